"""Kernels for the exported low-bit linears and the tied vocabulary projection, chosen per shape at load time.

Backends (each packs its weights once, when chosen; `__call__(x, bias)` takes (..., K) float32 -> (..., N)):
| backend     | activations                            | weights              | equals the fake-quant forward     |
|-------------|----------------------------------------|----------------------|-----------------------------------|
| float       | as trained (float, or per-token f.-q.) | dequantized float32  | bit for bit (the same operations) |
| fbgemm      | int8 per token, codes as in QAT        | int8, per-row scales | exact integer sums; f32 rounding  |
| onednn      | int8 per token, codes as in QAT        | int8, per-row scales | exact integer sums; f32 rounding  |
| int_mm      | int8 per token, codes as in QAT        | int8, per-row scales | exact integer sums; f32 rounding  |
| float_codes | int8 per token, codes as in QAT        | codes as float32     | exact integer sums; f32 rounding  |
| weight_only | as trained                             | int8/int4 packed     | f32 rounding (another summation)  |
The four int8-activation backends give the same float32 bits: each forms the exact integer sum of code products
(float_codes in the float GEMM, exact over at most two blocks of K * 128 * max |weight code| <= 2^24 each: 8-bit
weights up to K = 2048; it is not built otherwise), converts it to float32 and rescales it as fbgemm does: times the
row scale, then times the token scale. So what `auto` picks among them (by timing, which varies from run to
run) never changes a transcript.
fbgemm runs on our own per-token integer codes through `quantized.linear_with_input_q_dq_qweight_dq_output_fp32`,
which takes the input's scale and zero point as given (1 and 128): the codes pass through unchanged, with no range
pass over the activations (`linear_dynamic` needs one, and an extra input row to pin it). Without VNNI,
fbgemm adds u8*s8 pairs in saturating int16 (vpmaddubsw); a probe at first use detects that, and weights with codes
beyond +-64 then run as two GEMMs on halves of the activation codes (each pair sum fits int16), so the sums stay exact.
`torch._int_mm` is fast only where torch sends it to oneDNN (mkldnn enabled and AVX512-VNNI); elsewhere it is a
plain loop, 20-50x slower than float.
onednn runs oneDNN's int8 matmul (`torch.ops.onednn.qlinear_pointwise`, signed codes at zero point 0, the row scales
as its weight scales, float32 out), which uses AMX tiles on CPUs that have them: on an AMX Xeon it took 0.3-0.6x
fbgemm's time on the encoder's shapes (400 x 512 x 2048). Without VNNI its int16 pair sums saturate; a probe at
first use checks that full-range codes sum exactly, and it is not built where they do not. Without AMX (measured:
an AMD EPYC with AVX512-VNNI, oneDNN 3.10) it has no fast kernel for signed int8 inputs and runs `ref_int8`,
thousands of times slower than fbgemm; the speed probe drops it there.

What is trained is what runs: a model trained with weight-only quantization keeps float activations under `auto`
(candidates weight_only and float); fbgemm/int_mm quantize activations, so `auto` uses them only for modules
trained with activation quantization. Asking for fbgemm or int_mm by name runs them anyway (int8 activations per
token, as CTranslate2's int8 does) and says so once.

`auto`: fbgemm is a candidate wherever torch lists its quantized engine (fbgemm supports the CPU: AVX2 or later);
a short probe drops int_mm / onednn / weight_only when they have no fast kernel on this CPU; then every distinct
(rows, K, N) of the model is timed with each remaining candidate (round-robin, best of 5, in process CPU time so
that other jobs on a shared machine do not decide). Weight-only modules: a candidate replaces float only when it is
at least 10% faster, so auto is never slower than float on the measured shapes. Modules trained with int8
activations: the fastest of the int8 backends, which give the same bits (float_codes, whose GEMM is float's own,
among them), never float: float's sums round, so a timing-dependent switch to it changed transcripts from one run to
the next (round 10: the same PTQ file scored 53.5% and 52.5% on test, with float chosen for 12 linears and for 1).
Float stays their fallback where no int8 backend can be built. Rows are the tokens a call sees: batch x audio frames
in the encoder and the cross-attention keys/values, batch in the decoder.

`DQW_EMULATE_CPU=avx2` (scripts/emulate_avx2.sh sets it with the ISA limits) disables mkldnn in this process, which
sends `_int_mm` down the path a CPU without AVX512-VNNI takes (torch's dispatch checks mkldnn and VNNI).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dqwhisper.quant.fake_quant import quantize_tokens  # noqa: F401 (the int8 backends' codes; re-exported)
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)
BACKENDS = ("fbgemm", "onednn", "int_mm", "float_codes", "weight_only", "float")
CHOICES = ("auto",) + BACKENDS
INT8_ACTIVATION = ("fbgemm", "onednn", "int_mm", "float_codes")
EXACT_FLOAT_SUM = 2**24  # integers up to this add exactly in float32, in any order
MARGIN = 0.9  # a kernel replaces float only when it takes at most this fraction of float's time
EMULATION_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def apply_cpu_emulation() -> str | None:
    """Honour DQW_EMULATE_CPU=avx2 (see the module docstring); returns the emulated ISA or None."""
    isa = os.environ.get("DQW_EMULATE_CPU")
    if not isa:
        return None
    if isa != "avx2":
        raise DQWhisperError(f"DQW_EMULATE_CPU={isa!r}: only 'avx2' is supported")
    wrong = [f"{k}={v}" for k, v in EMULATION_ENV.items() if os.environ.get(k) != v]
    if wrong:
        raise DQWhisperError(
            f"DQW_EMULATE_CPU=avx2 needs {', '.join(wrong)} set before python starts "
            "(run the command through scripts/emulate_avx2.sh)"
        )
    torch.backends.mkldnn.enabled = False
    return isa


EMULATED = apply_cpu_emulation()


def max_abs_code(w_int8: Tensor) -> int:
    """max |code| of int8 codes (in int16: int8's abs(-128) wraps to -128)."""
    return int(w_int8.to(torch.int16).abs().max())


def rescale(acc: Tensor, row_scale: Tensor, s: Tensor) -> Tensor:
    """The int8 backends' one rescale of an exact integer sum (M, N): as float32, times the row scale, then times the
    token scale (fbgemm's own order): the same bits from every backend. Overwrites `acc` when it is float32."""
    return (acc.mul_(row_scale) if acc.dtype == torch.float32 else torch.mul(acc, row_scale)).mul_(s)


class Kernel:
    name = "float"
    int8_activations = False

    def matmul(self, x: Tensor) -> Tensor:  # (M, K) float32 -> (M, N) float32
        raise NotImplementedError

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        # a decoder step's linears take ~50 us: each skipped no-op call (reshape, to) is a few percent of one
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self.matmul(flat)  # a fresh tensor: the bias is added in place
        if flat is not x:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        if bias is not None:
            y = y.add_(bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class FloatKernel(Kernel):
    """The fake-quant forward's own operations: bit-identical to it."""

    def __init__(self, weight: Tensor, act_quant: bool):
        self.weight, self.act_quant = weight, act_quant

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.act_quant:
            q, s = quantize_tokens(x)
            x = q.mul_(s).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class IntMMKernel(Kernel):
    name, int8_activations = "int_mm", True

    def __init__(self, w_int8: Tensor, row_scale: Tensor):
        self.w_t, self.row_scale = w_int8.t(), row_scale

    def matmul(self, x: Tensor) -> Tensor:
        q, s = quantize_tokens(x)
        return rescale(torch._int_mm(q.to(torch.int8), self.w_t), self.row_scale, s)


class FloatCodesKernel(Kernel):
    """The int8 path's arithmetic in the float GEMM: integer-valued activation codes times the weight's integer
    codes as float32, in float's own weight layout (N, K). Over a block of at most `block` input features every
    product and partial sum is an integer below 2^24, so the block's sum is exact in any summation order. A weight
    wider than one block (8-bit codes at K = 2048: the encoder's second FFN linear) runs as two blocks whose exact sums
    are added once: one float32 rounding of the exact integer sum, as the int8 backends' conversion of their int32
    sum. So: the same float32 bits as fbgemm / int_mm at float's speed. Not built over two blocks."""

    name, int8_activations = "float_codes", True

    def __init__(self, w_int8: Tensor, row_scale: Tensor):
        w, k = w_int8.float(), w_int8.shape[1]
        self.half = 0 if k <= self.block(w_int8) else (k + 1) // 2  # the first block's width (0: one block)
        self.parts = [t.contiguous() for t in ((w[:, : self.half], w[:, self.half :]) if self.half else (w,))]
        self.row_scale = row_scale

    @staticmethod
    def block(w_int8: Tensor) -> int:
        """Input features whose code products (activation codes up to 128 in size) sum exactly in float32."""
        return EXACT_FLOAT_SUM // (128 * max(1, max_abs_code(w_int8)))

    @staticmethod
    def exact(w_int8: Tensor) -> bool:
        return w_int8.shape[1] <= 2 * FloatCodesKernel.block(w_int8)

    def matmul(self, x: Tensor) -> Tensor:
        q, s = quantize_tokens(x)
        if not self.half:
            acc = F.linear(q, self.parts[0])
        else:
            acc = F.linear(q[:, : self.half], self.parts[0]).add_(F.linear(q[:, self.half :], self.parts[1]))
        return rescale(acc, self.row_scale, s)


_SATURATES: bool | None = None


def fbgemm_saturates() -> bool:
    """Whether fbgemm's int8 GEMM on this CPU adds u8*s8 pairs in saturating int16 (no VNNI). Probed once."""
    global _SATURATES
    if _SATURATES is None:
        k = 64
        ones, zeros = torch.ones(8, dtype=torch.double), torch.zeros(8, dtype=torch.long)
        w = torch._make_per_channel_quantized_tensor(torch.full((8, k), 127, dtype=torch.int8), ones, zeros, 0)
        x = torch.full((1, k), 127.0)  # uint8 255 at zero point 128: pair sums of 2 * 255 * 127 overflow int16
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, 1.0, 128, torch.ops.quantized.linear_prepack(w, None)
        )
        _SATURATES = float(y[0, 0]) != 127.0 * 127.0 * k
        log.info(
            "fbgemm int8 GEMM %s",
            "saturates int16 pair sums (no VNNI): 8-bit weights run as two GEMMs"
            if _SATURATES
            else "sums exactly (VNNI)",
        )
    return _SATURATES


class FbgemmKernel(Kernel):
    name, int8_activations = "fbgemm", True

    def __init__(self, w_int8: Tensor, row_scale: Tensor):
        n, k = w_int8.shape
        self.split = fbgemm_saturates() and max_abs_code(w_int8) > 64
        # fbgemm rescales its exact sum by its weight scale, then we by the token scale. Split, the halves' sums
        # are added first (unscaled: weight scale 1), then rescaled the same way: the same bits while the
        # integer sums stay below 2^24
        self.row_scale = row_scale
        scale = torch.ones(n, dtype=torch.double) if self.split else row_scale.double()
        qw = torch._make_per_channel_quantized_tensor(w_int8.contiguous(), scale, torch.zeros(n, dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.zero_point = 64 if self.split else 128  # codes + zero point are fbgemm's uint8 inputs

    def gemm(self, codes: Tensor) -> Tensor:
        """(M, K) integer-valued float32 codes -> (M, N) float32 sums times the packed weight scale."""
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes, 1.0, self.zero_point, self.packed
        )

    def matmul(self, x: Tensor) -> Tensor:
        q, s = quantize_tokens(x)
        if not self.split:
            return self.gemm(q).mul_(s)
        # split: q = q1 + q2 with both in [-64, 64], so u8 = q + 64 <= 128 and 2 * 128 * 128 fits int16
        m = x.shape[0]
        q1 = q.clamp(-64, 63)
        y = self.gemm(torch.cat([q1, q.sub_(q1)]))
        return rescale(y[:m] + y[m:], self.row_scale, s)


_ONEDNN_EXACT: bool | None = None


def _onednn_gemm(codes: Tensor, packed: Tensor, w_scale: Tensor, w_zero: Tensor) -> Tensor:
    """(M, K) int8 codes @ packed int8 weight -> (M, N) float32: float32(exact int32 sum) * w_scale (zero points
    w_zero: zeros, made once per weight, not per call)."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], ""
    )


def onednn_exact() -> bool:
    """Whether torch has oneDNN's int8 linear here and it sums full-range int8 codes exactly. Probed once."""
    global _ONEDNN_EXACT
    if _ONEDNN_EXACT is None:
        k = 64
        w = torch.full((16, k), 127, dtype=torch.int8)
        w[1] = -128
        x = torch.full((2, k), -128, dtype=torch.int8)
        x[1] = 127
        want = x.double() @ w.double().t()  # +-16384 per product: int16 pair sums would saturate
        try:
            y = _onednn_gemm(x, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(16), torch.zeros(16).long())
            _ONEDNN_EXACT = bool(torch.equal(y.double(), want))
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN_EXACT = False
        log.info("oneDNN int8 linear %s", "sums exactly" if _ONEDNN_EXACT else "is missing or inexact here: not used")
    return _ONEDNN_EXACT


class OnednnKernel(Kernel):
    name, int8_activations = "onednn", True

    def __init__(self, w_int8: Tensor, row_scale: Tensor):
        self.packed = torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)
        self.row_scale = row_scale.float().contiguous()
        self.zero = torch.zeros(w_int8.shape[0], dtype=torch.long)

    def matmul(self, x: Tensor) -> Tensor:
        q, s = quantize_tokens(x)
        return _onednn_gemm(q.to(torch.int8), self.packed, self.row_scale, self.zero).mul_(s)


class WeightOnlyKernel(Kernel):
    """Float activations (fake-quantized per token first when trained so) against packed int8 or int4 weights."""

    name = "weight_only"
    GROUPS = (256, 128, 64, 32)

    def __init__(self, w_int8: Tensor | None, row_scale: Tensor | None, int4: tuple | None, act_quant: bool):
        self.act_quant = act_quant
        self.w_int8, self.row_scale, self.int4 = w_int8, row_scale, None
        if int4 is not None:
            codes, scale, group = int4  # codes (N, K) in [-8, 7]; scale (N, K // group)
            n = codes.shape[0]
            pad = (-n) % 16
            u = F.pad(codes.to(torch.int32) + 8, (0, 0, 0, pad), value=8)
            sz = torch.stack([F.pad(scale.t(), (0, pad)), torch.zeros(scale.shape[1], n + pad)], -1)
            self.int4 = (torch._convert_weight_to_int4pack_for_cpu(u, 1), group, sz.contiguous(), n)

    def matmul(self, x: Tensor) -> Tensor:
        if self.act_quant:
            q, s = quantize_tokens(x)
            x = q.mul_(s)
        if self.int4 is not None:
            packed, group, sz, n = self.int4
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, sz)[:, :n]
        return torch._weight_int8pack_mm(x.contiguous(), self.w_int8, self.row_scale)


def int4_groups(qt) -> tuple[Tensor, Tensor, int] | None:
    """(codes - zero in [-8, 7] (N, K), scale (N, K // g), g) when the weight fits torch's int4 CPU kernel."""
    spec, (n, k) = qt.spec, qt.shape
    if len(qt.shape) != 2 or spec.bits > 4 or spec.granularity not in ("per_tensor", "per_channel", "per_group"):
        return None
    if spec.granularity == "per_group":
        group = spec.group_size
    else:
        group = next((g for g in WeightOnlyKernel.GROUPS if k % g == 0), 0)
    if group not in WeightOnlyKernel.GROUPS or k % group:
        return None
    a, b, _ = spec.grouped_shape(qt.shape)
    codes = qt.codes.reshape(a, b, -1).to(torch.int16)
    if qt.zero is not None:
        codes = codes - qt.zero.reshape(a, b, 1).to(torch.int16)
    codes = codes.reshape(n, k)
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        return None
    scale = qt.scale.reshape(a, b).expand(n, b) if a == 1 else qt.scale.reshape(n, b)
    return codes, scale.repeat_interleave((k // group) // b, 1).float().contiguous(), group


def from_rows(backend: str, rows: tuple[Tensor, Tensor] | None) -> Kernel | None:
    """An int8-activation backend's kernel for int8 weight rows (codes (N, K), one scale per row); None when it
    cannot run them here."""
    if rows is None:
        return None
    if backend == "fbgemm":
        return FbgemmKernel(*rows)
    if backend == "onednn":
        return OnednnKernel(*rows) if onednn_exact() else None
    if backend == "int_mm":
        return IntMMKernel(*rows)
    if backend == "float_codes":
        return FloatCodesKernel(*rows) if FloatCodesKernel.exact(rows[0]) else None
    raise DQWhisperError(f"{backend!r} is not an int8-activation kernel ({', '.join(INT8_ACTIVATION)})")


def build(backend: str, qt, weight: Callable[[], Tensor], act_quant: bool) -> Kernel | None:
    """The kernel `backend` for quantized tensor `qt` (None when it cannot run this weight). `weight()`: the
    dequantized float32 weight (N, K)."""
    if backend == "float":
        return FloatKernel(weight(), act_quant)
    rows = qt.int8_rows() if len(qt.shape) == 2 else None
    if backend in INT8_ACTIVATION:
        return from_rows(backend, rows)
    if backend == "weight_only":
        int4 = int4_groups(qt)
        if int4 is not None:
            return WeightOnlyKernel(None, None, int4, act_quant)
        return None if rows is None else WeightOnlyKernel(rows[0], rows[1], None, act_quant)
    raise DQWhisperError(f"unknown kernel {backend!r}; use one of {list(CHOICES)}")


EVICT_MB = 64  # written between the cold race's calls: more than the L2 + L3 a core of these machines sees
COLD_ROUNDS = 15  # single calls are noisier than blocks of them


def race(
    fns: dict[str, Callable[[], object]],
    rounds: int = 5,
    drop_after: int = 2,
    clock: Callable[[], float] = time.process_time,
    give_up: float = 20.0,
    cold: bool = False,
) -> dict[str, float]:
    """{name: best seconds per call} of each `fns[name]()`, timed round-robin (so load on a shared machine hits all
    alike; the order rotates, so no entry always runs first) with the process's CPU time (all threads; a preempted
    thread does not count), each timing repeated until it spans >= 2 ms, after a 2 ms pause (so OpenMP threads still
    spinning after the previous block do not count against this one). Each entry is called once untimed (the first
    call may build or compile), then once timed; one whose timed call took over `give_up`x the fastest is not timed
    again (that call is its time: a reference kernel that takes seconds a call must not make loading take
    minutes). After `drop_after` rounds, entries over 2x the first entry's time stop being timed.
    cold: each timing is one call after a write over EVICT_MB of memory (untimed), as a decoder step's linears run:
    the step streams ~33 MB of weights, so each linear's weights come from memory, which back-to-back calls hide."""
    inner, once = {}, {}
    scratch = torch.zeros(EVICT_MB * 2**18) if cold else None
    for name, fn in fns.items():
        fn()  # the first call may build or JIT-compile (oneDNN's primitives): not a measure of speed
        if scratch is not None:
            scratch.add_(1.0)
        start = clock()
        fn()
        once[name] = max(clock() - start, 1e-6)
        inner[name] = 1 if cold else max(1, min(1000, int(2e-3 / once[name])))
    first = next(iter(fns))
    best = {name: (once[name] if once[name] > give_up * min(once.values()) else math.inf) for name in fns}
    active = [name for name in fns if name == first or best[name] == math.inf]
    for r in range(rounds):
        for name in active[r % len(active) :] + active[: r % len(active)]:  # each name leads some rounds
            if scratch is not None:
                scratch.add_(1.0)  # evicts this weight (and spans the previous block's spinning threads)
            else:
                time.sleep(0.002)  # the previous block's worker threads stop spinning outside this block's time
            start = clock()
            for _ in range(inner[name]):
                fns[name]()
            best[name] = min(best[name], (clock() - start) / inner[name])
        if r + 1 == drop_after:
            active = [n for n in active if n == first or best[n] <= 2 * best[first]]
    return best


_FAST: dict[str, bool] = {}
PROBE_ROWS = (64, 512)  # a decoder-like and an encoder-like row count
REFERENCE_KERNEL = 50.0  # x float on the small probe: a reference kernel (oneDNN's ref_int8 is ~1000x), no rerun


def _probe(backend: str, rows: int) -> tuple[float, float]:
    """(backend, float) CPU seconds per call on a (rows x 512) @ (512 x 512) product."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=g)
    s = torch.full((512,), 1e-3)
    x = torch.randn(rows, 512, generator=g)
    fast = {
        "int_mm": lambda: IntMMKernel(w, s),
        "weight_only": lambda: WeightOnlyKernel(w, s, None, False),
        "onednn": lambda: OnednnKernel(w, s),
    }[backend]()
    ref = FloatKernel(w.float() * s[:, None], False)
    t = race({"float": lambda: ref(x, None), backend: lambda: fast(x, None)}, rounds=3)
    return t[backend], t["float"]


def has_fast_kernel(backend: str) -> bool:
    """fbgemm: whether torch has its engine here (it has AVX2 and AVX512 kernels; the per-shape race decides, as a
    timing probe of one small shape, where it is ~1.5x float on AVX2, can drop it by noise). The others: one probe per
    process, is `backend` under 2x float's CPU time on a (64 x 512) @ (512 x 512) product, or, where it is between 2x
    and REFERENCE_KERNEL x there, on 512 rows? The probe keeps reference kernels out of the per-shape race (which
    then picks the fastest): oneDNN has a fast kernel for int8 x int8 only with AMX (on an AMD EPYC with AVX512-VNNI
    it runs `ref_int8`, 15 s for a product fbgemm does in 2.4 ms, and timing every shape with it took 4 minutes a
    model before this probe). With AMX, oneDNN's per-call overhead made it 0.4-2.3x float on the small shape from
    load to load, and 9x once, while it is 0.2-0.5x on the encoder's: the small shape alone dropped it by chance."""
    if backend == "fbgemm":
        return "fbgemm" in torch.backends.quantized.supported_engines
    if backend == "onednn" and not onednn_exact():
        return False
    if backend not in _FAST:
        tried = []
        for rows in PROBE_ROWS:
            t, t_float = _probe(backend, rows)
            tried.append(f"{rows} rows {t * 1e3:.3f} ms vs float {t_float * 1e3:.3f} ms")
            if t < 2 * t_float or t > REFERENCE_KERNEL * t_float:
                break
        _FAST[backend] = t < 2 * t_float
        log.info(
            "kernel probe: %s %s (CPU time)%s",
            backend,
            ", ".join(tried),
            "" if _FAST[backend] else f": no fast {backend} kernel here, not a candidate",
        )
    return _FAST[backend]


_TIMES: dict[tuple, dict[str, float]] = {}


STEP_ROWS = 64  # at most this many rows a call: a decoder step's linears (one token per utterance and beam)


def candidates(act_quant: bool) -> list[str]:
    names = ["fbgemm", "onednn", "int_mm", "weight_only"] if act_quant else ["weight_only"]
    fast = [b for b in names if has_fast_kernel(b)]
    return fast + ["float_codes"] if act_quant else fast  # float_codes runs float's own GEMM: no probe


def choose(qt, weight: Callable[[], Tensor], act_quant: bool, rows: int) -> tuple[str, Kernel, dict[str, float]]:
    """auto: (backend, its kernel, {backend: CPU seconds per call}) for a weight run on `rows` tokens per call.
    Timed once per distinct shape and kind in a process (the cache key), on a random input."""
    n, k = qt.shape[0], math.prod(qt.shape[1:])
    built = {"float": build("float", qt, weight, act_quant)}
    for name in candidates(act_quant):
        kernel = build(name, qt, weight, act_quant)
        if kernel is not None:
            built[name] = kernel
    one_pass = [b for b in ("fbgemm", "onednn", "int_mm") if b in built and not getattr(built[b], "split", False)]
    if rows <= STEP_ROWS and "float_codes" in built and one_pass:
        # A decoder step streams ~33 MB of weights from memory (the vocabulary projection evicts the rest) and
        # float_codes reads 4x the bytes of int8. A hot-cache race of a 512 x 512 linear at 8 rows cannot see that
        # (every backend within 10-20% of the others); picking float_codes for 18 of a 4-bit student's linears
        # decoded 1.27x slower than fbgemm on all of them (README, round 22). So small calls race int8 only, where
        # an int8 kernel runs in one pass (and since, cold: see race). fbgemm without VNNI runs 8-bit weights as two
        # GEMMs (split): there float_codes stays in (emulated AVX2, 1 x 512 x 512: 214-229 vs 342-374 us with the
        # caches evicted before each call, 78 vs 121 us hot).
        del built["float_codes"]
    key = (rows, k, n, act_quant) + tuple(
        (name, getattr(kern, "split", None), getattr(kern, "int4", None) is None) for name, kern in built.items()
    )
    if key not in _TIMES:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
        fns = {name: (lambda kern=kern: kern(x, None)) for name, kern in built.items()}
        cold = rows <= STEP_ROWS
        _TIMES[key] = race(fns, rounds=COLD_ROUNDS, cold=True) if cold else race(fns)
    times = _TIMES[key]
    exact = [name for name in built if name in INT8_ACTIVATION]
    if act_quant and exact:  # one of the bit-identical int8 backends, whatever the timing: the same transcripts
        best = min(exact, key=times.get)
    else:
        best = min(times, key=times.get)
        if best != "float" and times[best] > MARGIN * times["float"]:
            best = "float"
    return best, built[best], dict(times)


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def describe_cpu(threads: int) -> str:
    """One line: the CPU model, its SIMD flags that matter here, the emulation, threads and the load average."""
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    emu = f"EMULATED {EMULATED.upper()} (scripts/emulate_avx2.sh)" if EMULATED else "native"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"CPU: {model}; flags: {' '.join(have) or '-'}; {emu}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}); fbgemm saturates int16: {fbgemm_saturates()}; "
        f"{threads} threads; load average {load}"
    )
