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
    dims = dict(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_vocab=51865,
                n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=4)
    dims.update(overrides)
    return ModelDimensions(**dims)


@pytest.fixture
def tiny_whisper() -> Whisper:
    """A random multilingual-vocabulary Whisper with tiny widths, weights drawn with a fixed seed."""
    torch.manual_seed(0)
    model = Whisper(tiny_dims())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "embedding" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def base_checkpoint() -> Path:
    path = MODEL_STORE / "base.pt"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/prepare_models.sh")
    return path
