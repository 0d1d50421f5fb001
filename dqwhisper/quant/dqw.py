"""The compact export file `model.dqw`: writer (`export_model`) and loader (`load_exported`).

Layout (little-endian):
    b"DQW1" | u64 header length | header (UTF-8 JSON) | zero padding to a multiple of 64 | data
Every tensor's bytes lie in `data` at the header's `offset` (from the start of data, 64-byte aligned) and `nbytes`.
Header: `format`, `version`, `dims` (ModelDimensions), `quant` (the QuantConfig dict or null), `ctc_units`,
`float_dtype`, `tokenizer` (multilingual, num_languages, languages the student was trained for, task),
`encoder_positional` ("sinusoids": regenerated on load, not stored | "sinusoids_float16": the same, rounded to
float16 | "sinusoids64_float16": computed in float64, then rounded to float16, as the teachers converted from
CTranslate2's float16 files hold them | "stored"), `vocab_keep` / `bpe_model` (tensor
names or null), `source`, `data_nbytes` and `data_sha256` (the data section's size and SHA-256: a truncated or damaged
file is one error naming it; version 1 files have neither and are only bounds-checked), and `tensors`: name -> entry.
- float entry: {"kind": "float", "dtype": "float16"|"float32", "shape"} — every non-quantized float tensor.
- int entry: {"kind": "int", "dtype": "int32"|"uint8", "shape"} — vocab_keep, the sentencepiece model bytes.
- quantized entry (name = module name): {"kind": "quantized", "module": "linear"|"embedding"|"conv1d", "shape",
  "bits", "symmetric", "granularity", "group_size", "act_quant", "codes": {offset, nbytes} (codes - qmin, bit-packed,
  see packing.py), "scale": {offset, nbytes, shape (A, B)} float16, "zero": {offset, nbytes} uint8 or null}.
  per_group_int8 entries store the row scales as "scale" (shape (A, 1)) and "multiplier": {offset, nbytes, bits,
  shape (A, B)}, the group multipliers - 1 bit-packed: the group scales are row scale * multiplier.
  Mixed row widths (per_group_int8) add "row_bits": {offset, nbytes, hi} (1 bit per row: the row has `hi` bits, not
  `bits`) and "codes_hi": {offset, nbytes} (the wide rows' codes + 2^(hi - 1), in row order); "codes" then holds the
  narrow rows only.
The module's bias, if any, is a separate float entry `<name>.bias`.

Loading rebuilds a DQWhisper (whisper.decode runs on it) with QuantizedLinear/Embedding/Conv1d modules:
mode "dequant" is the exact reference (equals the fake-quant forward bit for bit when the float tensors are stored in
float32; with float16 storage, equal to a fake-quant model whose float tensors are rounded to float16), mode "int8"
(= "auto") runs the fastest kernel per shape that computes what was trained, or a named backend (kernels.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from whisper.model import ModelDimensions, sinusoids

from dqwhisper.quant.fake_quant import FAKE_QUANTIZED_TYPES, FakeQuantizedConv1d, FakeQuantizedEmbedding, QuantSpec
from dqwhisper.quant.packing import pack_codes, unpack_codes
from dqwhisper.models.student import DQWhisper
from dqwhisper.quant.prepare import quantize_module_weight, set_module
from dqwhisper.quant.quantized import (
    QUANTIZED_TYPES,
    QuantizedConv1d,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    select_kernels,
)
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, get_logger

log = get_logger(__name__)
MAGIC = b"DQW1"
FORMAT = "dqwhisper-export"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no data_nbytes / data_sha256
ALIGN = 64
FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SKIP_BUFFERS = ("decoder.full_to_sub", "decoder.vocab_keep", "encoder.positional_embedding")


class _Blob:
    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> dict:
        pad = (-self.size) % ALIGN
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        entry = {"offset": self.size, "nbytes": len(data)}
        self.parts.append(data)
        self.size += len(data)
        return entry


def quantized_parts(entry: dict) -> list[dict]:
    """The {offset, nbytes} parts of a quantized entry: codes, scales and those present of zero points, group
    multipliers, wide rows' codes and row flags."""
    keys = ("codes", "scale", "zero", "multiplier", "codes_hi", "row_bits")
    return [entry[k] for k in keys if entry.get(k) is not None]


def sinusoids64(length: int, channels: int) -> Tensor:
    """whisper.model.sinusoids computed in float64 (float64 out): rounded to float16, the table CTranslate2's
    float16 Whisper files hold, which float32's rounding misses in about 0.6% of the entries."""
    step = np.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, (FakeQuantizedEmbedding, QuantizedEmbedding)):
        return "embedding"
    if isinstance(module, (FakeQuantizedConv1d, QuantizedConv1d)):
        return "conv1d"
    return "linear"


def _quantized_entry(qt: QuantizedTensor, kind: str, act_quant: bool, blob: _Blob) -> dict:
    spec = qt.spec
    unsigned = (qt.codes.to(torch.int16) - spec.qmin).to(torch.uint8).numpy()
    entry = {
        "kind": "quantized",
        "module": kind,
        "shape": list(qt.shape),
        "bits": spec.bits,
        "symmetric": spec.symmetric,
        "granularity": spec.granularity,
        "group_size": spec.group_size,
        "act_quant": act_quant,
    }
    if qt.row_bits is None:
        entry["codes"] = blob.add(pack_codes(unsigned, spec.bits))
    else:  # two widths: the narrow rows' codes, then the wide rows' at their own width, and a 1-bit row flag
        widths = sorted(set(qt.row_bits.tolist()))
        if widths[0] != spec.bits or len(widths) > 2:
            raise DQWhisperError(f"mixed row widths {widths}: the file stores {spec.bits} bits and at most one other")
        hi_bits = widths[-1]
        wide = (qt.row_bits == hi_bits).numpy() if hi_bits != spec.bits else np.zeros(len(qt.row_bits), bool)
        hi_unsigned = (qt.codes[torch.from_numpy(wide)].to(torch.int16) + 2 ** (hi_bits - 1)).to(torch.uint8).numpy()
        entry["codes"] = blob.add(pack_codes(unsigned[~wide], spec.bits))
        entry["codes_hi"] = blob.add(pack_codes(hi_unsigned, hi_bits))
        entry["row_bits"] = {**blob.add(pack_codes(wide.astype(np.uint8), 1)), "hi": hi_bits}
    scale = qt.scale
    if qt.row_scale is not None:
        mult = qt.multipliers()
        bits = max(1, (spec.max_multiple - 1).bit_length())
        packed = pack_codes((mult - 1).to(torch.uint8).numpy(), bits)
        entry["multiplier"] = {**blob.add(packed), "bits": bits, "shape": list(mult.shape)}
        scale = qt.row_scale
    scale16 = scale.to(torch.float16)
    if not torch.equal(scale16.float(), scale.float()):
        raise DQWhisperError("a quantization scale is not float16-representable (not from this package's quantizer?)")
    entry["scale"] = {**blob.add(_tensor_bytes(scale16)), "shape": list(scale.shape)}
    entry["zero"] = None if qt.zero is None else blob.add(_tensor_bytes(qt.zero.to(torch.uint8)))
    return entry


def _languages(model: nn.Module, config: dict | None) -> list[str] | None:
    langs = None
    if isinstance(config, dict):
        langs = (config.get("data") or {}).get("languages")
    return list(langs) if langs else None


def export_model(
    model: nn.Module,
    path: str | Path,
    float_dtype: str = "float16",
    config: dict | None = None,
    source: dict | None = None,
) -> dict:
    """Write a (fake-quantized, converted or float) DQWhisper to `path`; returns the header."""
    if float_dtype not in FLOAT_DTYPES:
        raise DQWhisperError(f"float_dtype {float_dtype!r}: use one of {list(FLOAT_DTYPES)}")
    blob = _Blob()
    tensors: dict[str, Any] = {}
    covered: set[str] = set()
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, FAKE_QUANTIZED_TYPES):
            qt = quantize_module_weight(module)
            act = getattr(module, "activation_fake_quantizer", None) is not None
        elif isinstance(module, QUANTIZED_TYPES):
            qt, act = module.quantized_tensor(), bool(getattr(module, "act_quant", False))
        else:
            continue
        tensors[name] = _quantized_entry(qt, _module_kind(module), act, blob)
        covered.update(k for k in state if k.startswith(name + ".") and not k.endswith(".bias"))
    dims = model.dims
    enc_pos = "stored"
    pos = state.get("encoder.positional_embedding")
    if pos is not None:
        table = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
        if torch.equal(pos.float().cpu(), table):
            enc_pos = "sinusoids"
        elif torch.equal(pos.float().cpu(), table.half().float()):
            enc_pos = "sinusoids_float16"
        elif torch.equal(pos.float().cpu(), sinusoids64(dims.n_audio_ctx, dims.n_audio_state).half().float()):
            enc_pos = "sinusoids64_float16"
    for key, value in state.items():
        stored_pos = key == "encoder.positional_embedding" and enc_pos == "stored"
        if key in covered or (key in SKIP_BUFFERS and not stored_pos):
            continue
        if not torch.is_floating_point(value):
            raise DQWhisperError(f"export: unexpected non-float tensor {key} ({value.dtype})")
        t = value.detach().cpu().to(FLOAT_DTYPES[float_dtype])
        tensors[key] = {"kind": "float", "dtype": float_dtype, "shape": list(t.shape), **blob.add(_tensor_bytes(t))}
    keep = getattr(model.decoder, "vocab_keep", None)
    if keep is not None:
        tensors["vocab_keep"] = {
            "kind": "int",
            "dtype": "int32",
            "shape": [len(keep)],
            **blob.add(_tensor_bytes(keep.to(torch.int32))),
        }
    bpe = getattr(model, "ctc_bpe", None)
    if bpe:
        tensors["bpe_model"] = {"kind": "int", "dtype": "uint8", "shape": [len(bpe)], **blob.add(bytes(bpe))}
    n_languages = dims.n_vocab - 51765 - int(dims.n_vocab >= 51865)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "dims": asdict(dims),
        "quant": getattr(model, "quant_config", None),
        "ctc_units": int(getattr(model, "ctc_units", 0)),
        "float_dtype": float_dtype,
        "encoder_positional": enc_pos,
        "vocab_keep": "vocab_keep" if keep is not None else None,
        "bpe_model": "bpe_model" if bpe else None,
        "tokenizer": {
            "multilingual": dims.n_vocab >= 51865,
            "num_languages": n_languages,
            "languages": _languages(model, config),
            "task": "transcribe",
        },
        "source": source or {},
        "tensors": tensors,
    }
    data = b"".join(blob.parts)
    header["data_nbytes"] = len(data)
    header["data_sha256"] = hashlib.sha256(data).hexdigest()
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<Q", len(head)) + head
    prefix += b"\0" * ((-len(prefix)) % ALIGN)
    atomic_write_bytes(path, prefix + data)
    return header


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, byte offset of the data section). The file's size is checked against the header's `data_nbytes`."""
    path = Path(path)
    if not path.is_file():
        raise DQWhisperError(f"export file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(12)
        if len(start) < 12 or start[:4] != MAGIC:
            raise DQWhisperError(f"{path} is not a DQ-Whisper export file (bad magic)")
        (n,) = struct.unpack("<Q", start[4:])
        if 12 + n > size:
            raise DQWhisperError(
                f"{path} is truncated or damaged: its header says {n:,} header bytes, the file has "
                f"{size:,} bytes in all; export it again"
            )
        head = f.read(n)
    try:
        header = json.loads(head)
    except ValueError as e:
        raise DQWhisperError(f"{path}: corrupt header ({e}); export it again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") not in READABLE_VERSIONS:
        got = (header.get("format"), header.get("version")) if isinstance(header, dict) else (None, None)
        raise DQWhisperError(
            f"{path}: format {got[0]} v{got[1]}, this loader reads {FORMAT} v{', v'.join(map(str, READABLE_VERSIONS))}"
        )
    data_start = 12 + n
    data_start += (-data_start) % ALIGN
    want = header.get("data_nbytes")
    if want is not None and size != data_start + want:
        raise DQWhisperError(
            f"{path} is {'truncated' if size < data_start + want else 'damaged'}: {size:,} bytes, "
            f"its header says {data_start + want:,}; export it again"
        )
    return header, data_start


def _check_data(path: Path, header: dict, data: memoryview) -> None:
    """The data section against the header's SHA-256 (version 2) and every entry's bounds (all versions)."""
    want = header.get("data_sha256")
    if want is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise DQWhisperError(
                f"{path} is damaged: the data's SHA-256 is {got[:16]}..., its header says "
                f"{want[:16]}...; export it again"
            )

    def bounds(e: dict) -> list[tuple[int, int]]:
        if e.get("kind") == "quantized":
            return [(p["offset"], p["nbytes"]) for p in quantized_parts(e)]
        return [(e["offset"], e["nbytes"])]

    for name, entry in header["tensors"].items():
        for offset, nbytes in bounds(entry):
            if offset < 0 or offset + nbytes > len(data):
                raise DQWhisperError(
                    f"{path} is truncated: tensor {name} needs bytes {offset:,}..{offset + nbytes:,}"
                    f" of the data section, which has {len(data):,}; export it again"
                )


def _read_quantized(entry: dict, data: memoryview, name: str) -> QuantizedTensor:
    spec = QuantSpec(entry["bits"], entry["symmetric"], entry["granularity"], entry["group_size"])
    shape = tuple(entry["shape"])
    n = int(np.prod(shape))
    c = entry["codes"]
    row_bits = None
    if entry.get("row_bits") is None:
        codes = unpack_codes(data[c["offset"] : c["offset"] + c["nbytes"]], spec.bits, n).astype(np.int16) + spec.qmin
    else:  # mixed row widths: narrow rows, then wide rows
        r, h, hi = entry["row_bits"], entry["codes_hi"], entry["row_bits"]["hi"]
        wide = unpack_codes(data[r["offset"] : r["offset"] + r["nbytes"]], 1, shape[0]).astype(bool)
        width = n // shape[0]
        n_wide = int(wide.sum())
        codes = np.empty((shape[0], width), np.int16)
        narrow = unpack_codes(data[c["offset"] : c["offset"] + c["nbytes"]], spec.bits, (shape[0] - n_wide) * width)
        codes[~wide] = narrow.reshape(-1, width).astype(np.int16) + spec.qmin
        wide_codes = unpack_codes(data[h["offset"] : h["offset"] + h["nbytes"]], hi, n_wide * width)
        codes[wide] = wide_codes.reshape(-1, width).astype(np.int16) - 2 ** (hi - 1)
        row_bits = torch.from_numpy(np.where(wide, hi, spec.bits).astype(np.int8))
    codes = torch.from_numpy(codes.reshape(shape)).to(torch.int8 if spec.symmetric else torch.uint8)
    s = entry["scale"]
    scale = torch.from_numpy(np.frombuffer(data[s["offset"] : s["offset"] + s["nbytes"]], np.float16).copy())
    scale = scale.float().reshape(s["shape"])
    row_scale = None
    if entry.get("multiplier") is not None:  # per_group_int8: row scales x the group multipliers
        m = entry["multiplier"]
        n_groups = int(np.prod(m["shape"]))
        mult = unpack_codes(data[m["offset"] : m["offset"] + m["nbytes"]], m["bits"], n_groups).astype(np.float32) + 1
        row_scale = scale
        scale = row_scale * torch.from_numpy(mult.reshape(m["shape"]))
    if tuple(scale.shape) != spec.grouped_shape(shape, name)[:2]:
        raise DQWhisperError(f"export entry {name}: scale shape {tuple(scale.shape)} does not fit {spec}")
    zero = None
    if entry["zero"] is not None:
        z = entry["zero"]
        zero = torch.from_numpy(np.frombuffer(data[z["offset"] : z["offset"] + z["nbytes"]], np.uint8).copy())
        zero = zero.float().reshape(scale.shape)
    return QuantizedTensor(codes, scale, zero, spec, row_scale, row_bits)


def _read_plain(entry: dict, data: memoryview) -> Tensor:
    dtype = {"float16": np.float16, "float32": np.float32, "int32": np.int32, "uint8": np.uint8}[entry["dtype"]]
    arr = np.frombuffer(data[entry["offset"] : entry["offset"] + entry["nbytes"]], dtype).copy()
    return torch.from_numpy(arr.reshape(entry["shape"]))


def load_exported(
    path: str | Path, mode: str = "dequant", device: str | torch.device = "cpu", batch: int = 1, select: bool = True
):
    """model.dqw -> a runnable DQWhisper in eval mode (`export_header` attribute holds the header). mode: a kernel
    request (quantized.MODES), chosen for `batch` utterances per call; set torch's threads before calling. select=False:
    run float until the caller calls quantized.select_kernels (after changing the audio window, say)."""
    header, start = read_header(path)
    raw = Path(path).read_bytes()
    data = memoryview(raw)[start:]
    _check_data(Path(path), header, data)
    dims = ModelDimensions(**header["dims"])
    entries = header["tensors"]
    keep = None
    if header.get("vocab_keep"):
        keep = _read_plain(entries[header["vocab_keep"]], data).long()
    model = DQWhisper(dims, ctc_units=header.get("ctc_units", 0), vocab_keep=keep)
    state = {}
    for name, entry in entries.items():
        if entry["kind"] == "float":
            state[name] = _read_plain(entry, data).float()
    pos = header["encoder_positional"]
    if pos in ("sinusoids", "sinusoids_float16", "sinusoids64_float16"):
        table = (sinusoids64 if pos == "sinusoids64_float16" else sinusoids)(dims.n_audio_ctx, dims.n_audio_state)
        state["encoder.positional_embedding"] = table.float() if pos == "sinusoids" else table.half().float()
    quantized = {n: e for n, e in entries.items() if e["kind"] == "quantized"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized or not k.endswith(".weight")]
    missing = [k for k in missing if not k.startswith(("decoder.vocab_keep", "decoder.full_to_sub"))]
    if missing or unexpected:
        raise DQWhisperError(f"{path} does not match its own dims: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, entry in quantized.items():
        qt = _read_quantized(entry, data, name)
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise DQWhisperError(f"{path}: quantized tensor for {name}, which this model does not have") from e
        if tuple(old.weight.shape) != qt.shape:
            raise DQWhisperError(f"{path}: {name} has shape {qt.shape}, the model expects {tuple(old.weight.shape)}")
        if entry["module"] == "embedding":
            new = QuantizedEmbedding(qt, mode, name, act_quant=entry["act_quant"])
        elif entry["module"] == "conv1d":
            new = QuantizedConv1d(qt, old.bias, old, mode, name)
        else:
            new = QuantizedLinear(qt, old.bias, mode, name, act_quant=entry["act_quant"])
        set_module(model, name, new)
    if header.get("bpe_model"):
        model.ctc_bpe = bytes(_read_plain(entries[header["bpe_model"]], data).numpy().tobytes())
    model.quant_config = header.get("quant")
    model.export_header = header
    model = model.to(device).eval()
    if select:
        select_kernels(model, batch=batch)
    return model
