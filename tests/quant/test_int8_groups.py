"""per_group_int8: group scales that are integer multiples of a float16 row scale (4-bit codes at group accuracy,
run exactly by the int8 per-row kernels)."""

from __future__ import annotations

import pytest
import torch

from dqwhisper.quant import QuantSpec, convert, prepare
from dqwhisper.quant.config import resolve_config
from dqwhisper.quant.export import export_model, load_exported, read_header
from dqwhisper.quant.fake_quant import WeightFakeQuantizer, int8_group_scales, mse_scale_zero
from dqwhisper.quant.gptq import gptq_
from dqwhisper.utils import DQWhisperError
from tests.quant.conftest import make_student
from tests.quant.test_kernels import W4A8_INT8_GROUPS


def _weight(rows=32, width=128, seed=0):
    """Rows whose groups of 16 columns differ in magnitude by up to 20x (as a token embedding's do)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, width, generator=g)
        * torch.rand(rows, width // 16, 1, generator=g).mul(19).add(1).repeat_interleave(16, 1).reshape(rows, width)
        / 10
    )


def _mse(spec, w, lsq=True):
    wfq = WeightFakeQuantizer(spec, w, lsq=lsq, scale_init="mse")
    with torch.no_grad():
        return float((wfq(w) - w).pow(2).mean()), wfq


def test_group_multipliers_sit_between_per_channel_and_free_group_scales():
    w = _weight()
    chan, _ = _mse(QuantSpec(4, True, "per_channel"), w)
    free, _ = _mse(QuantSpec(4, True, "per_group", 16), w)
    ints, wfq = _mse(QuantSpec(4, True, "per_group_int8", 16), w)
    assert free <= ints < 0.6 * chan
    m, row = wfq.multiplier, wfq.row_scale()
    assert torch.equal(m, m.round()) and int(m.min()) >= 1 and int(m.max()) == 8  # the largest group takes 8
    assert torch.equal(row.half().float(), row)
    s, _ = wfq.scale_zero(w)
    assert torch.equal(s, row * m)  # exact products


@pytest.mark.parametrize("bits,multiples", [(2, 32), (4, 8), (5, 4), (6, 2)])
def test_int8_rows_reproduce_the_dequantized_weight_within_64(bits, multiples):
    w = _weight()
    spec = QuantSpec(bits, True, "per_group_int8", 16)
    assert spec.max_multiple == multiples
    model_like = torch.nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        model_like.weight.copy_(w)
    from dqwhisper.quant.prepare import quantize_module_weight
    from dqwhisper.quant.fake_quant import FakeQuantizedLinear

    fq = FakeQuantizedLinear(model_like, WeightFakeQuantizer(spec, model_like.weight, lsq=True))
    qt = quantize_module_weight(fq)
    codes8, row = qt.int8_rows()
    assert int(codes8.abs().max()) <= 64 and codes8.dtype == torch.int8
    assert torch.equal(codes8.float() * row[:, None], qt.dequantize())
    assert torch.equal(qt.dequantize(), fq.weight_fake_quantizer(fq.weight))
    assert int(qt.multipliers().max()) == multiples  # the largest group takes the top multiple


def test_the_file_stores_codes_row_scales_and_3_bit_multipliers(tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), W4A8_INT8_GROUPS)
    export_model(model, tmp_path / "m.dqw", float_dtype="float32")
    header, _ = read_header(tmp_path / "m.dqw")
    e = header["tensors"]["decoder.blocks.0.mlp.0"]
    rows, width = e["shape"]
    assert e["scale"]["shape"] == [rows, 1] and e["multiplier"]["bits"] == 3
    assert e["multiplier"]["nbytes"] == (rows * width // 16 * 3 + 7) // 8
    from dqwhisper.quant.size import dqw_tensors

    sizes = {r["name"]: r["bytes"] for r in dqw_tensors(tmp_path / "m.dqw")}
    assert sizes["decoder.blocks.0.mlp.0"] == e["codes"]["nbytes"] + e["scale"]["nbytes"] + e["multiplier"]["nbytes"]
    # dequant is the fake-quant arithmetic exactly; fbgemm sums the same integers exactly, but the reference's float32
    # sums can put an 8-bit activation on the other side of a rounding boundary a few layers on (one code step, 1/255
    # of a token's range): the whole-model tolerance of test_prepare's int8 tests, 2% of the largest |logit| with the
    # argmax kept (measured 0.35% on a Xeon with AMX, where 1e-3 failed; within 1e-3 on the EPYC)
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel))
        for mode, tol in (("dequant", 0.0), ("fbgemm", 0.02)):
            m = load_exported(tmp_path / "m.dqw", mode)
            out = m.decoder(tokens, m.encoder(mel))
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(out))
            err = float((out[finite] - ref[finite]).abs().max())
            assert err <= tol * float(ref[finite].abs().max()), (mode, err)
            assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99, mode
            if mode == "fbgemm":
                assert m.decoder.blocks[0].mlp[0].kernel == "fbgemm"  # it ran on the int8 kernel


def test_a_5_bit_embedding_stores_2_bit_multipliers_and_runs_on_the_int8_kernels(tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), {**W4A8_INT8_GROUPS, "embedding_bits": 5})
    export_model(model, tmp_path / "m.dqw", float_dtype="float32")
    header, _ = read_header(tmp_path / "m.dqw")
    e = header["tensors"]["decoder.token_embedding"]
    rows, width = e["shape"]
    assert e["bits"] == 5 and e["multiplier"]["bits"] == 2 and e["codes"]["nbytes"] == (rows * width * 5 + 7) // 8
    assert header["tensors"]["decoder.blocks.0.mlp.0"]["bits"] == 4
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel))
        exact = load_exported(tmp_path / "m.dqw", "dequant")
        assert torch.equal(exact.decoder(tokens, exact.encoder(mel)), ref)
        m = load_exported(tmp_path / "m.dqw", "fbgemm")
        out = m.decoder(tokens, m.encoder(mel))
    finite = torch.isfinite(ref)  # the tiny model's suppressed tokens are -inf in both
    assert torch.equal(finite, torch.isfinite(out))
    err = float((out[finite] - ref[finite]).abs().max())
    assert err <= 0.02 * float(ref[finite].abs().max())  # the tolerance of the 4-bit test above
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99


def test_gptq_keeps_the_multipliers_and_the_grid(inputs):
    mel, tokens = inputs
    model = prepare(make_student(), {**W4A8_INT8_GROUPS, "scope": "decoder"})
    xa = model.encoder(mel).detach()
    with torch.no_grad():
        model.decoder(tokens, xa)  # the MSE scale init runs on first use
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("multiplier")}
    ratios = gptq_(model, [(tokens, xa)], scope="decoder.", run=lambda m, b: m.decoder(*b))
    assert ratios and sum(ratios.values()) / len(ratios) < 1.0
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers() if n.endswith("multiplier"))
    lin = model.decoder.blocks[0].mlp[0]
    with torch.no_grad():
        torch.testing.assert_close(lin.weight_fake_quantizer(lin.weight), lin.weight, rtol=0, atol=1e-6)
    convert(model, "dequant")


@pytest.mark.parametrize(
    "weight,match",
    [
        ({"bits": 8, "lsq": True, "granularity": "per_group_int8"}, "at most 6 bits"),
        ({"bits": 4, "lsq": False, "granularity": "per_group_int8"}, "LSQ"),
    ],
)
def test_bad_settings_fail_clearly(weight, match):
    with pytest.raises(DQWhisperError, match=match):
        resolve_config({"enabled": True, "weight": weight})
    with pytest.raises(DQWhisperError, match="at most 6 bits"):
        resolve_config(
            {"enabled": True, "embedding_granularity": "per_group_int8", "embedding_bits": 8, "weight": {"lsq": True}}
        )


def test_multiplier_choice_is_the_least_error():
    w = _weight(4, 64, seed=3)
    spec = QuantSpec(4, True, "per_group_int8", 16)
    w3 = w.reshape(4, 4, 16)
    s, _ = mse_scale_zero(w3, spec)
    row, m = int8_group_scales(w3, s, spec)
    for a in range(4):
        for b in range(4):
            errs = []
            for k in range(1, 9):
                sc = row[a, 0] * k
                errs.append(float((torch.round(w3[a, b] / sc).clamp(-8, 7) * sc - w3[a, b]).pow(2).sum()))
            assert errs[int(m[a, b]) - 1] == min(errs)
