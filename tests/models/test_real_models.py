"""Real weights (scripts/prepare_models.sh): the converted base against faster-whisper on synthesized speech."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper

from dqwhisper.models import ct2
from dqwhisper.models.load import load_whisper
from dqwhisper.models.student import export_state, read_checkpoint

pytestmark = pytest.mark.slow

SENTENCES = {  # language -> (engine, text)
    "en": ("flite", "The quick brown fox jumps over the lazy dog."),
    "es": ("espeak-ng", "El perro come carne en la casa de mi abuela."),
    "de": ("espeak-ng", "Heute ist das Wetter sehr schön und warm."),
    "ja": ("pyopenjtalk", "今日はとても良い天気です。"),
}


def _synthesize(lang: str, engine: str, text: str, out: Path) -> Path:
    raw = out.with_suffix(".raw.wav")
    if engine == "pyopenjtalk":
        pyopenjtalk = pytest.importorskip("pyopenjtalk")
        import soundfile

        wave, sr = pyopenjtalk.tts(text)
        soundfile.write(raw, (wave / 32768.0).astype(np.float32), sr)
    else:
        if not shutil.which(engine):
            pytest.skip(f"{engine} not installed")
        cmd = (
            ["flite", "-voice", "slt", "-t", text, "-o", str(raw)]
            if engine == "flite"
            else ["espeak-ng", "-v", lang, "-s", "130", "-w", str(raw), text]
        )
        subprocess.run(cmd, check=True, capture_output=True)
    if not shutil.which("sox"):
        pytest.skip("sox not installed")
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        lang: whisper.load_audio(str(_synthesize(lang, engine, text, folder / f"{lang}.wav")))
        for lang, (engine, text) in SENTENCES.items()
    }


@pytest.fixture(scope="session")
def base_model(base_checkpoint):
    torch.set_num_threads(2)
    return load_whisper("base")


@pytest.fixture(scope="session")
def base_ct2_dir(base_checkpoint) -> Path:
    d = base_checkpoint.parent / "base-ct2"
    if not (d / "model.bin").exists():
        pytest.skip(f"{d} missing: run scripts/prepare_models.sh")
    return d


def _faster_whisper(path: Path):
    fw = pytest.importorskip("faster_whisper")
    return fw.WhisperModel(str(path), device="cpu", compute_type="float32", cpu_threads=2)


def _fw_tokens(model, audio: np.ndarray, lang: str) -> list[int]:
    segments, _ = model.transcribe(
        audio,
        language=lang,
        beam_size=1,
        without_timestamps=True,
        temperature=0.0,
        condition_on_previous_text=False,
        vad_filter=False,
    )
    return [t for s in segments for t in s.tokens]


TIE = 0.05  # logit gap below which fp32 noise (thread scheduling, gemm order) may flip a greedy choice


def _assert_same_greedy(model, mel: torch.Tensor, lang: str, ours: list[int], theirs: list[int]) -> None:
    """Token lists equal, or equal up to the first step where the two choices are tied within TIE under our model
    (the espeak es/de clips are hard for base and produce near-ties); prints the agreement for the report."""
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"[{lang}] {n}/{max(len(ours), len(theirs))} tokens agree{'' if ours == theirs else ' (then a tie)'}")
    if ours == theirs:
        return
    assert n < min(len(ours), len(theirs)), f"one sequence is a prefix of the other: {ours} vs {theirs}"
    tok = whisper.tokenizer.get_tokenizer(True, num_languages=99)
    prompt = [tok.sot, tok.to_language_token(lang), tok.transcribe, tok.no_timestamps]
    with torch.no_grad():
        logits = model.logits(torch.tensor([prompt + ours[:n]]), model.embed_audio(mel[None]))[0, -1]
    gap = float(logits[ours[n]] - logits[theirs[n]])
    assert 0 <= gap < TIE, f"[{lang}] token {n}: ours {ours[n]} vs reference {theirs[n]}, logit gap {gap:.4f}"


def _openai_tokens(model, mel: torch.Tensor, lang: str) -> list[int]:
    options = whisper.DecodingOptions(language=lang, without_timestamps=True, temperature=0.0, fp16=False)
    return list(whisper.decode(model, mel, options).tokens)


@pytest.mark.parametrize("lang", list(SENTENCES))
def test_converted_base_gives_faster_whisper_tokens(lang, clips, base_model, base_ct2_dir):
    """Same greedy tokens as faster-whisper on the original CT2 files, on the same log-mel features.

    faster-whisper's numpy front end and openai-whisper's torch one differ slightly, enough to flip a token on
    these clips, so each model is run on both front ends' features: openai decode on faster-whisper's features
    against faster-whisper's own transcribe, and CTranslate2 on openai's features against openai decode."""
    import ctranslate2
    from faster_whisper.audio import pad_or_trim as fw_pad_or_trim

    fw = _faster_whisper(base_ct2_dir)
    audio = clips[lang]
    fw_tokens = _fw_tokens(fw, audio, lang)
    fw_mel = torch.from_numpy(fw_pad_or_trim(fw.feature_extractor(audio)[:, :3000]))
    _assert_same_greedy(base_model, fw_mel, lang, _openai_tokens(base_model, fw_mel, lang), fw_tokens)

    oa_mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))
    oa_tokens = _openai_tokens(base_model, oa_mel, lang)
    tok = whisper.tokenizer.get_tokenizer(True, num_languages=99)
    prompt = [tok.sot, tok.to_language_token(lang), tok.transcribe, tok.no_timestamps]
    result = fw.model.generate(
        ctranslate2.StorageView.from_array(oa_mel[None].numpy()), [prompt], beam_size=1, max_length=224
    )
    _assert_same_greedy(base_model, oa_mel, lang, oa_tokens, result[0].sequences_ids[0])
    assert len(oa_tokens) >= 5


def test_exported_base_loads_in_faster_whisper(tmp_path, clips, base_checkpoint, base_ct2_dir):
    out = ct2.openai_to_ct2(**export_state(read_checkpoint(base_checkpoint)), out_dir=tmp_path / "base-export")
    assert (out / "model.bin").read_bytes() == (base_ct2_dir / "model.bin").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((base_ct2_dir / "config.json").read_text())
    original, exported = _faster_whisper(base_ct2_dir), _faster_whisper(out)
    for lang in ("en", "ja"):
        assert _fw_tokens(exported, clips[lang], lang) == _fw_tokens(original, clips[lang], lang)


INT8_TIE = 1.0  # log-probability gap below which the CPU's int8 GEMM may flip a greedy choice (see the test)


def _ct2_steps(model_dir: Path, mel: np.ndarray, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Greedy CTranslate2 int8 decoding: (token ids, each step's log-probabilities over the vocabulary)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="int8_float32", intra_threads=2)
    r = model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None])),
        [prompt],
        beam_size=1,
        max_length=64,
        return_logits_vocab=True,
    )[0]
    return r.sequences_ids[0], [np.asarray(step) for step in r.logits[0]]  # logits: per hypothesis, then per step


def test_exported_int8_base_decodes_like_ctranslate2_int8(tmp_path, clips, base_checkpoint, base_ct2_dir):
    """Our int8 export (codes written offline) decodes like CTranslate2's own int8 quantization at load time (same
    per-row rule). Stated tolerance: the token lists are equal, or equal up to a step where the two choices are within
    INT8_TIE of each other under one of the models. CTranslate2's int8 GEMM is CPU-dependent (u8s8 with int16 pair
    sums without VNNI): on the en clip the two models' step-0 log-probabilities differ by up to ~1.0 while the top two
    tokens (440, 264) are 0.5-1.0 apart, so an AVX2-only CPU flips that first choice (issue 15: 440 vs 264)."""
    out = ct2.openai_to_ct2(
        **export_state(read_checkpoint(base_checkpoint)), out_dir=tmp_path / "base-int8", quantization="int8"
    )
    assert (out / "model.bin").stat().st_size < 0.55 * (base_ct2_dir / "model.bin").stat().st_size
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(clips["en"])).numpy()
    tok = whisper.tokenizer.get_tokenizer(True, num_languages=99)
    prompt = [tok.sot, tok.to_language_token("en"), tok.transcribe, tok.no_timestamps]
    ours, ours_lp = _ct2_steps(out, mel, prompt)
    theirs, theirs_lp = _ct2_steps(base_ct2_dir, mel, prompt)
    assert len(ours) >= 5 and len(theirs) >= 5
    if ours != theirs:
        n = next(i for i, (a, b) in enumerate(zip(ours + [-1], theirs + [-2])) if a != b)
        a, b = (ours + [tok.eot])[n], (theirs + [tok.eot])[n]
        steps = [lp[n] for lp in (ours_lp, theirs_lp) if n < len(lp)]  # a model that ended at n has none for it
        gap = min(abs(float(lp[a] - lp[b])) for lp in steps)
        assert gap < INT8_TIE, f"step {n}: {a} vs {b}, {gap:.2f} apart (not a near-tie)"


def test_generated_vocabulary_and_config_match_shipped(base_checkpoint, base_ct2_dir):
    dims, _ = ct2.ct2_to_openai(base_ct2_dir)
    shipped = (base_ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    assert ct2.vocabulary_lines(dims) == shipped[:-1] and shipped[-1] == ""
    config = json.loads((base_ct2_dir / "config.json").read_text())
    ours = ct2.whisper_config(dims, config["alignment_heads"])
    assert ours == config


def test_tiny_en_store_entry(base_checkpoint):
    model = load_whisper("tiny.en")
    assert model.dims.n_vocab == 51864 and not model.is_multilingual and model.dims.n_text_state == 384
