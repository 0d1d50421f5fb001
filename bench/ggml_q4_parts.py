#!/usr/bin/env python
"""Where ggml's q4_0 costs a float student, and whisper.cpp's errors without runaways.

    python bench/ggml_q4_parts.py split Q.bin FLOAT_CKPT OUT_DIR      # OUT_DIR/q4_0_{encoder,decoder}_only.pt
    python bench/ggml_q4_parts.py exclude RUN.json [RUN.json ...]     # results of `bench/interop.py ggml`

split: openai-format checkpoints holding only the encoder's (or only the decoder's) tensors from a ggml file (as
ggml dequantizes them) and the rest from the float checkpoint; decode them with `python inference.py base FILE.pt`
to see which half of the post-training q4_0 costs the error.
exclude: every `bench/interop.py ggml` result scored again without the utterances that ran away (token cap or
compression ratio > 2.4) in any of the given runs; those utterances are decoded again by the same decoders on the
same files (greedy, one thread: the same hypotheses) and their errors are taken out of each run's totals.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.interop import _ours_texts, _whispercpp_texts, default_tokenizer, load_any, utterances  # noqa: E402
from dqwhisper.scoring import score_utterances  # noqa: E402
from dqwhisper.utils import DQWhisperError  # noqa: E402


def cmd_split(qfile: str, float_ckpt: str, out: Path) -> None:
    from dqwhisper.interop.ggml import load_ggml
    from dqwhisper.models.load import load_whisper

    mq = load_ggml(qfile)
    sq, dims = mq.state_dict(), mq.dims
    sf = load_whisper(float_ckpt, device="cpu").state_dict()
    if set(sq) != set(sf) or any(sq[k].shape != sf[k].shape for k in sq):
        raise DQWhisperError(f"{float_ckpt} and {qfile} do not hold the same tensors (a pruned or other model?)")
    out.mkdir(parents=True, exist_ok=True)
    for half in ("encoder", "decoder"):
        sd = {k: (sq[k] if k.startswith(half + ".") else sf[k].float()).clone() for k in sq}
        n_diff = sum(not torch.equal(sd[k], sf[k].float()) for k in sd)
        path = out / f"q4_0_{half}_only.pt"
        torch.save({"dims": asdict(dims), "model_state_dict": sd}, path)
        print(f"wrote {path}: {n_diff} of {len(sd)} tensors from {qfile}")


def _errors_by_lang(scores) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in scores:
        out[s.lang] = out.get(s.lang, 0) + s.errors
    return out


def cmd_exclude(paths: list[str], data_dir: str) -> None:
    from dqwhisper.interop.ggml import load_ggml
    from dqwhisper.interop.whispercpp import WhisperCpp

    runs = [json.loads(Path(p).read_text()) for p in paths]
    excl = sorted({u for d in runs for k, v in d.items() if k.startswith("runaways_") for u in v})
    print("excluded:", excl)
    data, utts = utterances(data_dir, None)
    langs = {u.utt_id: u.lang for u in utts}
    all_scores, _ = score_utterances({u.utt_id: u.text for u in utts}, {u.utt_id: u.text for u in utts}, langs)
    n_ref: dict[str, int] = {}
    ex_ref: dict[str, int] = {}
    for s in all_scores:
        n_ref[s.lang] = n_ref.get(s.lang, 0) + s.n_ref
        if s.utt_id in excl:
            ex_ref[s.lang] = ex_ref.get(s.lang, 0) + s.n_ref
    sub = [u for u in utts if u.utt_id in excl]

    def report(name: str, err: dict, texts: dict[str, str]) -> None:
        scores, _ = score_utterances({u.utt_id: u.text for u in sub}, texts, {u.utt_id: u.lang for u in sub})
        ex = _errors_by_lang(scores)
        per, tot_e, tot_r = {}, 0, 0
        for lang, r in n_ref.items():
            e = round(err["per_language"][lang] * r) - ex.get(lang, 0)
            per[lang] = e / (r - ex_ref.get(lang, 0))
            tot_e, tot_r = tot_e + e, tot_r + r - ex_ref.get(lang, 0)
        avg = sum(per.values()) / len(per)
        langs_txt = " ".join(f"{k} {100 * v:.1f}" for k, v in per.items())
        print(f"  {name}: pooled {100 * tot_e / tot_r:.2f}% ({tot_e}/{tot_r}) avg {100 * avg:.2f}% | {langs_txt}")

    for d in runs:
        print("==", d["file"])
        fm = load_ggml(d["file"])
        tok = default_tokenizer(fm.dims.n_vocab)
        report("ours, file weights", d["error_ours_same_weights"], _ours_texts(fm, data, sub, tok)[0])
        runner = WhisperCpp(d["file"], n_threads=1, flash_attn=d["whispercpp_flash_attn"])
        for mode in ("mel", "pcm"):
            if f"error_whispercpp_{mode}" in d:
                texts = _whispercpp_texts(runner, data, sub, fm.dims, mode, tok)[0]
                report(f"whisper.cpp {mode}", d[f"error_whispercpp_{mode}"], texts)
        if "error_ours_original" in d:
            report("ours, original", d["error_ours_original"], _ours_texts(load_any(d["ckpt"]), data, sub, tok)[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("qfile")
    s.add_argument("float_ckpt")
    s.add_argument("out", type=Path)
    e = sub.add_parser("exclude")
    e.add_argument("runs", nargs="+")
    e.add_argument("--data", default="data/demo/test")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "split":
        cmd_split(a.qfile, a.float_ckpt, a.out)
    else:
        cmd_exclude(a.runs, a.data)


if __name__ == "__main__":
    main()
