#!/usr/bin/env python
"""Teacher-forced cross-entropy (nats per token) on a data set's transcripts, and the KL divergence from a reference
model, for checkpoints: a smoother measure than decoded error for comparing quantizers on a small dev set.

    python bench/dev_ce.py REFERENCE.pt CKPT.pt [CKPT.pt ...] [--data data/demo/dev] [--batch-window S]

--batch-window S: each utterance's encoder window is its audio + S s (whole seconds), as the demo students are
trained and decoded (data.batch_window); default: the model's whole window.

(The 4-bit quantizer of conf/quant/w4a8.yaml was chosen with it: PTQ checkpoints of the float KD student against
the student itself.)
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dqwhisper.data.dataset import WhisperDataset, collate, default_tokenizer  # noqa: E402
from dqwhisper.models.student import load_checkpoint  # noqa: E402
from dqwhisper.decoding.audio import encoder_window  # noqa: E402
from dqwhisper.train.calibrate import calibration_batches  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("reference")
p.add_argument("checkpoints", nargs="+")
p.add_argument("--data", default="data/demo/dev")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--batch-window", type=float, default=None, help="S: per-utterance windows of audio + S s")
args = p.parse_args()
torch.set_num_threads(args.threads)
ref_path, paths = args.reference, args.checkpoints
ref = load_checkpoint(ref_path).eval()
ds = WhisperDataset(args.data, default_tokenizer(ref.dims.n_vocab), ref.dims.n_mels, ref.dims.n_audio_ctx)
if args.batch_window is None:
    items = [it for it in (ds[i] for i in range(len(ds.items))) if it is not None]
    batches = [collate(items[i : i + 16], ds.tokenizer.eot) for i in range(0, len(items), 16)]
else:  # every utterance, in batches of one window each
    batches = calibration_batches(ds, len(ds.items), batch_size=16, margin=args.batch_window)


def logits(m):
    out = []
    with torch.no_grad():
        for b in batches:
            with encoder_window(m, b.get("window", m.dims.n_audio_ctx)):  # no window: the whole one, unchanged
                out.append(m(b["mel"], b["tokens_in"]).float())
    return out


R = logits(ref)
for p in [ref_path] + paths:
    m = ref if p == ref_path else load_checkpoint(p).eval()
    L = R if p == ref_path else logits(m)
    ce = n = kl = 0.0
    for lg, r, b in zip(L, R, batches):
        t = b["targets"]
        mask = t != -100
        ce += float(F.cross_entropy(lg[mask], t[mask], reduction="sum"))
        n += int(mask.sum())
        kl += float(F.kl_div(F.log_softmax(lg[mask], -1), F.log_softmax(r[mask], -1), log_target=True, reduction="sum"))
    print(f"{p}: dev CE {ce / n:.4f}  KL(ref||m) {kl / n:.4f}  ({n} tokens)", flush=True)
