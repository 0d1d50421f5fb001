"""Shared fixtures: tiny random Whisper dims (no download), the real-weight model store for `slow` tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from whisper.model import ModelDimensions, Whisper

ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE = Path(os.environ.get("DQWHISPER_MODEL_STORE", ROOT / "exp" / "models"))


def pytest_report_header(config) -> list[str]:
    """The CPU (the int8 kernels and some tolerances depend on it) and the free disk, in every CI log."""
    from dqwhisper.quant.kernels import describe_cpu

    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free / 2**30
    lines = [describe_cpu(torch.get_num_threads()), f"free disk in {tmp}: {free:.1f} GiB; model store: {MODEL_STORE}"]
    if free < 3:
        lines.append(f"WARNING: under 3 GiB free in {tmp}: the slow real-weight tests write up to ~0.6 GB each")
    return lines


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
