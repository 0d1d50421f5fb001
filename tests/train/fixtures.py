"""Fixtures for the training tests: a tiny random Whisper checkpoint and a tiny Kaldi data dir with written wavs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from hydra import compose, initialize_config_dir

from dqwhisper.config import register_configs
from dqwhisper.models.student import from_whisper, save_checkpoint
from tests.conftest import random_tiny_whisper

CONF = Path(__file__).resolve().parents[2] / "conf"

TEXTS = {
    "en": ["hello world", "the cat sat", "good morning", "a red apple", "see you soon", "thank you"],
    "ja": ["こんにちは", "ありがとう", "おはよう", "さようなら", "すみません", "いただきます"],
}


def write_tiny_model(path: Path, seed: int = 0, **dims) -> Path:
    save_checkpoint(from_whisper(random_tiny_whisper(seed, **dims)), path)
    return path


def write_data_dir(root: Path, n_per_lang: int = 6, seed: int = 0) -> Path:
    """root/{train,dev,test}: 1-1.8 s tones + noise, en and ja."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_per_lang), ("dev", 2), ("test", 2)):
        d = root / split
        (d / "wav").mkdir(parents=True, exist_ok=True)
        rows = []
        for lang, texts in TEXTS.items():
            for i in range(count):
                utt = f"{lang}_{split}_{i:03d}"
                n = int(16000 * rng.uniform(1.0, 1.8))
                t = np.arange(n) / 16000
                wav = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(n)
                sf.write(d / "wav" / f"{utt}.wav", wav.astype(np.float32), 16000)
                rows.append((utt, f"wav/{utt}.wav", texts[i % len(texts)], lang))
        rows.sort()
        (d / "wav.scp").write_text("".join(f"{u} {w}\n" for u, w, _, _ in rows))
        (d / "text").write_text("".join(f"{u} {t}\n" for u, _, t, _ in rows))
        (d / "utt2spk").write_text("".join(f"{u} {u.split('_')[0]}\n" for u, _, _, _ in rows))
        (d / "utt2lang").write_text("".join(f"{u} {lang}\n" for u, _, _, lang in rows))
    return root


def tiny_config(expdir: Path, data_dir: Path, teacher: Path, name: str = "demo_student_kd_dm", overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[
                f"checkpoint_dir={expdir}",
                f"data.data_dir={data_dir}",
                f"teacher.name={teacher}",
                "data.audio_window=2.0",
                "data.bpe_vocab_size=300",
                "data.collector.minibatch_size=4",
                "student.decoder_layers=[0,3]",
                f"trainer.cache_dir={expdir.parent / 'cache'}",
                "trainer.max_steps=6",
                "trainer.valid_every=3",
                "trainer.progress=false",
                "trainer.device=cpu",
                "trainer.num_threads=1",
                "trainer.cache_dtype=float32",
                "optim.warmup_steps=2",
                "optim.lr=1e-3",
                # what these tests check, whatever the demo configs choose: dev decoded as test is (the demo's float
                # students score dev by its loss), the teacher on its own whole window (the demo's take its targets
                # on their per-utterance windows: test_batch_window.py checks that too)
                "trainer.valid_decode=true",
                "teacher.batch_window=false",
                # and the teacher's targets cached, no time masks (the demo's KD students read masked outputs with a
                # live teacher: tests/train/test_batch_window.py and tests/distill/test_model.py check those)
                "trainer.cache_teacher=true",
                "data.feature_mask.num_time_masks=0",
                "data.feature_mask.teacher=false",
                *overrides,
            ],
        )
