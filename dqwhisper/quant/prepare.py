"""prepare (swap float modules for fake-quantized ones, by scope) and convert (fake-quantized -> real low-bit).

Scopes name module prefixes: `decoder` = every Linear under `decoder.` plus `decoder.token_embedding` (when
`quant.embedding`); `encoder` = every Linear under `encoder.`, its Conv1d layers (when `quant.conv`) and the CTC head;
`all` = both. `include` regexes narrow that set (a module must match one), `exclude` regexes remove from it.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from dqwhisper.quant.config import QuantConfig, module_bits, resolve_config
from dqwhisper.quant.fake_quant import (
    FAKE_QUANTIZED_TYPES,
    ActivationFakeQuantizer,
    FakeQuantizedConv1d,
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    GROUPED,
    QuantSpec,
    WeightFakeQuantizer,
)
from dqwhisper.quant.quantized import (
    QUANTIZED_TYPES,
    QuantizedConv1d,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    select_kernels,
)
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)
EMBEDDING_NAME = "decoder.token_embedding"


def _in_scope(name: str, scope: str) -> bool:
    dec = name.startswith("decoder.")
    enc = name.startswith("encoder.") or name == "ctc_head" or name.startswith("ctc_head.")
    return {"decoder": dec, "encoder": enc, "all": dec or enc}[scope]


def select_modules(model: nn.Module, cfg: QuantConfig) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every float module that `cfg` quantizes, in model order."""
    include = [re.compile(p) for p in cfg.include]
    exclude = [re.compile(p) for p in cfg.exclude]
    for name, module in model.named_modules():
        if isinstance(module, FAKE_QUANTIZED_TYPES + QUANTIZED_TYPES):
            continue
        if isinstance(module, nn.Embedding):
            wanted = name == EMBEDDING_NAME and cfg.embedding
        elif isinstance(module, nn.Conv1d):
            wanted = cfg.conv
        else:
            wanted = isinstance(module, nn.Linear)
        if not wanted or not _in_scope(name, cfg.scope):
            continue
        if include and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        yield name, module


def weight_spec(cfg: QuantConfig, module: nn.Module, name: str = "") -> QuantSpec:
    w = cfg.weight
    bits, granularity = w.bits, w.granularity
    group_size = w.group_size
    if isinstance(module, nn.Embedding):
        bits = cfg.embedding_bits if cfg.embedding_bits is not None else bits
        granularity = cfg.embedding_granularity or granularity
        group_size = cfg.embedding_group_size or group_size
    bits = module_bits(cfg, name) or bits
    if isinstance(module, nn.Conv1d) and granularity.startswith("ggml_"):
        raise DQWhisperError("ggml keeps the convolution kernels in f16: set quant.conv=false")
    if isinstance(module, nn.Conv1d) and granularity in GROUPED:
        granularity = "per_channel"  # a kernel's taps x input channels do not form natural groups
    return QuantSpec(
        bits=bits,
        symmetric=w.symmetric,
        granularity=granularity,
        group_size=group_size if granularity in GROUPED else (32 if granularity.startswith("ggml_") else 0),
    )


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prepare(model: nn.Module, cfg: QuantConfig | Any) -> nn.Module:
    """Swap the modules `cfg` names for fake-quantized ones, in place; set `model.quant_config` (a plain dict) so a
    checkpoint rebuilds the same model. Call it on the float weights the quantizers should start from (LSQ scales
    are initialised from them). Returns the model."""
    cfg = resolve_config(cfg)
    if not cfg.enabled:
        log.info("quant.enabled is false: model left in float")
        return model
    if any(isinstance(m, FAKE_QUANTIZED_TYPES + QUANTIZED_TYPES) for m in model.modules()):
        raise DQWhisperError("prepare: the model is already quantized (prepare it once, from float)")
    chosen = list(select_modules(model, cfg))
    if not chosen:
        raise DQWhisperError(
            f"prepare: quant config (scope={cfg.scope}, include={cfg.include}, "
            f"exclude={cfg.exclude}) selects no module of this model"
        )
    specs = [(name, module, weight_spec(cfg, module, name)) for name, module in chosen]
    for name, module, spec in specs:  # check every shape before changing anything
        spec.grouped_shape(tuple(module.weight.shape), name)
    for name, module, spec in specs:
        hi_bits = cfg.embedding_hi_bits if cfg.embedding_hi_rows and isinstance(module, nn.Embedding) else None
        wfq = WeightFakeQuantizer(
            spec, module.weight, lsq=cfg.weight.lsq, scale_init=cfg.weight.scale_init, name=name, hi_bits=hi_bits
        )
        wfq.to(module.weight.device)
        afq = ActivationFakeQuantizer(cfg.activation.bits) if cfg.activation.enabled else None
        if isinstance(module, nn.Embedding):
            new = FakeQuantizedEmbedding(module, wfq, afq)
        elif isinstance(module, nn.Conv1d):
            new = FakeQuantizedConv1d(module, wfq)
        else:
            new = FakeQuantizedLinear(module, wfq, afq)
        new.train(module.training)
        set_module(model, name, new)
    model.quant_config = cfg.to_dict()
    other = {name: spec.bits for name, _, spec in specs if spec.bits != cfg.weight.bits}
    if other:
        log.info("prepare: %d modules at other bit widths: %s", len(other), other)
    log.info(
        "prepare: %d modules fake-quantized (%d-bit %s%s, scope %s)",
        len(specs),
        cfg.weight.bits,
        cfg.weight.granularity,
        " LSQ" if cfg.weight.lsq else "",
        cfg.scope,
    )
    return model


def widen_embedding_rows(model: nn.Module, order: Tensor, cfg: QuantConfig | Any) -> int:
    """Give the first `quant.embedding_hi_rows` ids of `order` (most used first) `quant.embedding_hi_bits` in the
    fake-quantized token embedding of a model just prepared (before training or GPTQ); returns how many."""
    cfg = resolve_config(cfg)
    emb = model.get_submodule(EMBEDDING_NAME)
    wfq = getattr(emb, "weight_fake_quantizer", None)
    if wfq is None or wfq.row_bits is None:
        raise DQWhisperError(f"{EMBEDDING_NAME} has no rows to widen (prepare with quant.embedding_hi_rows > 0)")
    n = min(cfg.embedding_hi_rows, len(order))
    wfq.set_hi_rows(order[:n])
    log.info(
        "token embedding: the %d most used rows at %d bits, the other %d at %d",
        n,
        cfg.embedding_hi_bits,
        len(wfq.row_bits) - n,
        wfq.spec.bits,
    )
    return n


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FAKE_QUANTIZED_TYPES)]


def quantize_module_weight(module: nn.Module) -> QuantizedTensor:
    """The codes/scales a fake-quantized module's forward uses, as a QuantizedTensor."""

    wfq = module.weight_fake_quantizer
    with torch.no_grad():
        q, s, z = wfq.codes(module.weight)
        row = wfq.row_scale()
    return QuantizedTensor.from_float_codes(q, s, z, wfq.spec, tuple(module.weight.shape), row, wfq.row_bits)


def convert(model: nn.Module, mode: str = "dequant", batch: int = 1) -> nn.Module:
    """Replace every fake-quantized module by its real low-bit form (integer codes + scales), in place.
    mode: a kernel request (quantized.MODES): "dequant"/"float" reproduces the fake-quant forward exactly, "int8"/"auto"
    picks the fastest kernel per shape for `batch` utterances per call (kernels.py)."""
    mods = quantized_modules(model)
    if not mods:
        raise DQWhisperError("convert: the model has no fake-quantized module (call prepare first)")
    for name, module in mods:
        qt = quantize_module_weight(module)
        device = module.weight.device
        if isinstance(module, FakeQuantizedEmbedding):
            new = QuantizedEmbedding(qt, mode, name, act_quant=module.activation_fake_quantizer is not None)
        elif isinstance(module, FakeQuantizedConv1d):
            new = QuantizedConv1d(qt, module.bias, module, mode, name)
        else:
            new = QuantizedLinear(qt, module.bias, mode, name, act_quant=module.activation_fake_quantizer is not None)
        set_module(model, name, new.to(device))
    select_kernels(model, batch=batch)
    return model
