"""The distillation model: the student, the frozen teacher's targets and the matching adapters as one module whose
`forward(batch)` returns the named losses (WeNet's ASRModel.forward), so DDP wraps it and syncs its gradients.

    loss = beta * CTC + (1 - alpha) * CE + alpha * (KD + lambda_match * match)     (dqwhisper.losses.combine)

The teacher is not a submodule: it is frozen, lives in a target provider (dqwhisper.distill.teacher), and so stays
out of DDP, of `state_dict()` and of `train()`/`eval()`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torchaudio
from torch import Tensor, nn

from dqwhisper import losses
from dqwhisper.distill.matching import FeatureAdapter, match_loss
from dqwhisper.distill.teacher import TeacherTargets
from dqwhisper.models.student import DQWhisper, swapped
from dqwhisper.utils import autocast


def feature_adapter(student: DQWhisper, teacher: DQWhisper, feature: str, side: str = "decoder") -> FeatureAdapter:
    """Teacher -> student width maps, one per student layer, for `ffn` (4d) or `block` (d) features."""
    width = (lambda m: m.dims.n_text_state) if side == "decoder" else (lambda m: m.dims.n_audio_state)
    layers = student.dims.n_text_layer if side == "decoder" else student.dims.n_audio_layer
    scale = 4 if feature == "ffn" else 1
    return FeatureAdapter(layers, width(teacher) * scale, width(student) * scale)


class DistillModel(nn.Module):
    """forward(batch) -> ({"loss", "loss_ce", "loss_ctc", "loss_kd", "loss_match"}, info).

    batch: the collated training batch (dqwhisper.train.cache_set.collate_training): `tokens_in`, `targets`,
    `ctc_targets`, `ctc_target_lengths`, `enc_lengths`, and `enc` (cached encoder output) or `mel`; teacher
    targets when cached. info: `n_tokens`, and `chosen` / `enc_chosen` (teacher layer per student layer).
    `loss`: the `loss` config section (alpha, beta, kd_temperature, lambda_match, label_smoothing, match).
    `all_reduce`/`world_size`: under DDP, the sum across ranks; losses are then normalised by the global count
    over the world size, and the matching distances summed before the layer choice.
    """

    def __init__(
        self,
        student: DQWhisper,
        loss: Any,
        teacher: TeacherTargets | None = None,
        adapter: FeatureAdapter | None = None,
        enc_adapter: FeatureAdapter | None = None,
        freeze_encoder: bool = True,
        amp_dtype: torch.dtype | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        world_size: int = 1,
        feature_mask: tuple[int, int] = (0, 0),
        mask_teacher: bool = False,
        prefix_noise: float = 0.0,
    ):
        """feature_mask: (masks per utterance, max width in encoder positions) of the time masks on the frozen
        encoder's output that the student's decoder reads in training (data.feature_mask); (0, _) = none.
        mask_teacher: the teacher's targets come from the same masked output (consistent teaching: the teacher
        says what it would predict from what the student sees); False: from the unmasked one.
        prefix_noise: in training, the share of the decoder's input text tokens replaced by text tokens drawn from
        the batch (data.prefix_noise): the student (and a live teacher) read a history with errors in it, as in
        decoding, and learn the next label from it; 0 = none."""
        super().__init__()
        self.prefix_noise = prefix_noise
        # set by the training loop before each micro-batch: the masks and prefix noise are drawn from this seed
        # (the global generator left as it was); None: from the global generator
        self.noise_seed: int | None = None
        self.mask_teacher = mask_teacher
        n_masks, width = feature_mask
        self.feature_mask = (
            (n_masks, torchaudio.transforms.TimeMasking(width))
            if n_masks > 0 and width > 0 and freeze_encoder
            else None
        )
        self.student = student
        self.adapter = adapter
        self.enc_adapter = enc_adapter
        self.teacher = teacher
        self.loss_cfg = loss
        self.freeze_encoder = freeze_encoder
        self.amp_dtype = amp_dtype
        self.all_reduce = all_reduce
        self.world_size = world_size

    def train(self, mode: bool = True) -> "DistillModel":
        super().train(mode)
        if mode and self.freeze_encoder:
            self.student.encoder.eval()
        return self

    def _targets(self, batch: dict, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens_in, targets in the student's vocabulary ids, mask of the counted positions)."""
        tokens_in = batch["tokens_in"].to(dev)
        targets_full = batch["targets"].to(dev)
        mask = targets_full != losses.IGNORE
        targets = targets_full
        if self.student.decoder.vocab_keep is not None:
            targets = self.student.decoder.to_subset_ids(targets_full)
            targets = torch.where(mask & (targets >= 0), targets, torch.full_like(targets, losses.IGNORE))
        return tokens_in, targets, mask

    def _student(self, batch: dict, tokens_in: Tensor, mask: Tensor, want_match: bool, match_encoder: bool):
        """-> (encoder output xa, the time-masked positions (B, T) | None, what the decoder read (xa with those
        positions zeroed), subset logits (1, N, V) at the N counted positions (mask), decoder features (B, L, D) |
        None, encoder features | None)."""
        dev, m = tokens_in.device, self.loss_cfg.match
        enc_feats = s_feats = None
        with autocast(self.amp_dtype):
            if "enc" in batch:
                xa = batch["enc"].to(dev).float()
            else:
                mel = batch["mel"].to(dev)
                if self.freeze_encoder:
                    with torch.no_grad():
                        xa = self.student.encoder(mel)
                elif match_encoder:
                    xa, eb, ef = self.student.encoder.forward_features(mel)
                    enc_feats = ef if m.feature == "ffn" else eb
                else:
                    xa = self.student.encoder(mel)
            lengths = batch.get("enc_window")  # rows of different encoder windows (data.batch_window), padded
            decoder = self.student.decoder
            masked = self._mask_positions(xa, batch["enc_lengths"]) if self.training and self.feature_mask else None
            xa_dec = xa if masked is None else xa.masked_fill(masked[..., None], 0.0)
            with (
                swapped(decoder, "subset_logits", True),
                decoder.key_lengths(None if lengths is None else lengths.to(dev), xa.shape[1]),
                decoder.logits_at(mask),
            ):
                if want_match:
                    logits, ffn, blocks = decoder.forward_features(tokens_in, xa_dec)
                    s_feats = ffn if m.feature == "ffn" else blocks
                else:
                    logits = decoder(tokens_in, xa_dec)
        return xa, masked, xa_dec, logits.unsqueeze(0), s_feats, enc_feats

    def _noisy_prefix(self, tokens_in: Tensor, mask: Tensor) -> Tensor:
        """tokens_in with a share `prefix_noise` of its text tokens (the labels fed back: a counted position before,
        one after; not the prompt, not a final end-of-text) replaced by text tokens drawn uniformly from the same
        positions of the batch."""
        text = torch.zeros_like(mask)
        text[:, 1:] = mask[:, :-1] & mask[:, 1:]
        pool = tokens_in[text]
        hit = text & (torch.rand(text.shape, device=tokens_in.device) < self.prefix_noise)
        if pool.numel() == 0 or not bool(hit.any()):
            return tokens_in
        out = tokens_in.clone()
        out[hit] = pool[torch.randint(pool.numel(), (int(hit.sum()),), device=tokens_in.device)]
        return out

    def _mask_positions(self, xa: Tensor, audio_positions: Tensor) -> Tensor:
        """(B, T) bool: each row's time masks (torchaudio's TimeMasking) drawn within its audio's positions."""
        n_masks, mask = self.feature_mask
        out = torch.zeros(xa.shape[:2], dtype=torch.bool, device=xa.device)
        for b, n in enumerate(audio_positions.tolist()):
            n = max(1, min(int(n), xa.shape[1]))
            row = torch.ones(1, 1, n, device=xa.device)  # (channel, feature, time)
            for _ in range(n_masks):
                row = mask(row, 0.0)
            out[b, :n] = row[0, 0] == 0
        return out

    def forward(self, batch: dict, with_teacher: bool = True) -> tuple[dict[str, Tensor], dict]:
        dev = next(self.student.parameters()).device
        tokens_in, targets, mask = self._targets(batch, dev)
        with contextlib.ExitStack() as stack:
            if self.training and self.noise_seed is not None:
                cuda = [dev.index or 0] if dev.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=cuda))
                torch.manual_seed(self.noise_seed)
            return self._forward(batch, tokens_in, targets, mask, with_teacher)

    def _forward(self, batch: dict, tokens_in: Tensor, targets: Tensor, mask: Tensor, with_teacher: bool):
        cfg, m = self.loss_cfg, self.loss_cfg.match
        dev = tokens_in.device
        if self.training and self.prefix_noise > 0:
            tokens_in = self._noisy_prefix(tokens_in, mask)
        distil = with_teacher and self.teacher is not None and cfg.alpha > 0
        want_match = distil and m.enabled
        n_tok = mask.sum().float()
        n_ctc = batch["ctc_target_lengths"].sum().float()
        norm_tok = norm_ctc = reduce = None
        if self.all_reduce is not None and self.student.training:
            counts = self.all_reduce(torch.stack([n_tok, n_ctc]).to(dev))
            norm_tok, norm_ctc = counts[0] / self.world_size, counts[1] / self.world_size
            reduce = self.all_reduce
        xa, masked, xa_dec, logits, s_feats, enc_feats = self._student(
            batch, tokens_in, mask, want_match, want_match and m.encoder and not self.freeze_encoder
        )
        counted = torch.ones_like(logits[..., 0], dtype=torch.bool)  # (1, N): logits are only the counted positions

        out = {"ce": losses.ce(logits, targets[mask][None], cfg.label_smoothing, normalizer=norm_tok)}
        if cfg.beta > 0 and self.student.ctc_head is not None:
            enc_lengths = batch["enc_lengths"].clamp(max=xa.shape[1])
            out["ctc"] = losses.ctc(
                self.student.ctc_logits(xa),
                enc_lengths.to(dev),
                batch["ctc_targets"].to(dev),
                batch["ctc_target_lengths"].to(dev),
                normalizer=norm_ctc,
            )
        info: dict = {}
        if distil:
            t_batch, t_xa = batch, xa
            if masked is not None and self.mask_teacher:
                t_xa = xa_dec
                if "t_enc" in batch:  # the teacher's own encoder output (its window may be longer): the same
                    t_enc = batch["t_enc"]  # positions masked, 20 ms each from the start in both
                    n = min(t_enc.shape[1], masked.shape[1])
                    t_masked = torch.zeros(t_enc.shape[:2], dtype=torch.bool, device=t_enc.device)
                    t_masked[:, :n] = masked[:, :n].to(t_enc.device)
                    t_batch = {**batch, "t_enc": t_enc.masked_fill(t_masked[..., None], 0.0)}
            t = self.teacher(t_batch, tokens_in, t_xa, want_match, at=mask)
            t_logits, t_index = t["t_logits"], t.get("t_index")  # (N, K) at the counted positions
            out["kd"] = losses.kd_logits(
                logits,
                t_logits[None],
                counted,
                cfg.kd_temperature,
                teacher_index=None if t_index is None else t_index[None],
                normalizer=norm_tok,
            )
            if want_match:
                match, info["chosen"], _ = match_loss(
                    s_feats,
                    t["t_feats"],
                    mask,
                    m.mode,
                    m.distance,
                    m.temperature,
                    self.adapter,
                    normalizer=norm_tok,
                    all_reduce=reduce,
                )
                if enc_feats is not None:
                    t_enc_feats = self.teacher.encoder_features(batch["mel"].to(dev))
                    frames = torch.arange(xa.shape[1], device=dev)[None] < batch["enc_lengths"].to(dev)[:, None]
                    enc_match, info["enc_chosen"], _ = match_loss(
                        enc_feats,
                        t_enc_feats,
                        frames,
                        m.mode,
                        m.distance,
                        m.temperature,
                        self.enc_adapter,
                        all_reduce=reduce,
                    )
                    match = 0.5 * (match + enc_match)
                out["match"] = match
        named = losses.combine(
            out.get("ce"),
            out.get("ctc"),
            out.get("kd"),
            out.get("match"),
            alpha=cfg.alpha if distil else 0.0,
            beta=cfg.beta,
            lambda_match=cfg.lambda_match,
        )
        info["n_tokens"] = int(n_tok)
        return named, info
