#!/usr/bin/env python
"""Checks that the `auto` kernel choice is never slower than float on this machine's shapes (a benchmark: it times,
so it asserts here and not in the unit tests).

For every distinct (tokens per call, K, N, trained with activation quantization) of the given exports (default:
Whisper-base-sized random models quantized w8a8 and w4 (weight-only), with the window of --window seconds), it lets
`auto` choose, then times the choice against float again, interleaved call by call (best of --reps), in process CPU
time (all threads) and in wall time. A choice fails when it takes more than --tolerance times float's time on both
clocks: other jobs on a shared machine inflate wall time alone, and OpenMP threads spinning between short calls
inflate CPU time alone; a kernel that is slower is slower on both. Calls of at most kernels.STEP_ROWS rows (a decoder
step's linears) are timed as a decoder step runs them, and as `auto` races them: one call at a time, with the caches
evicted before each (kernels.race(cold=True): a step streams ~33 MB of weights); larger calls (the encoder's) back
to back. Prints the CPU's flags, the emulation if any, the load average, and a table.
  python bench/kernel_select.py --threads 2 [EXPORT.dqw ...]
  bash scripts/emulate_avx2.sh .venv/bin/python bench/kernel_select.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dqwhisper.quant import kernels  # noqa: E402
from dqwhisper.quant.quantized import QuantizedEmbedding, QuantizedLinear, expected_rows  # noqa: E402
from dqwhisper.utils import DQWhisperError  # noqa: E402


def random_base_models(window: float) -> list[tuple[str, torch.nn.Module]]:
    from omegaconf import OmegaConf
    from whisper.model import ModelDimensions, Whisper

    from dqwhisper.models.student import from_whisper
    from dqwhisper.quant import convert, prepare

    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=round(window * 50),
        n_audio_state=512,
        n_audio_head=8,
        n_audio_layer=6,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=512,
        n_text_head=8,
        n_text_layer=6,
    )
    out = []
    for name in ("w8a8", "w4"):
        torch.manual_seed(0)
        model = from_whisper(Whisper(dims)).eval()
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "quant" / f"{name}.yaml"))
        cfg["weight"]["scale_init"] = "minmax"  # only the shapes matter here; the mse search takes minutes
        prepare(model, cfg)
        out.append((f"random-base-{name}", convert(model, "auto")))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="*", help="model.dqw files (default: random base-sized w8a8 and w4 models)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=float, default=30.0, help="audio window (s) of the default random models")
    p.add_argument("--batch", type=int, default=1, help="utterances per decoding call")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument(
        "--tolerance",
        type=float,
        default=1.10,
        help="fail when auto's time exceeds float's by this factor on both clocks (timing noise)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(kernels.describe_cpu(args.threads), flush=True)
    if args.exports:
        from dqwhisper.quant.export import load_exported

        models = [(Path(e).parent.parent.name or e, load_exported(e, "auto", batch=args.batch)) for e in args.exports]
    else:
        models = random_base_models(args.window)
    print(
        f"\n{'model':<22}{'rows x K x N':>20}{'act':>5}{'auto':>13}{'float ms':>10}{'auto ms':>10}{'ratio':>7}"
        f"{'wall float':>12}{'wall auto':>11}{'ratio':>7}  cache   (ms per call: CPU time of all threads, then wall)"
    )
    seen, worst = set(), 0.0
    for label, model in models:
        n_ctx = model.dims.n_audio_ctx
        for name, m in model.named_modules():
            if not isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
                continue
            rows = expected_rows(name, n_ctx, args.batch)
            key = (label, rows, tuple(m.quantized_tensor().shape), m.act_quant, m.kernel)
            if key in seen:
                continue
            seen.add(key)
            ref = kernels.build("float", m.quantized_tensor(), m.dequantized_weight, m.act_quant)
            x = torch.randn(rows, m.quantized_tensor().shape[1], generator=torch.Generator().manual_seed(2))
            fns = {"float": lambda: ref(x, None), "auto": lambda: (m.impl or ref)(x, None)}
            cold = rows <= kernels.STEP_ROWS
            with torch.no_grad():
                reps = max(args.reps, kernels.COLD_ROUNDS) if cold else args.reps  # as auto races them
                cpu = kernels.race(fns, rounds=reps, drop_after=reps, cold=cold)
                wall = kernels.race(fns, rounds=reps, drop_after=reps, clock=time.perf_counter, cold=cold)
            ratio = min(cpu["auto"] / cpu["float"], wall["auto"] / wall["float"])  # slower on both clocks
            if m.kernel != "float":  # auto chose float itself: the ratio is float against float, i.e. the noise
                worst = max(worst, ratio)
            n, k = m.quantized_tensor().shape
            print(
                f"{label:<22}{f'{rows}x{k}x{n}':>20}{'a8' if m.act_quant else 'w':>5}{m.kernel:>13}"
                f"{cpu['float'] * 1e3:>10.3f}{cpu['auto'] * 1e3:>10.3f}{ratio:>7.2f}{wall['float'] * 1e3:>12.3f}"
                f"{wall['auto'] * 1e3:>11.3f}{wall['auto'] / wall['float']:>7.2f}  {'cold' if cold else 'hot ':<5}"
                + ("  (float itself: the timing noise, not counted)" if m.kernel == "float" else ""),
                flush=True,
            )
    print(
        f"\nslowest auto choice other than float vs float (the smaller of its CPU and wall ratios): {worst:.2f}x "
        f"(limit {args.tolerance:.2f})"
    )
    if worst > args.tolerance:
        print("FAIL: auto chose a kernel slower than float", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DQWhisperError as e:
        sys.exit(f"kernel_select.py: error: {e}")
