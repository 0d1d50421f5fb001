"""CTC greedy decoding over the CTC head's sentencepiece units (a fast path without the decoder)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from whisper.model import Whisper

from dqwhisper.data.bpe import BPE
from dqwhisper.decoding.search import SAMPLES_PER_FRAME, row_windows
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


def ctc_greedy(logits: Tensor, lengths: Sequence[int] | None = None, blank: int = 0) -> list[list[int]]:
    """CTC best path: argmax per frame, merge repeats, drop blanks.

    logits (B, T, V); lengths (B) frames per row that hold real audio (None = all T). Returns per row the unit ids
    minus one (CTC label k + 1 is sentencepiece id k, blank = 0), as DESIGN.md's `ctc_targets` define them.
    """
    best = logits.argmax(dim=-1).cpu()
    out = []
    for row, ids in enumerate(best.tolist()):
        n = len(ids) if lengths is None else int(lengths[row])
        units, prev = [], None
        for i in ids[:n]:
            if i != prev and i != blank:
                units.append(i - 1)
            prev = i
        out.append(units)
    return out


def load_ctc_bpe(model: Whisper, fallback: str | Path | None = None):
    """The sentencepiece model of the CTC units: the checkpoint's serialized copy, else a bpe.model file."""

    proto = getattr(model, "ctc_bpe", None)
    if proto:
        return BPE.load(bytes(proto))
    if fallback is not None and Path(fallback).is_file():
        return BPE.load(fallback)
    raise DQWhisperError(
        "CTC decoding needs the sentencepiece model of the CTC units: the checkpoint has no "
        f"'bpe_model' and {fallback or 'no bpe.model file'} was not found"
    )


@torch.no_grad()
def ctc_decode_batch(
    model: Whisper, mel: Tensor, n_samples: Sequence[int], bpe, windows: Sequence[int] | None = None
) -> list[tuple[str, int]]:
    """CTC greedy transcripts of a mel batch: (text, number of units) per row. Encoder frames past the real audio
    (padding) are ignored. `windows`: encoder positions per row (each row encoded on its own window; DQWhisper)."""
    lengths = None if windows is None else torch.as_tensor(list(windows), dtype=torch.long)
    with row_windows(model, lengths):
        features = model.encoder(mel)
    lengths = [min(math.ceil(n / SAMPLES_PER_FRAME), features.shape[1]) for n in n_samples]
    out = []
    for units in ctc_greedy(model.ctc_logits(features), lengths):
        bad = [u for u in units if not 0 <= u < bpe.vocab_size]
        if bad:
            raise DQWhisperError(
                f"CTC head emits unit {bad[0] + 1} but the sentencepiece model has {bpe.vocab_size} pieces (+ blank)"
            )
        out.append((bpe.decode(units), len(units)))
    return out
