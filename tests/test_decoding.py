"""Decoding: batched == per-utterance (greedy and beam), the audio window, CTC greedy, the config file."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from whisper.decoding import DecodingOptions
from whisper.model import Whisper

from dqwhisper.decoding import (
    DecodeConfig,
    apply_audio_window,
    audio_to_mel,
    batch_frames,
    ctc_decode_batch,
    ctc_greedy,
    decode_batch,
    decode_utterances,
    decoding_options,
    search_tag,
    select_utts,
)
from dqwhisper.models.student import DQWhisper
from dqwhisper.utils import DQWhisperError
from tests.conftest import ROOT, tiny_dims


def sharp_whisper(**dims) -> Whisper:
    """Random tiny Whisper with weights large enough that its transcripts depend on the audio."""
    torch.manual_seed(0)
    model = Whisper(tiny_dims(**dims))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "embedding" in name:
                p.normal_(0, 0.3)
    return model.eval()


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> Whisper:
    return sharp_whisper()


@pytest.fixture(scope="module")
def mel(model) -> torch.Tensor:
    return audio_to_mel([noise(s, i) for i, s in enumerate((0.5, 1.0, 1.5, 1.8))], model)


@pytest.mark.parametrize("beam_size", [None, 3])
def test_batched_equals_per_utterance(model, mel, beam_size):
    options = DecodingOptions(language="en", beam_size=beam_size, without_timestamps=True, fp16=False, sample_len=12)
    batched = [r.tokens for r in decode_batch(model, mel, options)]
    single = [decode_batch(model, mel[i : i + 1], options)[0].tokens for i in range(len(mel))]
    assert len({tuple(t) for t in single}) > 1, "precondition: the utterances must decode differently"
    assert batched == single


def test_beam_search_differs_from_greedy_somewhere(model, mel):
    """The beam path is really taken (a beam of 3 finds higher-scoring sequences on some utterance)."""
    greedy = decode_batch(
        model, mel, DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=12)
    )
    beam = decode_batch(
        model, mel, DecodingOptions(language="en", beam_size=3, without_timestamps=True, fp16=False, sample_len=12)
    )
    assert [r.tokens for r in greedy] != [r.tokens for r in beam]


def test_language_detection_batched(model, mel):
    options = DecodingOptions(language=None, beam_size=2, without_timestamps=True, fp16=False, sample_len=4)
    batched = decode_batch(model, mel, options)
    single = [decode_batch(model, mel[i : i + 1], options)[0] for i in range(len(mel))]
    assert [r.language for r in batched] == [r.language for r in single]
    assert [r.tokens for r in batched] == [r.tokens for r in single]


def test_audio_to_mel_uses_the_model_window():
    short = sharp_whisper(n_audio_ctx=100)  # a 2 s window
    mel = audio_to_mel([noise(0.5, 0), noise(5.0, 1)], short)
    assert mel.shape == (2, 80, 200)
    full = audio_to_mel([noise(0.5, 0)], sharp_whisper(n_audio_ctx=1500))
    assert full.shape == (1, 80, 3000)


def test_mel_padding_zeros_is_transcribe_style():
    from whisper.audio import log_mel_spectrogram

    audio = noise(0.75, 3)
    model = sharp_whisper(n_audio_ctx=100)
    mel = audio_to_mel([audio], model, padding="zeros")[0]
    reference = log_mel_spectrogram(torch.from_numpy(audio), 80, padding=480000)  # as whisper.transcribe
    assert mel.shape == (80, 200)
    torch.testing.assert_close(mel[:, :75], reference[:, :75], atol=0, rtol=0)
    assert bool((mel[:, 75:] == 0).all())
    padded = audio_to_mel([audio], model, padding="audio")[0]
    assert not torch.equal(padded[:, 75:], mel[:, 75:])  # the 'audio' mode: log-mel of silence, not zeros
    long = audio_to_mel([noise(3.0, 4)], model, padding="zeros")
    assert long.shape == (1, 80, 200) and bool((long[0, :, -1] != 0).any())  # cut to the window, no padding


def test_mel_padding_rejects_unknown_modes():
    with pytest.raises(DQWhisperError, match="mel padding 'none'"):
        audio_to_mel([noise(0.5, 0)], sharp_whisper(n_audio_ctx=100), padding="none")


@dataclass(frozen=True)
class FakeUtt:
    utt_id: str
    lang: str
    seconds: float


class FakeData:
    """Just what decode_utterances needs from a DataDir."""

    def load_audio(self, utt: FakeUtt) -> np.ndarray:
        return noise(utt.seconds, int(utt.utt_id.encode().hex(), 16) % 1000)

    def duration(self, utt: FakeUtt) -> float:
        return utt.seconds


def test_decode_utterances_encoder_sees_model_window(model):
    utts = [FakeUtt("a", "en", 0.7), FakeUtt("b", "de", 3.0), FakeUtt("c", "en", 1.2)]
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        cfg = DecodeConfig(batch_size=2, max_new_tokens=5)
        run = decode_utterances(model, FakeData(), utts, cfg, progress=False)
    finally:
        hook.remove()
    assert seen and all(s[1:] == (80, 200) for s in seen)  # 2 s window: 200 mel frames, not 3000
    assert [h.utt_id for h in run.hyps] == ["a", "b", "c"]
    assert [h.language for h in run.hyps] == ["en", "de", "en"]  # forced from the utterance language
    assert run.n_trimmed == 1  # "b" is longer than the 2 s window
    assert run.audio_seconds == pytest.approx(0.7 + 3.0 + 1.2)
    assert run.rtf > 0 and run.n_tokens == sum(h.n_tokens for h in run.hyps)


def test_decode_utterances_batch_size_does_not_change_results(model):
    utts = [FakeUtt(f"u{i}", "en", 0.4 + 0.3 * i) for i in range(5)]
    one = decode_utterances(
        model, FakeData(), utts, DecodeConfig(batch_size=1, beam_size=2, max_new_tokens=6), progress=False
    )
    four = decode_utterances(
        model, FakeData(), utts, DecodeConfig(batch_size=4, beam_size=2, max_new_tokens=6), progress=False
    )
    assert [h.text for h in one.hyps] == [h.text for h in four.hyps]


def test_batch_window_cuts_each_batch_to_its_longest_utterance_and_restores_the_model(model):
    utts = [FakeUtt("a", "en", 0.3), FakeUtt("b", "en", 0.4), FakeUtt("c", "de", 1.5)]
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        cfg = DecodeConfig(batch_size=2, max_new_tokens=4, batch_window=0.5)
        run = decode_utterances(model, FakeData(), utts, cfg, progress=False)
    finally:
        hook.remove()
    # en: 0.4 s + 0.5 s -> 1 s (50 positions, 100 mel frames); de: 1.5 s + 0.5 s -> the whole 2 s window
    assert sorted(s[2] for s in seen) == [100, 200]
    assert [h.utt_id for h in run.hyps] == ["a", "b", "c"]
    assert model.dims.n_audio_ctx == 100 and model.encoder.positional_embedding.shape[0] == 100


def test_batch_window_batches_hold_one_window_each(model):
    # 1.2 s and 0.9 s + 0.5 s -> 2 s; 0.3 s + 0.5 s -> 1 s: two batches, as data.batch_window trains them, not one
    # 2 s batch
    utts = [FakeUtt("a", "en", 0.3), FakeUtt("b", "en", 0.9), FakeUtt("c", "en", 1.2)]
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        run = decode_utterances(
            model, FakeData(), utts, DecodeConfig(batch_size=3, max_new_tokens=4, batch_window=0.5), progress=False
        )
    finally:
        hook.remove()
    assert [(s[0], s[2]) for s in seen] == [(2, 200), (1, 100)]
    assert [h.utt_id for h in run.hyps] == ["a", "b", "c"]
    seen.clear()
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        decode_utterances(model, FakeData(), utts, DecodeConfig(batch_size=3, max_new_tokens=4), progress=False)
    finally:
        hook.remove()
    assert [(s[0], s[2]) for s in seen] == [(3, 200)]  # off: one batch of the whole window


def test_batch_window_as_long_as_the_window_changes_nothing(model):
    utts = [FakeUtt(f"u{i}", "en", 0.3 + 0.4 * i) for i in range(4)]
    whole = decode_utterances(model, FakeData(), utts, DecodeConfig(batch_size=2, max_new_tokens=6), progress=False)
    cfg = DecodeConfig(batch_size=2, max_new_tokens=6, batch_window=2.0)
    assert [h.text for h in decode_utterances(model, FakeData(), utts, cfg, progress=False).hyps] == [
        h.text for h in whole.hyps
    ]


def test_batch_frames_rounds_up_to_whole_seconds_within_the_window(model):
    assert batch_frames(model, 16000, 0.0) == 50  # exactly 1 s stays 1 s
    assert batch_frames(model, 16001, 0.0) == 100
    assert batch_frames(model, 8000, 1.0) == 100  # 1.5 s -> 2 s
    assert batch_frames(model, 32000, 1.0) == 100  # never past the model's 2 s
    assert batch_frames(model, 8000, None) == 100  # off: the whole window
    with pytest.raises(DQWhisperError, match="batch_window"):
        decode_utterances(model, FakeData(), [], DecodeConfig(batch_window=-1.0), progress=False)
    assert search_tag(DecodeConfig(batch_window=1.0)) == "greedy_bw1s"


def test_apply_audio_window_shrinks_and_refuses_to_grow():
    m = sharp_whisper(n_audio_ctx=1500)
    apply_audio_window(m, 4.0)
    assert m.dims.n_audio_ctx == 200 and m.encoder.positional_embedding.shape[0] == 200
    assert audio_to_mel([noise(1.0, 0)], m).shape[-1] == 400
    with pytest.raises(DQWhisperError, match="longer than the model's window"):
        apply_audio_window(m, 10.0)


def test_ctc_greedy_hand_built():
    path = [0, 3, 3, 0, 3, 2, 2, 0, 1, 1, 4]  # blank=0: labels 3, 3, 2, 1, (4 past the length)
    logits = torch.full((2, len(path), 5), -1.0)
    logits[0, torch.arange(len(path)), torch.tensor(path)] = 2.0
    logits[1, :, 0] = 2.0  # all blank
    logits[1, 4, 2] = 3.0
    assert ctc_greedy(logits, lengths=[10, 11]) == [[2, 2, 1, 0], [1]]
    assert ctc_greedy(logits)[0] == [2, 2, 1, 0, 3]


def test_ctc_decode_batch_through_bpe():
    from dqwhisper.data.bpe import train_bpe

    bpe = train_bpe(["hello world", "the cat sat on the mat", "hello cat"] * 20, vocab_size=300)
    units = bpe.encode("hello cat")
    student = DQWhisper(tiny_dims(), ctc_units=bpe.vocab_size).eval()
    n_frames = 2 * len(units) + 1  # blank, unit, blank, unit, ..., blank

    def fake_ctc_logits(features):
        logits = torch.zeros(features.shape[0], features.shape[1], bpe.vocab_size + 1)
        logits[:, :, 0] = 1.0
        for k, u in enumerate(units):
            logits[:, 2 * k + 1, u + 1] = 5.0
        logits[:, n_frames:, units[0] + 1] = 9.0  # beyond the audio: must be ignored
        return logits

    student.ctc_logits = fake_ctc_logits
    mel = audio_to_mel([noise(1.0, 0)], student)
    [(text, n)] = ctc_decode_batch(student, mel, [n_frames * 320], bpe)
    assert (text, n) == ("hello cat", len(units))


def test_decoding_options_and_tags():
    cfg = DecodeConfig(beam_size=5, patience=2.0, length_penalty=0.5)
    o = decoding_options(cfg, "ja")
    assert (o.beam_size, o.patience, o.length_penalty, o.language, o.temperature, o.without_timestamps) == (
        5,
        2.0,
        0.5,
        "ja",
        0.0,
        True,
    )
    g = decoding_options(DecodeConfig(), None)
    assert g.beam_size is None and g.patience is None
    assert search_tag(DecodeConfig()) == "greedy"
    assert search_tag(cfg) == "beam5"
    assert search_tag(DecodeConfig(ctc=True, audio_window=10.0, raw=True)) == "ctc_w10s_raw"


def test_select_utts_shards_partition():
    utts = [FakeUtt(f"u{i:02d}", "en" if i % 3 else "ja", 1.0) for i in range(10)]
    parts = [select_utts(utts, DecodeConfig(shard=f"{k}/3")) for k in (1, 2, 3)]
    assert sorted(u.utt_id for p in parts for u in p) == [u.utt_id for u in utts]
    assert [u.lang for u in select_utts(utts, DecodeConfig(languages=["ja"]))] == ["ja"] * 4
    assert len(select_utts(utts, DecodeConfig(max_utts=3))) == 3
    with pytest.raises(DQWhisperError, match="shard"):
        select_utts(utts, DecodeConfig(shard="4/3"))


def test_default_yaml_matches_schema():
    yaml = OmegaConf.load(ROOT / "conf" / "decode" / "default.yaml")
    assert set(yaml.keys()) == {f.name for f in fields(DecodeConfig)}
    assert OmegaConf.merge(OmegaConf.structured(DecodeConfig), yaml) == OmegaConf.structured(DecodeConfig)


def _synthesize(text: str, lang: str, path: Path) -> None:
    voice = {"en": "en", "de": "de", "es": "es"}[lang]
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)


@pytest.mark.slow
def test_base_matches_faster_whisper(base_checkpoint, tmp_path):
    """Real base weights: our greedy decode (transcribe-style mel) gives faster-whisper's tokens (CT2, fp32) on
    synthesized clips."""
    ct2_dir = base_checkpoint.parent / "base-ct2"
    if shutil.which("espeak-ng") is None or not (ct2_dir / "model.bin").is_file():
        pytest.skip("needs espeak-ng and exp/models/base-ct2")
    faster_whisper = pytest.importorskip("faster_whisper")
    from dqwhisper.data.kaldi import load_wav
    from dqwhisper.models.student import load_checkpoint

    clips = [("the weather is nice today and we are going for a walk", "en"), ("ich habe heute keine zeit", "de")]
    audios = []
    for i, (text, lang) in enumerate(clips):
        _synthesize(text, lang, tmp_path / f"{i}.wav")
        audios.append(load_wav(str(tmp_path / f"{i}.wav")))
    torch.set_num_threads(2)
    model = load_checkpoint(base_checkpoint)
    ours = []
    for audio, (_, lang) in zip(audios, clips):
        options = decoding_options(DecodeConfig(), lang)
        ours.append(decode_batch(model, audio_to_mel([audio], model, padding="zeros"), options)[0].tokens)
    fw = faster_whisper.WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=2)
    theirs = []
    for audio, (_, lang) in zip(audios, clips):
        segments, _ = fw.transcribe(
            audio,
            language=lang,
            beam_size=1,
            temperature=0.0,
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
            no_speech_threshold=None,
            log_prob_threshold=None,
            compression_ratio_threshold=None,
        )
        theirs.append([t for s in segments for t in s.tokens])
    assert all(ours), "empty transcript"
    assert ours == theirs
