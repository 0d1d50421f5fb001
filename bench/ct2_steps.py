#!/usr/bin/env python
"""Where ours and CTranslate2 int8 differ in time, at equal work: the encoder, and the decoder per token with
end-of-text suppressed on both sides so that both sample exactly --tokens tokens (greedy, language forced).

    python bench/ct2_steps.py EXPORT.dqw CT2_DIR [--data data/demo/test] [--tokens 40] [--threads 1] [--batch 1]

EXPORT.dqw runs through our kernels (--kernel, default auto) and decode_mels' task (its logit filters included);
CT2_DIR is its `dqwhisper export-ct2` conversion. Times are process CPU seconds (all threads; other jobs on a shared
machine do not count) and wall seconds, best of --reps, on the first utterance of --data (repeated --batch times per
call: decode_speed.py decodes 8 per call): encoder = one encoder call; per token = (encoder + N tokens - encoder) /
N. Compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_times(fn, reps: int) -> tuple[float, float]:
    """(best process CPU seconds, best wall seconds) of `reps` calls."""
    cpu = wall = math.inf
    for _ in range(reps):
        start, start_wall = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = min(cpu, time.process_time() - start), min(wall, time.perf_counter() - start_wall)
    return cpu, wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("ct2_dir")
    p.add_argument("--data", default="data/demo/test")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="rows per call (the first utterance repeated)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import ctranslate2
    import numpy as np
    from whisper.decoding import LogitFilter
    from whisper.tokenizer import get_tokenizer

    from dqwhisper.config import DecodeConfig
    from dqwhisper.data.kaldi import DataDir
    from dqwhisper.decoding import audio_to_mel
    from dqwhisper.decoding.search import BatchedDecodingTask, decoding_options
    from dqwhisper.quant import kernels
    from dqwhisper.quant.export import load_exported

    print(kernels.describe_cpu(args.threads), flush=True)
    utt = DataDir.load(args.data).utts[0]
    audio = DataDir.load(args.data).load_audio(utt)
    model = load_exported(args.export, mode=args.kernel)
    mel = audio_to_mel([audio] * args.batch, model, "cpu", "zeros")
    ct2 = ctranslate2.models.Whisper(args.ct2_dir, device="cpu", compute_type="int8", intra_threads=args.threads)
    tok = get_tokenizer(multilingual=True)
    prompt = [tok.sot, tok.to_language_token(utt.lang), tok.transcribe, tok.no_timestamps]
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))

    class NoEndOfText(LogitFilter):
        def apply(self, logits, tokens):
            logits[:, tok.eot] = -math.inf

    @torch.no_grad()
    def ours(n: int) -> int:
        audio_features = model.encoder(mel)
        if n == 0:
            return 0
        task = BatchedDecodingTask(model, decoding_options(DecodeConfig(), utt.lang, sample_len=n), [n] * args.batch)
        task.logit_filters.insert(0, NoEndOfText())
        return len(task.run(audio_features)[0].tokens)

    def theirs(n: int) -> int:
        if n == 0:
            ct2.encode(features)
            return 0
        result = ct2.generate(  # CTranslate2's Whisper samples at most max_length // 2 tokens
            features, [prompt] * args.batch, beam_size=1, max_length=2 * n, suppress_tokens=[-1, tok.eot]
        )
        return len(result[0].sequences_ids[0])

    rows = {}
    for name, fn in (("ours", ours), ("ct2-int8", theirs)):
        got = fn(args.tokens)  # warm-up
        if got != args.tokens:
            sys.exit(f"ct2_steps.py: {name} sampled {got} tokens, not {args.tokens}")
        encoder = best_times(lambda fn=fn: fn(0), args.reps)
        total = best_times(lambda fn=fn: fn(args.tokens), args.reps)
        rows[name] = [(e, (t - e) / args.tokens) for e, t in zip(encoder, total)]
        (ec, tc), (ew, tw) = rows[name]
        print(
            f"{name:>9}: encoder {ec * 1e3:7.1f} ms CPU ({ew * 1e3:7.1f} wall), decoder {tc * 1e3:6.3f} ms/token CPU "
            f"({tw * 1e3:6.3f} wall)",
            flush=True,
        )
    for i, clock in enumerate(("CPU time", "wall")):
        (eo, to), (ec, tc) = rows["ours"][i], rows["ct2-int8"][i]
        print(f"ours / CT2 int8 ({clock}): encoder {eo / ec:.2f}x, per token {to / tc:.2f}x ({args.tokens} tokens)")


if __name__ == "__main__":
    main()
