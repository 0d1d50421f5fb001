"""What the demo students rely on: dev decoding as at test time, quantizer scales in their own optimizer group,
early stopping on dev, and the loss-term shares."""

from __future__ import annotations

import json

import pytest
import torch

from dqwhisper.train import make_trainer, train
from dqwhisper.train.build import is_quantizer_param
from dqwhisper.train.loop import Trainer
from tests.train.fixtures import tiny_config, write_data_dir, write_tiny_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return write_tiny_model(root / "teacher.pt"), write_data_dir(root / "data"), root


def test_quantizer_params_are_named_by_their_module():
    assert is_quantizer_param("decoder.blocks.0.mlp.0.weight_fake_quantizer.scale")
    assert is_quantizer_param("decoder.token_embedding.weight_fake_quantizer.zero_point")
    assert not is_quantizer_param("decoder.blocks.0.mlp.0.weight")


def test_lsq_scales_get_their_own_group_without_weight_decay(assets, tmp_path):
    teacher, data, _ = assets
    cfg = tiny_config(
        tmp_path / "exp",
        data,
        teacher,
        overrides=["quant=w4a8", "optim.weight_decay=0.01", "optim.quant_lr=0.005", "optim.lr=0.001"],
    )
    tr = make_trainer(cfg)
    names = {id(p): n for n, p in tr.parts.student.named_parameters()}
    groups = [g for g in tr.parts.optimizer.param_groups if g["params"]]
    quant = [g for g in groups if any(is_quantizer_param(names.get(id(p), "")) for p in g["params"])]
    assert len(quant) == 1
    g = quant[0]
    assert g["weight_decay"] == 0.0 and g["initial_lr"] == pytest.approx(0.005)
    assert all(is_quantizer_param(names[id(p)]) for p in g["params"])
    others = [g for g in groups if g is not quant[0]]
    assert all(g["weight_decay"] == pytest.approx(0.01) for g in others)
    # the trainable decoder's scales train, the frozen encoder's do not
    assert any(n.startswith("decoder.") for n in (names[id(p)] for p in g["params"]))
    assert not any(n.startswith("encoder.") for n in (names[id(p)] for p in g["params"]))


def test_train_weights_false_trains_the_quantizer_scales_only(assets, tmp_path):
    teacher, data, _ = assets
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=["quant=w4a8", "student.train_weights=false"])
    tr = make_trainer(cfg)
    names = {id(p): n for n, p in tr.parts.student.named_parameters()}
    trained = [names[id(p)] for g in tr.parts.optimizer.param_groups for p in g["params"] if id(p) in names]
    assert trained and all(is_quantizer_param(n) for n in trained)
    assert any(n.startswith("decoder.token_embedding.") for n in trained)
    weights = [p for n, p in tr.parts.student.named_parameters() if not is_quantizer_param(n)]
    assert not any(p.requires_grad for p in weights)


def test_gptq_rounds_every_quantized_layer_before_the_encoder_outputs_are_cached(assets, tmp_path):
    teacher, data, _ = assets
    runs = {}
    for g in ("false", "true"):
        cfg = tiny_config(
            tmp_path / f"exp_{g}", data, teacher, overrides=["quant=w4a8", f"quant.gptq={g}", "quant.gptq_utts=4"]
        )
        runs[g] = make_trainer(cfg).parts.student
    rtn = dict(runs["false"].named_modules())
    changed = set()
    for name, m in runs["true"].named_modules():
        # (an embedding is no linear, and the CTC head is not on the path a calibration pass takes)
        if hasattr(m, "weight_fake_quantizer") and not name.endswith("token_embedding") and name != "ctc_head":
            with torch.no_grad():  # on the quantizer's grid (GPTQ's codes), and not round-to-nearest's everywhere
                torch.testing.assert_close(m.weight_fake_quantizer(m.weight), m.weight, rtol=0, atol=1e-6)
                if not torch.equal(rtn[name].weight_fake_quantizer(rtn[name].weight), m.weight):
                    changed.add(name.split(".")[0])
    assert changed == {"encoder", "decoder"}
    emb = "decoder.token_embedding.weight"  # an embedding is no linear: GPTQ leaves it (and its scales) alone
    assert torch.equal(dict(runs["true"].named_parameters())[emb], dict(runs["false"].named_parameters())[emb])
    # w4a8's most used embedding rows (all 8,000 of the tiny vocabulary's when it has fewer) were ranked and widened
    # by the float student before GPTQ
    wfq = runs["true"].decoder.token_embedding.weight_fake_quantizer
    assert int((wfq.row_bits == 5).sum()) == min(8000, len(wfq.row_bits))
    assert set(wfq.row_bits.unique().tolist()) <= {4, 5}


def test_dev_is_decoded_as_test_with_a_cap_from_the_audio_and_runaways_counted(assets, tmp_path, monkeypatch):
    teacher, data, _ = assets
    import dqwhisper.decoding as decoding

    calls, counted = [], []
    real = decoding.decode_mels

    def spy(model, mel, languages, seconds=None, cfg=None, fp16=False, windows=None, defer=False):
        calls.append((list(languages), list(seconds), cfg))
        assert not defer
        hyps = real(model, mel, languages, seconds, cfg, fp16, windows)
        hyps[0].runaway = True  # at least one per batch
        counted.append(sum(h.runaway for h in hyps))
        return hyps

    monkeypatch.setattr(decoding, "decode_mels", spy)
    # decode.pool_fallback=false: each batch's hypotheses are final when decode_mels returns (pooled:
    # tests/train/test_batch_window.py)
    tr = make_trainer(tiny_config(tmp_path / "exp", data, teacher, overrides=["decode.pool_fallback=false"]))
    result = tr.validate()
    assert calls and result["n_runaways"] == sum(counted) > 0
    frames = {tr.parts.dev_set[i]["utt_id"]: tr.parts.dev_set[i]["n_frames"] for i in range(len(tr.parts.dev_set))}
    durations = sorted(s for _, secs, _ in calls for s in secs)
    assert durations == pytest.approx(sorted(f / 50 for f in frames.values()))  # the audio's, not the reference's
    assert all(cfg is tr.cfg.decode for _, _, cfg in calls)


def test_early_stop_ends_training_when_dev_stops_improving(assets, tmp_path, monkeypatch):
    teacher, data, _ = assets
    cfg = tiny_config(
        tmp_path / "exp",
        data,
        teacher,
        overrides=["trainer.max_steps=30", "trainer.valid_every=2", "trainer.early_stop=2"],
    )
    values = iter([0.5, 0.6, 0.6] + [0.1] * 30)
    monkeypatch.setattr(Trainer, "validate", lambda self: {"error": next(values), "n_runaways": 0})
    summary = train(cfg)
    assert summary["steps"] == 6  # validations at 2 (best), 4 and 6 (no better): stop
    assert summary["best_metric"] == pytest.approx(0.5)
    lines = (tmp_path / "exp" / "dev_results.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6]


def test_loss_shares_are_logged_and_sum_to_one(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "exp"
    cfg = tiny_config(exp, data, teacher, overrides=["trainer.max_steps=2", "trainer.valid_every=0"])
    alpha = cfg.loss.alpha
    summary = train(cfg)
    rec = json.loads((exp / "train_losses.jsonl").read_text().splitlines()[-1])
    shares = {k: v for k, v in rec.items() if k.startswith("share_")}
    assert set(shares) == {"share_ce", "share_ctc", "share_kd", "share_match"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert rec["share_kd"] == pytest.approx(alpha * rec["loss_kd"] / rec["loss"], rel=1e-3)
    assert set(summary["mean_loss_shares"]) == set(shares)


def test_gptq_with_a_decoder_only_quantizer(assets, tmp_path):
    teacher, data, _ = assets
    over = ["quant=w8", "quant.weight.lsq=true", "quant.gptq=true", "quant.gptq_utts=4"]
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=over)
    student = make_trainer(cfg).parts.student
    m = student.get_submodule("decoder.blocks.0.mlp.0")
    with torch.no_grad():
        torch.testing.assert_close(m.weight_fake_quantizer(m.weight), m.weight, rtol=0, atol=1e-6)


def test_save_start_keeps_the_quantized_student_before_its_first_step(assets, tmp_path):
    """trainer.save_start: start.pt is the PTQ that QAT starts from (scales, GPTQ codes), not a trained state."""
    from dqwhisper.models.student import load_checkpoint

    teacher, data, _ = assets
    cfg = tiny_config(
        tmp_path / "exp",
        data,
        teacher,
        overrides=["quant=w4a8", "quant.gptq=true", "quant.gptq_utts=4", "trainer.save_start=true"],
    )
    tr = make_trainer(cfg)
    before = {k: v.clone() for k, v in tr.parts.student.state_dict().items()}
    tr.run()
    start = load_checkpoint(tmp_path / "exp" / "start.pt")
    assert start.decoder.token_embedding.weight_fake_quantizer is not None  # loads as the quantized student
    got = start.state_dict()
    assert set(got) == set(before)
    assert all(torch.equal(got[k], before[k]) for k in before)
    after = tr.parts.student.state_dict()  # and training moved on from it
    assert not all(torch.equal(after[k], before[k]) for k in before)


def test_save_start_writes_nothing_for_a_float_student(assets, tmp_path):
    teacher, data, _ = assets
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=["trainer.save_start=true", "trainer.max_steps=1"])
    make_trainer(cfg).run()
    assert not (tmp_path / "exp" / "start.pt").exists() and (tmp_path / "exp" / "best.pt").exists()


def test_dev_error_chosen_on_is_the_macro_average_over_languages():
    """Checkpoints are chosen on the error RESULTS.md reports (the mean of the per-language errors), not on the
    pooled one, where the language with the most reference words (here en) outweighs the others."""
    from types import SimpleNamespace

    from dqwhisper.train.validate import dev_errors

    refs = {"en1": ("en", "the cat sat on a mat in spring"), "de1": ("de", "eins zwei")}
    items = [(SimpleNamespace(utt_id=u, text=t, lang=lang), None, None, None) for u, (lang, t) in refs.items()]
    errors = dev_errors({"en1": "the cat sat on a mat in spring", "de1": "eins"}, items)
    assert errors["error_en"] == 0 and errors["error_de"] == pytest.approx(0.5)
    assert errors["error"] == pytest.approx(0.25)  # (0 + 0.5) / 2
    assert errors["error_pooled"] == pytest.approx(0.1)  # 1 error / 10 words
