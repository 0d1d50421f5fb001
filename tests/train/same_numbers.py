"""Same numbers before and after a refactor: a few steps of CE, KD + dynamic matching and QAT (w4) on the tiny
random Whisper and the tiny written data dir of the training tests, every training loss (float.hex) and a sha256 of
every tensor of the saved checkpoints (last.pt with its optimizer state, best.pt, avg.pt).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m tests.train.same_numbers OUT.json
    diff before.json after.json   # bitwise the same when empty

The losses are caught where every training path computes them (`dqwhisper.losses.combine`, with gradient enabled),
so the script does not depend on how the trainer is organised.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from dqwhisper import losses
from dqwhisper.models.student import read_checkpoint
from tests.train.fixtures import tiny_config, write_data_dir, write_tiny_model

RECIPES = {
    "ce": ("demo_student_ce", []),
    "kd_dm": ("demo_student_kd_dm", []),
    "kd_dm_qat_w4": ("demo_student_kd_dm", ["quant=w4"]),
    "kd_dm_accum2": ("demo_student_kd_dm", ["optim.accum_grad=2", "data.collector.minibatch_size=2"]),
    "kd_dm_live_teacher": ("demo_student_kd_dm", ["trainer.cache_teacher=false"]),
    "kd_dm_train_encoder": (
        "demo_student_kd_dm",
        [
            "student.freeze_encoder=false",
            "data.batch_window=null",
            "loss.match.encoder=true",
            "data.spec_augment.enabled=true",
        ],
    ),
}


def train_fn():
    try:
        from dqwhisper.train import train
    except ImportError:
        from dqwhisper.trainer import train
    return train


def tensor_digest(t: torch.Tensor) -> str:
    shape = t.shape
    t = t.detach().cpu().contiguous().reshape(-1)
    return f"{t.dtype}{tuple(shape)}:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def digests(obj, prefix: str = "") -> dict[str, str]:
    """Every tensor of a nested dict/list, by path."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = tensor_digest(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            out.update(digests(obj[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(digests(v, f"{prefix}[{i}]"))
    return out


def run(name: str, root: Path, teacher: Path, data: Path) -> dict:
    config, overrides = RECIPES[name]
    exp = root / name
    cfg = tiny_config(
        exp,
        data,
        teacher,
        name=config,
        overrides=[
            "trainer.max_steps=4",
            "trainer.valid_every=2",
            f"trainer.cache_dir={root / name}_cache",
            *overrides,
        ],
    )
    caught: list[dict[str, str]] = []
    real = losses.combine

    def combine(*a, **k):
        named = real(*a, **k)
        if torch.is_grad_enabled():
            caught.append({k: float(v).hex() for k, v in named.items()})
        return named

    losses.combine = combine
    try:
        summary = train_fn()(cfg)
    finally:
        losses.combine = real
    out = {
        "losses": caught,
        "dev_results": (exp / "dev_results.jsonl").read_text().splitlines(),
        "dev_metric": float(summary["dev_metric"]).hex(),
    }
    for ckpt in ("last.pt", "best.pt", "avg.pt"):
        state = read_checkpoint(exp / ckpt)
        out[ckpt] = digests({k: state.get(k) for k in ("model_state_dict", "optimizer", "adapter", "step")})
    return out


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, data = write_tiny_model(root / "teacher.pt"), write_data_dir(root / "data")
        result = {name: run(name, root, teacher, data) for name in RECIPES}
    Path(out_path).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    counts = ", ".join(f"{k}: {len(v['losses'])} losses" for k, v in result.items())
    print(f"{out_path}: {counts}")


if __name__ == "__main__":
    main(sys.argv[1])
