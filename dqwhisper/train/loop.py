"""The training loop: `train_one_epoch`, `validate`, checkpoints (last.pt at each validation and every
trainer.save_every_steps / save_every_minutes), resume (the jsonl logs cut back to the resumed step), `train(cfg)`.

One `Trainer` per process. Under `torchrun` each rank reads its share of the batches (the data package's
BatchSampler) and DDP wraps the DistillModel, so the ranks' gradients are averaged by torch. Losses are normalised
by the global token count over the world size, so N ranks step exactly as one process on the concatenated batch.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dqwhisper.data.sampler import BatchSampler, chunks_by_key
from dqwhisper.decoding import FallbackPool
from dqwhisper.models.student import save_checkpoint
from dqwhisper.train import dist as D
from dqwhisper.train.build import Parts, build, setup
from dqwhisper.train.cache_set import TrainingSet, collate_training
from dqwhisper.train.checkpoint import TopK, load_state, save_state, truncate_log
from dqwhisper.train.expdir import open_experiment
from dqwhisper.train.logs import loss_shares, train_record, write_dev_record, write_train_record
from dqwhisper.train.validate import dev_errors, dev_hypotheses, pooled_hypotheses
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, autocast, get_logger

log = get_logger(__name__)


class Trainer:
    def __init__(
        self, cfg: Any, parts: Parts, dist: D.DistInfo, device: torch.device, amp_dtype: torch.dtype | None = None
    ):
        self.cfg, self.parts, self.dist, self.device, self.amp_dtype = cfg, parts, dist, device, amp_dtype
        self.model = D.wrap(parts.model, dist, device)  # DDP(DistillModel) under torchrun
        self.expdir = Path(cfg.checkpoint_dir)
        self.writer = None
        self.step = self.epoch = self.batch_in_epoch = self.nonfinite = 0
        self.last_save = time.time()  # of last.pt
        self.topk = TopK(self.expdir, cfg.trainer.keep_top_k)
        self.loss_log, self.stale_validations = [], 0  # records; validations since dev improved (trainer.early_stop)
        self.validated_step, self.last_metric = -1, float("nan")
        self.chosen_counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    # ---------------------------------------------------------------------------------------------- one step
    def train_step(self, batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step over `accum_grad` micro-batches. Returns the logged values, None when skipped."""
        p = self.parts
        self.model.train()
        p.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = defaultdict(float)
        finite, info = True, {}
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            with nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                # the step's time masks and prefix noise from their own seed: a resumed run draws what the
                # uninterrupted one did (the global generator also serves the data loader)
                core = getattr(self.model, "module", self.model)
                core.noise_seed = (self.cfg.trainer.seed * 1_000_003 + self.step * 64 + n) * 131 + self.dist.rank
                core.step = self.step
                named, info = self.model(batch)
                loss = named["loss"] / len(batches)
                flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
                finite = D.all_reduce_sum(flag).item() == 0
                if finite or self.dist.enabled:  # DDP expects the backward of every synced forward
                    (p.scaler.scale(loss) if p.scaler else loss).backward()
            if not finite:
                break
            for k, v in named.items():
                totals[k] += float(v.detach()) / len(batches)
            if "n_on_policy" in info:  # tokens learnt on the student's own hypotheses (loss.on_policy)
                totals["n_on_policy"] += info["n_on_policy"]
        if finite:
            if p.scaler:
                p.scaler.unscale_(p.optimizer)
            clip = self.cfg.optim.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(p.params, clip if clip > 0 else float("inf"))
            finite = bool(torch.isfinite(norm))
            totals["grad_norm"] = float(norm)
        if not finite:
            return self._skip_step()
        if p.scaler:
            p.scaler.step(p.optimizer)
            p.scaler.update()
        else:
            p.optimizer.step()
        totals["lr"] = p.scheduler.get_last_lr()[0]
        p.scheduler.step()
        self.step += 1
        if "chosen" in info:
            totals["chosen"] = info["chosen"]
            for i, j in enumerate(info["chosen"]):
                self.chosen_counts[i][j] += 1
        return dict(totals)

    def _skip_step(self) -> None:
        p, tc = self.parts, self.cfg.trainer
        p.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", self.step + 1, self.nonfinite)
        if p.scaler:
            p.scaler.update()
        if self.nonfinite > tc.max_nonfinite:
            raise DQWhisperError(
                f"{self.nonfinite} non-finite steps (trainer.max_nonfinite={tc.max_nonfinite}): "
                "lower optim.lr or check the data"
            )
        with warnings.catch_warnings():  # the skipped step keeps the schedule in step with the data
            warnings.simplefilter("ignore", UserWarning)
            p.scheduler.step()
        self.step += 1
        return None

    # ----------------------------------------------------------------------------------------------- the loop
    def loader(self, ds: TrainingSet, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        pad = self.parts.tokenizer.eot
        return torch.utils.data.DataLoader(
            ds,
            batch_sampler=batches,
            collate_fn=lambda items: collate_training(items, pad),
            num_workers=self.cfg.data.collector.num_workers if ds.enc_cache is None else 0,
        )

    def train_one_epoch(self, sampler: BatchSampler, bar: tqdm, start_step: int) -> str | None:
        """The rest of the current epoch. Returns "done" (max_steps), "stopped" (stop_after_steps) or None."""
        tc, accum = self.cfg.trainer, self.cfg.optim.accum_grad
        sampler.set_epoch(self.epoch)
        batches = list(sampler)
        n_usable = len(batches) - len(batches) % accum if len(batches) >= accum else len(batches)
        loader = iter(self.loader(self.parts.train_set, batches[self.batch_in_epoch : n_usable]))
        while self.batch_in_epoch < n_usable:
            group = [next(loader) for _ in range(min(accum, n_usable - self.batch_in_epoch))]
            self.batch_in_epoch += len(group)
            values = self.train_step(group)
            bar.update(1)
            if values is not None:
                self._log_train(values)
                bar.set_postfix(loss=f"{values['loss']:.3f}")
            if tc.valid_every and self.step % tc.valid_every == 0 and self.step < tc.max_steps:
                self.validate_and_save()
                if tc.early_stop and self.stale_validations >= tc.early_stop:
                    log.info(
                        "step %d: dev has not improved for %d validations (trainer.early_stop): stopping",
                        self.step,
                        self.stale_validations,
                    )
                    return "done"
            elif self.step < tc.max_steps and self._periodic_save_due():
                if self.dist.main:
                    self.save_state(self.expdir / "last.pt")
                self.last_save = time.time()
            if tc.stop_after_steps and self.step - start_step >= tc.stop_after_steps:
                log.info("stopping after %d steps (trainer.stop_after_steps), without a checkpoint", self.step)
                return "stopped"
            if self.step >= tc.max_steps:
                return "done"
        return None

    def _periodic_save_due(self) -> bool:
        """last.pt between validations: every trainer.save_every_steps steps or save_every_minutes minutes (rank 0
        decides alone: only it writes)."""
        tc = self.cfg.trainer
        due_by_time = bool(tc.save_every_minutes) and time.time() - self.last_save >= 60 * tc.save_every_minutes
        return bool(tc.save_every_steps and self.step % tc.save_every_steps == 0) or due_by_time

    def run(self) -> dict:
        """Run to trainer.max_steps (or max_epochs), validating and checkpointing; returns the summary."""
        cfg, tc = self.cfg, self.cfg.trainer
        self.last_save = time.time()
        _resume_or_start(self)
        if cfg.quant.enabled and cfg.quant.ptq:
            log.info("post-training quantization: no training steps")
            metric = self.validate_and_save()
            self.finish()
            return {"steps": 0, "dev_metric": metric}
        if tc.save_start and cfg.quant.enabled and self.step == 0 and self.dist.main:
            save_checkpoint(self.parts.student, self.expdir / "start.pt", config=config_dict(cfg), step=0)
            log.info("the quantized student before training (its PTQ) in %s", self.expdir / "start.pt")
        if self.dist.main and tc.tensorboard:
            self.writer = SummaryWriter(str(self.expdir / "tensorboard"), purge_step=self.step or None)
        bar = tqdm(
            total=tc.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (tc.progress and self.dist.main),
        )
        sampler = _train_sampler(cfg, self.parts, self.dist)
        start_step, t0 = self.step, time.time()
        state = "done" if self.step >= tc.max_steps else None
        while state is None and not (tc.max_epochs and self.epoch >= tc.max_epochs):
            state = self.train_one_epoch(sampler, bar, start_step)
            if state is None:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        if state == "stopped":
            return {"steps": self.step, "stopped": True}
        elapsed = time.time() - t0
        metric = self.validate_and_save() if self.validated_step != self.step else self.last_metric
        self.finish()
        summary = _run_summary(self, elapsed, start_step, metric)
        if self.dist.main:
            (self.expdir / "train_summary.json").write_text(json.dumps(summary, indent=1))
            log.info("done: %s", json.dumps(summary))
        return summary

    def _log_train(self, values: dict) -> None:
        values.update(loss_shares(values, self.cfg.loss, self.parts.model.teacher is not None))
        record = train_record(self.step, values)
        self.loss_log.append(record)
        if self.dist.main:
            write_train_record(self.expdir, self.writer, record, values, self.cfg.trainer.log_every)

    # --------------------------------------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Dev loss (CE + beta CTC, no teacher), WER/CER and runaways of the test-time decoder. Rank 0 only."""
        model, ds, bs = self.parts.model, self.parts.dev_set, self.cfg.trainer.valid_batch_size
        model.eval()
        tot, n_tok = defaultdict(float), 0
        hyps: dict[str, str] = {}
        self._runaways: list[str] = []
        decode = self.cfg.decode
        pool = FallbackPool(self.parts.student, decode) if decode.pool_fallback else None
        with torch.no_grad():
            for batch in self.loader(ds, dev_batches(ds, bs, self.cfg.data.group_windows)):
                named, info = model(batch, with_teacher=False)
                for k, v in named.items():
                    tot[k] += float(v) * info["n_tokens"]
                n_tok += info["n_tokens"]
                if self.cfg.trainer.valid_decode:
                    dev, runaways = dev_hypotheses(self.parts.student, batch, decode, self.device, self.amp_dtype, pool)
                    hyps.update(dev)
                    self._runaways += runaways
            if pool is not None:
                with autocast(self.amp_dtype):
                    dev, runaways = pooled_hypotheses(pool.flush())
                hyps.update(dev)
                self._runaways += runaways
        result = {k: v / max(1, n_tok) for k, v in tot.items() if k in ("loss", "loss_ce", "loss_ctc")}
        if self.cfg.trainer.valid_decode:
            result.update(dev_errors(hyps, self.parts.dev_base.items))
            result["n_runaways"] = len(self._runaways)
            if self.dist.main:  # the latest dev hypotheses, Kaldi text format
                text = "".join(f"{u} {' '.join(h.split())}\n" for u, h in sorted(hyps.items()))
                atomic_write_bytes(self.expdir / "dev_hyp.txt", text.encode())
        return result

    def validate_and_save(self) -> float:
        metric_value = float("nan")
        if self.dist.main:
            t0 = time.time()
            result = self.validate()
            metric_value = result["error" if "error" in result else "loss"]
            log.info(
                "step %d dev (%.1f s): %s",
                self.step,
                time.time() - t0,
                " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
            )
            write_dev_record(self.expdir, self.writer, self.step, result)
            improved = metric_value < self.topk.best_metric
            self.topk.save(self.parts.student, self.step, metric_value, config_dict(self.cfg))
            self.save_state(self.expdir / "last.pt")
            self.stale_validations = 0 if improved else self.stale_validations + 1
        self.last_save = time.time()
        D.barrier(self.dist)
        if self.dist.enabled:  # every rank takes the same early-stopping decision
            flag = torch.tensor([float(self.stale_validations)], device=self.device)
            torch.distributed.broadcast(flag, 0)
            self.stale_validations = int(flag.item())
        self.validated_step, self.last_metric = self.step, metric_value
        return metric_value

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_state(self, path: Path) -> None:
        save_state(path, self.parts, config_dict(self.cfg), **_loop_state(self))

    def load_state(self, path: Path) -> None:
        ckpt = load_state(path, self.parts, self.device)
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.topk.best_metric, self.topk.kept, self.nonfinite = ckpt["best_metric"], ckpt["kept"], ckpt["nonfinite"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def finish(self) -> None:
        """Average the kept checkpoints into avg.pt (rank 0)."""
        if self.dist.main and self.cfg.trainer.average:
            self.topk.average()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        D.barrier(self.dist)


def _resume_or_start(tr: Trainer) -> None:
    """Resume from last.pt (trainer.resume), its jsonl logs cut back to the resumed step; else start them empty."""
    if tr.cfg.trainer.resume and (tr.expdir / "last.pt").exists():
        tr.load_state(tr.expdir / "last.pt")
        if tr.dist.main:  # records of steps after last.pt were made by the killed run: they are redone
            for name in ("train_losses.jsonl", "dev_results.jsonl"):
                truncate_log(tr.expdir / name, tr.step)
    elif tr.dist.main:  # a fresh run: the logs start empty
        for name in ("train_losses.jsonl", "dev_results.jsonl"):
            (tr.expdir / name).unlink(missing_ok=True)


def dev_batches(ds: TrainingSet, size: int, group_windows: bool = True) -> list[list[int]]:
    """Validation batches of at most `size` utterances: one encoder window each (data.batch_window) with
    `group_windows`, else one language each (decoding splits a batch by language), shortest window first, windows
    mixed (each row decoded on its own window)."""
    if group_windows:
        return chunks_by_key(list(range(len(ds))), ds.windows, size)
    windows, languages = ds.windows, ds.languages
    order = sorted(range(len(ds)), key=lambda i: (languages[i], windows[i], i))
    return chunks_by_key(order, languages, size)


def _train_sampler(cfg: Any, parts: Parts, dist: D.DistInfo) -> BatchSampler:
    c = cfg.data.collector
    return BatchSampler(
        parts.train_set.lengths,
        c.minibatch_size,
        c.max_frames or None,
        shuffle=c.shuffle,
        seed=cfg.trainer.seed,
        drop_last=False,
        rank=dist.rank,
        world_size=dist.world_size,
        groups=parts.train_set.windows if parts.train_set.margin is not None and cfg.data.group_windows else None,
    )


def _run_summary(tr: Trainer, elapsed: float, start_step: int, metric: float) -> dict:
    """train_summary.json: steps, time, mean loss-term shares, dev metric, matching choices."""
    shares = defaultdict(list)
    for record in tr.loss_log:
        for k, v in record.items():
            if k.startswith("share_"):
                shares[k].append(v)
    return {
        "steps": tr.step,
        "epochs": tr.epoch,
        "train_seconds": round(elapsed, 2),
        "mean_loss_shares": {k: round(sum(v) / len(v), 4) for k, v in shares.items()},
        "seconds_per_step": round(elapsed / max(1, tr.step - start_step), 4),
        "dev_metric": metric,
        "best_metric": tr.topk.best_metric,
        "nonfinite_steps": tr.nonfinite,
        "chosen_layers": {i: dict(c) for i, c in tr.chosen_counts.items()},
    }


def _loop_state(tr: Trainer) -> dict:
    """The loop's own state that last.pt keeps besides the model, optimizer, scheduler and RNG."""
    return dict(
        step=tr.step,
        epoch=tr.epoch,
        batch_in_epoch=tr.batch_in_epoch,
        best_metric=tr.topk.best_metric,
        kept=tr.topk.kept,
        nonfinite=tr.nonfinite,
    )


def config_dict(cfg: Any) -> dict | None:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else None


def make_trainer(cfg: Any) -> Trainer:
    device, dist, amp_dtype = setup(cfg)
    return Trainer(cfg, build(cfg, device, dist, amp_dtype), dist, device, amp_dtype)


def train(cfg: Any) -> dict:
    """The Hydra entry point's body: take the experiment dir (rank 0: lock, resume / overwrite rules, config.yaml),
    set up, build the parts, run the loop."""
    lock = open_experiment(cfg) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        trainer = make_trainer(cfg)
        try:
            return trainer.run()
        finally:
            D.cleanup(trainer.dist)
    finally:
        if lock is not None:
            lock.release()
