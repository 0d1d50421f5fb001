#!/usr/bin/env python
"""The decoding loop's options, A/B in one process: `inference.py` on one data set with each setting of --option in
turn, rounds alternating the order (ABBA...), then each setting's wall time, the seconds in sampled (fallback) tasks,
their decoder steps and rows, and whether every setting wrote the same hyp.txt.

    python bench/decode_loop.py TARGET [--option drop_finished] [--data data/demo/dev] [--rounds 4] [-- OVERRIDES]
    python bench/decode_loop.py exp/demo/student_kd_dm_q4 -- decode.checkpoint=export
    python bench/decode_loop.py exp/models/base.pt --option pool_fallback --rounds 2

TARGET is what `python inference.py base TARGET` takes. --option: a boolean decode.* setting (drop_finished,
pool_fallback); true is A, false is B, and the ratio is B's time over A's (> 1: true is faster). Choose and compare
on dev, never on test. `decode s` is results.json's wall_seconds (the decoding, without the model's load); this
machine's speed drifts, so only rounds taken back to back on a quiet machine compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dqwhisper import inference  # noqa: E402
from dqwhisper.decoding import search  # noqa: E402


class Counter:
    """Seconds, tasks, steps and row-steps of the sampled (temperature > 0) decoding tasks."""

    def __enter__(self):
        self.reset()
        self.real = real_run, real_update = search.BatchedDecodingTask.run, search.SeededSampler.update
        counter = self

        def run(task, mel):
            if task.options.temperature == 0:
                return real_run(task, mel)
            t0 = time.perf_counter()
            try:
                return real_run(task, mel)
            finally:
                counter.seconds += time.perf_counter() - t0
                counter.tasks += 1

        def update(sampler, tokens, logits, sum_logprobs):
            counter.steps += 1
            counter.rows += tokens.shape[0]
            return real_update(sampler, tokens, logits, sum_logprobs)

        search.BatchedDecodingTask.run = run
        search.SeededSampler.update = update
        return self

    def __exit__(self, *exc):
        search.BatchedDecodingTask.run, search.SeededSampler.update = self.real

    def reset(self):
        self.seconds, self.tasks, self.steps, self.rows = 0.0, 0, 0, 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="an exp dir or checkpoint, as `python inference.py base TARGET`")
    p.add_argument("--option", default="drop_finished", help="a boolean decode.* setting")
    p.add_argument("--data", default="data/demo/dev", help="Kaldi data dir (dev: settings are never chosen on test)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/dqw-bench-decode-loop", help="where each run's decode folder goes")
    p.add_argument("--model", default="base", help="inference.py's MODEL argument")
    args = p.parse_args(argv)
    with Counter() as counter:
        return compare(args, extra, counter)


def compare(args: argparse.Namespace, extra: list[str], counter: Counter) -> int:
    rows: dict[str, list[dict]] = {"true": [], "false": []}
    hyps: dict[str, set[str]] = {"true": set(), "false": set()}
    for r in range(args.rounds):
        for value in ("true", "false") if r % 2 == 0 else ("false", "true"):
            out = Path(args.out) / f"{args.option}_{value}_{r}"
            counter.reset()
            t0 = time.perf_counter()
            res = inference.run(
                args.model,
                args.target,
                [
                    *extra,
                    f"decode.test_sets=[{args.data}]",
                    f"decode.num_threads={args.threads}",
                    f"decode.out_dir={out}",
                    f"decode.{args.option}={value}",
                ],
                progress=False,
            )[0]
            wall = time.perf_counter() - t0
            row = dict(wall=wall, decode=res["wall_seconds"], sampled_s=counter.seconds, tasks=counter.tasks)
            row.update(steps=counter.steps, row_steps=counter.rows, error=res["overall"]["macro_error"])
            rows[value].append(row)
            hyps[value].add((out / "hyp.txt").read_text())
            print(
                f"round {r} {args.option}={value}: " + json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True
            )
    print(f"\n{args.target} on {args.data}, {args.rounds} rounds, {args.threads} threads (medians):")
    print("| decode." + args.option + " | decode s | sampled s | sampled tasks | sampled steps | sampled row-steps |")
    print("|---|---|---|---|---|---|")
    for value in ("true", "false"):
        med = {k: statistics.median(x[k] for x in rows[value]) for k in rows[value][0]}
        print(
            f"| {value} | {med['decode']:.2f} | {med['sampled_s']:.2f} | {med['tasks']:.0f} | {med['steps']:.0f} "
            f"| {med['row_steps']:.0f} |"
        )
    ratios = [b["decode"] / a["decode"] for a, b in zip(rows["true"], rows["false"])]
    print("decode time false / true per round: " + " / ".join(f"{x:.3f}" for x in ratios))
    same = len(hyps["true"] | hyps["false"]) == 1
    print("hyp.txt: " + ("the same in every run" if same else "DIFFERS between runs"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
