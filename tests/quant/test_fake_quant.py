"""The quantizer math: ranges, granularities, STE and LSQ gradients, fp16 scales."""

from __future__ import annotations

import math

import pytest
import torch

from dqwhisper.quant.fake_quant import (
    ActivationFakeQuantizer,
    QuantSpec,
    WeightFakeQuantizer,
    dequantize_codes,
    minmax_scale_zero,
    quantize_codes,
)
from dqwhisper.utils import DQWhisperError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_codes_in_range_and_error_bounded(bits, symmetric, granularity):
    torch.manual_seed(bits)
    w = torch.randn(16, 128)
    spec = QuantSpec(bits, symmetric, granularity, 32 if granularity == "per_group" else 0)
    fq = WeightFakeQuantizer(spec, w)
    q, s, z = fq.codes(w)
    assert q.shape == spec.grouped_shape(w.shape)
    assert float(q.min()) >= spec.qmin and float(q.max()) <= spec.qmax
    assert torch.equal(q, q.round())
    assert torch.equal(s, s.half().float()), "effective scales must be fp16-representable"
    # min/max scales never clip: every weight is within half a step of its grid point
    err = (fq(w) - w).abs().reshape(q.shape)
    assert bool((err <= s.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all())
    expected_scales = {"per_tensor": 1, "per_channel": 16, "per_group": 16 * 4}[granularity]
    assert s.numel() == expected_scales


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    errors = [float((WeightFakeQuantizer(QuantSpec(b), w)(w) - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 1000


def test_symmetric_uses_all_levels_and_zero_is_exact():
    w = torch.linspace(-1, 1, 301).reshape(1, 301)
    for symmetric in (True, False):
        spec = QuantSpec(4, symmetric, "per_channel")
        q, s, z = WeightFakeQuantizer(spec, w).codes(w)
        # min/max scales round up to fp16, so one end level may stay unused on data symmetric around 0
        assert len(torch.unique(q)) >= 15
        zero = torch.zeros(1, 1, 1)
        assert float(dequantize_codes(quantize_codes(zero, s, z, spec), s, z)) == 0.0


def test_asymmetric_uses_all_levels_on_one_sided_data():
    w = torch.linspace(0, 1, 301).reshape(1, 301)
    q, s, z = WeightFakeQuantizer(QuantSpec(4, False), w).codes(w)
    assert len(torch.unique(q)) == 16 and float(z) == 0


def test_ste_gradient_passes_through_rounding():
    w = torch.randn(8, 64, requires_grad=True)
    fq = WeightFakeQuantizer(QuantSpec(4), w)
    fq(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # min/max clips at most half a step: STE gradient 1 everywhere
    w2 = w.detach().clone().requires_grad_(True)
    fq_clip = WeightFakeQuantizer(QuantSpec(4), w, lsq=True, scale_init="minmax")
    with torch.no_grad():
        fq_clip.scale.mul_(0.5)  # half the range: the largest weights are now clipped by more than half a step
    fq_clip(w2).sum().backward()
    assert 0 < int((w2.grad == 0).sum()) < w2.numel()


def test_lsq_gradient_reaches_scale_with_paper_scaling():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    spec = QuantSpec(4, True, "per_channel")
    fq = WeightFakeQuantizer(spec, w, lsq=True, scale_init="minmax")
    target = torch.randn_like(w)
    loss = ((fq(w) - target) ** 2).sum()
    loss.backward()
    assert fq.scale.grad is not None and bool((fq.scale.grad.abs() > 0).all())
    # analytic LSQ gradient: dL/ds = sum dL/dw_q * (q - w/s) (in range) or q (clipped), times 1/sqrt(n * Qp)
    with torch.no_grad():
        s = fq.scale.half().float().unsqueeze(-1)
        v = w.reshape(4, 1, 64) / s
        q = v.clamp(spec.qmin, spec.qmax).round()
        inside = (v >= spec.qmin - 0.5) & (v <= spec.qmax + 0.5)
        dq_ds = torch.where(inside, q - v, q)
        upstream = 2 * ((q * s).reshape(4, 64) - target).reshape(4, 1, 64)
        expected = (upstream * dq_ds).sum(-1) / math.sqrt(64 * spec.qmax)
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-4, atol=1e-6)


def test_lsq_learns_a_better_scale():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    fq = WeightFakeQuantizer(QuantSpec(3), w, lsq=True, scale_init="minmax")
    start = float((fq(w) - w).pow(2).mean().detach())
    opt = torch.optim.Adam(fq.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        (fq(w) - w).pow(2).mean().backward()
        opt.step()
    assert float((fq(w) - w).pow(2).mean()) < 0.8 * start


def test_mse_init_not_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 512)
    w[:, 0] *= 8  # an outlier per row: clipping pays
    spec = QuantSpec(3)
    e_mm = (WeightFakeQuantizer(spec, w, lsq=True, scale_init="minmax")(w) - w).pow(2).sum()
    e_mse = (WeightFakeQuantizer(spec, w, lsq=True, scale_init="mse")(w) - w).pow(2).sum()
    assert e_mse < e_mm


def test_asymmetric_lsq_zero_point_learns():
    torch.manual_seed(0)
    w = torch.rand(4, 64) + 0.5  # all positive
    fq = WeightFakeQuantizer(QuantSpec(4, False), w, lsq=True)
    (fq(w) - w.flip(-1)).pow(2).sum().backward()
    assert fq.zero_point.grad is not None and fq.scale.grad is not None


def test_group_size_must_divide():
    with pytest.raises(DQWhisperError, match="group_size 48 does not divide"):
        QuantSpec(4, True, "per_group", 48).grouped_shape((8, 64))


def test_activation_fake_quant_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * torch.logspace(-2, 2, 5).reshape(1, 5, 1)
    y = ActivationFakeQuantizer(8)(x)
    rel = (y - x).abs().amax(-1) / x.abs().amax(-1)
    assert bool((rel <= 0.5 / 127.5 + 1e-6).all())  # each token's own scale
    assert not torch.equal(x, y)


def test_activation_fake_quant_without_gradient_is_the_same_arithmetic_bit_for_bit():
    """Where no gradient is needed (frozen encoders' caches, validation, export), the activation fake quantizer
    takes quantize_tokens' shorter path: the same bits as the autograd path, which still passes gradients."""
    g = torch.Generator().manual_seed(1)
    fq = ActivationFakeQuantizer(8)
    for shape in ((2, 5, 64), (40, 64), (3, 37, 96)):  # few and many rows take different paths to max |x|
        x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)
        x[..., 0, :] = 0.0
        with torch.no_grad():
            fast = fq(x)
        xg = x.clone().requires_grad_(True)
        slow = fq(xg)
        torch.testing.assert_close(fast, slow.detach(), atol=0, rtol=0)
        slow.sum().backward()
        assert xg.grad is not None and bool((xg.grad != 0).any())


def test_minmax_scale_all_zero_weight():
    s, z = minmax_scale_zero(torch.zeros(2, 1, 8), QuantSpec(8))
    assert bool((s > 0).all())


def test_lsq_mse_init_runs_lazily_and_not_over_loaded_scales():
    torch.manual_seed(0)
    w = torch.randn(16, 512)
    w[:, 0] *= 8
    spec = QuantSpec(3)
    fq = WeightFakeQuantizer(spec, w, lsq=True, scale_init="mse")
    minmax = fq.scale.detach().clone()
    sd = fq.state_dict()  # saving resolves the pending MSE search
    assert not torch.equal(sd["scale"], minmax)
    other = WeightFakeQuantizer(spec, w, lsq=True, scale_init="mse")
    loaded = torch.full_like(minmax, 0.25)
    other.load_state_dict({"scale": loaded})
    other(w)
    assert torch.equal(other.scale.detach(), loaded)  # the checkpoint's scales win: no search over them


@pytest.mark.parametrize(
    "spec, lsq, hi_bits",
    [
        (QuantSpec(4, True, "per_group_int8", 16), True, 5),
        (QuantSpec(3, True, "per_group", 16), True, None),
        (QuantSpec(8, True, "per_channel"), False, None),
    ],
)
@pytest.mark.parametrize("weight_trains", [True, False])
def test_fused_forward_and_gradients_equal_the_composed_ops(spec, lsq, hi_bits, weight_trains):
    torch.manual_seed(0)
    w = torch.randn(12, 64).requires_grad_(weight_trains)
    fq = WeightFakeQuantizer(spec, w, lsq=lsq, scale_init="minmax", hi_bits=hi_bits)
    if hi_bits:
        fq.set_hi_rows(torch.tensor([1, 5, 7]))
    if lsq:
        with torch.no_grad():
            fq.scale.mul_(0.7)  # some weights clipped by more than half a step: both gradient cases occur
    upstream = torch.randn(12, 64)

    def run(fused: bool):
        w.grad = None
        if lsq:
            fq.scale.grad = None
        if fused:
            out = fq(w)
        else:
            s, z = fq.scale_zero(w)
            q = quantize_codes(w.float().reshape(fq.grouped), s, z, fq.spec, fq.bounds())
            out = dequantize_codes(q, s, z).reshape(w.shape)
        if w.requires_grad or lsq:
            (out * upstream).sum().backward()
        return out.detach(), w.grad, fq.scale.grad if lsq else None

    out, gw, gs = run(True)
    ref, ref_gw, ref_gs = run(False)
    assert torch.equal(out, ref)  # the same codes and scales, bit for bit
    if weight_trains:
        assert 0 < int((gw == 0).sum()) < gw.numel() or not lsq
        torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-7)
    else:
        assert gw is None and ref_gw is None
    if lsq:
        # sums of 16-64 terms in another order: close to the largest gradient's float32 rounding
        torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=1e-5 * float(ref_gs.abs().max()))
