"""Fixture writers shared by the data tests: sine-wave audio files and small data dirs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dqwhisper.data.kaldi import Utterance, write_data_dir


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_wav(
    path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0, channels: int = 1, subtype: str = "PCM_16"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, rate, freq, channels), rate, subtype=subtype)
    return path


def write_mp3(path: Path, seconds: float = 1.0, rate: int = 48000) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    wav = write_wav(path.with_suffix(".src.wav"), seconds, rate)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-codec:a", "libmp3lame", "-b:a", "64k", str(path)],
        check=True,
    )
    wav.unlink()
    return path


def make_data_dir(root: Path, n: int = 4, lang: str = "en", seconds: float = 1.0, name: str = "data") -> Path:
    """A valid data dir with `n` utterances of two speakers, wavs under root/wav (relative paths)."""
    utts = []
    for i in range(n):
        spk = f"spk{i % 2}"
        write_wav(root / "wav" / f"{spk}-u{i}.wav", seconds + 0.1 * i, freq=300 + 50 * i)
        utts.append(Utterance(f"{spk}-u{i}", f"../wav/{spk}-u{i}.wav", f"hello number {i}", spk, lang))
    write_data_dir(root / name, utts)
    return root / name
