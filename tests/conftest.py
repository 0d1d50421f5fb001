"""Shared fixtures: tiny random Whisper dims (no download), the real-weight model store for `slow` tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from whisper.model import ModelDimensions, Whisper

ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE = Path(os.environ.get("DQWHISPER_MODEL_STORE", ROOT / "exp" / "models"))


def tiny_dims(**overrides) -> ModelDimensions:
    dims = dict(
        n_mels=80,
        n_audio_ctx=100,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=4,
    )
    dims.update(overrides)
    return ModelDimensions(**dims)


def random_tiny_whisper(seed: int = 0, bias_std: float = 0.0, **dims) -> Whisper:
    """A random multilingual-vocabulary Whisper with tiny widths: matrices and embeddings ~ N(0, 0.05); biases and
    norms ~ N(0, bias_std) when bias_std > 0 (else as initialised)."""
    torch.manual_seed(seed)
    model = Whisper(tiny_dims(**dims))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "embedding" in name:
                p.normal_(0, 0.05)
            elif bias_std > 0:
                p.normal_(0, bias_std)
    return model.eval()


@pytest.fixture
def tiny_whisper() -> Whisper:
    return random_tiny_whisper()


@pytest.fixture(scope="session")
def base_checkpoint() -> Path:
    path = MODEL_STORE / "base.pt"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/prepare_models.sh")
    return path
