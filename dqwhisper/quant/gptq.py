"""GPTQ rounding for fake-quantized linears: the codes chosen column by column with the error fed forward.

Round-to-nearest quantizes each weight alone. GPTQ (Frantar et al., 2023) quantizes a linear's input columns in order
and moves each column's rounding error onto the columns not yet quantized, weighted by the inverse of the layer's
input Hessian H = X^T X (X: the layer's inputs on calibration audio), which minimises ||X W^T - X Q^T|| instead of
||W - Q||. The scales stay what the quantizer has (MSE-initialised LSQ scales); only the integer codes change, and
the module's float weight is set to the dequantized codes so that the fake-quant forward, convert and export all
reproduce them exactly. For frozen weights (a QAT student's encoder, PTQ) these are the final codes; weights that
train start QAT from them. With `act_order` the columns go in order of decreasing Hessian diagonal (the inputs with
the most energy first, while the most columns are left to absorb their error); each column keeps its own group
scale, so the groups and their (int8-multiple) scales are those of round-to-nearest. The tied token embedding keeps
round-to-nearest codes: GPTQ on its projection's inputs (tried) raised the 4-bit student's dev cross-entropy (1.93
vs 1.79 nats, decoder-only PTQ); it is the lookup too.

    gptq_(model, batches, scope="encoder.", run=lambda m, b: m.encoder(b))   # run(model, batch) per batch
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqwhisper.quant.config import GPTQ_GRANULARITIES
from dqwhisper.quant.fake_quant import FakeQuantizedConv1d, FakeQuantizedLinear
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


class HessianAccumulator:
    """Sum of x^T x over every input row a linear sees (inputs flattened to (N, in_features))."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.h += (x.T @ x).cpu().to(torch.float64)  # float32 products (4x faster), float64 sum over batches
        self.rows += x.shape[0]


@torch.no_grad()
def gptq_codes(
    weight: Tensor,
    scale: Tensor,
    group: int,
    qmin: int,
    qmax: int,
    h: Tensor,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> Tensor:
    """GPTQ-rounded integer codes (out, in) of `weight` (out, in) for symmetric scales `scale` (out, in // group),
    input Hessian `h` (in, in). `act_order`: columns are rounded in order of decreasing diag(h) (each column keeps
    its own group's scale, so the groups and their scales are unchanged)."""
    w = weight.detach().to(torch.float64).clone()
    n_out, n_in = w.shape
    s = scale.detach().to(torch.float64).repeat_interleave(group, dim=1)  # (out, in)
    h = h.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        q = gptq_codes(w[:, perm], s[:, perm], 1, qmin, qmax, h[perm][:, perm], damp, block, act_order=False)
        return q[:, torch.argsort(perm)]
    h += torch.eye(n_in, dtype=h.dtype) * (damp * torch.diag(h).mean())
    # the upper Cholesky factor of H^-1: row j holds the weights that spread column j's error onto columns > j
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for i0 in range(0, n_in, block):
        i1 = min(i0 + block, n_in)
        wb, errb, hb = w[:, i0:i1].clone(), torch.zeros(n_out, i1 - i0, dtype=w.dtype), hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col, sc = wb[:, j], s[:, i0 + j]
            code = torch.clamp(torch.round(col / sc), qmin, qmax)
            q[:, i0 + j] = code
            err = (col - code * sc) / hb[j, j]
            wb[:, j:] -= err[:, None] * hb[j, j:][None, :]
            errb[:, j] = err
        w[:, i1:] -= errb @ hinv[i0:i1, i1:]
    return q


class _Stop(Exception):
    pass


def _stop(*_):
    raise _Stop


def _adder(acc: HessianAccumulator, module: nn.Module):
    if isinstance(module, FakeQuantizedConv1d):  # a convolution is a linear over its input patches (in * k)
        k, (stride,), (pad,) = module.kernel_size[0], module.stride, module.padding

        def add_patches(_m, args):
            x = F.unfold(args[0].unsqueeze(2), (1, k), padding=(0, pad), stride=(1, stride))  # (B, in * k, L)
            acc.add(x.transpose(1, 2))

        return add_patches
    return lambda _m, args: acc.add(args[0])


def _block_of(name: str) -> str:
    """`encoder.blocks.3.mlp.0` -> `encoder.blocks.3` (the first numbered part); a name without one is its own group."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


@torch.no_grad()
def _round_layer(
    m: FakeQuantizedLinear | FakeQuantizedConv1d, h: Tensor, damp: float, act_order: bool = False
) -> float:
    """GPTQ codes for one layer written into its weight; returns its output error over round-to-nearest's."""
    wfq = m.weight_fake_quantizer
    w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
    s, _ = wfq.scale_zero(w)
    s = s.detach().float().reshape(w.shape[0], -1)
    group = w.shape[1] // s.shape[1]
    q = gptq_codes(w, s, group, wfq.spec.qmin, wfq.spec.qmax, h, damp=damp, act_order=act_order)
    new_w = (q * s.double().repeat_interleave(group, dim=1)).to(m.weight.dtype)
    rtn = wfq(m.weight).detach().double().reshape(w.shape)

    def out_err(d: Tensor) -> float:
        return float(((d @ h) * d).sum().clamp(min=0).sqrt())

    ratio = out_err(new_w.double() - w.double()) / max(out_err(rtn - w.double()), 1e-30)
    m.weight.copy_(new_w.reshape(m.weight.shape))
    wfq._cache = None
    return ratio


def _targets(model: nn.Module, scope: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (FakeQuantizedLinear, FakeQuantizedConv1d)) or not name.startswith(scope):
            continue
        wfq = m.weight_fake_quantizer
        if wfq.ggml or not wfq.spec.symmetric or wfq.spec.granularity not in GPTQ_GRANULARITIES:
            raise DQWhisperError(
                f"GPTQ: {name} is {wfq.spec.granularity} (symmetric={wfq.spec.symmetric}); "
                "it handles symmetric per-channel and per-group scales"
            )
        out.append((name, m))
    return out


@torch.no_grad()
def gptq_(
    model: nn.Module,
    batches: Iterable,
    scope: str = "encoder.",
    run: Callable[[nn.Module, object], object] | None = None,
    damp: float = 0.01,
    act_order: bool = False,
) -> dict[str, float]:
    """GPTQ-round every fake-quantized linear whose name starts with `scope`, in place, from the inputs those linears
    see while `run(model, batch)` (default: model(batch)) goes over `batches`. Blocks (`...blocks.N`) are done in
    model order, each with the inputs that the already-rounded blocks before it produce (the linears inside one block
    see round-to-nearest neighbours), and each pass stops after the block it needs. Returns, per layer, GPTQ's
    output error ||X(Q - W)^T|| over round-to-nearest's (< 1: GPTQ helps)."""
    run = run or (lambda m, b: m(b))
    batches = list(batches)
    targets = _targets(model, scope)
    if not targets:
        raise DQWhisperError(f"GPTQ: no fake-quantized linear under {scope!r}")
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, m in targets:
        groups.setdefault(_block_of(name), []).append((name, m))
    was_training = model.training
    model.eval()
    ratios: dict[str, float] = {}
    try:
        for members in groups.values():
            accs = [HessianAccumulator(m.weight[0].numel()) for _, m in members]
            hooks = [m.register_forward_pre_hook(_adder(a, m)) for (_, m), a in zip(members, accs)]
            last = members[-1][1]
            hooks.append(last.register_forward_hook(_stop))
            try:
                for b in batches:
                    try:
                        run(model, b)
                    except _Stop:
                        pass
            finally:
                for hk in hooks:
                    hk.remove()
            for (name, m), acc in zip(members, accs):
                if acc.rows == 0:  # not on the path `run` takes (a CTC head under a decoder pass): left as it is
                    log.info("GPTQ: %s saw no input, left at round-to-nearest", name)
                    continue
                ratios[name] = _round_layer(m, acc.h, damp, act_order)
                log.debug("GPTQ %s: %d input rows, output error %.3g of RTN's", name, acc.rows, ratios[name])
    finally:
        model.train(was_training)
    mean = sum(ratios.values()) / max(len(ratios), 1)
    log.info(
        "GPTQ: %d layers under %r rounded; output error %.2f of round-to-nearest's on average",
        len(ratios),
        scope,
        mean,
    )
    return ratios
