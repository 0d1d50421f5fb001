"""The encoder input for a model's own window, and the window a model decodes with."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from whisper.model import Whisper

from dqwhisper.data.dataset import window_log_mel
from dqwhisper.decoding.search import SAMPLES_PER_FRAME, SAMPLE_RATE
from dqwhisper.models.student import margin_frames, set_audio_window, window_frames
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


def window_samples(model: Whisper) -> int:
    """Audio samples the encoder's window covers: n_audio_ctx * 320 (480000 for Whisper's 30 s)."""
    return model.dims.n_audio_ctx * SAMPLES_PER_FRAME


def audio_to_mel(
    audios: list[np.ndarray], model: Whisper, device: torch.device | str = "cpu", padding: str = "zeros"
) -> Tensor:
    """Waveforms -> log-mel (B, n_mels, 2 * n_audio_ctx) for the model's window (`window_log_mel`)."""
    return torch.stack([window_log_mel(a, model.dims.n_mels, model.dims.n_audio_ctx, padding) for a in audios]).to(
        device
    )


def apply_audio_window(model: Whisper, seconds: float | None) -> Whisper:
    """Shrink the encoder window to `seconds` for decoding (None: keep the model's own)."""
    if seconds is None:
        return model

    frames = window_frames(seconds)
    if frames > model.dims.n_audio_ctx:
        raise DQWhisperError(
            f"decode.audio_window={seconds} s is longer than the model's window of {model.dims.n_audio_ctx / 50:.2f} s"
        )
    return set_audio_window(model, frames)


def batch_frames(model: Whisper, n_samples: int, margin: float | None) -> int:
    """Encoder positions for a batch whose longest waveform has `n_samples`: (its seconds + `margin`) rounded up to
    whole seconds, at most the model's window; the whole window when `margin` is None (`margin_frames`)."""
    return margin_frames(n_samples / SAMPLE_RATE, margin, model.dims.n_audio_ctx)


@contextmanager
def encoder_window(model: Whisper, frames: int) -> Iterator[Whisper]:
    """The model with its encoder window cut to the first `frames` positions for the duration of the block (the
    sinusoid table and dims restored after; decode.batch_window)."""
    table, dims = model.encoder.positional_embedding, model.dims
    set_audio_window(model, min(frames, dims.n_audio_ctx))
    try:
        yield model
    finally:
        model.encoder.positional_embedding, model.dims = table, dims
