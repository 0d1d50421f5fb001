"""What validation measures on the dev set besides the loss: the student's hypotheses and their error."""

from __future__ import annotations

import torch

from dqwhisper.config import DecodeConfig
from dqwhisper import decoding
from dqwhisper.models.student import DQWhisper
from dqwhisper.scoring import score_utterances, summarize
from dqwhisper.utils import autocast


def dev_hypotheses(
    student: DQWhisper,
    batch: dict,
    decode_cfg: DecodeConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    pool: decoding.FallbackPool | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Decode a dev batch exactly as inference.py decodes test: `decode_mels` with the experiment's `decode`
    settings (token cap from the audio's duration, never from the reference; temperature fallback), language from
    utt2lang. Returns (utt_id -> text, the utt_ids that ran away) of the utterances decoded now: with `pool`, rows
    that fall back wait in it (keyed by utt_id) and come back from whichever call fills it, or from
    `pooled_hypotheses(pool.flush())` after the last batch."""
    if "enc" in batch:
        xa = batch["enc"].to(device).float()
    else:
        with autocast(amp_dtype):
            xa = student.encoder(batch["mel"].to(device)).float()
    seconds = (batch["enc_lengths"].float() / 50).tolist()
    windows = batch.get("enc_window")  # rows of different windows, padded: each decoded on its own
    windows = None if windows is None else windows.tolist()
    # cached outputs of a shorter window (data.batch_window) are decoded with the model's window cut to them
    with autocast(amp_dtype), decoding.encoder_window(student, xa.shape[1]):
        hyps = decoding.decode_mels(
            student, xa, list(batch["langs"]), seconds, decode_cfg, windows=windows, defer=pool is not None
        )
        done = []
        for u, h in zip(batch["utt_ids"], hyps):
            done += pool.add(u, h) if isinstance(h, decoding.PendingRow) else [(u, h)]
    return pooled_hypotheses(done)


def pooled_hypotheses(pairs: list) -> tuple[dict[str, str], list[str]]:
    """(utt_id, Hypothesis) pairs -> (utt_id -> text, the utt_ids that ran away)."""
    return {u: h.text for u, h in pairs}, [u for u, h in pairs if h.runaway]


def dev_errors(hyps: dict[str, str], items: list) -> dict[str, float]:
    """Dev error (WER; CER for scripts without spaces; dqwhisper.scoring): `error`, what checkpoints are chosen on, is
    the macro average over languages, as RESULTS.md and inference.py's headline report it (a language with more or
    longer dev references does not outweigh the others); `error_pooled` pools all errors; `error_<lang>` per
    language. `items`: the dev WhisperDataset's (utterance, tokens, ctc targets, frames)."""
    summary = summarize(
        score_utterances({u.utt_id: u.text for u, _, _, _ in items}, hyps, {u.utt_id: u.lang for u, _, _, _ in items})[
            0
        ]
    )
    return {
        "error": summary["overall"]["macro_error"],
        "error_pooled": summary["overall"]["error"],
        **{f"error_{lang}": v["error"] for lang, v in summary["per_language"].items()},
    }
