#!/usr/bin/env python
"""The QAT step's fake-quantized tied token embedding (Whisper base: 51,865 x 512, the demo's 4-bit int8-multiple
groups of 64 with 8,000 rows at 5 bits), forward and backward, three ways, in one run (best of --repeat each):

  composed x2   quantize_codes + dequantize_codes through autograd, once for the lookup and once for the projection
                (the QAT step before the embedding's one_weight scope)
  composed x1   the same ops once a step (one_weight: the lookup and the projection share the weight)
  fused x1      WeightFakeQuantizer.forward now: one weight a step through _LsqFakeQuant

each with the projection of --positions hidden states onto the vocabulary and a lookup of as many tokens, then
backward to the weight and the scales. The float projection alone is the floor. Random weights: the time does not
depend on their values.

    .venv/bin/python bench/fake_quant_speed.py [--threads 2] [--positions 300] [--repeat 3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dqwhisper.quant.fake_quant import (  # noqa: E402
    QuantSpec,
    WeightFakeQuantizer,
    dequantize_codes,
    quantize_codes,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", type=int, default=300, help="counted positions a batch (the demo: ~300)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_vocab, d = 51865, 512
    weight = torch.nn.Parameter(torch.randn(n_vocab, d) * 0.02)
    fq = WeightFakeQuantizer(QuantSpec(4, True, "per_group_int8", 64), weight, lsq=True, scale_init="minmax", hi_bits=5)
    fq.set_hi_rows(torch.arange(8000))
    hidden = torch.randn(args.positions, d)
    ids = torch.randint(0, n_vocab, (args.positions,))

    def composed():
        s, z = fq.scale_zero(weight)
        q = quantize_codes(weight.reshape(fq.grouped), s, z, fq.spec, fq.bounds())
        return dequantize_codes(q, s, z).reshape(weight.shape)

    def step(quantized_lookup, quantized_projection):
        loss = F.embedding(ids, quantized_lookup()).sum() + (hidden @ quantized_projection().t()).logsumexp(-1).sum()
        loss.backward()

    def once(make):
        cache = []

        def get():
            if not cache:
                cache.append(make())
            return cache[0]

        return get

    ways = {
        "composed x2": lambda: step(composed, composed),
        "composed x1": lambda: (get := once(composed), step(get, get)),
        "fused x1": lambda: (get := once(lambda: fq(weight)), step(get, get)),
        "float projection": lambda: step(lambda: weight, lambda: weight),
    }
    best = {}
    for name, run in ways.items():
        run()  # warm-up
        times = []
        for _ in range(args.repeat):
            weight.grad = fq.scale.grad = None
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    print(f"{args.threads} thread(s), {args.positions} positions, best of {args.repeat}")
    for name, t in best.items():
        print(f"{name:17} {t:7.3f} s   {best['composed x2'] / t:5.2f}x faster than composed x2")


if __name__ == "__main__":
    main()
