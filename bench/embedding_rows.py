#!/usr/bin/env python
"""How much of the 4-bit token embedding's error a few more bits on its most used rows remove (what
`quant.embedding_hi_rows` does), for several splits and rankings at once.

    python bench/embedding_rows.py FLOAT_STUDENT.pt [--train data/demo/train] [--dev data/demo/dev]
        [--batch-window 1] [--split 4000:5:4 8000:5:4 26000:5:3 ...] [--rank-utts 0 64]

The rows are ranked on the training set as the trainer ranks them for `quant.embedding_hi_rows`
(`dqwhisper.train.calibrate.rank_embedding_rows`): the float student, teacher-forced over `--rank-utts` training
utterances (0: all; several values compare rankings), counts each token id's appearances in its top 16 logits and
(x100) as a target. For each split N:HI:LO the N highest-ranked
rows are quantized to HI bits and the rest to LO bits (round to nearest, int8-multiple groups of 64 as in
conf/quant/w4a8.yaml); every other weight stays float. Printed per split: the dev teacher-forced cross-entropy, the
KL divergence from the float student (as bench/dev_ce.py computes them) and the embedding's bytes in the .dqw file
against 4 bits everywhere (the multipliers of every row stored at the narrow width's bits, one flag bit a row). Dev is
never used for the ranking.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dqwhisper.data.dataset import WhisperDataset, default_tokenizer  # noqa: E402
from dqwhisper.decoding.audio import encoder_window  # noqa: E402
from dqwhisper.models.student import load_checkpoint  # noqa: E402
from dqwhisper.quant.fake_quant import QuantSpec, WeightFakeQuantizer  # noqa: E402
from dqwhisper.train.calibrate import calibration_batches, rank_embedding_rows  # noqa: E402

GROUP = 64

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("student")
p.add_argument("--train", default="data/demo/train")
p.add_argument("--dev", default="data/demo/dev")
p.add_argument("--batch-window", type=float, default=1.0, help="S: per-utterance windows of audio + S s")
p.add_argument("--split", nargs="+", default=["0:4:4", "51865:5:5", "4000:5:4", "8000:5:4", "26000:5:3"])
p.add_argument("--rank-utts", type=int, nargs="+", default=[0], help="training utterances ranked on (0: all)")
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)

model = load_checkpoint(args.student).eval()
tok = default_tokenizer(model.dims.n_vocab)


def batches_of(folder, n=0):
    ds = WhisperDataset(folder, tok, model.dims.n_mels, model.dims.n_audio_ctx)
    return calibration_batches(ds, n or len(ds.items), batch_size=16, margin=args.batch_window)


def logits(batches):
    out = []
    with torch.no_grad():
        for b in batches:
            with encoder_window(model, b["window"]):
                out.append(model(b["mel"], b["tokens_in"]).float())
    return out


n_vocab = model.decoder.token_embedding.weight.shape[0]
orders = {}
for n in args.rank_utts:
    batches = batches_of(args.train, n)
    orders[n] = rank_embedding_rows(model, batches, "cpu")
    print(f"ranking {n}: {sum(len(b['mel']) for b in batches)} utterances of {args.train}", flush=True)
dev = batches_of(args.dev)
ref = logits(dev)
weight = model.decoder.token_embedding.weight.detach().clone()
quantized = {}


def at_bits(bits):
    if bits not in quantized:
        wfq = WeightFakeQuantizer(QuantSpec(bits, True, "per_group_int8", GROUP), weight, lsq=True, scale_init="mse")
        with torch.no_grad():
            quantized[bits] = wfq(weight)
    return quantized[bits]


def bits_per_weight(bits):  # codes + the group multipliers' bits (1..2^(7-bits)) + a float16 row scale
    return bits + max(1, (2 ** (7 - bits) - 1).bit_length()) / GROUP + 16 / weight.shape[1]


for rank_n, split in ((r, x) for r in args.rank_utts for x in args.split):
    order = orders[rank_n]
    n, hi, lo = (int(x) for x in split.split(":"))
    n = min(n, n_vocab)
    mixed = at_bits(lo).clone()
    mixed[order[:n]] = at_bits(hi)[order[:n]]
    with torch.no_grad():
        model.decoder.token_embedding.weight.copy_(mixed)
    ce = kl = tokens = 0.0
    for lg, r, b in zip(logits(dev), ref, dev):
        mask = b["targets"] != -100
        ce += float(F.cross_entropy(lg[mask], b["targets"][mask], reduction="sum"))
        kl += float(F.kl_div(F.log_softmax(lg[mask], -1), F.log_softmax(r[mask], -1), log_target=True, reduction="sum"))
        tokens += int(mask.sum())
    wide = n if hi != lo else 0
    extra = wide * (hi - lo) + n_vocab * (bits_per_weight(lo) - bits_per_weight(4))
    extra_mb = (extra * weight.shape[1] + (n_vocab if wide else 0)) / 8 / 1e6
    print(
        f"ranked on {rank_n or 'all'}: top {n} rows at {hi} bits, the rest {lo}: "
        f"dev CE {ce / tokens:.4f}  KL {kl / tokens:.4f}  "
        f"embedding {extra_mb:+.2f} MB against 4 bits",
        flush=True,
    )
with torch.no_grad():
    model.decoder.token_embedding.weight.copy_(weight)
