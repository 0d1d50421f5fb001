"""Long-form transcription: chunk planning and streaming respect the window, the CLI writes openai-style outputs,
bad files are reported one line each while the others go on. Tiny random models; the VAD is replaced by an energy
detector where the audio is synthetic (Silero does not call noise speech); the real Silero VAD runs on the silent
file and in the slow test."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

import dqwhisper.transcribe as tr
from dqwhisper.transcribe import VadConfig, main, plan_chunks, stream_chunks
from tests.conftest import random_tiny_whisper

SR = 16000


def energy_regions(audio: np.ndarray, vad: VadConfig, max_samples: int | None = None) -> list[tuple[int, int]]:
    """Stand-in for Silero: 512-sample frames with RMS > 0.01 are speech; pauses shorter than min_silence_ms are
    bridged; regions padded by speech_pad_ms."""
    n = len(audio) // 512
    loud = [float(np.sqrt(np.mean(audio[i * 512 : (i + 1) * 512] ** 2))) > 0.01 for i in range(n)]
    gap = vad.min_silence_ms * SR // 1000 // 512
    regions, start, quiet = [], None, 0
    for i, v in enumerate(loud + [False] * (gap + 1)):
        if v:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet > gap:
                regions.append((start * 512, (i - quiet + 1) * 512))
                start, quiet = None, 0
    pad = vad.speech_pad_ms * SR // 1000
    return [(max(0, s - pad), min(len(audio), e + pad)) for s, e in regions]


def bursts(spec: list[tuple[float, float]], seconds: float, seed: int = 0) -> np.ndarray:
    """Noise at 0.1 RMS in the (start, end) second spans, zeros elsewhere."""
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(seconds * SR), np.float32)
    for s, e in spec:
        audio[int(s * SR) : int(e * SR)] = rng.standard_normal(int(e * SR) - int(s * SR)) * 0.1
    return audio


BURSTS = [(0.5, 1.5), (2.3, 3.0), (3.8, 6.9), (7.6, 8.0), (9.0, 21.5), (22.4, 23.0), (25.0, 26.2), (27.5, 27.9)]


def test_plan_chunks_respects_the_window():
    rng = np.random.default_rng(0)
    for max_samples in (SR * 2, SR * 8, SR * 30):
        t, regions = 0, []
        for _ in range(200):
            t += int(rng.integers(0, 3 * SR))
            length = int(rng.integers(SR // 10, 40 * SR))
            regions.append((t, t + length))
            t += length
        spans = plan_chunks(regions, max_samples)
        assert all(0 < e - s <= max_samples for s, e in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # in order, no overlap
        covered = np.zeros(t, bool)
        for s, e in spans:
            covered[s:e] = True
        assert all(covered[s:e].all() for s, e in regions)  # every speech sample is in a chunk
    # short regions with short pauses are merged up to the window; a long one is cut into equal pieces
    assert plan_chunks([(0, 10), (20, 30), (40, 95)], 50) == [(0, 30), (40, 68), (68, 95)]
    assert plan_chunks([(0, 10), (20, 30), (40, 95)], 50, merge=False) == [(0, 10), (20, 30), (40, 68), (68, 95)]


@pytest.mark.parametrize("block_seconds", [1.0, 3.0, 7.0, 100.0])
def test_stream_chunks_blocks_and_window(monkeypatch, block_seconds):
    monkeypatch.setattr(tr, "speech_regions", energy_regions)
    audio = bursts(BURSTS, 29.0)
    window = 4 * SR
    blocks = [audio[i : i + int(block_seconds * SR)] for i in range(0, len(audio), int(block_seconds * SR))]
    chunks = list(stream_chunks(iter(blocks), window, VadConfig()))
    assert all(0 < len(c.audio) <= window for c in chunks)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))
    for c in chunks:  # the audio of a chunk is the recording's at its times
        np.testing.assert_array_equal(c.audio, audio[c.start : c.end])
    for s, e in BURSTS:  # every burst lies in chunks
        inside = np.zeros(len(audio), bool)
        for c in chunks:
            inside[c.start : c.end] = True
        assert inside[int(s * SR) : int(e * SR)].all(), (s, e)


def test_stream_chunks_is_lazy(monkeypatch):
    """Chunks come out while blocks are still being read: a long file is never held whole."""
    monkeypatch.setattr(tr, "speech_regions", energy_regions)
    audio = bursts([(i + 0.2, i + 0.7) for i in range(0, 600)], 600.0)
    read = []

    def blocks():
        for i in range(0, len(audio), 10 * SR):
            read.append(i)
            yield audio[i : i + 10 * SR]

    gen = stream_chunks(blocks(), 2 * SR, VadConfig())
    first = next(gen)
    assert first.start < SR and len(read) <= 2
    rest = list(gen)
    assert len(read) == 60 and len(rest) > 100


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    model = random_tiny_whisper()  # 2 s window (n_audio_ctx 100)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save({"dims": model.dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


def test_cli_outputs_and_bad_files(tiny_pt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tr, "speech_regions", energy_regions)
    audio = bursts(BURSTS[:4] + [(9.0, 11.5)], 12.0)
    good = tmp_path / "talk.wav"
    sf.write(good, audio, SR)
    stereo = tmp_path / "stereo44k.flac"  # another format, rate and channel count
    t44 = np.interp(np.arange(int(12.0 * 44100)) / 44100, np.arange(len(audio)) / SR, audio)
    sf.write(stereo, np.stack([t44, t44], 1).astype(np.float32), 44100)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 100)
    missing = tmp_path / "missing.mp3"
    out = tmp_path / "out"
    files = [good, missing, garbage, stereo, empty]
    rc = main(
        [
            *map(str, files),
            "--model",
            str(tiny_pt),
            "--language",
            "en",
            "--output_dir",
            str(out),
            "--output_format",
            "all",
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert f"audio file {missing} does not exist" in err
    assert f"audio file {garbage} could not be decoded (ffmpeg:" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 2
    for stem in ("talk", "stereo44k", "empty"):
        for ext in ("txt", "srt", "vtt", "tsv", "json"):
            assert (out / f"{stem}.{ext}").is_file(), (stem, ext)
    for stem in ("missing", "garbage"):
        assert not list(out.glob(f"{stem}.*"))
    result = json.loads((out / "talk.json").read_text())
    assert set(result) >= {"text", "language", "segments"} and result["language"] == "en"
    segs = result["segments"]
    assert segs and all(0 <= s["start"] < s["end"] <= 12.0 for s in segs)
    assert all(a["end"] <= b["start"] for a, b in zip(segs, segs[1:]))
    assert all(s["end"] - s["start"] <= 2.0 + 1e-6 for s in segs)  # the model's 2 s window
    assert "-->" in (out / "talk.srt").read_text() and (out / "talk.vtt").read_text().startswith("WEBVTT")
    assert json.loads((out / "empty.json").read_text())["segments"] == []
    assert (out / "empty.txt").read_text() == ""
    other = json.loads((out / "stereo44k.json").read_text())["segments"]  # same speech regions after resampling
    assert len(other) == len(segs)
    assert all(abs(a["start"] - b["start"]) < 0.1 and abs(a["end"] - b["end"]) < 0.1 for a, b in zip(segs, other))


def test_silence_with_real_vad_and_detected_language(tiny_pt, tmp_path, capsys):
    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(5 * SR, np.float32), SR)
    assert main([str(silent), "--model", str(tiny_pt), "--output_dir", str(tmp_path), "-f", "json"]) == 0
    assert json.loads((tmp_path / "silence.json").read_text()) == {"text": "", "language": "", "segments": []}


def test_detected_language_and_model_error(tiny_pt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tr, "speech_regions", energy_regions)
    wav = tmp_path / "a.wav"
    sf.write(wav, bursts([(0.2, 1.5)], 2.0), SR)
    assert main([str(wav), "--model", str(tiny_pt), "--output_dir", str(tmp_path), "-f", "txt"]) == 0
    from whisper.tokenizer import LANGUAGES

    assert (tmp_path / "a.txt").is_file()
    from dqwhisper.models.load import load_model

    res = tr.transcribe_file(load_model(tiny_pt), wav)
    assert res["language"] in LANGUAGES
    assert main([str(wav), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(wav), "--model", str(tiny_pt), "--language", "klingon"])
    assert "--language klingon: not a Whisper language" in capsys.readouterr().err
    assert main([str(wav), "--model", str(tiny_pt), "--language", "Japanese", "-o", str(tmp_path), "-f", "json"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["language"] == "ja"


def test_python_dash_m_help():
    out = subprocess.run(
        [__import__("sys").executable, "-m", "dqwhisper.transcribe", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--output_format" in out.stdout and "--beam_size" in out.stdout


@pytest.mark.slow
def test_real_base_long_recording(base_checkpoint, tmp_path):
    """Whisper base on >= 50 s of held-out English demo clips joined with pauses: all 17+ sentences come out (the
    old transcribe stopped at 30 s), segment times are ordered and inside the audio, and the long-form error is at
    most 1.10x the per-utterance error on the same clips."""
    from bench.longform import check_segments, join_clips
    from dqwhisper.data.kaldi import DataDir
    from dqwhisper.decoding import DecodeConfig, decode_utterances
    from dqwhisper.models.load import load_model
    from dqwhisper.scoring import score_utterances, summarize
    from tests.conftest import ROOT

    test_dir = ROOT / "data" / "demo" / "test"
    if not (test_dir / "wav.scp").is_file():
        pytest.skip(f"{test_dir} missing: run scripts/prepare_demo_data.sh")
    data = DataDir.load(test_dir)
    utts = sorted((u for u in data.utts if u.lang == "en"), key=lambda u: u.utt_id)
    audio, used, _ = join_clips(data, utts, 50.0)
    wav = tmp_path / "long_en.wav"
    sf.write(wav, audio, SR, subtype="PCM_16")
    model = load_model(base_checkpoint)
    result = tr.transcribe_file(model, wav, "en")
    seconds = len(audio) / SR
    assert seconds >= 50 and check_segments(result["segments"], seconds) == []
    assert result["segments"][-1]["end"] > 40  # past the first 30 s window
    long_err = summarize(
        score_utterances({"r": " ".join(u.text for u in used)}, {"r": result["text"]}, {"r": "en"})[0]
    )["overall"]["error"]
    per = decode_utterances(model, data, list({u.utt_id: u for u in used}.values()), DecodeConfig(), progress=False)
    refs = {u.utt_id: u.text for u in used}
    utt_err = summarize(score_utterances(refs, {h.utt_id: h.text for h in per.hyps}, {u: "en" for u in refs})[0])[
        "overall"
    ]["error"]
    assert long_err <= 1.10 * utt_err, (long_err, utt_err)


@pytest.mark.parametrize("n_audio_ctx, merged", [(100, False), (1500, True)])
def test_merge_auto_only_for_a_30s_window(monkeypatch, n_audio_ctx, merged):
    """Short-window models (trained on single utterances) get one VAD region per chunk; a 30 s model gets regions
    merged up to its window; merge=True/False override."""
    monkeypatch.setattr(tr, "speech_regions", energy_regions)
    audio = bursts([(0.2, 0.4), (0.9, 1.1), (1.6, 1.8)], 3.0)  # three regions, together 1.8 s with padding
    seen = []
    stream = tr.stream_chunks

    def spy(blocks, max_samples, vad, merge=True):
        chunks = list(stream(blocks, max_samples, vad, merge))
        seen.append((merge, len(chunks)))
        return iter(chunks)

    monkeypatch.setattr(tr, "stream_chunks", spy)
    model = random_tiny_whisper(n_audio_ctx=n_audio_ctx)
    vad = VadConfig(min_silence_ms=300, speech_pad_ms=100)
    cfg = tr.LongFormConfig(vad=vad, decode=tr.DecodeConfig(temperatures=[0.0], max_new_tokens=3))
    tr.transcribe_audio(model, iter([audio]), "en", cfg)
    cfg.merge = not merged
    tr.transcribe_audio(model, iter([audio]), "en", cfg)
    assert seen == [(merged, 1 if merged else 3), (not merged, 3 if merged else 1)]


def test_audio_blocks_reads_16k_mono_directly_and_the_rest_through_ffmpeg(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(3 * SR + 123) * 0.1).astype(np.float32)
    wav, stereo = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(wav, audio, SR, subtype="PCM_16")
    sf.write(stereo, np.stack([audio, audio], 1), SR, subtype="PCM_16")
    want = np.concatenate(list(tr.ffmpeg_blocks(wav, SR)))
    calls = []
    ffmpeg = tr.ffmpeg_blocks
    monkeypatch.setattr(tr, "ffmpeg_blocks", lambda p, n: calls.append(p) or ffmpeg(p, n))
    blocks = list(tr.audio_blocks(wav, SR))
    assert calls == [] and [len(b) for b in blocks] == [SR, SR, SR, 123]
    np.testing.assert_array_equal(np.concatenate(blocks), want)  # the same samples as ffmpeg's
    np.testing.assert_allclose(np.concatenate(list(tr.audio_blocks(stereo, SR))), want, atol=1 / 32768)
    assert calls == [stereo]


def test_long_regions_are_split_by_silero_at_the_window(monkeypatch):
    import faster_whisper.vad as fv

    got = []
    monkeypatch.setattr(fv, "get_speech_timestamps", lambda audio, opts: got.append(opts) or [])
    tr.speech_regions(np.zeros(SR, np.float32), VadConfig(), max_samples=8 * SR)
    tr.speech_regions(np.zeros(SR, np.float32), VadConfig())
    assert got[0].max_speech_duration_s == 8.0 and got[1].max_speech_duration_s == float("inf")


def test_batches_sorted_by_length_segments_in_time_order(monkeypatch):
    """Chunks are decoded in batches of similar lengths (several batches at a time); segments come out in time
    order with each chunk's own text."""
    import dataclasses

    monkeypatch.setattr(tr, "speech_regions", energy_regions)
    spans = [(0.2, 0.5), (1.5, 2.6), (3.6, 3.9), (5.0, 6.5), (7.5, 7.8), (9.0, 10.2), (11.2, 11.4)]
    audio = bursts(spans, 12.5)
    calls = []
    real = tr.decode_mels

    def spy(model, features, language, seconds, cfg, fp16):
        calls.append(list(seconds))
        return [
            dataclasses.replace(h, text=f"{s:.2f}")
            for h, s in zip(real(model, features, language, seconds, cfg, fp16), seconds)
        ]

    monkeypatch.setattr(tr, "decode_mels", spy)
    vad = VadConfig(min_silence_ms=300, speech_pad_ms=100)
    dcfg = tr.DecodeConfig(temperatures=[0.0], max_new_tokens=2, batch_size=2, no_speech_threshold=None)
    res = tr.transcribe_audio(random_tiny_whisper(), iter([audio]), "en", tr.LongFormConfig(vad=vad, decode=dcfg))
    segs = res["segments"]
    assert len(segs) == len(spans) and sum(len(c) for c in calls) == len(spans)
    assert all(c == sorted(c, reverse=True) for c in calls)  # each batch longest first
    assert [c[0] for c in calls[:4]] == sorted((c[0] for c in calls[:4]), reverse=True)  # 4 batches sorted together
    assert all(a["end"] <= b["start"] for a, b in zip(segs, segs[1:]))
    assert all(abs(float(s["text"]) - (s["end"] - s["start"])) < 0.01 for s in segs)  # each its own chunk's text
