#!/usr/bin/env python
"""A kv-cached decoder step of a DQWhisper model, two ways interleaved in one process, and whether every logit is
the same. --compare cross: whisper's cross-attention (its MultiHeadAttention reading the cached keys and values as
permuted views of (B, T, d)) against ours (contiguous (B, heads, T, d / heads), computed once per decoding:
models/student.py `cached_keys_values`). --compare fuse (an exported .dqw): each self-attention's query/key/value as
three GEMMs against one (quantized.FusedProjection), and the encoder too.

    python bench/decoder_step.py [--model exp/models/base.pt] [--compare cross|fuse] [--batch 1 8] [--steps 20]

--model: an openai-whisper checkpoint (copied into a DQWhisper) or an exported .dqw (through --kernel). Times are wall
milliseconds per step ((prompt + N steps) - prompt) / N on random audio features of the model's window (encoder:
one call on random mel); ratios > 1 mean the second way (ours, fused) is faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def whispers_cross(decoder, block, h, xa, kv_cache=None):
    """DQTextDecoder._cross as before ours: whisper's module for the cross-attention (no per-row key lengths)."""
    return block.cross_attn(block.cross_attn_ln(h), xa, kv_cache=kv_cache)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="exp/models/base.pt")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--compare", choices=("cross", "fuse"), default="cross")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dqwhisper.models.student import DQTextDecoder
    from dqwhisper.quant import kernels
    from dqwhisper.quant.quantized import select_kernels

    print(kernels.describe_cpu(args.threads), flush=True)
    if args.model.endswith(".dqw"):
        from dqwhisper.quant.export import load_exported

        model = load_exported(args.model, mode=args.kernel)
    else:
        import whisper

        from dqwhisper.models.student import from_whisper

        model = from_whisper(whisper.load_model(args.model, device="cpu")).eval()
    ours, d = DQTextDecoder._cross, model.dims
    if args.compare == "fuse" and not args.model.endswith(".dqw"):
        sys.exit("decoder_step.py: --compare fuse needs an exported .dqw model")
    request = None if args.kernel == "auto" else args.kernel

    def setup(way: str) -> None:
        if args.compare == "cross":
            DQTextDecoder._cross = whispers_cross if way == "first" else ours
        else:
            select_kernels(model, request, fuse=way == "second")

    names = ("whisper", "ours") if args.compare == "cross" else ("unfused", "fused")

    @torch.no_grad()
    def steps(tokens, xa, n):
        cache, hooks = model.install_kv_cache_hooks()
        logits = model.decoder(tokens, xa, kv_cache=cache)
        for _ in range(n):
            logits = model.decoder(logits[:, -1].argmax(-1, keepdim=True), xa, kv_cache=cache)
        for h in hooks:
            h.remove()
        return logits

    def report(label: str, times: dict, same: bool | None) -> None:
        a, b = (times[n] for n in names)
        ratios = sorted(x / y for x, y in zip(a, b))
        print(
            f"{label}: {names[0]} {' '.join(f'{t:.1f}' for t in a)}, {names[1]} {' '.join(f'{t:.1f}' for t in b)} "
            f"ms; {names[0]} / {names[1]} median {ratios[len(ratios) // 2]:.2f}x"
            + ("" if same is None else f"; same logits: {same}"),
            flush=True,
        )

    try:
        for batch in args.batch:
            xa = torch.randn(batch, d.n_audio_ctx, d.n_audio_state, generator=torch.Generator().manual_seed(0))
            tokens = torch.full((batch, 4), 50258)
            times, logits = {n: [] for n in names}, {}
            for _ in range(args.reps):
                for way, name in zip(("first", "second"), names):
                    setup(way)
                    logits[name] = steps(tokens, xa, 2)
                    start = time.perf_counter()
                    steps(tokens, xa, 0)
                    prompt = time.perf_counter() - start
                    start = time.perf_counter()
                    steps(tokens, xa, args.steps)
                    times[name].append((time.perf_counter() - start - prompt) / args.steps * 1e3)
            report(f"batch {batch}, {d.n_audio_ctx} keys, ms/step", times, torch.equal(*logits.values()))
            if args.compare == "fuse":
                mel = torch.randn(batch, d.n_mels, 2 * d.n_audio_ctx, generator=torch.Generator().manual_seed(0))
                times = {n: [] for n in names}
                for _ in range(args.reps):
                    for way, name in zip(("first", "second"), names):
                        setup(way)
                        with torch.no_grad():
                            model.encoder(mel)
                            start = time.perf_counter()
                            model.encoder(mel)
                        times[name].append((time.perf_counter() - start) * 1e3)
                report(f"batch {batch}, encoder, ms/call", times, None)
    finally:
        DQTextDecoder._cross = ours
        if args.compare == "fuse":
            select_kernels(model, request)


if __name__ == "__main__":
    main()
