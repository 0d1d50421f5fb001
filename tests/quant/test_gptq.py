"""GPTQ rounding: exact where it must equal round-to-nearest, better where inputs correlate, and what it writes is
what the fake-quant forward and the converted model compute."""

from __future__ import annotations

import copy

import pytest
import torch

from dqwhisper.quant import QuantSpec, convert, prepare
from dqwhisper.quant.config import QuantConfig, resolve_config
from dqwhisper.quant.fake_quant import FakeQuantizedConv1d, FakeQuantizedLinear, mse_scale_zero
from dqwhisper.quant.gptq import gptq_, gptq_codes
from dqwhisper.utils import DQWhisperError
from tests.quant.conftest import make_student

W4 = {"enabled": True, "scope": "all", "weight": {"bits": 4, "lsq": True, "granularity": "per_channel"}}


def _scales(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s, _ = mse_scale_zero(w.reshape(spec.grouped_shape(tuple(w.shape), "w")), spec)
    return s.reshape(w.shape[0], -1)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity,group", [("per_channel", 0), ("per_group", 8)])
def test_uncorrelated_inputs_give_round_to_nearest(granularity, group, act_order):
    """With a diagonal Hessian no error is fed forward: GPTQ's codes are round-to-nearest's, bit for bit, in either
    column order (act_order keeps every column's own group scale)."""
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    spec = QuantSpec(bits=4, symmetric=True, granularity=granularity, group_size=group)
    s = _scales(w, spec)
    g = w.shape[1] // s.shape[1]
    h = torch.diag(torch.rand(32) + 0.5).double()
    q = gptq_codes(w, s, g, spec.qmin, spec.qmax, h, damp=0.0, block=5, act_order=act_order)
    rtn = torch.clamp(torch.round(w / s.repeat_interleave(g, 1)), spec.qmin, spec.qmax)
    assert torch.equal(q, rtn.double())


@pytest.mark.parametrize("act_order", [False, True])
def test_correlated_inputs_lower_the_output_error(act_order):
    torch.manual_seed(0)
    mix = torch.randn(32, 32) * 0.3 + torch.eye(32)
    x = torch.randn(2000, 32) @ mix * (torch.rand(32) * 4 + 0.1)  # correlated input features of unequal energy
    w = torch.randn(16, 32)
    spec = QuantSpec(bits=3, symmetric=True, granularity="per_channel")
    s = _scales(w, spec)
    h = (x.T @ x).double()
    q = gptq_codes(w, s, 32, spec.qmin, spec.qmax, h, act_order=act_order, block=8)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax and torch.equal(q, q.round())
    rtn = torch.clamp(torch.round(w / s), spec.qmin, spec.qmax)
    err_gptq = (x @ (q.float() * s - w).T).norm()
    err_rtn = (x @ (rtn * s - w).T).norm()
    assert err_gptq < 0.8 * err_rtn
    if act_order:  # another column order spreads the errors differently: other codes
        assert not torch.equal(q, gptq_codes(w, s, 32, spec.qmin, spec.qmax, h, block=8))


def test_gptq_on_a_model_writes_on_grid_weights_that_convert_reproduces(inputs):
    mel, tokens = inputs
    model = prepare(make_student(), W4)
    rtn = copy.deepcopy(model)
    batches = [(mel, tokens), (mel.flip(-1), tokens)]
    ratios = gptq_(model, batches, scope="", run=lambda m, b: m(*b))
    fq = [(n, m) for n, m in model.named_modules() if isinstance(m, (FakeQuantizedLinear, FakeQuantizedConv1d))]
    assert len(ratios) == len(fq)  # every linear and both convolutions (no CTC head here; the embedding stays RTN)
    assert sum(ratios.values()) / len(ratios) < 1.0
    for name, m in fq:
        # the float weight now sits on the quantizer's grid: fake-quantizing it is the identity
        with torch.no_grad():
            torch.testing.assert_close(m.weight_fake_quantizer(m.weight), m.weight, rtol=0, atol=1e-6, msg=name)
    rtn_mods = dict(rtn.named_modules())
    with torch.no_grad():  # GPTQ chose other codes than round-to-nearest for some weights
        changed = sum(not torch.equal(m.weight, rtn_mods[n].weight_fake_quantizer(rtn_mods[n].weight)) for n, m in fq)
    assert changed > 0
    with torch.no_grad():
        want = model(mel, tokens)
        got = convert(copy.deepcopy(model), "dequant")(mel, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_encoder_scope_leaves_the_decoder_alone(inputs):
    mel, _ = inputs
    model = prepare(make_student(), W4)
    before = {n: p.clone() for n, p in model.named_parameters() if n.startswith("decoder.")}
    ratios = gptq_(model, [mel], scope="encoder.", run=lambda m, b: m.encoder(b))
    assert ratios and all(n.startswith("encoder.") for n in ratios)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("decoder."))


def test_unsupported_settings_are_refused():
    with pytest.raises(DQWhisperError, match="quant.gptq"):
        resolve_config(QuantConfig(enabled=True, gptq=True, weight={"bits": 4, "symmetric": False, "lsq": True}))
    with pytest.raises(DQWhisperError, match="LSQ"):
        resolve_config(QuantConfig(enabled=True, gptq=True, weight={"bits": 4, "lsq": False}))
    model = prepare(make_student(), {"enabled": True, "scope": "decoder", "embedding": False})
    with pytest.raises(DQWhisperError, match="no fake-quantized"):
        gptq_(model, [], scope="encoder.")


def test_ptq_cli_with_gptq_calibrates_on_a_data_dir(tmp_path, capsys):
    from dqwhisper.models.student import load_checkpoint, save_checkpoint
    from dqwhisper.quant import ptq
    from tests.train.fixtures import write_data_dir

    data = write_data_dir(tmp_path / "data", n_per_lang=3)
    student = make_student(vocab_keep=None)
    save_checkpoint(student, tmp_path / "f.pt")
    assert ptq.main([str(tmp_path / "f.pt"), "w4", str(tmp_path / "g.pt"), "gptq=true"]) != 0
    assert "--calib" in capsys.readouterr().err and not (tmp_path / "g.pt").exists()
    assert ptq.main([str(tmp_path / "f.pt"), "w4", str(tmp_path / "r.pt")]) == 0
    args = [str(tmp_path / "f.pt"), "w4", str(tmp_path / "g.pt"), "gptq=true", "gptq_utts=4"]
    assert ptq.main(args + ["--calib", str(data / "train")]) == 0
    rtn, gptq = load_checkpoint(tmp_path / "r.pt"), load_checkpoint(tmp_path / "g.pt")
    assert gptq.quant_config["gptq"] and not rtn.quant_config["gptq"]
    r, g = dict(rtn.named_parameters()), dict(gptq.named_parameters())
    enc = "encoder.blocks.0.mlp.0.weight"
    assert not torch.equal(r[enc], g[enc])
    # the scales are the same (MSE init); GPTQ only chose other codes
    torch.testing.assert_close(
        r["encoder.blocks.0.mlp.0.weight_fake_quantizer.scale"], g["encoder.blocks.0.mlp.0.weight_fake_quantizer.scale"]
    )


def test_layers_of_one_block_share_a_calibration_pass():
    from dqwhisper.quant.gptq import _block_of

    assert _block_of("encoder.blocks.3.mlp.0") == _block_of("encoder.blocks.3.attn.query") == "encoder.blocks.3"
    assert _block_of("encoder.conv2") == "encoder.conv2"
