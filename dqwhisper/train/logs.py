"""What training writes as it goes: train_losses.jsonl and dev_results.jsonl records, TensorBoard scalars, the log
line every trainer.log_every steps, and each loss term's share of the total."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dqwhisper.utils import get_logger

log = get_logger("dqwhisper.train.loop")


def loss_shares(values: dict, loss_cfg: Any, distilling: bool) -> dict[str, float]:
    """Each weighted term's share of the total loss: beta CTC, (1-alpha) CE, alpha KD, alpha lambda match."""
    alpha = loss_cfg.alpha if distilling else 0.0
    weights = {"ce": 1 - alpha, "ctc": loss_cfg.beta, "kd": alpha, "match": alpha * loss_cfg.lambda_match}
    parts = {k: w * values.get(f"loss_{k}", 0.0) for k, w in weights.items()}
    total = sum(parts.values())
    return {f"share_{k}": v / total for k, v in parts.items() if v} if total > 0 else {}


def train_record(step: int, values: dict) -> dict:
    """The train_losses.jsonl record of a step (values rounded to 6 decimals; `chosen` taken out of `values`)."""
    chosen = values.pop("chosen", None)
    record = {"step": step, **{k: round(v, 6) for k, v in values.items()}}
    if chosen is not None:
        record["chosen"] = chosen
    return record


def write_train_record(expdir: Path, writer, record: dict, values: dict, log_every: int) -> None:
    step, chosen = record["step"], record.get("chosen")
    with open(expdir / "train_losses.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in values.items():
            writer.add_scalar(f"train/{k}", v, step)
        for i, j in enumerate(chosen or []):
            writer.add_scalar(f"match/teacher_layer_of_student_layer_{i}", j, step)
    if step % log_every == 0:
        log.info(
            "step %d: %s",
            step,
            " ".join(f"{k}={v:.4g}" for k, v in values.items()) + (f" chosen={chosen}" if chosen is not None else ""),
        )


def write_dev_record(expdir: Path, writer, step: int, result: dict) -> None:
    if writer is not None:
        for k, v in result.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(f"dev/{k}", v, step)
        writer.flush()
    with open(expdir / "dev_results.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
