"""The real low-bit form: integer codes + fp16-valued scales, and the kernels that run them (kernels.py).

A quantized module is built with a kernel request: "float" (alias "dequant": the weight dequantized once,
`(codes - zero) * scale` in float32, bit-identical to the fake-quantized weight, so the forward equals the fake-quant
forward exactly), one of kernels.BACKENDS, or "auto" (alias "int8": the fastest kernel that runs what was trained,
timed per shape). It runs in float until `select_kernels(model)` applies the request (convert and load_exported call
it), so a model moved to another device first still packs on the CPU. Convolutions always run dequantized (once per
utterance); the embedding lookup reads the dequantized rows, its tied projection goes through the kernel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqwhisper.quant import kernels
from dqwhisper.quant.fake_quant import QuantSpec, dequantize_codes
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)
ALIASES = {"dequant": "float", "int8": "auto"}
MODES = tuple(ALIASES) + kernels.CHOICES


def kernel_request(mode: str) -> str:
    choice = ALIASES.get(mode, mode)
    if choice not in kernels.CHOICES:
        raise DQWhisperError(f"unknown kernel {mode!r}; use one of {list(MODES)}")
    return choice


@dataclass
class QuantizedTensor:
    """Integer codes of a weight (its own shape; int8 when symmetric, uint8 when asymmetric) with scales (A, B)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: QuantSpec
    row_scale: Tensor | None = None  # per_group_int8: the (A, 1) row scales that `scale` is integer multiples of
    row_bits: Tensor | None = None  # mixed row widths (A,) int8: each row's bits (spec.bits is the narrowest)

    @classmethod
    def from_float_codes(
        cls,
        q: Tensor,
        s: Tensor,
        z: Tensor | None,
        spec: QuantSpec,
        shape,
        row_scale: Tensor | None = None,
        row_bits: Tensor | None = None,
    ) -> "QuantizedTensor":
        dtype = torch.int8 if spec.symmetric else torch.uint8
        if (row_scale is None) != (spec.granularity != "per_group_int8"):
            raise DQWhisperError(f"{spec.granularity} weights {'need' if row_scale is None else 'have no'} row scales")
        return cls(
            q.detach().reshape(shape).to(dtype),
            s.detach().float().clone(),
            None if z is None else z.detach().float().clone(),
            spec,
            None if row_scale is None else row_scale.detach().float().reshape(-1, 1).clone(),
            None if row_bits is None else row_bits.detach().to(torch.int8).clone(),
        )

    def max_multiples(self) -> Tensor | int:
        """per_group_int8: the largest multiplier, per row (A, 1) with mixed widths: 2^(7 - bits)."""
        if self.row_bits is None:
            return self.spec.max_multiple
        return torch.pow(2, 7 - self.row_bits.to(torch.int32)).reshape(-1, 1).to(self.scale.device)

    def multipliers(self) -> Tensor:
        """per_group_int8: the integer group multipliers (A, B), scale / row_scale."""
        m = torch.round(self.scale / self.row_scale)
        exact = torch.equal(m * self.row_scale, self.scale)
        if not exact or int(m.min()) < 1 or bool((m > self.max_multiples()).any()):
            raise DQWhisperError(
                f"per_group_int8 scales are not multiples 1..{self.spec.max_multiple} of the row scales"
                " (1..2^(7 - bits) per row)"
            )
        return m

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        grouped = self.spec.grouped_shape(self.shape)
        return dequantize_codes(self.codes.float().reshape(grouped), self.scale, self.zero).reshape(self.shape)

    def int8_rows(self) -> tuple[Tensor, Tensor] | None:
        """(codes - zero as int8 (rows, width), one scale per row) when the int8 kernel can run this weight."""
        rows = self.shape[0]
        if self.row_scale is not None:  # per_group_int8: code * multiplier, within +-64 by construction
            a, b, g = self.spec.grouped_shape(self.shape)
            q = self.codes.reshape(a, b, g).to(torch.int16) * self.multipliers().to(torch.int16).unsqueeze(-1)
            return q.reshape(rows, -1).to(torch.int8).contiguous(), self.row_scale.reshape(rows).contiguous()
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


class _QuantizedBase(nn.Module):
    def _setup(self, qt: QuantizedTensor, mode: str, name: str) -> None:
        self.spec = qt.spec
        self.requested = kernel_request(mode)
        self.register_buffer("qweight", qt.codes)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero_point", qt.zero)
        self.register_buffer("row_scale", qt.row_scale)
        self.register_buffer("row_bits", qt.row_bits)
        self.register_buffer("weight", qt.dequantize(), persistent=False)
        self.kernel = "float"
        self.impl: kernels.Kernel | None = None
        self.kernel_times: dict[str, float] = {}
        self.fused: tuple[FusedProjection, int] | None = None  # QuantizedLinear in a fused projection: (it, index)

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.qweight, self.scale, self.zero_point, self.spec, self.row_scale, self.row_bits)

    def dequantized_weight(self) -> Tensor:
        return self.weight if self.weight is not None else self.quantized_tensor().dequantize()

    def set_kernel(self, request: str, rows: int) -> str:
        """Apply `request` (auto or a backend) for calls of `rows` tokens; returns the backend that runs."""
        qt = self.quantized_tensor()
        act = bool(getattr(self, "act_quant", False))
        if request == "auto":
            name, impl, self.kernel_times = kernels.choose(qt, self.dequantized_weight, act, rows)
        else:
            name, impl = request, kernels.build(request, qt, self.dequantized_weight, act)
            if impl is None:
                name, impl = "float", kernels.build("float", qt, self.dequantized_weight, act)
        self.kernel, self.impl = name, impl
        if name != "float" and not isinstance(self, QuantizedEmbedding):
            self.weight = None  # the kernel holds its own packed copy
        return name

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, granularity={s.granularity}, kernel={self.kernel}"


class QuantizedLinear(_QuantizedBase):
    """act_quant: trained with 8-bit per-token activation fake-quant (the float kernel applies it too; fbgemm,
    onednn and int_mm quantize activations the same way whether or not the model was trained so)."""

    def __init__(
        self,
        qt: QuantizedTensor,
        bias: Tensor | None,
        mode: str = "dequant",
        name: str = "linear",
        act_quant: bool = False,
    ):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.act_quant = act_quant
        self._setup(qt, mode, name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            group, index = self.fused
            return group(index, x, self.own)
        return self.own(x)

    def own(self, x: Tensor) -> Tensor:
        """This module's own kernel (outside a fused projection)."""
        if self.impl is None:
            return kernels.FloatKernel(self.weight, self.act_quant)(x, self.bias)
        return self.impl(x, self.bias)


class FusedProjection:
    """The query, key and value projections of a self-attention as one GEMM, where the three run the same
    int8-activation kernel (kernels.INT8_ACTIVATION): the input is quantized per token once and its codes meet the
    three weights' int8 rows stacked (3N, K). Each output column is the same exact integer sum, rescaled the same
    way, as in its own module's GEMM, and gets the same bias: the same bits, with one quantization and one kernel
    call instead of three. Whisper's attention (and ours) calls query(x), key(x), value(x) in that order on one
    tensor: the query's call computes all three; the key's and the value's return their columns while x is that
    very tensor, unchanged since (its version counter), in the same thread (the pending outputs are per thread, so
    one model can serve several threads). Any other call runs the module's own kernel, and so does every call on an
    inference tensor (torch.inference_mode: no version counter to tell an unchanged input)."""

    def __init__(self, kernel: kernels.Kernel, modules: list[QuantizedLinear]):
        self.kernel = kernel
        self.widths = [m.out_features for m in modules]
        self.biases = [m.bias for m in modules]
        self.local = threading.local()  # .pending: (input, its version, [outputs not yet returned])

    def __getstate__(self) -> dict:  # copies and pickles (copy.deepcopy of a model) carry no pending outputs
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.local = threading.local()

    def __call__(self, index: int, x: Tensor, own) -> Tensor:
        if x.is_inference():
            return own(x)
        if index == 0:
            shape = x.shape
            y = self.kernel.matmul(x.reshape(-1, shape[-1]))
            outputs = list(y.reshape(*shape[:-1], y.shape[-1]).split(self.widths, dim=-1))
            for i, bias in enumerate(self.biases):
                if bias is not None:
                    outputs[i].add_(bias)  # in place on a column slice: each element as in its own output
            outputs = [o.to(x.dtype) for o in outputs]
            self.local.pending = (x, x._version, outputs)
            return outputs[0]
        pending = getattr(self.local, "pending", None)
        if pending is not None and pending[0] is x and pending[1] == x._version and pending[2][index] is not None:
            out, pending[2][index] = pending[2][index], None
            if all(o is None for o in pending[2][1:]):
                self.local.pending = None  # let go of the input and the outputs
            return out
        return own(x)


def fuse_projections(model: nn.Module, enabled: bool = True) -> int:
    """Fuse the query/key/value linears of every self-attention of `model` (not the cross-attentions: their keys
    and values project the encoder's output, not the query's input) that run one int8-activation kernel; the rest
    (all of them when not `enabled`) run their own kernels. Returns the number fused."""
    fused = 0
    for name, m in model.named_modules():
        parts = [getattr(m, p, None) for p in ("query", "key", "value")]
        if not all(isinstance(p, QuantizedLinear) for p in parts):
            continue
        for p in parts:
            p.fused = None
        kinds = {p.kernel for p in parts}
        if not enabled or name.endswith("cross_attn") or len(kinds) != 1 or kinds.pop() not in kernels.INT8_ACTIVATION:
            continue
        rows = [p.quantized_tensor().int8_rows() for p in parts]
        if any(r is None for r in rows) or len({p.in_features for p in parts}) != 1:
            continue
        kernel = kernels.from_rows(
            parts[0].kernel, (torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]).contiguous())
        )
        if kernel is None:
            continue
        group = FusedProjection(kernel, parts)
        for i, p in enumerate(parts):
            p.fused = (group, i)
        fused += 1
    return fused


class QuantizedConv1d(_QuantizedBase):
    """Runs dequantized whatever the request (the convolutions run once per utterance)."""

    def __init__(
        self, qt: QuantizedTensor, bias: Tensor | None, conv: nn.Conv1d, mode: str = "dequant", name: str = "conv"
    ):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._setup(qt, "float", name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(
            x,
            self.weight.to(x.dtype),
            None if self.bias is None else self.bias.to(x.dtype),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class QuantizedEmbedding(_QuantizedBase):
    """Quantized token embedding; `project(x)` is the tied output projection (through the chosen kernel)."""

    def __init__(
        self, qt: QuantizedTensor, mode: str = "dequant", name: str = "token_embedding", act_quant: bool = False
    ):
        super().__init__()
        self.act_quant = act_quant
        self.num_embeddings, self.embedding_dim = qt.shape
        self._setup(qt, mode, name)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)

    def project(self, x: Tensor) -> Tensor:
        """(B, L, d) -> (B, L, rows) logits."""
        if self.impl is None or self.kernel == "float":
            if self.act_quant:
                q, s = kernels.quantize_tokens(x)
                x = q.mul_(s).to(x.dtype)
            return x @ self.weight.to(x.dtype).t()
        return self.impl(x, None)


QUANTIZED_TYPES = (QuantizedLinear, QuantizedConv1d, QuantizedEmbedding)


def expected_rows(name: str, n_audio_ctx: int, batch: int) -> int:
    """Tokens per call of module `name` when decoding `batch` utterances: the encoder and the cross-attention
    keys/values see every audio frame, the rest of the decoder one token per utterance and step."""
    if name.startswith("encoder.") or name.endswith(("cross_attn.key", "cross_attn.value")):
        return batch * n_audio_ctx
    return batch


def select_kernels(model: nn.Module, request: str | None = None, batch: int = 1, fuse: bool = True) -> dict[str, int]:
    """Apply each quantized module's kernel request (or `request` for all), timing each distinct shape once under
    auto; a model off the CPU runs float. Then, with `fuse`, each self-attention's query/key/value run as one GEMM
    where they can (`fuse_projections`: the same bits). Logs and returns {backend: modules};
    `model.kernel_choices` holds {module: (backend, {backend: seconds measured})}."""
    if request is not None:
        request = kernel_request(request)
    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    n_ctx = model.dims.n_audio_ctx if hasattr(model, "dims") else 1
    counts: dict[str, int] = {}
    choices = {}
    forced_int8, fallback = [], []
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
                continue
            want = "float" if device.type != "cpu" else request or m.requested
            got = m.set_kernel(want, expected_rows(name, n_ctx, batch))
            if want not in ("auto", got):
                fallback.append(name)
            if got in kernels.INT8_ACTIVATION and not m.act_quant:
                forced_int8.append(name)
            counts[got] = counts.get(got, 0) + 1
            choices[name] = (got, dict(m.kernel_times))
    model.kernel_choices = choices
    if fallback:
        log.info(
            "%d quantized modules cannot run the requested kernel (per-group scales or codes beyond int8) and "
            "run dequantized in float, e.g. %s",
            len(fallback),
            fallback[0],
        )
    if forced_int8:
        log.warning(
            "%d modules trained with float activations run a kernel that quantizes them to int8 per token "
            "(as requested; auto would not), e.g. %s",
            len(forced_int8),
            forced_int8[0],
        )
    fused = fuse_projections(model, fuse)
    log.info(
        "kernels: %s%s",
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"; {fused} self-attentions' query/key/value fused" if fused else "",
    )
    return counts


def log_kernels(model: nn.Module) -> dict[str, int]:
    """{backend: quantized linears/embeddings running it}."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts
