"""Training step time of each loss, relative to CE-only, and cached vs uncached encoder epoch time, in one run.

    .venv/bin/python bench/train_step.py [--data data/demo] [--teacher base] [--steps 8] [--batch 16]

Runs the real dqwhisper.train Trainer (the demo student config: all encoder layers + decoder layers 0 and 5, frozen
cached encoder, pruned vocabulary) on the same fixed batches for every variant:
  ce          CE + CTC                                   (loss.alpha=0)
  kd          + T^2 KL to the cached teacher logits       (loss=kd)
  kd_match    + dynamic FFN matching (dynamic_limit)      (loss=kd_match)
  kd_match_qat  + 8-bit fake-quantized decoder (QAT)      (quant=w8, when dqwhisper.quant exists)
Then one pass over `--epoch-utts` training utterances with the encoder cached (reads features from disk) and
uncached (log-mel + frozen encoder forward every batch), CE-only. Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from dqwhisper.config import register_configs  # noqa: E402
from dqwhisper.train import Trainer, make_trainer  # noqa: E402
from dqwhisper.train.cache_set import collate_training  # noqa: E402


def make_cfg(args, exp: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="demo_student_ce",
            overrides=[
                f"checkpoint_dir={args.workdir}/{exp}",
                f"data.data_dir={args.data}",
                f"teacher.name={args.teacher}",
                f"data.collector.minibatch_size={args.batch}",
                "trainer.progress=false",
                "trainer.device=cpu",
                f"trainer.num_threads={args.threads}",
                f"data.audio_window={args.window}",
                *args.override,
                *overrides,
            ],
        )


def time_steps(tr: Trainer, batches: list[dict], warmup: int = 1) -> float:
    for b in batches[:warmup]:
        tr.train_step([b])
    times = []
    for b in batches:
        t0 = time.perf_counter()
        tr.train_step([b])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--teacher", default="base")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epoch-utts", type=int, default=64, help="utterances for the cached/uncached epoch timing")
    ap.add_argument("--workdir", default="exp/bench_train_step")
    ap.add_argument("--out", default="exp/bench_train_step/results.json")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    variants = [("ce", []), ("kd", ["loss=kd"]), ("kd_match", ["loss=kd_match"])]
    try:
        import dqwhisper.quant.prepare  # noqa: F401

        variants.append(("kd_match_qat", ["loss=kd_match", "quant=w8"]))
    except ImportError:
        print("dqwhisper.quant not available: no QAT row")

    results: dict = {
        "batch": args.batch,
        "window_s": args.window,
        "threads": args.threads,
        "teacher": args.teacher,
        "steps": {},
    }
    batches = None
    for name, overrides in variants:
        tr = make_trainer(make_cfg(args, name, overrides))
        if batches is None:  # the same utterances for every variant
            ids = list(range(min(len(tr.parts.train_set), args.batch * args.steps)))
            groups = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]
            batch_ids = groups[: args.steps]
        t0 = time.perf_counter()
        batches = [collate_training([tr.parts.train_set[i] for i in g], tr.parts.tokenizer.eot) for g in batch_ids]
        load = (time.perf_counter() - t0) / len(batches)
        step = time_steps(tr, batches)
        results["steps"][name] = {"step_s": round(step, 4), "batch_load_s": round(load, 4)}
        print(f"{name:14s} step {step * 1000:8.1f} ms   batch load (cache read) {load * 1000:6.1f} ms", flush=True)
        del tr
    base = results["steps"]["ce"]["step_s"]
    for v in results["steps"].values():
        v["vs_ce"] = round(v["step_s"] / base, 3)

    # cached vs uncached encoder: one pass over the first --epoch-utts utterances, CE only
    epoch = {}
    for cached in (True, False):
        tr = make_trainer(
            make_cfg(args, f"epoch_{cached}", [f"trainer.cache_encoder={cached}", "trainer.cache_teacher=false"])
        )
        n = min(len(tr.parts.train_set), args.epoch_utts)
        groups = [list(range(i, min(i + args.batch, n))) for i in range(0, n, args.batch)]
        t0 = time.perf_counter()
        for batch in tr.loader(tr.parts.train_set, groups):
            tr.train_step([batch])
        epoch["cached" if cached else "uncached"] = round(time.perf_counter() - t0, 2)
        del tr
    epoch["utterances"] = n
    epoch["speedup"] = round(epoch["uncached"] / epoch["cached"], 2)
    results["epoch"] = epoch

    print("\nvariant          step (s)   vs CE-only")
    for name, v in results["steps"].items():
        print(f"{name:15s} {v['step_s']:9.3f}   {v['vs_ce']:.2f}x")
    print(
        f"\nepoch of {n} utterances, CE only: cached encoder {epoch['cached']} s, uncached {epoch['uncached']} s "
        f"({epoch['speedup']}x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
