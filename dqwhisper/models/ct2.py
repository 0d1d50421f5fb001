"""CTranslate2 (faster-whisper) Whisper models <-> openai-whisper state dicts.

`model.bin` layout (ctranslate2 4.x, binary version 6, little-endian):
    u32 version | str spec name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dims | u8 dtype | u32 n_bytes | raw row-major bytes)
    u32 n_aliases | n_aliases x (str alias | str target)
where a str is a u16 length that counts a trailing NUL, then the bytes and the NUL. Variables are sorted by name.

Naming (CT2 -> openai): see `_layer_pairs`. The fused self-attention `linear_0` is q|k|v stacked by rows with a
zero key bias (openai's key projection has no bias: a key bias adds the same amount to every score of a query and
cancels in the softmax); the cross-attention `linear_1` is k|v. The output projection is tied to the token
embedding through the alias `decoder/projection/weight -> decoder/embeddings/weight`.

Quantized weights follow CTranslate2's convention: an int8 tensor `q` plus a float32 `<name>_scale` with one value
per output row (per output channel for convolutions), such that `w ~= q / scale` (scale = 127 / max|row|).

Pruned vocabularies (DQWhisper `decoder.vocab_keep`): CT2 needs every token id, so the exporter expands the
embedding with zero rows for pruned ids and writes a projection bias of `PRUNED_LOGIT` at those ids (0 elsewhere),
so CT2 never emits them; the pruned ids are also added to config.json's `suppress_ids`. Such a model is one-way:
`ct2_to_openai` refuses a projection bias.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor
from whisper.model import ModelDimensions, Whisper

from dqwhisper.utils import DQWhisperError, atomic_write_bytes, get_logger

log = get_logger(__name__)

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
PRUNED_LOGIT = -1.0e4  # projection bias at pruned token ids (representable in float16)

_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16,
                                    torch.bfloat16)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# rank-0 settings of the decoder that ctranslate2's WhisperSpec writes (values as in the shipped base model)
_DECODER_FLAGS: dict[str, tuple[torch.dtype, int]] = {
    "activation": (torch.int8, 3),  # GELU
    "alibi": (torch.int8, 0),
    "alignment_heads": (torch.int16, 1),
    "alignment_layer": (torch.int16, -1),
    "pre_norm": (torch.int8, 1),
    "scale_embeddings": (torch.int8, 0),
    "start_from_zero_embedding": (torch.int8, 0),
}
QUANTIZATIONS = (None, "float32", "float16", "int8", "int8_float32", "int8_float16")


@dataclass
class CT2ModelFile:
    """The contents of a model.bin: variables by name (any order; written sorted) and aliases (alias -> target)."""

    variables: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    spec: str = SPEC_NAME
    revision: int = SPEC_REVISION

    def get(self, name: str) -> Tensor | None:
        name = self.aliases.get(name, name)
        return self.variables.get(name)


@dataclass(frozen=True)
class Int8Weight:
    """A weight already quantized per output row: `w ~= q / scale` (CTranslate2's convention).

    q: int8 (rows, ...) ; scale: float32 (rows,). Holding a step size instead (w ~= q * step)? Use `from_step`.
    """

    q: Tensor
    scale: Tensor

    @classmethod
    def from_step(cls, q: Tensor, step: Tensor) -> "Int8Weight":
        return cls(q, 1.0 / step.float())

    def dequantize(self) -> Tensor:
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        return self.q.float() / self.scale.float().reshape(shape)


# ---------------------------------------------------------------------------------------------------- model.bin I/O

class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DQWhisperError(
                f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.data)} bytes"
            )
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"length of {what}")
        raw = self.take(n, what)
        if n == 0 or raw[-1:] != b"\0":
            raise DQWhisperError(f"{self.path} is corrupt: {what} at offset {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise DQWhisperError(f"{self.path} is corrupt: {what} at offset {self.pos - n} is not UTF-8") from e


def read_model_bin(path: str | Path) -> CT2ModelFile:
    """Parse a CTranslate2 model.bin. Errors name the file and the problem (missing, truncated, wrong version...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise DQWhisperError(f"CTranslate2 model file {path} does not exist")
    r = _Reader(path.read_bytes(), path)
    version = r.unpack("I", "the format version")
    if version != BINARY_VERSION:
        raise DQWhisperError(
            f"{path} has format version {version}, this reader knows version {BINARY_VERSION} "
            f"(not a CTranslate2 model.bin, or written by an unsupported ctranslate2)"
        )
    spec = r.string("the spec name")
    revision = r.unpack("I", "the spec revision")
    count = r.unpack("I", "the variable count")
    variables: dict[str, Tensor] = {}
    for i in range(count):
        name = r.string(f"the name of variable {i}")
        rank = r.unpack("B", f"the rank of {name}")
        shape = [r.unpack("I", f"the shape of {name}") for _ in range(rank)]
        type_id = r.unpack("B", f"the dtype of {name}")
        if type_id >= len(_DTYPES):
            raise DQWhisperError(f"{path} is corrupt: variable {name} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        n_bytes = r.unpack("I", f"the byte count of {name}")
        expected = torch.Size(shape).numel() * dtype.itemsize
        if n_bytes != expected:
            raise DQWhisperError(f"{path} is corrupt: variable {name} of shape {shape} and {dtype} "
                                 f"should take {expected} bytes, the file says {n_bytes}")
        raw = r.take(n_bytes, f"the data of {name}")
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    n_aliases = r.unpack("I", "the alias count")
    aliases = {}
    for i in range(n_aliases):
        alias = r.string(f"alias {i}")
        aliases[alias] = r.string(f"the target of alias {alias}")
        if aliases[alias] not in variables:
            raise DQWhisperError(f"{path} is corrupt: alias {alias} points to a missing variable {aliases[alias]}")
    if r.pos != len(r.data):
        raise DQWhisperError(f"{path} is corrupt: {len(r.data) - r.pos} unexpected bytes after the last alias")
    return CT2ModelFile(variables, aliases, spec, revision)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def model_bin_bytes(model: CT2ModelFile) -> bytes:
    out = io.BytesIO()
    out.write(struct.pack("<I", BINARY_VERSION) + _string(model.spec) + struct.pack("<I", model.revision))
    out.write(struct.pack("<I", len(model.variables)))
    for name in sorted(model.variables):
        t = model.variables[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise DQWhisperError(f"variable {name} has dtype {t.dtype}, which CTranslate2 cannot store")
        out.write(_string(name) + struct.pack("<B", t.ndim) + struct.pack(f"<{t.ndim}I", *t.shape))
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out.write(struct.pack("<BI", _DTYPES.index(t.dtype), len(raw)) + raw)
    out.write(struct.pack("<I", len(model.aliases)))
    for alias in sorted(model.aliases):
        out.write(_string(alias) + _string(model.aliases[alias]))
    return out.getvalue()


def write_model_bin(path: str | Path, model: CT2ModelFile) -> None:
    atomic_write_bytes(path, model_bin_bytes(model))


def join_parts(parts: list[str | Path], out: str | Path, expected_size: int | None = None) -> Path:
    """Concatenate a model.bin shipped in pieces (e.g. model.bin.part1 + part2), in the order given; atomic."""
    parts = [Path(p) for p in parts]
    for p in parts:
        if not p.is_file():
            raise DQWhisperError(f"part file {p} is missing: every part of {Path(out).name} is needed, in order "
                                 f"{[q.name for q in parts]}")
    total = sum(p.stat().st_size for p in parts)
    if expected_size is not None and total != expected_size:
        raise DQWhisperError(f"parts {[str(p) for p in parts]} add up to {total} bytes, expected {expected_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------------------------- name maps

def _layer_pairs(side: str, i: int) -> list[tuple[str, str]]:
    """(CT2 layer prefix, openai module prefix) pairs of the non-fused parts of layer i."""
    ct2, oa = f"{side}/layer_{i}", f"{side}.blocks.{i}"
    pairs = [
        (f"{ct2}/self_attention/linear_1", f"{oa}.attn.out"),
        (f"{ct2}/self_attention/layer_norm", f"{oa}.attn_ln"),
        (f"{ct2}/ffn/linear_0", f"{oa}.mlp.0"),
        (f"{ct2}/ffn/linear_1", f"{oa}.mlp.2"),
        (f"{ct2}/ffn/layer_norm", f"{oa}.mlp_ln"),
    ]
    if side == "decoder":
        pairs += [
            (f"{ct2}/attention/linear_0", f"{oa}.cross_attn.query"),
            (f"{ct2}/attention/linear_2", f"{oa}.cross_attn.out"),
            (f"{ct2}/attention/layer_norm", f"{oa}.cross_attn_ln"),
        ]
    return pairs


def _fused(side: str, i: int) -> list[tuple[str, list[str]]]:
    """(CT2 fused linear, openai linears stacked by rows in that order); the key has no bias in openai."""
    ct2, oa = f"{side}/layer_{i}", f"{side}.blocks.{i}"
    fused = [(f"{ct2}/self_attention/linear_0", [f"{oa}.attn.query", f"{oa}.attn.key", f"{oa}.attn.value"])]
    if side == "decoder":
        fused.append((f"{ct2}/attention/linear_1", [f"{oa}.cross_attn.key", f"{oa}.cross_attn.value"]))
    return fused


def _top_pairs() -> list[tuple[str, str]]:
    return [("encoder/conv1", "encoder.conv1"), ("encoder/conv2", "encoder.conv2"),
            ("encoder/layer_norm", "encoder.ln_post"), ("decoder/layer_norm", "decoder.ln")]


_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _is_norm(ct2_prefix: str) -> bool:
    return ct2_prefix.endswith("layer_norm")


def _count_layers(names, side: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise DQWhisperError(f"{side} layers {sorted(found)} are not numbered 0..N-1")
    return len(found)


# ---------------------------------------------------------------------------------------------------- CT2 -> openai

def _dequantized(model: CT2ModelFile, name: str, source: Path) -> Tensor:
    t = model.get(name)
    if t is None:
        raise DQWhisperError(f"{source} has no variable {name}: not a Whisper model of the expected layout")
    if t.dtype in _FLOATS:
        return t
    scale = model.get(name + "_scale")
    if scale is None:
        raise DQWhisperError(f"{source}: variable {name} is {t.dtype} without a {name}_scale")
    if scale.ndim == 0:
        return t.float() / scale.float()
    return Int8Weight(t, scale).dequantize()


def ct2_to_openai(ct2_dir: str | Path) -> tuple[ModelDimensions, dict[str, Tensor]]:
    """Read a CTranslate2 Whisper directory (or its model.bin) into openai-whisper dims + state_dict.

    Float weights keep their stored dtype (the shipped base is float16, so the state dict is float16, bit-exact);
    int8/int16 weights are dequantized to float32.
    """
    path = Path(ct2_dir)
    bin_path = path / "model.bin" if path.is_dir() or not path.name.endswith(".bin") else path
    if not path.exists():
        raise DQWhisperError(f"CTranslate2 model {path} does not exist")
    model = read_model_bin(bin_path)
    if model.spec != SPEC_NAME:
        raise DQWhisperError(f"{bin_path} holds a {model.spec}, not a {SPEC_NAME}")
    if model.revision != SPEC_REVISION:
        log.warning("%s has WhisperSpec revision %d; this reader was written for revision %d",
                    bin_path, model.revision, SPEC_REVISION)
    proj = model.aliases.get("decoder/projection/weight")
    if "decoder/projection/bias" in model.variables or (
            proj != "decoder/embeddings/weight" and "decoder/projection/weight" in model.variables):
        raise DQWhisperError(f"{bin_path} has an untied output projection or a projection bias (a pruned-vocabulary "
                             f"export?); openai-whisper ties the projection to the token embedding")
    get = lambda name: _dequantized(model, name, bin_path)  # noqa: E731

    sd: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(ct2_prefix: str, oa_prefix: str) -> None:
        for ct2_param in (("gamma", "beta") if _is_norm(ct2_prefix) else ("weight", "bias")):
            sd[f"{oa_prefix}.{_PARAM[ct2_param]}"] = get(f"{ct2_prefix}/{ct2_param}")
            used.update({f"{ct2_prefix}/{ct2_param}", f"{ct2_prefix}/{ct2_param}_scale"})

    n_enc = _count_layers(model.variables, "encoder")
    n_dec = _count_layers(model.variables, "decoder")
    for ct2_prefix, oa_prefix in _top_pairs():
        put(ct2_prefix, oa_prefix)
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            for ct2_prefix, oa_prefix in _layer_pairs(side, i):
                put(ct2_prefix, oa_prefix)
            for ct2_prefix, parts in _fused(side, i):
                weight, bias = get(ct2_prefix + "/weight"), get(ct2_prefix + "/bias")
                if weight.shape[0] % len(parts):
                    raise DQWhisperError(f"{bin_path}: {ct2_prefix}/weight has {weight.shape[0]} rows, "
                                         f"not a multiple of {len(parts)}")
                for part, w, b in zip(parts, weight.chunk(len(parts)), bias.chunk(len(parts))):
                    sd[part + ".weight"] = w.clone()
                    if not part.endswith(".key"):
                        sd[part + ".bias"] = b.clone()
                used.update(ct2_prefix + s for s in ("/weight", "/weight_scale", "/bias"))
    for ct2_name, oa_name in (("encoder/position_encodings/encodings", "encoder.positional_embedding"),
                              ("decoder/position_encodings/encodings", "decoder.positional_embedding"),
                              ("decoder/embeddings/weight", "decoder.token_embedding.weight")):
        sd[oa_name] = get(ct2_name)
        used.update({ct2_name, ct2_name + "_scale"})

    leftover = [n for n, t in model.variables.items() if n not in used and t.ndim > 0]
    if leftover:
        raise DQWhisperError(f"{bin_path} has variables this converter does not know: {leftover[:5]}")
    heads = {}
    for side in ("encoder", "decoder"):
        t = model.variables.get(f"{side}/num_heads")
        if t is None:
            raise DQWhisperError(f"{bin_path} has no variable {side}/num_heads")
        heads[side] = int(t)
    emb = sd["decoder.token_embedding.weight"]
    dims = ModelDimensions(
        n_mels=sd["encoder.conv1.weight"].shape[1],
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=sd["encoder.positional_embedding"].shape[1],
        n_audio_head=heads["encoder"],
        n_audio_layer=n_enc,
        n_vocab=emb.shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=emb.shape[1],
        n_text_head=heads["decoder"],
        n_text_layer=n_dec,
    )
    return dims, sd


def read_ct2_config(ct2_dir: str | Path) -> dict:
    path = Path(ct2_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DQWhisperError(f"{path} is not valid JSON: {e}") from e


def load_ct2_model(ct2_dir: str | Path) -> Whisper:
    """A CTranslate2 directory as an openai-whisper `Whisper` (float32, eval, alignment heads from config.json)."""
    dims, sd = ct2_to_openai(ct2_dir)
    model = Whisper(dims)
    model.load_state_dict(sd)
    heads = read_ct2_config(ct2_dir).get("alignment_heads") if Path(ct2_dir).is_dir() else None
    if heads:
        set_alignment_heads(model, heads)
    return model.eval()


def set_alignment_heads(model: Whisper, heads: list) -> None:
    mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[int(layer), int(head)] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)


# ---------------------------------------------------------------------------------------------------- openai -> CT2

def quantize_int8_rows(w: Tensor) -> Int8Weight:
    """Symmetric per-output-row int8 as ctranslate2's converter does it: scale = 127 / max|row|, q = rint(w * scale)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    amax = w2.abs().amax(dim=1)
    amax = torch.where(amax == 0, torch.full_like(amax, 127.0), amax)
    amax = amax.clamp(min=127.0 / torch.finfo(torch.float32).max)
    scale = 127.0 / amax
    q = torch.round(w2 * scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(w.shape)
    return Int8Weight(q, scale)


def _state_and_meta(model_or_ckpt) -> tuple[ModelDimensions, dict[str, Tensor], list[int] | None, list | None]:
    """(dims, float state_dict, vocab_keep, alignment heads) from a Whisper/DQWhisper, a checkpoint dict or a .pt
    path."""
    if isinstance(model_or_ckpt, (str, Path)):
        from dqwhisper.models.student import read_checkpoint

        model_or_ckpt = read_checkpoint(model_or_ckpt)
    if isinstance(model_or_ckpt, Whisper):
        m = model_or_ckpt
        keep = getattr(m.decoder, "vocab_keep", None)
        heads = m.alignment_heads.to_dense().nonzero().tolist() if m.alignment_heads is not None else None
        return m.dims, dict(m.state_dict()), None if keep is None else keep.tolist(), heads
    if isinstance(model_or_ckpt, Mapping) and "dims" in model_or_ckpt:
        dims = model_or_ckpt["dims"]
        dims = dims if isinstance(dims, ModelDimensions) else ModelDimensions(**dims)
        meta = model_or_ckpt.get("dqwhisper") or {}
        return dims, dict(model_or_ckpt["model_state_dict"]), meta.get("vocab_keep"), \
            model_or_ckpt.get("alignment_heads")
    raise DQWhisperError(f"cannot export a {type(model_or_ckpt).__name__}: expected a Whisper model, "
                         f"a checkpoint dict or a .pt path")


def _cast(t: Tensor, float_dtype: torch.dtype | None) -> Tensor:
    t = t.detach().cpu()
    if float_dtype is not None and t.dtype in _FLOATS:
        return t.to(float_dtype)
    return t


def openai_to_ct2_variables(dims: ModelDimensions, state_dict: Mapping[str, Tensor], *,
                            quantization: str | None = None,
                            int8_weights: Mapping[str, Int8Weight | tuple[Tensor, Tensor]] | None = None,
                            vocab_keep: list[int] | None = None) -> CT2ModelFile:
    """openai-whisper dims + state_dict -> CT2 variables.

    quantization: None keeps every float tensor's dtype; "float32"/"float16" cast floats; "int8" quantizes every
    linear, conv and embedding weight per row (others keep their dtype); "int8_float32"/"int8_float16" also cast
    the remaining floats. int8_weights: openai weight names (e.g. "decoder.blocks.0.mlp.0.weight") -> already
    quantized Int8Weight or (q, scale) with w ~= q / scale; they are written as given, whatever `quantization` says.
    The q|k|v (and cross k|v) of a layer must then be given all together (they are one fused CT2 matrix).
    vocab_keep: the kept token ids when the embedding rows are a pruned subset (see the module docstring).
    """
    if quantization not in QUANTIZATIONS:
        raise DQWhisperError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")
    float_dtype = {"float32": torch.float32, "int8_float32": torch.float32, "float16": torch.float16,
                   "int8_float16": torch.float16}.get(quantization)
    quantize_all = quantization is not None and quantization.startswith("int8")
    given = {k: v if isinstance(v, Int8Weight) else Int8Weight(*v) for k, v in (int8_weights or {}).items()}
    for k, v in given.items():
        if v.q.dtype != torch.int8 or v.scale.ndim != 1 or v.scale.shape[0] != v.q.shape[0]:
            raise DQWhisperError(f"int8 weight {k}: expected an int8 tensor and one float scale per row, got "
                                 f"{v.q.dtype} {tuple(v.q.shape)} and scale {tuple(v.scale.shape)}")
    unknown = sorted(set(given) - set(state_dict))
    if unknown:
        raise DQWhisperError(f"int8 weights given for names the model does not have: {unknown[:5]}")
    used: set[str] = set()

    def need(name: str) -> Tensor:
        if name not in state_dict:
            raise DQWhisperError(f"the model has no {name}: not an openai-whisper layout")
        used.add(name)
        return state_dict[name]

    variables: dict[str, Tensor] = {}

    def put_weight(ct2_name: str, oa_names: list[str], zero_bias_part: int | None = None) -> None:
        """Write CT2 `<ct2_name>` from the openai weights stacked by rows (quantizing where asked)."""
        if any(n in given for n in oa_names):
            missing = [n for n in oa_names if n not in given]
            if missing:
                raise DQWhisperError(f"int8 weights for {ct2_name} need all of {oa_names}; missing {missing}")
            parts = [given[n] for n in oa_names]
            for n in oa_names:
                used.add(n)
            variables[ct2_name] = torch.cat([p.q for p in parts]).contiguous()
            variables[ct2_name + "_scale"] = torch.cat([p.scale.float() for p in parts]).contiguous()
            return
        w = torch.cat([need(n) for n in oa_names]) if len(oa_names) > 1 else need(oa_names[0])
        if quantize_all:
            qw = quantize_int8_rows(w)
            variables[ct2_name], variables[ct2_name + "_scale"] = qw.q, qw.scale
        else:
            variables[ct2_name] = _cast(w, float_dtype).contiguous()

    def put_bias(ct2_name: str, oa_names: list[str], n_rows: list[int]) -> None:
        chunks = []
        for name, rows in zip(oa_names, n_rows):
            if name.endswith(".key.bias"):
                ref = state_dict[oa_names[-1]]
                chunks.append(torch.zeros(rows, dtype=ref.dtype))
            else:
                chunks.append(need(name))
        variables[ct2_name] = _cast(torch.cat(chunks), float_dtype).contiguous()

    def put_norm(ct2_prefix: str, oa_prefix: str) -> None:
        variables[ct2_prefix + "/gamma"] = _cast(need(oa_prefix + ".weight"), float_dtype)
        variables[ct2_prefix + "/beta"] = _cast(need(oa_prefix + ".bias"), float_dtype)

    def put_linear(ct2_prefix: str, oa_prefix: str) -> None:
        put_weight(ct2_prefix + "/weight", [oa_prefix + ".weight"])
        variables[ct2_prefix + "/bias"] = _cast(need(oa_prefix + ".bias"), float_dtype)

    for ct2_prefix, oa_prefix in _top_pairs():
        (put_norm if _is_norm(ct2_prefix) else put_linear)(ct2_prefix, oa_prefix)
    for side, n in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n):
            for ct2_prefix, oa_prefix in _layer_pairs(side, i):
                (put_norm if _is_norm(ct2_prefix) else put_linear)(ct2_prefix, oa_prefix)
            for ct2_prefix, parts in _fused(side, i):
                put_weight(ct2_prefix + "/weight", [p + ".weight" for p in parts])
                rows = [state_dict[p + ".weight"].shape[0] if p + ".weight" in state_dict
                        else given[p + ".weight"].q.shape[0] for p in parts]
                put_bias(ct2_prefix + "/bias", [p + ".bias" for p in parts], rows)
    variables["encoder/position_encodings/encodings"] = _cast(need("encoder.positional_embedding"), float_dtype)
    variables["decoder/position_encodings/encodings"] = _cast(need("decoder.positional_embedding"), float_dtype)

    emb_name = "decoder.token_embedding.weight"
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    if vocab_keep is None:
        put_weight("decoder/embeddings/weight", [emb_name])
    else:
        keep = torch.as_tensor(vocab_keep, dtype=torch.long)
        ref = given[emb_name].q if emb_name in given else need(emb_name)
        if ref.shape[0] != len(keep):
            raise DQWhisperError(f"the embedding has {ref.shape[0]} rows but vocab_keep lists {len(keep)} ids")
        used.add(emb_name)
        if emb_name in given:
            sub = given[emb_name]
            q = torch.zeros(dims.n_vocab, sub.q.shape[1], dtype=torch.int8)
            scale = torch.ones(dims.n_vocab, dtype=torch.float32)
            q[keep], scale[keep] = sub.q, sub.scale.float()
            variables["decoder/embeddings/weight"], variables["decoder/embeddings/weight_scale"] = q, scale
        else:
            full = torch.zeros(dims.n_vocab, ref.shape[1], dtype=ref.dtype)
            full[keep] = ref.detach().cpu()
            if quantize_all:
                qw = quantize_int8_rows(full)
                variables["decoder/embeddings/weight"], variables["decoder/embeddings/weight_scale"] = qw.q, qw.scale
            else:
                variables["decoder/embeddings/weight"] = _cast(full, float_dtype)
        float_ref = variables["decoder/position_encodings/encodings"]
        bias = torch.full((dims.n_vocab,), PRUNED_LOGIT, dtype=float_ref.dtype)
        bias[keep] = 0
        variables["decoder/projection/bias"] = bias

    variables["encoder/num_heads"] = torch.tensor(dims.n_audio_head, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(dims.n_text_head, dtype=torch.int16)
    for name, (dtype, value) in _DECODER_FLAGS.items():
        variables[f"decoder/{name}"] = torch.tensor(value, dtype=dtype)

    ignored = [k for k in state_dict if k not in used and not k.startswith(("ctc_head.", "decoder.vocab_keep",
                                                                          "decoder.full_to_sub"))]
    if ignored:
        log.warning("export ignores %d tensors that CTranslate2 has no place for: %s", len(ignored), ignored[:5])
    if any(k.startswith("ctc_head.") for k in state_dict):
        log.info("the CTC head is not exported (CTranslate2's Whisper has no CTC head)")
    return CT2ModelFile(variables, aliases)


# ------------------------------------------------------------------------------------------------ tokenizer files

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def whisper_tokenizer_for(dims: ModelDimensions):
    from whisper.tokenizer import get_tokenizer

    multilingual = dims.n_vocab >= 51865
    num_languages = dims.n_vocab - 51765 - int(multilingual)
    return get_tokenizer(multilingual, num_languages=num_languages)


def vocabulary_lines(dims: ModelDimensions) -> list[str]:
    """CT2's vocabulary.txt (one token per id) from openai-whisper's tiktoken vocabulary."""
    tok = whisper_tokenizer_for(dims)
    enc, table = tok.encoding, _byte_to_unicode()
    # HF's Whisper vocabularies (which faster-whisper's tokenizer.json follows) name the no-speech token nocaptions
    special = {i: s.replace("<|nospeech|>", "<|nocaptions|>") for s, i in enc._special_tokens.items()}
    lines = []
    for i in range(dims.n_vocab):
        if i in special:
            lines.append(special[i])
        elif i < enc.n_vocab:
            lines.append("".join(table[b] for b in enc.decode_single_token_bytes(i)))
        else:
            lines.append(f"<|{(i - tok.timestamp_begin) * 0.02:.2f}|>")
    if len(set(lines) - {""}) != len(lines) - lines.count(""):
        raise DQWhisperError(f"vocabulary for n_vocab={dims.n_vocab} has duplicate tokens")
    return lines


def whisper_config(dims: ModelDimensions, alignment_heads: list | None,
                   extra_suppress: list[int] | None = None) -> dict:
    """config.json as faster-whisper / CTranslate2 read it."""
    tok = whisper_tokenizer_for(dims)
    suppress = set(tok.non_speech_tokens) | {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm,
                                              tok.no_speech}
    suppress |= set(extra_suppress or [])
    if alignment_heads is None:
        alignment_heads = [[layer, head] for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
                           for head in range(dims.n_text_head)]
    return {
        "alignment_heads": [[int(a), int(b)] for a, b in alignment_heads],
        "lang_ids": sorted(tok.all_language_tokens),
        "suppress_ids": sorted(int(i) for i in suppress),
        "suppress_ids_begin": [tok.encode(" ")[0], tok.eot],
    }


def find_tokenizer_dir(dims: ModelDimensions, candidates: list[Path]) -> Path | None:
    """The first candidate CT2 dir with a tokenizer.json whose vocabulary.txt has this model's size and the same
    byte-level tokens (special-token spellings differ between HF releases, e.g. <|iw|> / <|he|>)."""
    want = vocabulary_lines(dims)
    n_text = whisper_tokenizer_for(dims).eot
    for d in candidates:
        vocab, tj = Path(d) / "vocabulary.txt", Path(d) / "tokenizer.json"
        if not (vocab.is_file() and tj.is_file()):
            continue
        lines = vocab.read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        if len(lines) == len(want) and lines[:n_text] == want[:n_text]:
            return Path(d)
    return None


def openai_to_ct2(model_or_ckpt, out_dir: str | Path, quantization: str | None = None, *,
                  int8_weights: Mapping[str, Int8Weight | tuple[Tensor, Tensor]] | None = None,
                  tokenizer_dir: str | Path | None = None, alignment_heads: list | None = None) -> Path:
    """Write a faster-whisper model directory: model.bin, config.json, vocabulary.txt, tokenizer.json.

    model_or_ckpt: a Whisper / DQWhisper, a checkpoint dict or a .pt path. tokenizer.json + vocabulary.txt
    (faster-whisper reads tokenizer.json; without it, it downloads one) are copied from `tokenizer_dir`, else from a
    CT2 dir in the model store whose vocabulary matches (base-ct2, tiny.en-ct2); else vocabulary.txt is generated
    from openai-whisper's tokenizer and tokenizer.json is left out, with a warning.
    """
    dims, sd, keep, heads = _state_and_meta(model_or_ckpt)
    ct2 = openai_to_ct2_variables(dims, sd, quantization=quantization, int8_weights=int8_weights, vocab_keep=keep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_model_bin(out / "model.bin", ct2)
    pruned = sorted(set(range(dims.n_vocab)) - set(keep)) if keep is not None else None
    config = whisper_config(dims, alignment_heads or heads, pruned)
    atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    if tokenizer_dir is None:
        from dqwhisper.models.load import model_store

        store = model_store()
        tokenizer_dir = find_tokenizer_dir(dims, [store / "base-ct2", store / "tiny.en-ct2"])
    if tokenizer_dir is None:
        log.warning("no tokenizer.json for n_vocab=%d found (looked in the model store); faster-whisper will try "
                    "to download one", dims.n_vocab)
        atomic_write_bytes(out / "vocabulary.txt", ("\n".join(vocabulary_lines(dims)) + "\n").encode("utf-8"))
    else:
        for name in ("tokenizer.json", "vocabulary.txt"):
            src = Path(tokenizer_dir) / name
            if not src.is_file():
                raise DQWhisperError(f"tokenizer file {src} does not exist")
            if src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    log.info("wrote CTranslate2 model %s (%.1f MB, quantization %s)", out, (out / "model.bin").stat().st_size / 1e6,
             quantization or "none")
    return out
