"""ggml's block quantization formats (q4_0, q5_0, q8_0) as whisper.cpp's quantizer computes them, in torch.

Each row of a weight is cut into blocks of 32 values; a block stores one float16 scale `d` and 32 integer codes.
- q4_0: `max` = the block's value of largest magnitude (first one on ties, sign kept), `d = max / -8`,
  code = min(15, trunc(x * (1/d) + 8.5)), weight = (code - 8) * fp16(d).
- q5_0: the same with 16 / 31: `d = max / -16`, code = min(31, trunc(x * (1/d) + 16.5)), weight = (code - 16) * fp16(d).
- q8_0: `d = max|x| / 127`, code = roundf(x * (1/d)) (half away from zero), weight = code * fp16(d).
The arithmetic is float32 as in ggml's reference quantizer (`quantize_row_*_ref`) and the `gguf` package's numpy
port; the codes are computed with the float32 `d`, the weights with its float16 rounding, exactly as the runtime
dequantizes. Here codes are returned signed (code - 8, code - 16, code), so `weight = codes * scale`; the block
layouts on disk are in `dqwhisper.interop.ggml`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dqwhisper.utils import DQWhisperError

QK = 32  # values per block in q4_0, q5_0 and q8_0


@dataclass(frozen=True)
class BlockFormat:
    name: str
    bits: int  # signed code width: codes lie in [-2^(bits-1), 2^(bits-1) - 1]
    offset: int  # stored code = signed code + offset (q4_0: 8, q5_0: 16, q8_0: 0 with int8 storage)
    block_bytes: int  # bytes per block of QK values on disk


FORMATS = {
    "q4_0": BlockFormat("q4_0", 4, 8, 2 + QK // 2),
    "q5_0": BlockFormat("q5_0", 5, 16, 2 + 4 + QK // 2),
    "q8_0": BlockFormat("q8_0", 8, 0, 2 + QK),
}
GRANULARITY_PREFIX = "ggml_"  # quant.weight.granularity = ggml_q4_0 | ggml_q5_0 | ggml_q8_0


def block_format(name: str) -> BlockFormat:
    key = name[len(GRANULARITY_PREFIX) :] if name.startswith(GRANULARITY_PREFIX) else name
    if key not in FORMATS:
        raise DQWhisperError(f"unknown ggml block format '{name}': one of {', '.join(FORMATS)}")
    return FORMATS[key]


def _roundf(v: Tensor) -> Tensor:
    """C roundf (half away from zero), by the same float32 steps as gguf's np_roundf."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


@torch.no_grad()
def quantize_blocks(w: Tensor, fmt: BlockFormat | str) -> tuple[Tensor, Tensor, Tensor]:
    """w (rows, width) or (n_blocks * 32,) -> (signed codes (n, 32) float, d (n,) float32 before fp16 rounding,
    scale (n,) = fp16(d) as float32). Rows are cut in blocks of 32 (width % 32 == 0)."""
    fmt = block_format(fmt) if isinstance(fmt, str) else fmt
    x = w.detach().float().reshape(-1)
    if x.numel() % QK:
        raise DQWhisperError(f"ggml {fmt.name}: {x.numel()} values are not whole blocks of {QK}")
    x = x.reshape(-1, QK)
    if fmt.name == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = _roundf(x * inv)
    else:
        top = 2 ** (fmt.bits - 1)  # 8 or 16
        imax = x.abs().argmax(-1, keepdim=True)
        d = x.gather(-1, imax) / -top
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        stored = torch.trunc(x * inv + (top + 0.5)).clamp(0, 2 * top - 1)
        codes = stored - top
    d = d.squeeze(-1)
    return codes, d, d.to(torch.float16).float()


def fake_quantize(w: Tensor, fmt: BlockFormat | str) -> Tensor:
    """w with every block replaced by its ggml dequantized value; straight-through gradient to w.
    The last axis of w is cut into blocks of 32."""
    codes, _, scale = quantize_blocks(w, fmt)
    deq = (codes * scale.unsqueeze(-1)).reshape(w.shape).to(w.dtype)
    return w + (deq - w).detach()
