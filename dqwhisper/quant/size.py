"""Size report: per-tensor bits and bytes of a model file, and its ratio against the teacher's fp16 size.

    python -m dqwhisper.quant.size FILE [--teacher exp/models/base.pt] [--per-tensor] [--json OUT]

FILE: an export (.dqw), a checkpoint (.pt) or a CTranslate2 dir / model.bin. "bytes on disk" is the file's size
(for a CT2 dir, model.bin's). The teacher's fp16 size is computed, not read: 2 bytes x the number of float elements
in its state dict (every parameter plus the encoder's 1500 x d sinusoid table: the tensors an fp16 file of the
teacher holds). Whisper base: 72,593,920 elements -> 145,187,840 bytes, which matches the shipped CT2 float16
model.bin (145,217,532 bytes with its names and header). A .pt's training state counts on disk, not in the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dqwhisper.models.ct2 import read_model_bin
from dqwhisper.models.student import read_checkpoint
from dqwhisper.quant.dqw import quantized_parts, read_header
from dqwhisper.utils import DQWhisperError, command


def teacher_fp16_bytes(path: str | Path) -> dict:

    sd = read_checkpoint(path)["model_state_dict"]
    floats = {k: v for k, v in sd.items() if torch.is_floating_point(v)}
    n = sum(v.numel() for v in floats.values())
    n_pos = sum(v.numel() for k, v in floats.items() if k == "encoder.positional_embedding")
    return {"path": str(path), "float_elements": n, "fp16_bytes": 2 * n, "of_which_encoder_sinusoids": n_pos}


def _group(name: str) -> str:
    if "token_embedding" in name or name.startswith("decoder/embeddings") or name == "vocab_keep":
        return "token_embedding"
    for side in ("encoder", "decoder", "ctc_head"):
        if name.startswith(side):
            return side
    return "other"


def dqw_tensors(path: Path) -> list[dict]:

    header, _ = read_header(path)
    rows = []
    for name, e in header["tensors"].items():
        numel = math.prod(e["shape"])
        if e["kind"] == "quantized":
            nbytes = sum(p["nbytes"] for p in quantized_parts(e))
            wide = f"+{e['row_bits']['hi']}" if e.get("row_bits") else ""  # mixed row widths
            detail = (
                f"int{e['bits']}{wide} {e['granularity']}"
                + (f"/{e['group_size']}" if e["group_size"] else "")
                + ("" if e["symmetric"] else " asym")
            )
        else:
            nbytes, detail = e["nbytes"], e["dtype"]
        rows.append(
            {
                "name": name,
                "shape": e["shape"],
                "numel": numel,
                "bytes": nbytes,
                "bits": 8 * nbytes / max(numel, 1),
                "format": detail,
            }
        )
    return rows


def pt_tensors(path: Path) -> list[dict]:

    return _plain_rows(read_checkpoint(path)["model_state_dict"])


def ct2_tensors(path: Path) -> list[dict]:

    return _plain_rows(read_model_bin(path).variables)


def size_report(file: str | Path, teacher: str | Path | None = None) -> dict:
    path = Path(file)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise DQWhisperError(f"{file}: no such model file")
    if path.suffix == ".dqw":
        rows = dqw_tensors(path)
    elif path.name == "model.bin":
        rows = ct2_tensors(path)
    else:
        rows = pt_tensors(path)
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(_group(r["name"]), {"numel": 0, "bytes": 0})
        g["numel"] += r["numel"]
        g["bytes"] += r["bytes"]
    for g in groups.values():
        g["bits"] = 8 * g["bytes"] / max(g["numel"], 1)
    report = {
        "file": str(path),
        "bytes_on_disk": path.stat().st_size,
        "tensor_bytes": sum(r["bytes"] for r in rows),
        "groups": groups,
        "tensors": rows,
    }
    if teacher:
        t = teacher_fp16_bytes(teacher)
        report["teacher"] = t
        report["ratio_vs_teacher_fp16"] = t["fp16_bytes"] / report["bytes_on_disk"]
    return report


def format_report(report: dict, per_tensor: bool = False) -> str:
    lines = []
    if per_tensor:
        lines.append(f"{'tensor':58s} {'shape':>16s} {'format':>22s} {'bits/w':>7s} {'bytes':>12s}")
        for r in report["tensors"]:
            lines.append(
                f"{r['name'][:58]:58s} {'x'.join(map(str, r['shape'])) or '-':>16s} {r['format']:>22s} "
                f"{r['bits']:7.2f} {r['bytes']:12,d}"
            )
        lines.append("")
    lines.append(f"{'group':16s} {'elements':>12s} {'bits/w':>7s} {'bytes':>13s}")
    for name, g in sorted(report["groups"].items()):
        lines.append(f"{name:16s} {g['numel']:12,d} {g['bits']:7.2f} {g['bytes']:13,d}")
    size = report["bytes_on_disk"]
    lines.append(f"{report['file']}: {size:,} bytes on disk ({size / 1e6:.2f} MB)")
    if "teacher" in report:
        t = report["teacher"]
        lines.append(
            f"teacher {t['path']}: {t['float_elements']:,} float elements (parameters + the "
            f"{t['of_which_encoder_sinusoids']:,}-element encoder sinusoid table) x 2 bytes = "
            f"{t['fp16_bytes']:,} bytes fp16 ({t['fp16_bytes'] / 1e6:.2f} MB, computed from the count)"
        )
        lines.append(f"ratio teacher fp16 / this file = {report['ratio_vs_teacher_fp16']:.2f}x")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqwhisper.quant.size", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="model.dqw, a .pt checkpoint, or a CT2 dir / model.bin")
    p.add_argument("--teacher", help="teacher checkpoint whose fp16 size is the reference (e.g. exp/models/base.pt)")
    p.add_argument("--per-tensor", action="store_true", help="list every tensor")
    p.add_argument("--json", help="also write the report as JSON")
    args = p.parse_args(argv)
    report = size_report(args.file, args.teacher)
    print(format_report(report, args.per_tensor))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _plain_rows(tensors: dict) -> list[dict]:
    """One row per unpacked tensor (its dtype's bits per value)."""
    return [
        {
            "name": name,
            "shape": list(t.shape),
            "numel": t.numel(),
            "bytes": t.numel() * t.element_size(),
            "bits": 8 * t.element_size(),
            "format": str(t.dtype).replace("torch.", ""),
        }
        for name, t in tensors.items()
    ]
