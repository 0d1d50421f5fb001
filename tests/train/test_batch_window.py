"""data.batch_window: each training utterance gets the encoder window decode.batch_window gives it (its audio + S
seconds, rounded up to whole seconds), its cached encoder output is what decoding computes, training batches mix
windows (padded, cross-attention masked to each row's window; data.group_windows=true: one window a batch), dev
batches hold one window, and dev decodes those windows."""

from __future__ import annotations

import json

import pytest
import torch

from dqwhisper.data.sampler import BatchSampler
from dqwhisper.decoding import audio_to_mel, batch_frames, encoder_window
from dqwhisper.train import make_trainer, train
from dqwhisper.train.cache_set import collate_training
from dqwhisper.train.loop import dev_batches
from dqwhisper.utils import DQWhisperError
from tests.train.fixtures import tiny_config, write_data_dir, write_tiny_model

# clips of 1.0-1.8 s in a 4 s window: + 0.5 s gives windows of 2 s and 3 s
WINDOWED = ["data.audio_window=4.0", "data.batch_window=0.5", "decode.batch_window=0.5"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bw")
    return write_tiny_model(root / "teacher.pt", n_audio_ctx=200), write_data_dir(root / "data"), root


@pytest.fixture(scope="module")
def trainer(assets):
    teacher, data, root = assets
    return make_trainer(tiny_config(root / "exp", data, teacher, overrides=WINDOWED))


def test_each_utterance_gets_the_window_decoding_gives_it(trainer):
    ds, student = trainer.parts.train_set, trainer.parts.student
    windows = ds.windows
    assert set(windows) == {100, 150}  # 2 s and 3 s: both occur in the fixture
    for j, w in enumerate(windows):
        utt = ds.base.items[ds.index[j]][0]
        audio = ds.base.data.load_audio(utt)
        assert batch_frames(student, len(audio), 0.5) == w, utt.utt_id


def test_cached_encoder_output_is_the_decoders_on_that_window(trainer):
    ds, student = trainer.parts.train_set, trainer.parts.student
    for j in (0, len(ds) - 1):
        item = ds[j]
        w = ds.windows[j]
        utt = ds.base.items[ds.index[j]][0]
        with torch.no_grad(), encoder_window(student, w):
            mel = audio_to_mel([ds.base.data.load_audio(utt)], student)
            ref = student.encoder(mel)[0]
        assert item["enc"].shape == ref.shape == (w, student.dims.n_audio_state)
        torch.testing.assert_close(item["enc"], ref, rtol=1e-4, atol=1e-5)
        # the teacher (trained on whole windows, teacher.batch_window=false) keeps its whole 4 s window
        assert item["t_enc"].shape[0] == 200
    assert student.dims.n_audio_ctx == 200  # restored after filling


def _mixed_batch(trainer):
    ds = trainer.parts.train_set
    by_window = {}
    for j, w in enumerate(ds.windows):
        by_window.setdefault(w, []).append(j)
    rows = [by_window[100][0], by_window[150][0], by_window[100][1]]
    return rows, collate_training([ds[j] for j in rows], trainer.parts.tokenizer.eot)


def test_a_mixed_batch_pads_to_its_longest_window_and_names_each_rows_window(trainer):
    rows, batch = _mixed_batch(trainer)
    assert batch["enc"].shape[1] == 150
    assert batch["enc_window"].tolist() == [100, 150, 100]
    assert bool((batch["enc"][0, 100:] == 0).all())
    assert "t_enc_window" not in batch  # the teacher's whole 4 s windows are all alike


@pytest.mark.parametrize("with_features", [False, True])
def test_each_row_of_a_mixed_batch_decodes_as_it_does_alone_on_its_window(trainer, with_features):
    """The masked cross-attention: row b's logits (and decoder features) in a padded batch of mixed windows equal
    its own on its unpadded window, alone."""
    rows, batch = _mixed_batch(trainer)
    decoder = trainer.parts.student.decoder.eval()
    tokens = batch["tokens_in"]

    def run(toks, xa, lengths):
        with torch.no_grad(), decoder.key_lengths(lengths, xa.shape[1]):
            if with_features:
                logits, ffn, _ = decoder.forward_features(toks, xa)
                return logits, torch.stack(ffn)
            return decoder(toks, xa), torch.zeros(1)

    mixed = run(tokens, batch["enc"], batch["enc_window"])
    for b, w in enumerate(batch["enc_window"].tolist()):
        alone = run(tokens[b : b + 1], batch["enc"][b : b + 1, :w], None)
        n = int((tokens[b] != trainer.parts.tokenizer.eot).sum())  # the row's own tokens (the rest is padding)
        torch.testing.assert_close(mixed[0][b, :n], alone[0][0, :n], rtol=1e-4, atol=1e-4)
        if with_features:
            torch.testing.assert_close(mixed[1][:, b, :n], alone[1][:, 0, :n], rtol=1e-4, atol=1e-4)
    # without the mask the short rows would attend to their zero padding: a real difference
    unmasked = run(tokens, batch["enc"], None)
    assert not torch.allclose(unmasked[0][0], mixed[0][0], rtol=1e-4, atol=1e-4)


def test_the_distillation_loss_of_a_mixed_batch_is_finite(trainer):
    _, batch = _mixed_batch(trainer)
    named, _ = trainer.parts.model(batch)
    assert all(torch.isfinite(v) for v in named.values())


def test_the_sampler_mixes_windows_unless_group_windows(trainer, assets, tmp_path):
    from dqwhisper.train.loop import _train_sampler

    ds = trainer.parts.train_set
    batches = list(_train_sampler(trainer.cfg, trainer.parts, trainer.dist))
    assert any(len({ds.windows[i] for i in b}) > 1 for b in batches)
    teacher, data, _ = assets
    grouped = make_trainer(tiny_config(tmp_path / "g", data, teacher, overrides=[*WINDOWED, "data.group_windows=true"]))
    gds = grouped.parts.train_set
    assert all(len({gds.windows[i] for i in b}) == 1 for b in _train_sampler(grouped.cfg, grouped.parts, grouped.dist))


def test_grouped_training_batches_and_dev_batches_hold_one_window(trainer):
    ds = trainer.parts.train_set
    sampler = BatchSampler(ds.lengths, 4, groups=ds.windows, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert all(len({ds.windows[i] for i in b}) == 1 for b in batches)
    batch = collate_training([ds[i] for i in batches[0]], trainer.parts.tokenizer.eot)
    named, _ = trainer.parts.model(batch)  # teacher logits from the whole window, student on the short one
    assert all(torch.isfinite(v) for v in named.values())
    dev = trainer.parts.dev_set
    assert all(len({dev.windows[i] for i in b}) == 1 for b in dev_batches(dev, 3))


def test_sampler_without_groups_is_unchanged():
    lengths = list(range(10, 30))
    plain = list(BatchSampler(lengths, 4, seed=5))
    one_group = list(BatchSampler(lengths, 4, seed=5, groups=[0] * 20))
    assert sorted(map(sorted, plain)) == sorted(map(sorted, one_group))
    groups = [i % 3 for i in range(20)]
    for b in BatchSampler(lengths, 4, seed=5, groups=groups):
        assert len({groups[i] for i in b}) == 1
    with pytest.raises(DQWhisperError, match="groups"):
        BatchSampler(lengths, 4, groups=[0])


def test_windowed_training_runs_end_to_end(assets, tmp_path):
    teacher, data, _ = assets
    summary = train(tiny_config(tmp_path / "exp", data, teacher, overrides=WINDOWED))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    dev = [json.loads(line) for line in (tmp_path / "exp" / "dev_results.jsonl").read_text().splitlines()]
    assert dev and all("error" in r for r in dev)
    saved = (tmp_path / "exp" / "config.yaml").read_text()
    assert "batch_window: 0.5" in saved  # inference.py decodes with the experiment's decode.batch_window


def test_a_teacher_on_the_students_windows_trains_from_the_same_encoder_outputs(assets, tmp_path):
    teacher, data, _ = assets
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=[*WINDOWED, "teacher.batch_window=true"])
    tr = make_trainer(cfg)
    item = tr.parts.train_set[0]
    assert "t_enc" not in item  # no whole-window copy: the teacher's targets come from item["enc"]'s window
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    assert summary["mean_loss_shares"]["share_kd"] > 0


def test_batch_window_needs_the_frozen_cached_encoder(assets, tmp_path):
    teacher, data, _ = assets
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=[*WINDOWED, "trainer.cache_encoder=false"])
    with pytest.raises(DQWhisperError, match="needs the frozen, cached encoder"):
        make_trainer(cfg)


def test_gptq_calibration_runs_the_encoder_on_the_training_windows(trainer):
    from dqwhisper.train.calibrate import calibration_batches

    base = trainer.parts.train_base
    batches = calibration_batches(base, 12, batch_size=4, margin=0.5)
    assert sum(len(b["mel"]) for b in batches) == 12
    assert {b["window"] for b in batches} == {100, 150}
    for b in batches:
        assert b["mel"].shape[-1] == 2 * b["window"]
        assert all(batch_frames(trainer.parts.student, 320 * n, 0.5) == b["window"] for n in b["enc_lengths"].tolist())
    whole = calibration_batches(base, 12, batch_size=4)
    assert {b["window"] for b in whole} == {200} and [len(b["mel"]) for b in whole] == [4, 4, 4]


def test_mixed_dev_batches_decode_as_one_window_batches(trainer):
    from dqwhisper.train.validate import dev_hypotheses

    dev, eot = trainer.parts.dev_set, trainer.parts.tokenizer.eot
    mixed = dev_batches(dev, 3, group_windows=False)
    assert sorted(i for b in mixed for i in b) == list(range(len(dev)))
    assert any(len({dev.windows[i] for i in b}) > 1 for b in mixed)
    assert all(len({dev.languages[i] for i in b}) == 1 for b in mixed)  # decoding splits a batch by language
    student = trainer.parts.student.eval()

    def hyps(batches):
        out = {}
        for b in batches:
            batch = collate_training([dev[i] for i in b], eot)
            out.update(dev_hypotheses(student, batch, trainer.cfg.decode, torch.device("cpu"))[0])
        return out

    assert hyps(mixed) == hyps(dev_batches(dev, 3))


def test_dev_fallback_pooled_across_batches_decodes_the_same(assets, monkeypatch):
    """Validation with decode.pool_fallback: the dev rows that fall back (this random student: all of them), from
    dev batches of one utterance, are decoded in pools of decode.batch_size: the same hypotheses and runaways as
    each batch falling back alone, in fewer sampling calls."""
    from dqwhisper.decoding import search

    teacher, data, root = assets
    calls = []
    real = search.BatchedDecodingTask.run

    def run(task, mel):
        calls.append(task.options.temperature)
        return real(task, mel)

    monkeypatch.setattr(search.BatchedDecodingTask, "run", run)
    out = {}
    for pool in ("true", "false"):
        overrides = WINDOWED + ["trainer.valid_batch_size=1", "decode.batch_size=4", f"decode.pool_fallback={pool}"]
        tr = make_trainer(tiny_config(root / f"exp_pool_{pool}", data, teacher, overrides=overrides))
        calls.clear()
        result = tr.validate()
        out[pool] = (result, (tr.expdir / "dev_hyp.txt").read_text(), sum(t > 0 for t in calls))
    (pooled, text, n_pooled), (alone, text_alone, n_alone) = out["true"], out["false"]
    assert text == text_alone and pooled["n_runaways"] == alone["n_runaways"]
    assert pooled["error"] == alone["error"]
    assert 0 < n_pooled < n_alone


@pytest.mark.parametrize(
    "perturbation",
    [["data.prefix_noise=0.1"], ["data.feature_mask.num_time_masks=2", "data.feature_mask.teacher=true"]],
)
def test_perturbed_inputs_need_the_teacher_live(assets, tmp_path, perturbation):
    """Prefix noise and teacher-side feature masks change the teacher's inputs every step: cached teacher targets
    would be those of the clean inputs, so they are an error; with live targets the student trains."""
    teacher, data, _ = assets
    base = [*WINDOWED, "teacher.batch_window=true", *perturbation]
    cfg = tiny_config(tmp_path / "cached", data, teacher, overrides=[*base, "trainer.cache_teacher=true"])
    with pytest.raises(DQWhisperError, match="trainer.cache_teacher=false"):
        make_trainer(cfg)
    summary = train(tiny_config(tmp_path / "live", data, teacher, overrides=[*base, "trainer.cache_teacher=false"]))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    assert summary["mean_loss_shares"]["share_kd"] > 0
