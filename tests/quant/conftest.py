"""Fixtures for the quantization tests: tiny random DQWhisper students (no download)."""

from __future__ import annotations

import pytest
import torch

from dqwhisper.models.student import from_whisper
from tests.conftest import random_tiny_whisper

# a pruned vocabulary: the first 1000 text tokens + every special token of the multilingual tokenizer
PRUNED_KEEP = list(range(1000)) + list(range(50257, 51865))


def make_student(seed: int = 0, vocab_keep=PRUNED_KEEP, ctc_units: int = 0, **dims) -> torch.nn.Module:
    # non-zero biases and norms, so that they matter in the comparisons
    teacher = random_tiny_whisper(seed, bias_std=0.02, **dims)
    return from_whisper(teacher, vocab_keep=vocab_keep, ctc_units=ctc_units).eval()


@pytest.fixture
def student():
    return make_student()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(2, 80, 200, generator=g)
    tokens = torch.randint(0, 1000, (2, 9), generator=g)
    tokens[:, 0] = 50258  # <|startoftranscript|>
    return mel, tokens
