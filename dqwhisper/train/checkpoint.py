"""Checkpoints of a training run: the training state (last.pt: model, optimiser, scheduler, RNG, counters), the
top-k step checkpoints by dev metric with best.pt, and their average (avg.pt). Files are DQ-Whisper checkpoints
(dqwhisper.models.student.save_checkpoint) with the training state as extra keys.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dqwhisper.models.student import DQWhisper, read_checkpoint, save_checkpoint
from dqwhisper.train.build import Parts
from dqwhisper.utils import DQWhisperError, atomic_torch_save, atomic_write_bytes, get_logger

log = get_logger(__name__)

TRAIN_STATE_KEYS = (
    "optimizer",
    "scheduler",
    "step",
    "epoch",
    "batch_in_epoch",
    "rng",
    "best_metric",
    "kept",
    "nonfinite",
    "adapter",
    "enc_adapter",
    "scaler",
)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_gauss"][0],
            state["numpy_gauss"][1],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, parts: Parts, config: dict | None, **counters) -> None:
    """last.pt: the student with everything a resumed run needs (`counters`: step, epoch, ... of the loop)."""
    m = parts.model
    save_checkpoint(
        parts.student,
        path,
        config=config,
        optimizer=parts.optimizer.state_dict(),
        scheduler=parts.scheduler.state_dict(),
        step=counters.pop("step"),
        epoch=counters.pop("epoch"),
        batch_in_epoch=counters.pop("batch_in_epoch"),
        rng=rng_state(),
        **counters,
        adapter=None if m.adapter is None else m.adapter.state_dict(),
        enc_adapter=None if m.enc_adapter is None else m.enc_adapter.state_dict(),
        scaler=None if parts.scaler is None else parts.scaler.state_dict(),
    )


def load_state(path: Path, parts: Parts, device: torch.device) -> dict:
    """Restore what save_state wrote into `parts` and the RNGs; returns the checkpoint (the loop's counters)."""
    m = parts.model
    ckpt = read_checkpoint(path, device)
    missing, unexpected = parts.student.load_state_dict(ckpt["model_state_dict"], strict=False)
    if missing or unexpected:
        raise DQWhisperError(
            f"{path} does not match this experiment's student: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (was the config changed?)"
        )
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    for name, module in (("adapter", m.adapter), ("enc_adapter", m.enc_adapter), ("scaler", parts.scaler)):
        if module is not None and ckpt.get(name) is not None:
            module.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    return ckpt


class TopK:
    """step_<N>.pt kept for the k best dev metrics (lower is better; ties: the later step), best.pt a copy of the
    best. `kept`: [metric, step, path] best first (saved in last.pt, so a resumed run keeps the same files)."""

    def __init__(self, expdir: Path, k: int):
        self.expdir, self.k = expdir, k
        self.kept: list[list] = []
        self.best_metric = float("inf")

    def save(self, student: DQWhisper, step: int, metric: float, config: dict | None) -> None:
        path = self.expdir / f"step_{step}.pt"
        candidates = sorted(self.kept + [[metric, step, str(path)]], key=lambda x: (x[0], -x[1]))
        keep = [c for c in candidates if not math.isnan(c[0])][: self.k] if self.k > 0 else []
        if any(c[1] == step for c in keep):
            save_checkpoint(student, path, config=config, step=step, dev_metric=metric)
        for c in self.kept:
            if c not in keep:
                Path(c[2]).unlink(missing_ok=True)
        self.kept = keep
        if keep and (keep[0][0] < self.best_metric or not (self.expdir / "best.pt").exists()):
            self.best_metric = keep[0][0]
            tmp = self.expdir / ".best.pt.tmp"
            shutil.copyfile(keep[0][2], tmp)
            os.replace(tmp, self.expdir / "best.pt")
        elif not keep:
            save_checkpoint(student, self.expdir / "best.pt", config=config, step=step)

    def average(self) -> None:
        if self.kept:
            average_checkpoints([Path(c[2]) for c in self.kept], self.expdir / "avg.pt")


def average_checkpoints(paths: list[Path], out: Path) -> None:
    """Element-wise mean of the float tensors of `paths`' model states (others from the first); atomic write."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return
    first = read_checkpoint(paths[0])
    state = {k: v.clone().double() if v.is_floating_point() else v for k, v in first["model_state_dict"].items()}
    for p in paths[1:]:
        sd = read_checkpoint(p)["model_state_dict"]
        for k, v in state.items():
            if v.is_floating_point():
                v += sd[k].double()
    ref = first["model_state_dict"]
    avg = {k: (v / len(paths)).to(ref[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    ckpt = {k: v for k, v in first.items() if k not in TRAIN_STATE_KEYS}
    ckpt["model_state_dict"] = avg
    ckpt["averaged"] = [str(p.name) for p in paths]
    atomic_torch_save(ckpt, out)
    log.info("averaged %d checkpoints into %s", len(paths), out)


def truncate_log(path: Path, step: int) -> None:
    """Keep the jsonl records of steps <= `step` (and drop a line a kill cut short); atomic."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(path, "".join(keep).encode("utf-8"))
