"""Per-row encoder windows in one decode batch (decode.batch_window, decode.group_windows=false): each row of a
padded batch is encoded and decoded as it is alone on its own window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqwhisper.decoding import DecodeConfig, audio_to_mel, decode_utterances
from dqwhisper.decoding.audio import encoder_window
from dqwhisper.decoding import search
from dqwhisper.decoding.search import decode_mels, row_windows
from dqwhisper.models.student import DQWhisper, from_whisper
from dqwhisper.quant import prepare
from dqwhisper.quant.export import export_model, load_exported
from dqwhisper.utils import DQWhisperError
from tests.test_decoding import FakeData, FakeUtt, noise, sharp_whisper

SECONDS = (1.7, 0.4, 0.45, 1.2)  # audio per row
WINDOWS = [100, 50, 50, 100]  # + 0.5 s, whole seconds, at most the tiny model's 2 s window


@pytest.fixture(scope="module")
def model() -> DQWhisper:
    return from_whisper(sharp_whisper()).eval()


def waves() -> list[np.ndarray]:
    return [noise(s, 10 + i) for i, s in enumerate(SECONDS)]


def alone(model, wave: np.ndarray, frames: int, padding: str = "zeros"):
    """(encoder output, mel) of one utterance on its own window."""
    with encoder_window(model, frames), torch.no_grad():
        mel = audio_to_mel([wave], model, padding=padding)
        return model.encoder(mel)[0], mel


@pytest.mark.parametrize("padding", ["zeros", "audio"])
def test_each_row_is_encoded_as_alone_on_its_window(model, padding):
    mel = audio_to_mel(waves(), model, padding=padding)
    lengths = torch.tensor(WINDOWS)
    with torch.no_grad(), model.encoder.row_windows(lengths):
        batched = model.encoder(mel)
    with torch.no_grad():
        unmasked = model.encoder(mel)
    differs = False
    for b, n in enumerate(WINDOWS):
        ref, _ = alone(model, waves()[b], n, padding)
        torch.testing.assert_close(batched[b, :n], ref, atol=2e-5, rtol=1e-5)
        differs |= n < 100 and not torch.allclose(unmasked[b, :n], ref, atol=1e-3)
    assert differs, "precondition: without the windows the short rows are encoded differently"
    assert model.encoder.row_lengths is None  # restored


def test_row_windows_equal_the_whole_window_change_nothing(model):
    mel = audio_to_mel(waves(), model)
    with torch.no_grad():
        ref = model.encoder(mel)
        with model.encoder.row_windows(torch.full((4,), 100)):
            out = model.encoder(mel)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("beam_size", [1, 2])
@pytest.mark.parametrize("language", ["en", None])  # forced, detected
def test_decode_mels_rows_decode_as_alone(model, beam_size, language):
    cfg = DecodeConfig(beam_size=beam_size, max_new_tokens=10)
    mel = audio_to_mel(waves(), model)
    batched = decode_mels(model, mel, language, list(SECONDS), cfg, windows=WINDOWS)
    single = []
    for b, n in enumerate(WINDOWS):
        with encoder_window(model, n):
            m = audio_to_mel([waves()[b]], model)
            single += decode_mels(model, m, language, [SECONDS[b]], cfg)
    assert [h.tokens for h in batched] == [h.tokens for h in single]
    assert [h.language for h in batched] == [h.language for h in single]
    assert [h.n_tries for h in batched] == [h.n_tries for h in single]
    plain = decode_mels(model, mel, language, list(SECONDS), cfg)  # every row on the batch's window
    assert [h.tokens for h in plain] != [h.tokens for h in single], "precondition: the windows matter"


def test_decoder_mask_is_restored_after_a_batch(model):
    mel = audio_to_mel(waves(), model)
    decode_mels(model, mel, "en", list(SECONDS), DecodeConfig(max_new_tokens=3), windows=WINDOWS)
    assert model.decoder.key_mask is None and model.encoder.row_lengths is None


def test_decode_utterances_mixes_windows_in_one_batch(model):
    utts = [FakeUtt(f"u{i}", "en", s) for i, s in enumerate(SECONDS)] + [FakeUtt("x", "de", 0.3)]
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        mixed = decode_utterances(
            model, FakeData(), utts, DecodeConfig(batch_size=4, max_new_tokens=6, batch_window=0.5), progress=False
        )
        n_mixed = len(seen)
        seen.clear()
        grouped = decode_utterances(
            model,
            FakeData(),
            utts,
            DecodeConfig(batch_size=4, max_new_tokens=6, batch_window=0.5, group_windows=True),
            progress=False,
        )
    finally:
        hook.remove()
    assert n_mixed == 2  # en: one batch of 4 on 2 s (rows of 1 s and 2 s); de: one
    assert [(s[0], s[2]) for s in seen] == [(2, 200), (2, 100), (1, 100)]  # one window a batch
    assert [h.text for h in mixed.hyps] == [h.text for h in grouped.hyps]
    assert model.dims.n_audio_ctx == 100


def test_exported_int8_student_rows_decode_as_alone(tmp_path):
    student = prepare(from_whisper(sharp_whisper()).eval(), {"enabled": True, "scope": "all", "weight": {"bits": 4}})
    export_model(student, tmp_path / "m.dqw")
    model = load_exported(tmp_path / "m.dqw", "fbgemm")
    utts = [FakeUtt(f"u{i}", "en", s) for i, s in enumerate(SECONDS)]
    runs = [
        decode_utterances(
            model,
            FakeData(),
            utts,
            DecodeConfig(batch_size=size, max_new_tokens=8, batch_window=0.5, temperatures=[0.0]),
            progress=False,
        )
        for size in (4, 1)
    ]
    assert [h.text for h in runs[0].hyps] == [h.text for h in runs[1].hyps]
    assert len({h.text for h in runs[1].hyps}) > 1


def test_windows_need_a_dqwhisper_model():
    plain = sharp_whisper()
    mel = audio_to_mel(waves()[:2], plain)
    with pytest.raises(DQWhisperError, match="per-row encoder windows need a DQWhisper"):
        decode_mels(plain, mel, "en", None, DecodeConfig(max_new_tokens=2), windows=[50, 100])
    with pytest.raises(ValueError, match="windows"):
        decode_mels(from_whisper(plain), mel, "en", None, DecodeConfig(max_new_tokens=2), windows=[50, 101])


@pytest.mark.parametrize("dq", [True, False])  # DQWhisper (rows padded, masked) / whisper (one call per window)
def test_pooled_fallback_equals_each_batch_falling_back(model, dq, monkeypatch):
    """decode.pool_fallback: the rows that fail the first temperature (the logprob test alone, its threshold at the
    median of the greedy hypotheses': about half; this random model hits every cap), from batches of 2 on windows of
    1 and 2 s, fall back together: the same sampled hypotheses as each batch falling back on its own, in fewer and
    fuller sampling calls."""
    # fails: the greedy hypotheses under the threshold; every sampled one passes (and is kept)
    monkeypatch.setattr(
        search, "_fails", lambda r, hit, cfg: r.temperature == 0 and r.avg_logprob < cfg.logprob_threshold
    )
    pools = []
    real = search.fall_back
    monkeypatch.setattr(
        search,
        "fall_back",
        lambda m, rows, *a: pools.append([r.features.shape[0] for r in rows]) or real(m, rows, *a),
    )
    m = model if dq else sharp_whisper()
    utts = [FakeUtt(f"u{i}", "en", s) for i, s in enumerate(SECONDS + (0.9, 0.3, 0.7, 0.35))]
    base = dict(batch_size=2, max_new_tokens=6, batch_window=0.5, group_windows=not dq)
    greedy = decode_utterances(m, FakeData(), utts, DecodeConfig(temperatures=[0.0], **base), progress=False)
    threshold = float(np.median([h.avg_logprob for h in greedy.hyps]))
    first = []

    def count(mod, args):
        if args[0].shape[1] > 1:  # a task's first step: the whole prompt (then one token a step)
            first.append(args[0].shape[0])

    hook = m.decoder.register_forward_pre_hook(count)
    runs = []
    try:
        for pool in (True, False):
            cfg = DecodeConfig(
                temperatures=[0.0, 0.5, 1.0], logprob_threshold=threshold, best_of=3, pool_fallback=pool, **base
            )
            first.clear()
            hyps = decode_utterances(m, FakeData(), utts, cfg, progress=False).hyps
            runs.append((hyps, [r for r in first if r % 3 == 0 and r > 2]))  # sampling: 3 rows an utterance
    finally:
        hook.remove()
    (pooled, calls), (alone_, calls_alone) = runs
    key = [(h.utt_id, h.text, h.n_tries, h.temperature, h.fallback_reason) for h in pooled]
    assert key == [(h.utt_id, h.text, h.n_tries, h.temperature, h.fallback_reason) for h in alone_]
    assert [h.avg_logprob for h in pooled] == pytest.approx([h.avg_logprob for h in alone_], abs=1e-5)
    assert 2 <= sum(h.temperature == 0.5 for h in pooled) <= 6 and {h.n_tries for h in pooled} == {1, 2}
    assert sum(calls) == sum(calls_alone)
    assert any(len(set(p)) > 1 for p in pools), pools  # a pool mixes windows of 1 and 2 s
    # DQWhisper decodes a pool in one call per temperature; whisper in one per window length
    assert len(calls) < len(calls_alone) if dq else len(calls) <= len(calls_alone)
    assert m.dims.n_audio_ctx == 100


def test_pooled_rows_decode_the_same_inside_a_shorter_window(model, monkeypatch):
    """A pool may fill while a later batch's shorter encoder window is in force (training validation adds rows
    inside it): fall_back decodes each pooled row on its own window all the same."""
    monkeypatch.setattr(search, "_fails", lambda r, hit, cfg: r.temperature == 0)
    cfg = DecodeConfig(max_new_tokens=5, temperatures=[0.0, 0.5], best_of=2)
    with encoder_window(model, 100):
        mel = audio_to_mel(waves()[:1], model)
        row = decode_mels(model, mel, "en", [SECONDS[0]], cfg, defer=True)[0]
    assert isinstance(row, search.PendingRow) and row.features.shape[0] == 100
    with encoder_window(model, 100):
        want = search.fall_back(model, [row], cfg)[0]
    with encoder_window(model, 50):
        got = search.fall_back(model, [row], cfg)[0]
        assert model.dims.n_audio_ctx == 50
    assert (got.text, got.avg_logprob, got.temperature) == (want.text, want.avg_logprob, 0.5)


@pytest.mark.parametrize("temperature", [0.0, 0.7])  # greedy; seeded best-of-3 sampling
@pytest.mark.parametrize("dq", [True, False])  # DQWhisper (rows padded to their windows, grouped keys) / whisper
def test_finished_utterances_leave_the_batch(model, dq, temperature, monkeypatch):
    """BatchedDecodingTask steps only the utterances that have not ended (caps of 2-8 tokens end them at different
    steps): the same tokens and log-probabilities as whisper's loop, which steps every row to the end."""
    m = model if dq else sharp_whisper()
    mel = audio_to_mel(waves(), m)
    windows = WINDOWS if dq else None
    with row_windows(m, None if windows is None else torch.tensor(windows)), torch.no_grad():
        features = m.encoder(mel)
    caps = [2, 8, 5, 3]
    cfg = DecodeConfig(best_of=3)
    options = search.decoding_options(cfg, "en", temperature=temperature, sample_len=max(caps))
    kept = []
    real_keep = search.BatchedDecodingTask._keep
    monkeypatch.setattr(
        search.BatchedDecodingTask, "_keep", lambda t, r, g, n: kept.append(len(r)) or real_keep(t, r, g, n)
    )
    rows = []
    hook = m.decoder.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        out = {}
        for drop in (True, False):
            task = search.BatchedDecodingTask(
                m, options, caps, 3, windows, seed=5 if temperature else None, drop_finished=drop
            )
            out[drop] = task.run(features)
            if drop:
                stepped, rows[:] = list(rows), []
    finally:
        hook.remove()
    group = 3 if temperature else 1
    assert [r.tokens for r in out[True]] == [r.tokens for r in out[False]]
    assert [len(r.tokens) for r in out[True]] == caps  # this random model runs to every cap
    assert [r.avg_logprob for r in out[True]] == pytest.approx([r.avg_logprob for r in out[False]], abs=1e-6)
    assert [r.no_speech_prob for r in out[True]] == pytest.approx([r.no_speech_prob for r in out[False]], abs=1e-6)
    assert kept == [3 * group, 2 * group, group]  # the utterances with caps 2, 3, 5 left in turn
    assert stepped[-1] == group and rows[-1] == 4 * group
    assert sum(stepped) < sum(rows)
    if dq:
        assert m.decoder.key_mask is None  # the task's own, cut as utterances left, is gone after
