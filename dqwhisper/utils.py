"""Small helpers shared by every module: logging, seeding, atomic writes, checksums."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


CONF_DIR = Path(__file__).resolve().parent / "conf"  # the Hydra configs, shipped inside the package (conf/ in the repo)


class DQWhisperError(RuntimeError):
    """An error whose message is meant for the user as is (names the file or utterance and the problem)."""


def get_logger(name: str = "dqwhisper") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("dqwhisper")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("DQWHISPER_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DQWhisperError(f"device '{device}' was asked for, but torch sees no CUDA device")
    return torch.device(device)


def autocast(dtype: torch.dtype | None):
    """CUDA autocast to `dtype` (bf16/fp16 AMP), or nothing when None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type="cuda", dtype=dtype)


def command(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """The one wrapper of every command-line entry point: `main(argv)` runs; a DQWhisperError becomes one line on
    stderr (`error: <message>`) and exit code 1. `python -m ...`, the `dqwhisper` subcommands and the top-level
    scripts all go through it."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except DQWhisperError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run
