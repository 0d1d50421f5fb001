#!/usr/bin/env python
"""Two ways of doing the same work, interleaved in one run, and whether the outputs are the same bits.

--compare rows (a model path or name, as inference.py takes it): decoding --data's utterances with whisper's
beam search or best-of sampling (temperature fallback), each utterance's rows projecting the cross-attention's keys
and values once and attending to that one copy (`DQTextDecoder.rows_share_audio`, what decoding does) against once
per beam / sample row (what whisper does). The attention's float sums differ in order (one sequence of n queries
against n rows of one): transcripts may differ where two tokens tie. --beam-size 1: greedy with the temperature
fallback (best of 5 at T > 0, as inference.py); --beam-size N: beam search at T = 0 only.

--compare act-quant (a checkpoint with 8-bit activation fake quantization, e.g. exp/demo/student_kd_dm_q4/best.pt):
the fake-quantized encoder's forward on --batch random mels of the model's window without autograd,
ActivationFakeQuantizer through `quantize_tokens` (what it does now) against `quantize_per_token` (its autograd
arithmetic; what it did before 9f8d68a): the frozen 4-bit encoder's training and dev caches and validation run it.

    python bench/shared_work.py --compare rows --model exp/models/base.pt --data data/demo/test --langs de en
    python bench/shared_work.py --compare rows --model exp/models/base.pt --beam-size 5 --max-utts 6
    python bench/shared_work.py --compare act-quant --model exp/demo/student_kd_dm_q4/best.pt

Wall and process CPU seconds per pass (--reps interleaved pairs); ratios > 1 mean the second way (what the code does
now) is faster. The machine's other jobs move absolute numbers: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", choices=("rows", "act-quant"), default="rows")
    p.add_argument("--model", default="exp/models/base.pt")
    p.add_argument("--data", default="data/demo/test")
    p.add_argument("--langs", nargs="*", default=None, help="only these languages of --data")
    p.add_argument("--max-utts", type=int, default=16)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="act-quant: mels per encoder call")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)

    from dqwhisper.quant import kernels

    print(kernels.describe_cpu(args.threads), flush=True)
    if args.compare == "rows":
        from dqwhisper.data.kaldi import DataDir
        from dqwhisper.decoding import DecodeConfig, decode_utterances
        from dqwhisper.models.load import load_model
        from dqwhisper.models.student import DQTextDecoder

        model = load_model(args.model, device="cpu").eval()
        if not hasattr(model.decoder, "rows_share_audio"):
            sys.exit(f"shared_work.py: {args.model} does not load as a DQWhisper")
        data = DataDir.load(args.data)
        utts = [u for u in data.utts if args.langs is None or u.lang in args.langs][: args.max_utts]
        cfg = DecodeConfig(beam_size=args.beam_size, temperatures=[0.0]) if args.beam_size > 1 else DecodeConfig()
        share = DQTextDecoder.rows_share_audio
        ways = {"per row": lambda self, n: contextlib.nullcontext(), "shared": share}

        def run(way: str):
            DQTextDecoder.rows_share_audio = ways[way]
            try:
                out = decode_utterances(model, data, utts, cfg, progress=False)
            finally:
                DQTextDecoder.rows_share_audio = share
            return [(h.utt_id, h.text) for h in out.hyps]

        what = f"{len(utts)} utterances, " + (f"beam {args.beam_size}" if args.beam_size > 1 else "greedy + fallback")
    else:
        from dqwhisper.models.student import load_checkpoint
        from dqwhisper.quant import fake_quant

        model = load_checkpoint(args.model).eval()
        if not any(isinstance(m, fake_quant.ActivationFakeQuantizer) for m in model.encoder.modules()):
            sys.exit(f"shared_work.py: {args.model}'s encoder has no activation fake quantization")
        d = model.dims
        mel = torch.randn(args.batch, d.n_mels, 2 * d.n_audio_ctx, generator=torch.Generator().manual_seed(0))
        fast = fake_quant.ActivationFakeQuantizer.forward

        def autograd_arithmetic(self, x):
            q, s = fake_quant.quantize_per_token(x, self.bits)
            return (q * s).to(x.dtype)

        ways = {"quantize_per_token": autograd_arithmetic, "quantize_tokens": fast}

        def run(way: str):
            fake_quant.ActivationFakeQuantizer.forward = ways[way]
            try:
                with torch.no_grad():
                    return model.encoder(mel)
            finally:
                fake_quant.ActivationFakeQuantizer.forward = fast

        what = f"encoder, {args.batch} x {d.n_audio_ctx} positions"
    names = list(ways)
    run(names[1])  # warm-up
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    outputs = {}
    for _ in range(args.reps):
        for name in names:
            outputs[name], wall, cpu = timed(lambda: run(name))
            times[name].append((wall, cpu))
            print(f"{name}: wall {wall:.2f} s, CPU {cpu:.2f} s", flush=True)
    a, b = (times[n] for n in names)
    x, y = (outputs[n] for n in names)
    same = torch.equal(x, y) if torch.is_tensor(x) else x == y
    wall = sorted(x[0] / y[0] for x, y in zip(a, b))
    cpu = sorted(x[1] / y[1] for x, y in zip(a, b))
    print(
        f"{what}: {names[0]} / {names[1]} wall {' '.join(f'{r:.2f}' for r in wall)}x, CPU "
        f"{' '.join(f'{r:.2f}' for r in cpu)}x; same outputs: {same}"
    )


if __name__ == "__main__":
    main()
