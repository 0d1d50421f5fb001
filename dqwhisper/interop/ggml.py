"""whisper.cpp model files (the `ggml-*.bin` format of whisper.cpp's convert-pt-to-ggml.py and quantize tool).

Layout (little-endian int32 unless said): magic 0x67676d6c; hparams n_vocab, n_audio_ctx, n_audio_state,
n_audio_head, n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels, ftype
(f16: 1, q4_0: 2, q8_0: 7, q5_0: 8; quantized files add GGML_QNT_VERSION 2 * 1000); mel filters (n_mels, n_fft,
float32 values, librosa's as openai-whisper bundles them); vocabulary (count, then per token its byte length and
bytes: the byte-level BPE ranks of openai-whisper's tiktoken file; whisper.cpp adds the special tokens itself from
n_vocab); then every tensor: n_dims, name length, ggml type (f32 0, f16 1, q4_0 2, q5_0 6, q8_0 8), the dims
innermost first, the name, the data. whisper.cpp stores the 2-D weights (linears and the token embedding) in the
file's type, the convolution kernels in f16 and everything else (biases, norms, positional tables) in f32.

A student's audio window: whisper.cpp assumes the 1500-position table (its timestamps use 30 s / n_audio_ctx), so
the file holds the full sinusoid table and the student runs with whisper.cpp's `audio_ctx` = its window (written
to `OUT.bin.json` and printed). A pruned vocabulary is expanded to the full ids with zero rows (logit 0 at every
pruned id, whatever the input; whisper.cpp has no per-file suppression list). Quantized students: with a ggml
block format (`quant.weight.granularity=ggml_q4_0` ...) and the same `--type`, the blocks are the trained codes bit
for bit; otherwise the dequantized float weights are quantized by ggml's rule (post-training), and the export
says so.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
import whisper.audio
from whisper.model import ModelDimensions, Whisper, sinusoids

from dqwhisper.interop.hf import _tiktoken_ranks, dequantized_float_model, pruned_ids
from dqwhisper.quant.ggml_format import FORMATS, QK, quantize_blocks
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)

MAGIC = 0x67676D6C
GGML_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q5_0": 6, "q8_0": 8}
GGML_TYPE_NAME = {v: k for k, v in GGML_TYPE.items()}
FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q5_0": 8}
QNT_VERSION, QNT_VERSION_FACTOR = 2, 1000
TYPES = ("f16", "q8_0", "q5_0", "q4_0")
FULL_AUDIO_CTX = 1500


def pack_blocks(w: Tensor, fmt_name: str) -> bytes:
    """A tensor (rows, width) -> ggml blocks (row-major, 32 values a block) in `fmt_name`'s on-disk layout."""
    fmt = FORMATS[fmt_name]
    codes, d, _ = quantize_blocks(w, fmt)
    return blocks_bytes(codes, d, fmt_name)


def blocks_bytes(codes: Tensor, d: Tensor, fmt_name: str) -> bytes:
    """Signed codes (n, 32) and float32 scales d (n,) -> the on-disk blocks (d stored as float16)."""
    fmt = FORMATS[fmt_name]
    n = codes.shape[0]
    dh = d.to(torch.float16).numpy().view(np.uint8).reshape(n, 2)
    q = (codes.to(torch.int16) + fmt.offset).numpy()
    if fmt_name == "q8_0":
        body = q.astype(np.int8).view(np.uint8)
    else:
        q = q.astype(np.uint8)
        lo, hi = q[:, : QK // 2], q[:, QK // 2 :]
        qs = (lo & 0x0F) | ((hi & 0x0F) << 4)
        if fmt_name == "q4_0":
            body = qs
        else:  # q5_0: bit j of the little-endian uint32 qh is the 5th bit of code j
            qh = np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little").reshape(n, 4)
            body = np.concatenate([qh, qs], axis=1)
    return np.concatenate([dh, body], axis=1).astype(np.uint8).tobytes()


def unpack_blocks(data: bytes, fmt_name: str, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """On-disk blocks -> (signed codes (n, 32) int16, float16 scales (n,))."""
    fmt = FORMATS[fmt_name]
    raw = np.frombuffer(data, dtype=np.uint8)[: n_blocks * fmt.block_bytes].reshape(n_blocks, fmt.block_bytes)
    d = raw[:, :2].copy().view(np.float16).reshape(n_blocks)
    if fmt_name == "q8_0":
        return raw[:, 2:].copy().view(np.int8).astype(np.int16), d
    qs = raw[:, -QK // 2 :]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int16)
    if fmt_name == "q5_0":
        hbits = np.unpackbits(raw[:, 2:6], axis=-1, bitorder="little").astype(np.int16)
        q |= hbits << 4
    return q - fmt.offset, d


def _tiktoken_tokens(multilingual: bool) -> list[bytes]:
    ranks = _tiktoken_ranks(multilingual)
    tokens = sorted(ranks, key=ranks.get)
    if [ranks[t] for t in tokens] != list(range(len(tokens))):
        raise DQWhisperError("openai-whisper's tiktoken ranks are not 0..n-1")
    return tokens


def mel_filters(n_mels: int) -> np.ndarray:
    return whisper.audio.mel_filters("cpu", n_mels).numpy().astype(np.float32)


def _file_tensors(model: Whisper, full_vocab: Tensor | None) -> dict[str, Tensor]:
    """openai-whisper names -> float32 tensors in whisper.cpp's order and shapes (full window, full vocabulary)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    dims = model.dims
    pos = sd["encoder.positional_embedding"]
    if pos.shape[0] < FULL_AUDIO_CTX:
        full = sinusoids(FULL_AUDIO_CTX, dims.n_audio_state).float()
        full[: pos.shape[0]] = pos
        sd["encoder.positional_embedding"] = full
    if full_vocab is not None:
        sd["decoder.token_embedding.weight"] = full_vocab
    for k in ("encoder.conv1.bias", "encoder.conv2.bias"):
        sd[k] = sd[k].reshape(-1, 1)
    return sd


def tensor_type(name: str, t: Tensor, file_type: str) -> str:
    if t.ndim < 2 or name in (
        "encoder.conv1.bias",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
        "decoder.positional_embedding",
    ):
        return "f32"
    if t.ndim == 3 or file_type == "f16":
        return "f16"
    return file_type


def _trained_blocks(model: Whisper, file_type: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{weight name: (signed codes, d)} of fake-quantized modules whose format is `file_type` (the trained codes)."""
    out = {}
    for name, m in model.named_modules():
        fq = getattr(m, "weight_fake_quantizer", None)
        if fq is None or fq.spec.granularity != f"ggml_{file_type}":
            continue
        codes, d, _ = quantize_blocks(m.weight, file_type)
        out[name + ".weight"] = (codes, d)
    return out


def write_ggml(model: Whisper, path: str | Path, file_type: str = "f16") -> dict:
    """Write `model` (any of ours: float, fake-quantized, pruned, short-window) as a whisper.cpp model file.
    Returns the sidecar info (also written to PATH.json): audio_ctx to run with, notes."""
    if file_type not in TYPES:
        raise DQWhisperError(f"ggml type '{file_type}': one of {', '.join(TYPES)}")
    dims = model.dims
    if dims.n_audio_state != dims.n_text_state:
        raise DQWhisperError("whisper.cpp needs one width for encoder and decoder")
    trained = _trained_blocks(model, file_type) if file_type != "f16" else {}
    float_model, notes = dequantized_float_model(model)
    quant = getattr(model, "quant_config", None)
    if quant and quant.get("enabled"):
        g = quant["weight"]["granularity"]
        if g == f"ggml_{file_type}":
            # the trained codes replace the dequantized floats of those weights: not "written dequantized"
            notes = [n for n in notes if "written dequantized" not in n]
            notes.append(f"{len(trained)} fake-quantized {file_type} weights written as their trained codes")
        else:
            notes.append(
                f"the model was quantized as {g} {quant['weight']['bits']}-bit; its dequantized weights are "
                f"re-quantized by ggml's {file_type} rule (post-training, not the trained codes)"
            )
    sd = _file_tensors(float_model, None)
    multilingual = dims.n_vocab >= 51865
    tokens = _tiktoken_tokens(multilingual)
    filters = mel_filters(dims.n_mels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ftype = FTYPE[file_type] + (QNT_VERSION * QNT_VERSION_FACTOR if file_type.startswith("q") else 0)
    tmp = path.with_name(path.name + ".tmp")
    counts: dict[str, int] = {}
    with open(tmp, "wb") as f:
        f.write(struct.pack("<i", MAGIC))
        f.write(
            struct.pack(
                "<11i",
                dims.n_vocab,
                FULL_AUDIO_CTX,
                dims.n_audio_state,
                dims.n_audio_head,
                dims.n_audio_layer,
                dims.n_text_ctx,
                dims.n_text_state,
                dims.n_text_head,
                dims.n_text_layer,
                dims.n_mels,
                ftype,
            )
        )
        f.write(struct.pack("<2i", *filters.shape))
        f.write(filters.astype("<f4").tobytes())
        f.write(struct.pack("<i", len(tokens)))
        for t in tokens:
            f.write(struct.pack("<i", len(t)))
            f.write(t)
        for name, t in sd.items():
            kind = tensor_type(name, t, file_type)
            if kind in FORMATS:
                if t.shape[-1] % QK:
                    raise DQWhisperError(
                        f"{name}: width {t.shape[-1]} is not a multiple of {QK}; ggml {kind} cannot store it"
                    )
                if name in trained:
                    codes, d = trained[name]
                    keep = getattr(model.decoder, "vocab_keep", None)
                    if name == "decoder.token_embedding.weight" and keep is not None:
                        codes, d = _expand_blocks(codes, d, keep, dims.n_vocab, t.shape[1])
                    data = blocks_bytes(codes, d, kind)
                else:
                    data = pack_blocks(t, kind)
            elif kind == "f16":
                data = t.numpy().astype("<f2").tobytes()
            else:
                data = t.numpy().astype("<f4").tobytes()
            shape = list(t.shape)[::-1]
            bname = name.encode()
            f.write(struct.pack("<3i", len(shape), len(bname), GGML_TYPE[kind]))
            f.write(struct.pack(f"<{len(shape)}i", *shape))
            f.write(bname)
            f.write(data)
            counts[kind] = counts.get(kind, 0) + 1
    tmp.replace(path)
    if dims.n_audio_ctx < FULL_AUDIO_CTX:
        notes.insert(
            0,
            f"audio window {dims.n_audio_ctx / 50:g} s: run whisper.cpp with audio_ctx = "
            f"{dims.n_audio_ctx} (whisper-cli -ac {dims.n_audio_ctx}); the file holds the full "
            f"{FULL_AUDIO_CTX}-position table"
            + (
                "; and with flash attention off (whisper-cli --no-flash-attn): whisper.cpp's flash attention "
                "attends over the window padded to a multiple of 256 positions without a mask"
                if dims.n_audio_ctx % 256
                else ""
            ),
        )
    dropped = pruned_ids(model)
    info = {
        "type": file_type,
        "audio_ctx": dims.n_audio_ctx if dims.n_audio_ctx < FULL_AUDIO_CTX else 0,
        "n_audio_ctx": dims.n_audio_ctx,
        "flash_attn": dims.n_audio_ctx % 256 == 0,  # see the note: whisper.cpp's flash attention pads unmasked
        "tensor_types": counts,
        "pruned_ids": len(dropped),
        "bytes": path.stat().st_size,
        "dims": asdict(dims),
        "notes": notes,
    }
    Path(str(path) + ".json").write_text(json.dumps(info, indent=2))
    return info


def _expand_blocks(codes: Tensor, d: Tensor, keep: Tensor, n_vocab: int, width: int) -> tuple[Tensor, Tensor]:
    per_row = width // QK
    full_c = codes.new_zeros(n_vocab, per_row, QK)
    full_d = d.new_zeros(n_vocab, per_row)
    full_c[keep] = codes.reshape(-1, per_row, QK)
    full_d[keep] = d.reshape(-1, per_row)
    return full_c.reshape(-1, QK), full_d.reshape(-1)


def read_ggml(path: str | Path) -> dict:
    """Parse a whisper.cpp model file: {"hparams": {...}, "filters": array, "vocab": [bytes],
    "tensors": {name: (type name, shape (numpy order), raw bytes)}}."""
    data = Path(path).read_bytes()
    off = 0

    def ints(n):
        nonlocal off
        v = struct.unpack_from(f"<{n}i", data, off)
        off += 4 * n
        return v

    (magic,) = ints(1)
    if magic != MAGIC:
        raise DQWhisperError(f"{path}: not a whisper.cpp model file (magic {magic:#x})")
    keys = (
        "n_vocab",
        "n_audio_ctx",
        "n_audio_state",
        "n_audio_head",
        "n_audio_layer",
        "n_text_ctx",
        "n_text_state",
        "n_text_head",
        "n_text_layer",
        "n_mels",
        "ftype",
    )
    hparams = dict(zip(keys, ints(11)))
    n_mel, n_fft = ints(2)
    filters = np.frombuffer(data, "<f4", n_mel * n_fft, off).reshape(n_mel, n_fft)
    off += 4 * n_mel * n_fft
    (n_tok,) = ints(1)
    vocab = []
    for _ in range(n_tok):
        (n,) = ints(1)
        vocab.append(data[off : off + n])
        off += n
    tensors = {}
    while off < len(data):
        n_dims, n_name, ttype = ints(3)
        ne = ints(n_dims)
        name = data[off : off + n_name].decode()
        off += n_name
        kind = GGML_TYPE_NAME[ttype]
        count = int(np.prod(ne))
        nbytes = {"f32": 4 * count, "f16": 2 * count}.get(kind) or count // QK * FORMATS.get(kind).block_bytes
        tensors[name] = (kind, tuple(ne[::-1]), data[off : off + nbytes])
        off += nbytes
    return {"hparams": hparams, "filters": filters, "vocab": vocab, "tensors": tensors}


def is_ggml_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file() or p.stat().st_size < 4:
        return False
    with open(p, "rb") as f:
        return struct.unpack("<i", f.read(4))[0] == MAGIC


def load_ggml(path: str | Path) -> Whisper:
    """A whisper.cpp model file -> openai-whisper `Whisper` with the weights the file holds (quantized blocks
    dequantized exactly as ggml does: code * fp16 d). The audio window comes from the PATH.json sidecar when there
    is one (a short-window export), else the file's n_audio_ctx."""
    f = read_ggml(path)
    hp = f["hparams"]
    sidecar = Path(str(path) + ".json")
    audio_ctx = json.loads(sidecar.read_text()).get("audio_ctx", 0) if sidecar.is_file() else 0
    dims = ModelDimensions(
        n_mels=hp["n_mels"],
        n_audio_ctx=audio_ctx or hp["n_audio_ctx"],
        n_audio_state=hp["n_audio_state"],
        n_audio_head=hp["n_audio_head"],
        n_audio_layer=hp["n_audio_layer"],
        n_vocab=hp["n_vocab"],
        n_text_ctx=hp["n_text_ctx"],
        n_text_state=hp["n_text_state"],
        n_text_head=hp["n_text_head"],
        n_text_layer=hp["n_text_layer"],
    )
    sd = {}
    for name, (kind, shape, data) in f["tensors"].items():
        if kind == "f32":
            t = np.frombuffer(data, "<f4").astype(np.float32)
        elif kind == "f16":
            t = np.frombuffer(data, "<f2").astype(np.float32)
        else:
            codes, d = unpack_blocks(data, kind, int(np.prod(shape)) // QK)
            t = codes.astype(np.float32) * d.astype(np.float32)[:, None]
        t = torch.from_numpy(t.reshape(shape).copy())
        if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
            t = t.reshape(-1)
        if name == "encoder.positional_embedding":
            t = t[: dims.n_audio_ctx]
        sd[name] = t
    model = Whisper(dims)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DQWhisperError(
            f"{path}: whisper.cpp tensors do not fill {dims}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return model.eval()
