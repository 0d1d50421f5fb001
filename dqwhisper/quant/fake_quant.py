"""Fake quantization: the quantizer math, weight/activation fake quantizers, and the fake-quantized modules.

Conventions (shared with convert and the export file, so the three agree bit for bit):
- A weight of shape (out, ...) is viewed as `(A, B, G)`: per_tensor (1, 1, numel), per_channel (out, 1, in),
  per_group (out, in / g, g) with `in` the flattened input width. Scales and zero points have shape (A, B).
- Signed codes for symmetric quantization, `[-2^(b-1), 2^(b-1) - 1]`; unsigned `[0, 2^b - 1]` with an integer zero
  point for asymmetric. min/max scales cover the range without clipping: symmetric `amax / (2^(b-1) - 0.5)` (all 2^b
  levels used, error <= scale / 2 everywhere), asymmetric `(max - min) / (2^b - 1)` with 0 in the range.
- Effective scales are float16 values (the export stores fp16 scales; min/max scales round up, so never clip), so a
  dequantized export reproduces the fake-quantized weights exactly: `w_q = (codes - zero) * scale` in float32 in both
  places.
- per_group_int8: per_group whose scales are integer multiples m in [1, 2^(7 - bits)] of one float16 scale per row,
  so `code * m` is an int8 code within +-64 and the row runs on the int8 per-row kernels exactly (without VNNI's
  int16 saturation); the file stores the b-bit codes, the row scales and (7 - b)-bit multipliers. LSQ learns the row
  scales; the multipliers are fixed when the scales are initialised.
- Mixed row widths (per_group_int8 only; the token embedding's most used rows, `quant.embedding_hi_rows`): a
  `row_bits` buffer (A,) gives each row its width, `spec.bits` or `hi_bits`; codes, grid ends, multipliers (1 ..
  2^(7 - row bits)) and the LSQ gradient scale follow each row's width, so the int8 rows stay within +-64.
- Straight-through estimator for the rounding (and for the at most half-step clipping at the ends of the grid); LSQ
  (Esser et al., "Learned Step Size Quantization", ICLR 2020) learns the scale with its gradient scaled by
  `1 / sqrt(n * Qp)`, n = weights sharing that scale, Qp = the largest code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqwhisper.quant import ggml_format
from dqwhisper.quant.ggml_format import QK as GGML_QK
from dqwhisper.utils import DQWhisperError

SCALE_MIN = 2.0**-14  # smallest normal float16: scales never reach zero or a subnormal
GROUPED = ("per_group", "per_group_int8")  # granularities with several scales per row, `group_size` columns each
# per_group_int8: code x multiplier within +-64 leaves multipliers 1..2^(7 - bits): 8 at 4 bits, 4 at 5, 2 at 6
INT8_GROUP_MAX_BITS = 6
MSE_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))  # clipping ratios tried by the mse scale init (1.0 .. 0.5)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int = 0

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def grouped_shape(self, shape: tuple[int, ...], what: str = "weight") -> tuple[int, int, int]:
        """(A, B, G) view of a weight of `shape` (rows = output channels, the rest flattened to the input width)."""
        rows = shape[0]
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        if self.granularity == "per_tensor":
            return 1, 1, rows * width
        if self.granularity == "per_channel":
            return rows, 1, width
        if self.granularity.startswith("ggml_"):
            if width % GGML_QK:
                raise DQWhisperError(
                    f"quant config: ggml's blocks of {GGML_QK} do not divide the input width {width} "
                    f"of {what} {tuple(shape)}; exclude that module"
                )
            return rows, width // GGML_QK, GGML_QK
        if self.granularity in GROUPED:
            if self.group_size <= 0 or width % self.group_size:
                raise DQWhisperError(
                    f"quant config: group_size {self.group_size} does not divide the input width "
                    f"{width} of {what} {tuple(shape)}; pick a divisor or exclude that module"
                )
            return rows, width // self.group_size, self.group_size
        raise DQWhisperError(f"unknown granularity {self.granularity!r}")

    @property
    def max_multiple(self) -> int:
        """per_group_int8: the largest group multiplier, 2^(7 - bits) (|code * m| <= 64)."""
        return 2 ** (7 - self.bits)


def int8_group_scales(w3: Tensor, group_scales: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """per_group_int8: (row scales (A, 1) float16-valued, integer multipliers (A, B)) for weights (A, B, G) whose ideal
    group scales are `group_scales` (A, B): the row scale is the largest group scale / max_multiple (rounded up to
    float16), and each group takes the multiplier in [1, max_multiple] whose quantization error is least."""
    top = spec.max_multiple
    row = fp16_scale_up(group_scales.amax(-1, keepdim=True) / top)
    best_m = torch.ones_like(group_scales)
    best_err = torch.full_like(group_scales, float("inf"))
    for m in range(1, top + 1):
        s = row * m
        q = torch.round(w3 / s.unsqueeze(-1)).clamp(spec.qmin, spec.qmax)
        err = (q * s.unsqueeze(-1) - w3).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_m = torch.where(better, torch.full_like(best_m, float(m)), best_m)
    return row, best_m


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient multiplied by `g` (LSQ's gradient scale). Exact in the forward."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


class _Fp16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundClampSTE(torch.autograd.Function):
    """clamp(round(v), qmin, qmax); the gradient passes where v is within half a step of the grid
    ([qmin - 0.5, qmax + 0.5]: only rounding happened) and is zero where v was clipped further."""

    @staticmethod
    def forward(ctx, v, qmin, qmax):
        ctx.save_for_backward((v >= qmin - 0.5) & (v <= qmax + 0.5))
        return torch.round(v).clamp(qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class _LsqFakeQuant(torch.autograd.Function):
    """clamp(round(w / s), lo, hi) * s for symmetric weights (A, B, G) and scales (A, B) as one function: the
    forward is quantize_codes then dequantize_codes bit for bit; the gradients are LSQ's (to w straight through
    where w / s is within half a step of the grid, else 0; to s the code minus w / s there, the code where clipped),
    without the intermediate tensors and passes of the composed ops. bench/fake_quant_speed.py (Whisper base's
    embedding, forward and backward with its projection, 2 threads): 0.72 s against 1.09 s composed."""

    @staticmethod
    def forward(ctx, w3, s, lo, hi):
        s3 = s.unsqueeze(-1)
        v = w3 / s3
        q = torch.round(v).clamp_(lo, hi)
        out = q * s3
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d = torch.sub(q, v, out=v)  # q - w / s, exact where |q - w / s| <= 1/2 (Sterbenz)
            outside = d.abs() > 0.5  # clipped: more than half a step beyond the grid
            factor = torch.where(outside, q, d) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(outside, factor)
        return out

    @staticmethod
    def backward(ctx, grad):
        outside, factor = ctx.saved_tensors
        grad_w = grad.masked_fill(outside, 0.0) if ctx.needs_input_grad[0] else None
        grad_s = torch.linalg.vecdot(grad, factor) if ctx.needs_input_grad[1] else None
        return grad_w, grad_s, None, None


def round_ste(x: Tensor) -> Tensor:
    return _RoundSTE.apply(x)


def fp16_scale(s: Tensor) -> Tensor:
    """Clamp to SCALE_MIN and round to a float16-representable value (straight-through)."""
    return _Fp16STE.apply(s.clamp(min=SCALE_MIN))


def fp16_scale_up(s: Tensor) -> Tensor:
    """The smallest float16-representable value >= s (clamped to SCALE_MIN): a min/max scale rounded up never clips."""
    s = s.detach().float().clamp(min=SCALE_MIN)
    h = s.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < s, up, h).float()


def minmax_scale_zero(w3: Tensor, spec: QuantSpec, ratio: float | Tensor = 1.0) -> tuple[Tensor, Tensor | None]:
    """(A, B, G) weights -> (scale (A, B), zero point (A, B) or None), covering `ratio` of the min/max range."""
    if spec.symmetric:
        amax = w3.abs().amax(-1) * ratio
        return fp16_scale_up(amax / (spec.qmax + 0.5)), None
    lo = w3.amin(-1).clamp(max=0) * ratio
    hi = w3.amax(-1).clamp(min=0) * ratio
    s = fp16_scale_up((hi - lo) / (spec.qmax - spec.qmin))
    z = torch.round(-lo / s).clamp(spec.qmin, spec.qmax)
    return s, z


def quantize_codes(
    w3: Tensor, s: Tensor, z: Tensor | None, spec: QuantSpec, bounds: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Integer-valued float codes, clamp(round(w / s) + z); gradients pass straight through the rounding.
    `bounds`: per-row (qmin, qmax) tensors (A, 1, 1) for mixed row widths, instead of the spec's."""
    v = w3 / s.unsqueeze(-1)
    if z is not None:
        v = v + z.unsqueeze(-1)
    qmin, qmax = bounds if bounds is not None else (spec.qmin, spec.qmax)
    return _RoundClampSTE.apply(v, qmin, qmax)


def row_bounds(row_bits: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric (qmin, qmax) per row, shaped (A, 1, 1), for rows of widths `row_bits` (A,)."""
    top = torch.pow(2.0, row_bits.float() - 1).reshape(-1, 1, 1)
    return -top, top - 1


def dequantize_codes(q: Tensor, s: Tensor, z: Tensor | None) -> Tensor:
    """(A, B, G) codes -> float weights (q - z) * s."""
    if z is not None:
        q = q - z.unsqueeze(-1)
    return q * s.unsqueeze(-1)


@torch.no_grad()
def mse_scale_zero(w3: Tensor, spec: QuantSpec, chunk_elems: int = 1 << 22) -> tuple[Tensor, Tensor | None]:
    """Per scale, the clipping ratio from MSE_RATIOS whose quantization error is smallest (a sound LSQ init)."""
    A, B, G = w3.shape
    flat = w3.reshape(A * B, 1, G)
    rows = max(1, chunk_elems // max(G, 1))
    best_s = torch.empty(A * B, device=w3.device)
    best_z = None if spec.symmetric else torch.empty(A * B, device=w3.device)
    for start in range(0, A * B, rows):
        part = flat[start : start + rows].float()
        best_err = torch.full((part.shape[0],), float("inf"), device=w3.device)
        for ratio in MSE_RATIOS:
            s, z = minmax_scale_zero(part, spec, ratio)
            err = (dequantize_codes(quantize_codes(part, s, z, spec), s, z) - part).pow(2).sum((-1, -2))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s[start : start + rows] = torch.where(better, s[:, 0], best_s[start : start + rows])
            if z is not None:
                best_z[start : start + rows] = torch.where(better, z[:, 0], best_z[start : start + rows])
    return best_s.view(A, B), None if best_z is None else best_z.view(A, B)


class WeightFakeQuantizer(nn.Module):
    """Fake-quantizes a weight tensor. min/max scales recomputed from the weight (the paper's quantizer), or LSQ:
    a learnable scale (and, asymmetric, a learnable zero point rounded straight-through), initialised by `scale_init`.
    """

    def __init__(
        self,
        spec: QuantSpec,
        weight: Tensor,
        lsq: bool = False,
        scale_init: str = "mse",
        name: str = "weight",
        hi_bits: int | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.lsq = lsq
        self.weight_shape = tuple(weight.shape)
        self.grouped = spec.grouped_shape(self.weight_shape, name)
        self._cache: tuple | None = None
        self._pending_init: str | None = None
        self._weight_ref = [weight]  # a list, so the module does not register the weight as its own parameter
        if spec.granularity == "per_group_int8" and (not lsq or not spec.symmetric or spec.bits > INT8_GROUP_MAX_BITS):
            raise DQWhisperError(
                f"{name}: per_group_int8 needs symmetric LSQ weights of at most {INT8_GROUP_MAX_BITS} bits "
                f"(got {spec.bits}-bit, "
                f"symmetric {spec.symmetric}, lsq {lsq})"
            )
        self.register_buffer("row_bits", None)
        if hi_bits is not None:
            if not self.int8_groups or not spec.bits < hi_bits <= INT8_GROUP_MAX_BITS:
                raise DQWhisperError(
                    f"{name}: rows at {hi_bits} bits need per_group_int8 {spec.bits}-bit weights and "
                    f"{spec.bits} < {hi_bits} <= {INT8_GROUP_MAX_BITS} (got {spec.granularity})"
                )
            self.row_bits = torch.full((self.grouped[0],), spec.bits, dtype=torch.int8)
        self.hi_bits = hi_bits
        if lsq:
            # min/max now; the MSE search (seconds on a real model) runs on first use, and never when a checkpoint's
            # scales are loaded over it (model_from_checkpoint prepares, then loads)
            s, z, m = self._fit_scales(weight.detach().float().reshape(self.grouped), mse=False)
            if m is not None:
                self.register_buffer("multiplier", m)
            self.scale = nn.Parameter(s.detach().clone())
            self.zero_point = None if z is None else nn.Parameter(z.detach().clone())
            self._pending_init = scale_init if scale_init != "minmax" else None
            self._scale_init = scale_init

    def _fit_scales(self, w3: Tensor, mse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(scale, zero point, per_group_int8 multipliers) fitted to weights (A, B, G), each row at its own width."""
        widths = [self.spec.bits] if self.row_bits is None else sorted(set(self.row_bits.tolist()))
        s_all = z_all = m_all = None
        for bits in widths:
            spec = QuantSpec(bits, self.spec.symmetric, self.spec.granularity, self.spec.group_size)
            rows = None if self.row_bits is None else (self.row_bits == bits).nonzero()[:, 0].to(w3.device)
            part = w3 if rows is None else w3[rows]
            s, z = (mse_scale_zero if mse else minmax_scale_zero)(part, spec)
            m = None
            if self.int8_groups:
                s, m = int8_group_scales(part, s, spec)
            if rows is None:
                return s, z, m
            if s_all is None:  # mixed widths are per_group_int8, so symmetric: no zero points
                s_all, m_all = s.new_empty((len(w3),) + s.shape[1:]), m.new_empty((len(w3),) + m.shape[1:])
            s_all[rows], m_all[rows] = s, m
        return s_all, z_all, m_all

    @torch.no_grad()
    def set_hi_rows(self, rows: Tensor) -> None:
        """Give `rows` (indices) `hi_bits` and the rest `spec.bits`, and fit the scales again (min/max now, the
        configured init on first use). For a quantizer built with `hi_bits`, before training or loading."""
        if self.row_bits is None or not self.lsq:
            raise DQWhisperError("set_hi_rows needs an LSQ quantizer built with hi_bits")
        self.row_bits.fill_(self.spec.bits)
        self.row_bits[rows.to(self.row_bits.device)] = self.hi_bits
        w3 = self._weight_ref[0].detach().float().reshape(self.grouped).to(self.scale.device)
        s, _, m = self._fit_scales(w3, mse=False)
        self.scale.copy_(s)
        self.multiplier.copy_(m)
        self._pending_init = self._scale_init if self._scale_init != "minmax" else None
        self._cache = None

    def bounds(self) -> tuple[Tensor, Tensor] | None:
        """Per-row (qmin, qmax) (A, 1, 1) with mixed row widths, else None (the spec's)."""
        if self.row_bits is None:
            return None
        return row_bounds(self.row_bits)

    @torch.no_grad()
    def _init_scales(self) -> None:
        if self._pending_init is None:
            return
        self._pending_init = None
        w3 = self._weight_ref[0].detach().float().reshape(self.grouped).to(self.scale.device)
        s, z, m = self._fit_scales(w3, mse=True)
        if m is not None:
            self.multiplier.copy_(m)
        self.scale.copy_(s)
        if z is not None:
            self.zero_point.copy_(z)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._init_scales()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "scale" in state_dict:
            self._pending_init = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        hi = "" if self.row_bits is None else f", hi_bits={self.hi_bits} on {int((self.row_bits != s.bits).sum())} rows"
        return (
            f"bits={s.bits}, symmetric={s.symmetric}, granularity={s.granularity}, "
            f"group_size={s.group_size}, lsq={self.lsq}{hi}"
        )

    @property
    def ggml(self) -> bool:
        return self.spec.granularity.startswith("ggml_")

    @property
    def int8_groups(self) -> bool:
        return self.spec.granularity == "per_group_int8"

    def row_scale(self) -> Tensor | None:
        """per_group_int8: the float16-valued row scales (A, 1) that the effective group scales are multiples of."""
        if not self.int8_groups:
            return None
        self._init_scales()
        return fp16_scale(self.scale.detach())

    def scale_zero(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """Effective (fp16-representable) scale (A, B) and integer zero point (A, B) or None."""
        if self.ggml:
            _, _, s = ggml_format.quantize_blocks(weight, self.spec.granularity)
            return s.reshape(self.grouped[:2]), None
        if not self.lsq:
            return minmax_scale_zero(weight.detach().float().reshape(self.grouped), self.spec)
        self._init_scales()
        n_per_scale = self.grouped[2] * (self.grouped[1] if self.int8_groups else 1)
        g = 1.0 / math.sqrt(n_per_scale * max(self.spec.qmax, 1))
        if self.row_bits is not None:  # each row's own largest code
            g = torch.rsqrt(n_per_scale * self.bounds()[1].reshape(-1, 1).clamp(min=1))
        s = fp16_scale(_ScaleGrad.apply(self.scale, g))
        if self.int8_groups:
            s = s * self.multiplier  # exact: a float16 value times an integer <= 64
        z = None
        if self.zero_point is not None:
            z = round_ste(_ScaleGrad.apply(self.zero_point, g)).clamp(self.spec.qmin, self.spec.qmax)
        return s, z

    def codes(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(integer-valued float codes (A, B, G), scale (A, B), zero (A, B) or None) — what convert and export store."""
        if self.ggml:  # ggml's rule: codes from the float32 scale, weights from its fp16 rounding (may be negative)
            q, _, s = ggml_format.quantize_blocks(weight, self.spec.granularity)
            return q.reshape(self.grouped), s.reshape(self.grouped[:2]), None
        s, z = self.scale_zero(weight)
        return quantize_codes(weight.float().reshape(self.grouped), s, z, self.spec, self.bounds()), s, z

    def forward(self, weight: Tensor) -> Tensor:
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable:
            key = (
                weight.data_ptr(),
                weight._version,
                weight.device,
                weight.dtype,
                None if not self.lsq else (self.scale.data_ptr(), self.scale._version),
            )
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        if self.ggml:
            out = ggml_format.fake_quantize(weight, self.spec.granularity)
        else:
            s, z = self.scale_zero(weight)
            w3 = weight.float().reshape(self.grouped)
            if z is None:  # symmetric: the fused function (the same values as the composed ops below)
                lo, hi = self.bounds() or (self.spec.qmin, self.spec.qmax)
                out = _LsqFakeQuant.apply(w3, s, lo, hi)
            else:
                out = dequantize_codes(quantize_codes(w3, s, z, self.spec, self.bounds()), s, z)
            out = out.reshape(self.weight_shape).to(weight.dtype)
        if cacheable:
            self._cache = (key, out)
        else:
            self._cache = None
        return out


def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token (last axis) quantization: (integer-valued float codes, scales (..., 1))."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.detach().float().abs().amax(-1, keepdim=True) / (qmax + 0.5)).clamp(min=1e-12)
    return round_ste((x.float() / s).clamp(-qmax - 1, qmax)), s


def quantize_tokens(x: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(..., K) float -> (integer-valued float32 codes in [-128, 127], per-token scales (..., 1)): the arithmetic of
    quantize_per_token(x, 8), bit for bit, without autograd and with fewer temporaries (clamp and round in place;
    for many rows max |x| as max(max x, -min x), the same value without a |x| copy, which costs more than the two
    extra ops for the decoder's single rows). The int8 kernels' activation codes, and the activation fake quantizer's
    arithmetic where no gradient is needed. `out`: a float32 tensor of x's shape to write the codes into."""
    xf = x.float()
    if xf.numel() > 16 * xf.shape[-1]:
        amax = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg_())
    else:
        amax = xf.abs().amax(-1, keepdim=True)
    s = amax.div_(127.5).clamp_(min=1e-12)
    return torch.div(xf, s, out=out).clamp_(-128, 127).round_(), s


class ActivationFakeQuantizer(nn.Module):
    """8-bit per-token dynamic symmetric fake quantization of a linear's input (scales not learned)."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_token=True, symmetric=True"

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 8 and not (x.requires_grad and torch.is_grad_enabled()):
            q, s = quantize_tokens(x)  # the same bits in fewer passes (frozen encoders' caches, validation, export)
            return q.mul_(s).to(x.dtype)
        q, s = quantize_per_token(x, self.bits)
        return (q * s).to(x.dtype)


class FakeQuantizedLinear(nn.Linear):
    """nn.Linear whose weight (and optionally input) is fake-quantized; same parameter names as the float layer."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_fake_quantizer: WeightFakeQuantizer,
        activation_fake_quantizer: ActivationFakeQuantizer | None = None,
    ):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_fake_quantizer = weight_fake_quantizer
        self.activation_fake_quantizer = activation_fake_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        w = self.weight_fake_quantizer(self.weight)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class FakeQuantizedConv1d(nn.Conv1d):
    """nn.Conv1d with a fake-quantized weight (per output channel scales); same parameter names."""

    def __init__(self, conv: nn.Conv1d, weight_fake_quantizer: WeightFakeQuantizer):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_fake_quantizer = weight_fake_quantizer

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        w = self.weight_fake_quantizer(weight)
        return super()._conv_forward(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


class FakeQuantizedEmbedding(nn.Embedding):
    """Token embedding with fake-quantized rows; `project(x)` is the tied output projection with the same weights,
    so a row's scale is the per-output-channel scale of the projection."""

    def __init__(
        self,
        emb: nn.Embedding,
        weight_fake_quantizer: WeightFakeQuantizer,
        activation_fake_quantizer: ActivationFakeQuantizer | None = None,
    ):
        super().__init__(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, device="meta")
        self.weight = emb.weight
        self.weight_fake_quantizer = weight_fake_quantizer
        self.activation_fake_quantizer = activation_fake_quantizer  # on the projection's input only
        self._one_weight_depth = 0
        self._one_weight: Tensor | None = None

    @contextlib.contextmanager
    def one_weight(self):
        """Within: the lookup and the tied projection use one fake-quantized weight, made at its first use. A
        training forward then quantizes the 26.5M-weight embedding of Whisper base once and back-propagates through
        that once, not twice (the weight's gradient is the same sum). Nestable; cleared at the outermost exit."""
        self._one_weight_depth += 1
        try:
            yield
        finally:
            self._one_weight_depth -= 1
            if self._one_weight_depth == 0:
                self._one_weight = None

    def quantized_weight(self) -> Tensor:
        if self._one_weight is not None:
            return self._one_weight
        w = self.weight_fake_quantizer(self.weight)
        if self._one_weight_depth:
            self._one_weight = w
        return w

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx)

    def project(self, x: Tensor) -> Tensor:
        """(B, L, d) -> (B, L, rows) logits."""
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return x @ self.quantized_weight().to(x.dtype).t()


FAKE_QUANTIZED_TYPES = (FakeQuantizedLinear, FakeQuantizedConv1d, FakeQuantizedEmbedding)
