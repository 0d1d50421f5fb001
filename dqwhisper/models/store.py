"""The offline model store: `<store>/<name>.pt` (openai format) + `<name>.pt.sha256`, and CTranslate2 dirs
`<name>-ct2/` (scripts/prepare_models.sh builds it). The store is `exp/models` under the current directory (the
repository root for the recipes), or env DQWHISPER_MODEL_STORE.
"""

from __future__ import annotations

import os
from pathlib import Path

from dqwhisper.utils import DQWhisperError, sha256_file


def model_store() -> Path:
    return Path(os.environ.get("DQWHISPER_MODEL_STORE") or Path("exp") / "models")


def verify_checksum(path: Path) -> None:
    """Compare `path` with `<path>.sha256` (first word); a store entry without one is refused."""
    sums = path.with_name(path.name + ".sha256")
    if not sums.is_file():
        raise DQWhisperError(f"model store entry {path} has no checksum file {sums}: rerun scripts/prepare_models.sh")
    want = sums.read_text().split()[0] if sums.read_text().split() else ""
    got = sha256_file(path)
    if got != want:
        raise DQWhisperError(
            f"model store entry {path} does not match its checksum in {sums} "
            f"(sha256 {got}, expected {want}): the file is damaged; rerun scripts/prepare_models.sh"
        )
