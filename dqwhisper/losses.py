"""Every training loss, and their weighted sum in one visible line.

    loss = beta * CTC + (1 - alpha) * CE + alpha * (KD + lambda_match * match)

Each loss is a sum over its items divided by `normalizer` (default: the local item count: target tokens for CE, KD
and matching, CTC target units for CTC). Under DDP the trainer passes the global count divided by the world size,
so that averaging gradients over ranks gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dqwhisper.distill.matching import match_loss as layer_match  # noqa: F401  (re-exported: one place for losses)

IGNORE = -100


def _denom(normalizer: float | Tensor | None, count: Tensor) -> Tensor | float:
    return count.clamp(min=1) if normalizer is None else normalizer


def ce(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, normalizer: float | Tensor | None = None
) -> Tensor:
    """Cross-entropy. logits (B, L, V), targets (B, L) with IGNORE at prefix/padding positions."""
    losses = F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return losses.sum() / _denom(normalizer, (targets != IGNORE).sum())


def kd_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    teacher_index: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the vocabulary, averaged over masked tokens.

    student_logits (B, L, V); teacher_logits (B, L, V), or (B, L, K) top-k values with their indices into V in
    teacher_index (B, L, K) (the teacher distribution renormalised over its top k); mask (B, L) bool.
    """
    T = temperature
    s_logp = F.log_softmax(student_logits.float() / T, dim=-1)
    if teacher_index is not None:
        s_logp = s_logp.gather(-1, teacher_index)
    t_logp = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, L)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    return T * T * kl.sum() / _denom(normalizer, mask.sum())


def ctc(
    ctc_logits: Tensor,
    enc_lengths: Tensor,
    targets: Tensor,
    target_lengths: Tensor,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """CTC (blank 0, infinities zeroed) summed over utterances, divided by the number of target units.

    ctc_logits (B, T, C); enc_lengths (B) valid frames; targets concatenated (sum target_lengths); target_lengths (B).
    """
    logp = F.log_softmax(ctc_logits.float(), dim=-1).transpose(0, 1)  # (T, B, C)
    losses = F.ctc_loss(logp, targets, enc_lengths, target_lengths, blank=0, reduction="none", zero_infinity=True)
    return losses.sum() / _denom(normalizer, target_lengths.sum())


def combine(
    ce: Tensor | None = None,
    ctc: Tensor | None = None,
    kd: Tensor | None = None,
    match: Tensor | None = None,
    alpha: float = 0.0,
    beta: float = 0.0,
    lambda_match: float = 1.0,
) -> dict[str, Tensor]:
    """The named losses and their weighted sum; a missing term counts as 0."""
    ref = next((x for x in (ce, ctc, kd, match) if x is not None), None)
    if ref is None:
        raise ValueError("combine() needs at least one loss")
    zero = ref.new_zeros(())
    ce, ctc, kd, match = (zero if x is None else x for x in (ce, ctc, kd, match))
    loss = beta * ctc + (1 - alpha) * ce + alpha * (kd + lambda_match * match)
    return {"loss": loss, "loss_ce": ce, "loss_ctc": ctc, "loss_kd": kd, "loss_match": match}
