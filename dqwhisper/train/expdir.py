"""The experiment dir as one training run owns it: a lock, the rules for a dir that already holds a run, temp files.

- Lock: `<dir>/.lock`, an exclusive `flock` held for the whole run and released by the kernel when the process dies
  (kill -9 included), so a stale lock cannot exist. Its text names the holder ("pid N on host H since T"). A second
  run into a locked dir fails at once with that text. `scripts/train_ce_ctc.sh` takes the same lock in the shell
  (so it fails in milliseconds) and exports `DQWHISPER_EXPDIR_LOCKED=<dir>`, which tells the Python run below it
  that its launcher holds the lock.
- A dir that holds a run that trained (a checkpoint or a loss log: TRAINING_OUTPUTS) is refused unless
  `trainer.resume=true` (which needs last.pt) or `trainer.overwrite=true` (which removes the old run's outputs,
  exports and decodings first). What a run that failed at set-up left (config.yaml, bpe.model) is simply replaced.
- Temp files of atomic writes (`.<name>.*.tmp`) that a killed run left behind are removed once the lock is held.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dqwhisper.config import validate as validate_config
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, get_logger

log = get_logger(__name__)

LOCK_NAME = ".lock"
LOCKED_ENV = "DQWHISPER_EXPDIR_LOCKED"
# what a run that trained leaves: a dir holding any of these holds an experiment
TRAINING_OUTPUTS = ("last.pt", "best.pt", "avg.pt", "step_*.pt", "train_losses.jsonl", "dev_results.jsonl")
# what a run writes before its first step (a run that failed at set-up leaves only these: they are replaced)
SETUP_OUTPUTS = ("config.yaml", "bpe.model", "dev_hyp.txt", "train_summary.json", "tensorboard")
# what belongs to the old model too and goes with trainer.overwrite=true
DERIVED_OUTPUTS = ("export", "decode_*")


class ExpLock:
    """An exclusive lock on `<expdir>/.lock` for this process's lifetime (or until `release`)."""

    def __init__(self, expdir: Path):
        self.path = expdir / LOCK_NAME
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(errors="replace").strip() or "holder unknown"
            os.close(self.fd)
            self.fd = None
            raise DQWhisperError(
                f"{expdir} is in use by another training ({holder}): wait for it to end, or train "
                "into another checkpoint_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%F %T')}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def remove_temp_files(folder: Path) -> list[str]:
    """Temp files of atomic writes (`.<name>.*.tmp`, `.<name>.tmp`) left by a killed run; only call under the lock."""
    gone = []
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    if gone:
        log.info("%s: removed %d temp file(s) a killed run left: %s", folder, len(gone), ", ".join(sorted(gone)))
    return gone


def existing_outputs(expdir: Path, patterns=TRAINING_OUTPUTS) -> list[Path]:
    return sorted({p for pattern in patterns for p in expdir.glob(pattern)})


def open_experiment(cfg: Any) -> ExpLock | None:
    """Rank 0, before anything is built: lock `checkpoint_dir`, clean temp files, apply the resume / overwrite rules,
    write the resolved config.yaml. Returns the lock (None when the launcher holds it)."""
    validate_config(cfg)  # a bad value fails before the dir is touched
    expdir = Path(cfg.checkpoint_dir)
    expdir.mkdir(parents=True, exist_ok=True)
    lock = None
    if os.environ.get(LOCKED_ENV) != str(expdir.resolve()):
        lock = ExpLock(expdir)
    try:
        remove_temp_files(expdir)
        tc = cfg.trainer
        found = existing_outputs(expdir)
        if tc.resume:
            if not (expdir / "last.pt").is_file():
                had = f" (it holds {', '.join(p.name for p in found)})" if found else ""
                raise DQWhisperError(
                    f"trainer.resume=true but {expdir / 'last.pt'} does not exist: nothing to resume"
                    f"{had}; drop trainer.resume to start a new run (trainer.overwrite=true replaces "
                    "what is there)"
                )
        elif found or tc.overwrite:
            if not tc.overwrite:
                raise DQWhisperError(
                    f"{expdir} already holds an experiment ({', '.join(p.name for p in found[:5])}"
                    f"{', ...' if len(found) > 5 else ''}): continue it with trainer.resume=true, "
                    "replace it with trainer.overwrite=true, or train into another checkpoint_dir"
                )
            old = existing_outputs(expdir, TRAINING_OUTPUTS + SETUP_OUTPUTS + DERIVED_OUTPUTS)
            for p in old:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if old:
                log.warning(
                    "trainer.overwrite=true: removed the previous run's %s from %s",
                    ", ".join(p.name for p in old),
                    expdir,
                )
        if OmegaConf.is_config(cfg):
            atomic_write_bytes(expdir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
