"""Quantization settings (config group `quant/`). Owned by the quantization package; the trainer only passes it on.

`resolve_config` turns a QuantConfig, an omegaconf DictConfig or a plain dict into a validated QuantConfig; every
entry point of the package (prepare, ptq, export) goes through it, so a bad setting fails before any work.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from dqwhisper.utils import DQWhisperError
from dqwhisper.quant.fake_quant import INT8_GROUP_MAX_BITS

SCOPES = ("decoder", "encoder", "all")
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_group_int8", "ggml_q4_0", "ggml_q5_0", "ggml_q8_0")
GPTQ_GRANULARITIES = ("per_channel", "per_group", "per_group_int8")
GGML_BITS = {"ggml_q4_0": 4, "ggml_q5_0": 5, "ggml_q8_0": 8}  # ggml's block formats (blocks of 32, its scale rule)
SCALE_INITS = ("minmax", "mse")
MIN_BITS, MAX_BITS = 2, 8


@dataclass
class WeightQuantConfig:
    bits: int = 8  # 2..8
    symmetric: bool = True  # symmetric (zero point 0) or asymmetric (integer zero point per scale)
    granularity: str = "per_channel"  # per_tensor | per_channel (per output row) | per_group | per_group_int8 (group
    # scales = integer multiples of a row scale: runs on the int8 kernels exactly; LSQ, <= 6 bits) | ggml_q4_0/q5_0/q8_0
    group_size: int = 64  # with per_group(_int8): consecutive input columns sharing one scale
    lsq: bool = False  # learnable step size (LSQ, Esser et al. 2020) instead of a scale recomputed from the weights
    scale_init: str = "mse"  # LSQ init: minmax (no clipping) | mse (clipping ratio with the least squared error)


@dataclass
class ActivationQuantConfig:
    enabled: bool = False  # 8-bit per-token dynamic symmetric fake quantization of the inputs of quantized linears
    bits: int = 8


@dataclass
class QuantConfig:
    enabled: bool = False
    scope: str = "decoder"  # decoder (the paper) | encoder (encoder + CTC head) | all
    include: list[str] = field(default_factory=list)  # regexes (re.search) on module names, narrowing the scope
    exclude: list[str] = field(default_factory=list)  # regexes on module names to leave in float
    embedding: bool = True  # quantize the token embedding (and so the tied output projection) when in scope
    embedding_bits: int | None = None  # bits of the token embedding; None: weight.bits
    embedding_granularity: str | None = None  # of the token embedding (its rows = the projection's output
    # channels); None: weight.granularity. per_group splits each row into embedding_group_size columns
    embedding_group_size: int | None = None  # None: weight.group_size
    embedding_hi_rows: int = 0  # this many token-embedding rows, those used most on the training audio (ranked by
    # the float student: top-16 logits and targets on the calibration utterances), get embedding_hi_bits; needs the
    # embedding in per_group_int8 (the rows stay int8 rows: the kernels are unchanged)
    embedding_hi_bits: int = 5  # bits of those rows: above the embedding's bits, at most 6
    embedding_rank_utts: int = 256  # training utterances the rows are ranked on (evenly spaced; 0: all)
    module_bits: list[str] = field(default_factory=list)  # "REGEX=BITS": modules whose name matches (re.search;
    # the first entry that matches wins, over embedding_bits too) get BITS instead, e.g. "encoder\\.conv=8"
    conv: bool = True  # quantize the encoder's Conv1d layers when the encoder is in scope (per output channel)
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    ptq: bool = False  # post-training quantization of a float student: quantize, no training
    gptq: bool = False  # GPTQ rounding of every quantized linear and convolution, calibrated on training audio
    # (symmetric per-channel/group only): final for frozen weights and PTQ, the starting point for weights that train
    gptq_utts: int = 32  # calibration utterances for GPTQ, evenly spaced over the training set
    gptq_act_order: bool = False  # GPTQ rounds the input columns in order of decreasing Hessian diagonal (the inputs
    # with the most energy first, so their error spreads onto the rest); the scales stay those set before GPTQ

    def to_dict(self) -> dict:
        return asdict(self)


def _plain(cfg: Any) -> Any:
    try:
        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for users of the package alone
        pass
    return cfg


def _build(cls, values: Mapping, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DQWhisperError(f"quant config: unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        if name == "weight":
            value = value if isinstance(value, WeightQuantConfig) else _build(WeightQuantConfig, value, "quant.weight")
        elif name == "activation":
            value = (
                value
                if isinstance(value, ActivationQuantConfig)
                else _build(ActivationQuantConfig, value, "quant.activation")
            )
        elif name in ("include", "exclude", "module_bits"):
            value = [] if value is None else list(value)
        kwargs[name] = value
    return cls(**kwargs)


def _check_bits(bits: Any, key: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise DQWhisperError(f"quant config: {key} = {bits!r}, must be an integer from {MIN_BITS} to {MAX_BITS}")


def validate(cfg: QuantConfig) -> QuantConfig:
    """Raise DQWhisperError naming the key for any setting the quantizer cannot honour."""

    w = cfg.weight
    _check_bits(w.bits, "quant.weight.bits")
    if cfg.embedding_bits is not None:
        _check_bits(cfg.embedding_bits, "quant.embedding_bits")
    if cfg.scope not in SCOPES:
        raise DQWhisperError(f"quant config: quant.scope = {cfg.scope!r}, must be one of {list(SCOPES)}")
    if cfg.embedding_granularity is not None and cfg.embedding_granularity not in GRANULARITIES:
        raise DQWhisperError(
            f"quant config: quant.embedding_granularity = {cfg.embedding_granularity!r}, must be null or one of "
            f"{list(GRANULARITIES)}"
        )
    if (
        cfg.embedding_granularity is not None
        and (cfg.embedding_granularity in GGML_BITS or w.granularity in GGML_BITS)
        and cfg.embedding_granularity != w.granularity
    ):
        raise DQWhisperError("quant config: quant.embedding_granularity: a ggml file has one type")
    if cfg.embedding_group_size is not None and (
        isinstance(cfg.embedding_group_size, bool)
        or not isinstance(cfg.embedding_group_size, int)
        or cfg.embedding_group_size < 2
    ):
        raise DQWhisperError(
            f"quant config: quant.embedding_group_size = {cfg.embedding_group_size!r}, must be null or an integer >= 2"
        )
    if w.granularity not in GRANULARITIES:
        raise DQWhisperError(
            f"quant config: quant.weight.granularity = {w.granularity!r}, must be one of {list(GRANULARITIES)}"
        )
    for gran, bits, where in (
        (w.granularity, w.bits, "quant.weight.granularity"),
        (cfg.embedding_granularity, cfg.embedding_bits or w.bits, "quant.embedding_granularity"),
    ):
        if gran == "per_group_int8" and (bits > INT8_GROUP_MAX_BITS or not w.symmetric or not w.lsq):
            raise DQWhisperError(
                f"quant config: {where} = per_group_int8 needs symmetric LSQ weights of at most "
                f"{INT8_GROUP_MAX_BITS} bits (got {bits}-bit, symmetric {w.symmetric}, lsq {w.lsq})"
            )
    for key in ("embedding_hi_rows", "embedding_rank_utts"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DQWhisperError(f"quant config: quant.{key} = {value!r}, must be an integer >= 0")
    if cfg.embedding_hi_rows:
        low = cfg.embedding_bits or w.bits
        if (cfg.embedding_granularity or w.granularity) != "per_group_int8":
            raise DQWhisperError(
                "quant config: quant.embedding_hi_rows needs the embedding in per_group_int8 (got "
                f"{cfg.embedding_granularity or w.granularity})"
            )
        if not isinstance(cfg.embedding_hi_bits, int) or not low < cfg.embedding_hi_bits <= INT8_GROUP_MAX_BITS:
            raise DQWhisperError(
                f"quant config: quant.embedding_hi_bits = {cfg.embedding_hi_bits!r}, must be above the embedding's "
                f"{low} bits and at most {INT8_GROUP_MAX_BITS}"
            )
    if w.granularity in ("per_group", "per_group_int8") and (
        isinstance(w.group_size, bool) or not isinstance(w.group_size, int) or w.group_size < 2
    ):
        raise DQWhisperError(f"quant config: quant.weight.group_size = {w.group_size!r}, must be an integer >= 2")
    if w.granularity in GGML_BITS:
        if w.bits != GGML_BITS[w.granularity] or not w.symmetric or w.lsq:
            raise DQWhisperError(
                f"quant config: quant.weight.granularity = {w.granularity} is ggml's own rule: "
                f"it needs quant.weight.bits = {GGML_BITS[w.granularity]}, symmetric = true, "
                "lsq = false "
                f"(got bits {w.bits}, symmetric {w.symmetric}, lsq {w.lsq})"
            )
        if cfg.embedding_bits not in (None, w.bits):
            raise DQWhisperError(
                f"quant config: quant.embedding_bits = {cfg.embedding_bits}: a ggml file stores the "
                f"token embedding in its one type ({w.granularity})"
            )
        if cfg.conv and cfg.scope != "decoder":
            raise DQWhisperError(
                "quant config: ggml keeps the convolution kernels in f16; set quant.conv=false with "
                f"quant.weight.granularity = {w.granularity}"
            )
    if cfg.gptq and (not w.symmetric or not w.lsq or w.granularity not in GPTQ_GRANULARITIES):
        raise DQWhisperError(
            "quant config: quant.gptq = true needs symmetric per_channel or per_group weights with stored (LSQ) "
            f"scales (got symmetric {w.symmetric}, lsq {w.lsq}, granularity {w.granularity}): min/max scales move "
            "with the rounded weights"
        )
    if cfg.gptq and (isinstance(cfg.gptq_utts, bool) or not isinstance(cfg.gptq_utts, int) or cfg.gptq_utts < 1):
        raise DQWhisperError(f"quant config: quant.gptq_utts = {cfg.gptq_utts!r}, must be an integer >= 1")
    if w.scale_init not in SCALE_INITS:
        raise DQWhisperError(
            f"quant config: quant.weight.scale_init = {w.scale_init!r}, must be one of {list(SCALE_INITS)}"
        )
    if cfg.activation.enabled and cfg.activation.bits != 8:
        raise DQWhisperError(
            f"quant config: quant.activation.bits = {cfg.activation.bits!r}; only 8-bit "
            "activations are supported (the int8 kernels need them)"
        )
    for entry in cfg.module_bits:
        pattern, sep, bits = str(entry).rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise DQWhisperError(f"quant config: quant.module_bits entry {entry!r} is not REGEX=BITS")
        _check_bits(int(bits), f"quant.module_bits[{entry!r}]")
        if w.granularity in GGML_BITS and int(bits) != w.bits:
            raise DQWhisperError(f"quant config: quant.module_bits entry {entry!r}: a ggml file has one type")
    for key in ("include", "exclude"):
        for pattern in getattr(cfg, key):
            try:
                re.compile(pattern)
            except re.error as e:
                raise DQWhisperError(f"quant config: quant.{key} pattern {pattern!r} is not a regex: {e}") from e
    for entry in cfg.module_bits:
        pattern = entry.rpartition("=")[0]
        try:
            re.compile(pattern)
        except re.error as e:
            raise DQWhisperError(f"quant config: quant.module_bits pattern {pattern!r} is not a regex: {e}") from e
    return cfg


def module_bits(cfg: QuantConfig, name: str) -> int | None:
    """The bits `quant.module_bits` gives module `name` (the first matching entry), or None."""
    for entry in cfg.module_bits:
        pattern, _, bits = entry.rpartition("=")
        if re.search(pattern, name):
            return int(bits)
    return None


def resolve_config(cfg: QuantConfig | Mapping | Any) -> QuantConfig:
    """QuantConfig | DictConfig | dict -> validated QuantConfig (a copy; the input is not changed)."""
    if isinstance(cfg, QuantConfig):
        return validate(_build(QuantConfig, asdict(cfg), "quant"))
    cfg = _plain(cfg)
    if not isinstance(cfg, Mapping):
        raise DQWhisperError(f"quant config must be a QuantConfig, DictConfig or dict, got {type(cfg).__name__}")
    return validate(_build(QuantConfig, dict(cfg), "quant"))


def register_configs() -> None:
    """Register the schema for Hydra's `quant` group (a key typo in conf/quant/*.yaml is then an error)."""

    ConfigStore.instance().store(group="quant", name="quant_schema", node=QuantConfig)
