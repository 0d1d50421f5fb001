"""On-disk cache of what frozen modules compute: encoder outputs and the frozen teacher's decoder outputs.

A frozen encoder gives the same output for the same audio every epoch, so it runs once per utterance and training
reads the result. Entries are keyed by content, never by name: the audio (file bytes, or the pipe command, plus
the segment) and a hash of the model that computed them (its weights and every setting that changes the result:
window, mel bins, kept vocabulary, features). Experiments that share a frozen encoder share its cache (a student cut
from the teacher with all encoder layers hits the teacher's entries).

Layout: `<root>/<model_key>/<entry_key[:2]>/<entry_key>.pt`, each written atomically; `<root>/<model_key>/info.json`
says what made it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from dqwhisper.data.kaldi import DataDir, Utterance, is_pipe
from dqwhisper.utils import atomic_torch_save, atomic_write_bytes

HASH_LEN = 20
STALE_TEMP_SECONDS = 3600  # a temp file this old is no write in progress: a killed run's


def _digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:HASH_LEN]


def module_key(module: nn.Module, **settings: Any) -> str:
    """Hash of a module's parameters and buffers (names, shapes, dtypes, values) and `settings` (JSON-able)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return _digest(h)


def audio_key(data: DataDir, utt: Utterance) -> str:
    """Content key of an utterance's audio: the file's bytes (or the pipe command) and the segment."""
    h = hashlib.sha256()
    if is_pipe(utt.wav):
        h.update(b"pipe:" + utt.wav.strip().encode())
    else:
        with open(data.resolve(utt.wav), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    h.update(repr(utt.segment).encode())
    return _digest(h)


def tokens_key(audio: str, tokens: Iterable[int]) -> str:
    return _digest(hashlib.sha256(f"{audio}:{','.join(map(str, tokens))}".encode()))


class FeatureCache:
    """Entries of one model under `root/model_key`."""

    def __init__(self, root: str | Path, model_key: str, info: dict | None = None):
        self.dir = Path(root) / model_key
        self.dir.mkdir(parents=True, exist_ok=True)
        if info is not None and not (self.dir / "info.json").exists():
            atomic_write_bytes(self.dir / "info.json", json.dumps(info, indent=1, default=str).encode())
        self.hits = 0
        self.misses = 0
        self.remove_stale_temp_files()

    def remove_stale_temp_files(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Temp files of entry writes that a killed run left (`<xx>/.<key>.pt.*.tmp`). Other experiments may write
        into the same cache right now, so only files untouched for `older_than` seconds go."""
        now, n = time.time(), 0
        for p in self.dir.glob("*/.*.tmp"):
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return torch.load(self.path(key), map_location="cpu", weights_only=True)

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        atomic_torch_save(
            {k: v.detach().cpu().contiguous() if torch.is_tensor(v) else v for k, v in entry.items()}, self.path(key)
        )
