"""The distillation model: the student, the frozen teacher's targets and the matching adapters as one module whose
`forward(batch)` returns the named losses (WeNet's ASRModel.forward), so DDP wraps it and syncs its gradients.

    loss = beta * CTC + (1 - alpha) * CE + alpha * (KD + lambda_match * match)     (dqwhisper.losses.combine)
    KD = (1 - w) * KD on the labels + w * KD on the student's own hypotheses   (w: loss.on_policy.weight, from
                                                                         optimizer step loss.on_policy.start_step on)

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
    """forward(batch) -> ({"loss", "loss_ce", "loss_ctc", "loss_kd", "loss_match"[, "loss_kd_labels",
    "loss_kd_on_policy"]}, info).

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
        eot: int | None = None,
    ):
        """feature_mask: (masks per utterance, max width in encoder positions) of the time masks on the frozen
        encoder's output that the student's decoder reads in training (data.feature_mask); (0, _) = none.
        mask_teacher: the teacher's targets come from the same masked output (consistent teaching: the teacher
        says what it would predict from what the student sees); False: from the unmasked one.
        prefix_noise: in training, the share of the decoder's input text tokens replaced by text tokens drawn from
        the batch (data.prefix_noise): the student (and a live teacher) read a history with errors in it, as in
        decoding, and learn the next label from it; 0 = none.
        eot: the end-of-text id (every id above it is special); on-policy distillation (loss.on_policy.weight > 0)
        needs it: its hypotheses are text tokens ended by it."""
        super().__init__()
        self.eot = eot
        self.prefix_noise = prefix_noise
        # set by the training loop before each micro-batch: the masks and prefix noise are drawn from this seed
        # (the global generator left as it was); None: from the global generator
        self.noise_seed: int | None = None
        self.step = 0  # set by the training loop: the optimizer step being taken (loss.on_policy.start_step)
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

    def _student(
        self,
        batch: dict,
        tokens_in: Tensor,
        mask: Tensor,
        want_match: bool,
        match_encoder: bool,
        cross: dict | None = None,
    ):
        """-> (encoder output xa, the time-masked positions (B, T) | None, what the decoder read (xa with those
        positions zeroed), subset logits (1, N, V) at the N counted positions (mask), decoder features (B, L, D) |
        None, encoder features | None). cross: a dict that keeps the decoder's cross-attention keys and values of
        what it read, for the passes over the student's hypotheses (loss.on_policy)."""
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
                    logits, ffn, blocks = decoder.forward_features(tokens_in, xa_dec, cross)
                    s_feats = ffn if m.feature == "ffn" else blocks
                else:
                    logits = decoder(tokens_in, xa_dec, kv_cache=cross)
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

    @torch.no_grad()
    def _hypotheses(
        self, tokens_in: Tensor, mask: Tensor, xa: Tensor, lengths: Tensor | None, cross: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        """The student's own hypotheses of the batch's utterances (loss.on_policy): each row's prompt (its tokens up to
        its first counted position), then text tokens decoded greedily (or sampled at loss.on_policy.temperature) by
        the student in eval mode, from what its decoder reads in training (xa), to end-of-text or to its own
        label + loss.on_policy.extra_tokens tokens. -> (tokens (B, L') padded with end-of-text, the positions whose
        next token is learnt (B, L'): the last prompt token and every decoded text token). cross: the decoder's
        cross-attention keys and values of xa, when a pass has projected them (`_student`)."""
        if self.eot is None:
            raise ValueError("on-policy distillation (loss.on_policy.weight > 0) needs DistillModel(eot=...)")
        eot, decoder = self.eot, self.student.decoder
        first = mask.float().argmax(1)  # each row's first counted position: its last prompt token
        room = decoder.positional_embedding.shape[0] - int(first.max()) - 1
        caps = (mask.sum(1) + self.loss_cfg.on_policy.extra_tokens).clamp(max=room)  # each row's label + extra
        was_training = decoder.training
        decoder.eval()
        hyps: dict[int, Tensor] = {}
        try:
            for p in first.unique().tolist():  # rows with prompts of one length decode together
                idx = (first == p).nonzero().squeeze(1)
                kv = {k: v[idx].detach() for k, v in (cross or {}).items()}
                rows = self._decode(
                    tokens_in[idx, : p + 1], xa[idx], None if lengths is None else lengths[idx], caps[idx], kv
                )
                hyps.update(zip(idx.tolist(), rows))
        finally:
            decoder.train(was_training)
        width = max(len(t) for t in hyps.values())
        out = tokens_in.new_full((len(first), width), eot)
        learn = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
        for b, t in hyps.items():
            p = int(first[b])
            out[b, : len(t)] = t
            learn[b, p] = True
            text = t[p + 1 :]
            learn[b, p + 1 : p + 1 + len(text)] = (text != eot).long().cumprod(0).bool()
        return out, learn

    def _decode(self, prompts: Tensor, xa: Tensor, lengths: Tensor | None, caps: Tensor, cross: dict) -> Tensor:
        """prompts (n, P) of one length -> (n, P + up to max(caps)) with kv-cached steps: row i ends at end-of-text
        or after caps[i] tokens; rows that ended repeat end-of-text. cross: the cross-attention's keys and values of
        xa, or {}."""
        decoder, eot, temperature = self.student.decoder, self.eot, self.loss_cfg.on_policy.temperature
        ids = decoder.vocab_keep if decoder.pruned else torch.arange(decoder.token_embedding.weight.shape[0])
        ids = ids.to(prompts.device)
        banned = ids > eot  # special tokens: a hypothesis is text ended by end-of-text
        toks = fed = prompts
        done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
        cache, hooks = self.student.install_kv_cache_hooks()  # each step reads only its new token
        cache.update(cross)
        try:
            with swapped(decoder, "subset_logits", True), decoder.key_lengths(lengths, xa.shape[1]):
                for step in range(int(caps.max())):
                    last = torch.zeros(fed.shape, dtype=torch.bool, device=fed.device)
                    last[:, -1] = True
                    with decoder.logits_at(last):
                        logits = decoder(fed, xa, kv_cache=cache).float().masked_fill(banned, float("-inf"))
                    if temperature > 0:
                        pick = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(1)
                    else:
                        pick = logits.argmax(-1)
                    fed = torch.where(done, torch.full_like(pick, eot), ids[pick])[:, None]
                    toks = torch.cat([toks, fed], 1)
                    done |= (fed[:, 0] == eot) | (step + 1 >= caps)
                    if bool(done.all()):
                        break
        finally:
            for hook in hooks:
                hook.remove()
        return toks

    def _on_policy_kd(
        self,
        t_batch: dict,
        t_xa: Tensor,
        xa_dec: Tensor,
        lengths: Tensor | None,
        tokens_in: Tensor,
        mask: Tensor,
        s_cross: dict,
        t_cross: dict,
    ) -> tuple[Tensor, Tensor]:
        """KD on the student's own hypotheses (loss.on_policy): at each of their positions, KL(teacher || student)
        of the next token, both reading the same history and the same encoder output (their cross-attention keys
        and values from the label passes: s_cross, t_cross). -> (the KD term, the number of positions)."""
        tokens, learn = self._hypotheses(tokens_in, mask, xa_dec, lengths, s_cross)
        decoder = self.student.decoder
        with (
            autocast(self.amp_dtype),
            swapped(decoder, "subset_logits", True),
            decoder.key_lengths(lengths, xa_dec.shape[1]),
            decoder.logits_at(learn),
        ):
            logits = decoder(tokens, xa_dec, kv_cache=s_cross)
        t = self.teacher(t_batch, tokens, t_xa, False, at=learn, cross=t_cross)
        n = learn.sum().float()
        norm = None
        if self.all_reduce is not None:
            norm = self.all_reduce(n.reshape(1))[0] / self.world_size
        kd = losses.kd_logits(
            logits[None],
            t["t_logits"][None],
            torch.ones_like(logits[None, :, 0], dtype=torch.bool),
            self.loss_cfg.kd_temperature,
            teacher_index=None if t.get("t_index") is None else t["t_index"][None],
            normalizer=norm,
        )
        return kd, n

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
        on_policy = distil and self.training and cfg.on_policy.weight > 0 and self.step >= cfg.on_policy.start_step
        # on-policy passes read the same encoder output: its cross-attention keys and values projected once
        s_cross, t_cross = ({}, {}) if on_policy else (None, None)
        xa, masked, xa_dec, logits, s_feats, enc_feats = self._student(
            batch, tokens_in, mask, want_match, want_match and m.encoder and not self.freeze_encoder, s_cross
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
        extra: dict[str, Tensor] = {}
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
            t = self.teacher(t_batch, tokens_in, t_xa, want_match, at=mask, cross=t_cross)
            t_logits, t_index = t["t_logits"], t.get("t_index")  # (N, K) at the counted positions
            out["kd"] = losses.kd_logits(
                logits,
                t_logits[None],
                counted,
                cfg.kd_temperature,
                teacher_index=None if t_index is None else t_index[None],
                normalizer=norm_tok,
            )
            if on_policy:
                share, lengths = cfg.on_policy.weight, batch.get("enc_window")
                kd_op, n_op = self._on_policy_kd(
                    t_batch,
                    t_xa,
                    xa_dec,
                    None if lengths is None else lengths.to(dev),
                    tokens_in,
                    mask,
                    s_cross,
                    t_cross,
                )
                info["n_on_policy"] = int(n_op)
                extra = {"kd_labels": out["kd"], "kd_on_policy": kd_op}
                out["kd"] = (1 - share) * out["kd"] + share * kd_op
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
        for k, v in extra.items():  # logged, not weighted again: inside loss_kd
            named[f"loss_{k}"] = v
        info["n_tokens"] = int(n_tok)
        return named, info
