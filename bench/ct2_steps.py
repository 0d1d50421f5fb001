#!/usr/bin/env python
"""Where ours and CTranslate2 int8 differ in time, at equal work: the encoder, and the decoder per token with
end-of-text suppressed on both sides so that both sample exactly --tokens tokens (greedy, language forced).

    python bench/ct2_steps.py EXPORT.dqw CT2_DIR [--data data/demo/test] [--tokens 40] [--threads 1]

EXPORT.dqw runs through our kernels (--kernel, default auto) and decode_mels' task (its logit filters included);
CT2_DIR is its `dqwhisper export-ct2` conversion. Times are process CPU seconds (all threads; other jobs on a shared
machine do not count), best of --reps, on the first utterance of --data: encoder = one encoder call; per token =
(encoder + N tokens - encoder) / N. Compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_cpu(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("ct2_dir")
    p.add_argument("--data", default="data/demo/test")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--reps", type=int, default=5)
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
    mel = audio_to_mel([audio], model, "cpu", "zeros")
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
        task = BatchedDecodingTask(model, decoding_options(DecodeConfig(), utt.lang, sample_len=n), [n])
        task.logit_filters.insert(0, NoEndOfText())
        return len(task.run(audio_features)[0].tokens)

    def theirs(n: int) -> int:
        if n == 0:
            ct2.encode(features)
            return 0
        result = ct2.generate(  # CTranslate2's Whisper samples at most max_length // 2 tokens
            features, [prompt], beam_size=1, max_length=2 * n, suppress_tokens=[-1, tok.eot]
        )
        return len(result[0].sequences_ids[0])

    rows = {}
    for name, fn in (("ours", ours), ("ct2-int8", theirs)):
        got = fn(args.tokens)  # warm-up
        if got != args.tokens:
            sys.exit(f"ct2_steps.py: {name} sampled {got} tokens, not {args.tokens}")
        encoder = best_cpu(lambda fn=fn: fn(0), args.reps)
        total = best_cpu(lambda fn=fn: fn(args.tokens), args.reps)
        rows[name] = (encoder, (total - encoder) / args.tokens)
        print(f"{name:>9}: encoder {encoder * 1e3:7.1f} ms, decoder {rows[name][1] * 1e3:6.3f} ms/token", flush=True)
    (eo, to), (ec, tc) = rows["ours"], rows["ct2-int8"]
    print(f"ours / CT2 int8 (CPU time): encoder {eo / ec:.2f}x, per token {to / tc:.2f}x ({args.tokens} tokens)")


if __name__ == "__main__":
    main()
