"""Where the frozen teacher's targets come from: a small provider per source, chosen once when training starts.

    CachedTargets   read from the batch: the teacher's logits (top-k values and indices) and matching features were
                    computed once into the on-disk cache (dqwhisper.train.cache_set) and collated with the batch
    LiveTargets     run the teacher's decoder now, on its cached encoder output (`t_enc`), on the student's when
                    both encoders are the same (`enc` without `t_enc`), or on the batch's mel

Both give `{"t_logits": (B, L, K), ["t_index": (B, L, K)], ["t_feats": [(B, L, D)] per teacher layer]}`.
Encoder features for encoder matching always come live (the encoder then trains, so nothing is cached).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dqwhisper.models.student import DQWhisper
from dqwhisper.utils import DQWhisperError, autocast


class TeacherTargets:
    """The frozen teacher and what the student learns from it: logits at the student's kept vocabulary (all of
    them, or the top `kd_topk`) and, when `match_feature` is set, its decoder's `ffn` or `block` features."""

    def __init__(
        self,
        teacher: DQWhisper,
        keep: Tensor | None,
        kd_topk: int = 0,
        match_feature: str | None = None,
        amp_dtype: torch.dtype | None = None,
    ):
        self.teacher = teacher
        self.keep = keep
        self.kd_topk = kd_topk
        self.match_feature = match_feature
        self.amp_dtype = amp_dtype

    @property
    def dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype

    def outputs(
        self,
        tokens_in: Tensor,
        xa: Tensor,
        xa_lengths: Tensor | None = None,
        at: Tensor | None = None,
        cross: dict | None = None,
    ) -> dict[str, Tensor]:
        """tokens_in (B, L), the teacher encoder's output xa (B, T, d) -> t_logits [, t_index] (B, L, K), or (N, K)
        at the N positions where `at` (B, L) is true [, t_feats (n_layer, B, L, D)]. xa_lengths (B,): each row's
        encoder window when the rows' windows differ (padded). cross: a dict keeping the cross-attention's keys
        and values of xa between calls on the same xa (DQTextDecoder.forward_features' kv_cache)."""
        decoder = self.teacher.decoder
        with (
            torch.no_grad(),
            autocast(self.amp_dtype),
            decoder.key_lengths(xa_lengths, xa.shape[1]),
            decoder.logits_at(at),
        ):
            logits, ffn, blocks = decoder.forward_features(tokens_in, xa.to(self.dtype), cross)
        if self.keep is not None:
            logits = logits.index_select(-1, self.keep)
        if not bool(torch.isfinite(logits).all()):
            raise DQWhisperError(
                "the teacher prunes token ids that the student keeps: use a teacher with the full "
                "vocabulary or the same training text"
            )
        out = {}
        if self.kd_topk > 0:
            out["t_logits"], out["t_index"] = logits.float().topk(min(self.kd_topk, logits.shape[-1]), dim=-1)
        else:
            out["t_logits"] = logits.float()
        if self.match_feature is not None:
            out["t_feats"] = torch.stack(ffn if self.match_feature == "ffn" else blocks).float()
        return out

    def encoder_features(self, mel: Tensor) -> list[Tensor]:
        """The teacher encoder's per-layer features on `mel` (for encoder matching)."""
        with torch.no_grad():
            _, blocks, ffn = self.teacher.encoder.forward_features(mel)
        return ffn if self.match_feature == "ffn" else blocks

    def __call__(
        self,
        batch: dict,
        tokens_in: Tensor,
        student_xa: Tensor,
        want_match: bool,
        at: Tensor | None = None,
        cross: dict | None = None,
    ) -> dict:
        """-> t_logits [, t_index]: (B, L, K), or (N, K) at the N positions where `at` (B, L) is true (row-major)
        [, t_feats]. cross: see `outputs` (live targets only)."""
        raise NotImplementedError


class CachedTargets(TeacherTargets):
    def __call__(
        self,
        batch: dict,
        tokens_in: Tensor,
        student_xa: Tensor,
        want_match: bool,
        at: Tensor | None = None,
        cross: dict | None = None,
    ) -> dict:
        dev = tokens_in.device
        t = {}
        for k in ("t_logits", "t_index"):
            if k in batch:
                v = batch[k] if at is None else batch[k][at.to(batch[k].device)]
                t[k] = v.to(dev).float() if k == "t_logits" else v.to(dev)
        if want_match:
            t["t_feats"] = [f.to(dev).float() for f in batch["t_feats"]]
        return t


class LiveTargets(TeacherTargets):
    def __call__(
        self,
        batch: dict,
        tokens_in: Tensor,
        student_xa: Tensor,
        want_match: bool,
        at: Tensor | None = None,
        cross: dict | None = None,
    ) -> dict:
        dev = tokens_in.device
        lengths = None
        if "t_enc" in batch:
            t_xa, lengths = batch["t_enc"].to(dev).float(), batch.get("t_enc_window")
        elif "enc" in batch:  # the teacher's encoder is the student's (one cache): its output is the student's
            t_xa, lengths = student_xa.detach(), batch.get("enc_window")
        else:
            with torch.no_grad(), autocast(self.amp_dtype):
                t_xa = self.teacher.encoder(batch["mel"].to(dev).to(self.dtype))
        t = self.outputs(tokens_in, t_xa, None if lengths is None else lengths.to(dev), at, cross)
        if want_match:
            t["t_feats"] = list(t["t_feats"])
        return t
