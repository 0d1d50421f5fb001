"""The real low-bit form: integer codes + fp16-valued scales, and two ways to run them.

- mode "dequant": the weight is dequantized once, `(codes - zero) * scale` in float32 — bit-identical to the
  fake-quantized weight the student trained with, so the forward equals the fake-quant forward exactly.
- mode "int8": linears (and the tied vocabulary projection) run `torch._int_mm` on int8 codes with dynamic
  per-token int8 activations (the same quantizer as the optional activation fake-quant), then rescale by the
  per-token and per-row scales. Needs one scale per output row: per_tensor / per_channel weights of any bit width
  (an int4 code is an int8 value), asymmetric up to 7 bits (codes - zero fits int8). Per-group weights fall back to
  the dequantized float matmul (logged once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqwhisper.quant.fake_quant import QuantSpec, dequantize_codes, quantize_per_token
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)
MODES = ("dequant", "int8")


@dataclass
class QuantizedTensor:
    """Integer codes of a weight (its own shape; int8 when symmetric, uint8 when asymmetric) with scales (A, B)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: QuantSpec

    @classmethod
    def from_float_codes(cls, q: Tensor, s: Tensor, z: Tensor | None, spec: QuantSpec, shape) -> "QuantizedTensor":
        dtype = torch.int8 if spec.symmetric else torch.uint8
        return cls(q.detach().reshape(shape).to(dtype), s.detach().float().clone(),
                   None if z is None else z.detach().float().clone(), spec)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        grouped = self.spec.grouped_shape(self.shape)
        return dequantize_codes(self.codes.float().reshape(grouped), self.scale, self.zero).reshape(self.shape)

    def int8_rows(self) -> tuple[Tensor, Tensor] | None:
        """(codes - zero as int8 (rows, width), one scale per row) when the int8 kernel can run this weight."""
        rows = self.shape[0]
        if self.scale.shape[1] != 1:  # several groups per row
            return None
        q = self.codes.reshape(rows, -1).to(torch.int16)
        if self.zero is not None:
            z = self.zero.reshape(-1, 1).expand(rows, 1) if self.zero.shape[0] == 1 else self.zero.reshape(rows, 1)
            q = q - z.to(torch.int16)
        if int(q.min()) < -128 or int(q.max()) > 127:
            return None
        s = self.scale.reshape(-1).expand(rows) if self.scale.shape[0] == 1 else self.scale.reshape(rows)
        return q.to(torch.int8).contiguous(), s.float().contiguous()


def int8_matmul(x: Tensor, w_int8: Tensor, row_scale: Tensor) -> Tensor:
    """x (..., k) float @ (w_int8 (n, k) * row_scale (n,)).T with x quantized per token to int8 -> (..., n) float32."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()
    # the same arithmetic as fake_quant.quantize_per_token (so w8a8 QAT matches), without autograd and in place
    sx = (xf.abs().amax(-1, keepdim=True) / 127.5).clamp_(min=1e-12)
    qx = torch.round((xf / sx).clamp_(-128, 127)).to(torch.int8)
    acc = torch._int_mm(qx, w_int8.t())
    return acc.float().mul_(sx).mul_(row_scale).reshape(*shape[:-1], w_int8.shape[0])


class _QuantizedBase(nn.Module):
    def _setup(self, qt: QuantizedTensor, mode: str, name: str) -> None:
        if mode not in MODES:
            raise DQWhisperError(f"unknown run mode {mode!r}; use one of {list(MODES)}")
        self.spec = qt.spec
        self.mode = mode
        self.register_buffer("qweight", qt.codes)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero_point", qt.zero)
        rows = qt.int8_rows() if mode == "int8" else None
        self.kernel = "int8" if rows is not None else "float"
        if rows is not None:
            self.register_buffer("w_int8", rows[0], persistent=False)
            self.register_buffer("w_row_scale", rows[1], persistent=False)
        else:
            self.register_buffer("weight", qt.dequantize(), persistent=False)

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.qweight, self.scale, self.zero_point, self.spec)

    def dequantized_weight(self) -> Tensor:
        return self.weight if self.kernel == "float" else self.quantized_tensor().dequantize()

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, granularity={s.granularity}, kernel={self.kernel}"


class QuantizedLinear(_QuantizedBase):
    """act_quant: the input is fake-quantized per token to 8 bits in mode dequant too (as the student trained);
    mode int8 always quantizes it (the int8 kernel needs int8 inputs)."""

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None, mode: str = "dequant", name: str = "linear",
                 act_quant: bool = False):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.act_quant = act_quant
        self._setup(qt, mode, name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "int8":
            y = int8_matmul(x, self.w_int8, self.w_row_scale)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)
        if self.act_quant:
            q, s = quantize_per_token(x, 8)
            x = (q * s).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantizedConv1d(_QuantizedBase):
    """Runs dequantized in both modes (the convolutions run once per utterance)."""

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None, conv: nn.Conv1d, mode: str = "dequant",
                 name: str = "conv"):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._setup(qt, "dequant", name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        self.stride, self.padding, self.dilation, self.groups)


class QuantizedEmbedding(_QuantizedBase):
    """Quantized token embedding; `project(x)` is the tied output projection (int8 kernel in mode int8)."""

    def __init__(self, qt: QuantizedTensor, mode: str = "dequant", name: str = "token_embedding",
                 act_quant: bool = False):
        super().__init__()
        self.act_quant = act_quant
        self.num_embeddings, self.embedding_dim = qt.shape
        self._setup(qt, mode, name)

    def forward(self, ids: Tensor) -> Tensor:
        if self.kernel == "float":
            return F.embedding(ids, self.weight)
        return F.embedding(ids, self.w_int8).float() * self.w_row_scale[ids].unsqueeze(-1)

    def project(self, x: Tensor) -> Tensor:
        """(B, L, d) -> (B, L, rows) logits."""
        if self.kernel == "int8":
            return int8_matmul(x, self.w_int8, self.w_row_scale).to(x.dtype)
        if self.act_quant:
            q, s = quantize_per_token(x, 8)
            x = (q * s).to(x.dtype)
        return x @ self.weight.to(x.dtype).t()


QUANTIZED_TYPES = (QuantizedLinear, QuantizedConv1d, QuantizedEmbedding)


def log_kernels(model: nn.Module) -> dict[str, int]:
    """Count quantized modules by the kernel they run (int8 / float), log it, return the counts."""
    counts: dict[str, int] = {}
    fallback = []
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZED_TYPES):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
            if m.mode == "int8" and m.kernel == "float" and not isinstance(m, QuantizedConv1d):
                fallback.append(name)
    if fallback:
        log.info("int8 mode: %d quantized modules have no int8 kernel (per-group scales or 8-bit asymmetric) and "
                 "run dequantized in float, e.g. %s", len(fallback), fallback[0])
    return counts
