"""Interop checks on real models: Hugging Face round trip and token agreement, whisper.cpp error and speed.

  python bench/interop.py hf-roundtrip exp/models/base.pt OUT_DIR
  python bench/interop.py hf-tokens CKPT data/demo/test OUT_DIR            # our greedy tokens vs transformers'
  python bench/interop.py ggml CKPT data/demo/test OUT_DIR --type q4_0     # whisper.cpp vs ours, same weights
  python bench/interop.py speed CKPT data/demo/test OUT_DIR --types f16,q8_0,q4_0 --max_utts 24

Every decoder runs greedy, temperature 0 without fallback, no timestamps, language forced from utt2lang, one
utterance at a time, up to 224 new tokens. Ours is `dqwhisper.decoding.decode_mels` (what `inference.py` runs) with
temperatures [0.0] and no duration-based token cap. Speeds are RTF
(wall seconds / audio seconds) with one thread per runtime, measured in one run: compare them only with each
other. Results go to OUT_DIR/*.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dqwhisper.data.dataset import default_tokenizer, window_log_mel  # noqa: E402
from dqwhisper.data.kaldi import DataDir  # noqa: E402
from dqwhisper.decoding import DecodeConfig, decode_mels  # noqa: E402
from dqwhisper.scoring import score_utterances, summarize  # noqa: E402

MAX_NEW = 224


def hf_greedy(hfm, mel, lang: str):
    """transformers' greedy generate on one (n_mels, T) mel, language forced, no timestamps."""
    return hfm.generate(
        input_features=mel[None],
        language=lang,
        task="transcribe",
        return_timestamps=False,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        num_beams=1,
    )


def load_any(ckpt: str):
    from dqwhisper.models.load import load_whisper

    if ckpt.endswith(".dqw"):
        from dqwhisper.quant.export import load_exported

        return load_exported(Path(ckpt), mode="dequant", device="cpu")
    return load_whisper(ckpt, device="cpu")


def utterances(data_dir: str, max_utts: int | None):
    data = DataDir.load(data_dir)
    utts = data.utts[:max_utts] if max_utts else data.utts
    return data, utts


def mel_of(audio: np.ndarray, dims) -> torch.Tensor:
    return window_log_mel(audio, dims.n_mels, dims.n_audio_ctx)


GREEDY = DecodeConfig(max_new_tokens=MAX_NEW, temperatures=[0.0], tokens_per_second=None)  # plain greedy


def ours_tokens(model, mel: torch.Tensor, lang: str) -> list[int]:
    return list(decode_mels(model, mel[None], lang, cfg=GREEDY)[0].tokens)


def runaways(ids: dict[str, list[int]], texts: dict[str, str]) -> list[str]:
    """Utterances whose plain greedy hypothesis is a runaway by our decoder's rule: it hits the token cap or its
    text's gzip compression ratio exceeds the default threshold (2.4)."""
    from whisper.utils import compression_ratio

    thr = DecodeConfig().compression_ratio_threshold
    return sorted(k for k in ids if len(ids[k]) >= MAX_NEW or compression_ratio(texts[k]) > thr)


def score(utts, texts: dict[str, str]) -> dict:
    refs = {u.utt_id: u.text for u in utts}
    scores, _ = score_utterances(refs, texts, {u.utt_id: u.lang for u in utts})
    s = summarize(scores)
    return {
        "pooled": s["overall"]["error"],
        "avg_over_languages": s["overall"]["macro_error"],
        "per_language": {k: v["error"] for k, v in s["per_language"].items()},
    }


def cmd_hf_roundtrip(a) -> dict:
    from dqwhisper.interop.hf_export import export_hf
    from dqwhisper.models.load import load_whisper

    src = load_any(a.ckpt)
    out = Path(a.out) / "hf_roundtrip"
    export_hf(a.ckpt, out)
    back = load_whisper(out)
    ref = {
        k: v
        for k, v in src.state_dict().items()
        if not k.startswith(("ctc_head", "decoder.vocab_keep", "decoder.full_to_sub"))
    }
    got = back.state_dict()
    same = [k for k in ref if k in got and torch.equal(ref[k].float(), got[k])]
    from transformers import WhisperForConditionalGeneration

    hfm = WhisperForConditionalGeneration.from_pretrained(out).eval()
    n_hf = sum(p.numel() for p in hfm.parameters())
    resaved = Path(a.out) / "hf_resaved_by_transformers"  # a directory transformers itself wrote
    hfm.save_pretrained(resaved)
    back2 = load_whisper(resaved).state_dict()
    same2 = [k for k in ref if k in back2 and torch.equal(ref[k].float(), back2[k])]
    return {
        "ckpt": a.ckpt,
        "tensors": len(ref),
        "identical": len(same),
        "missing": sorted(set(ref) - set(got)),
        "identical_after_transformers_save_pretrained": len(same2),
        "params_ours": sum(v.numel() for v in ref.values() if v.dtype.is_floating_point),
        "params_transformers": n_hf,
    }


def cmd_hf_tokens(a) -> dict:
    from transformers import WhisperForConditionalGeneration

    from dqwhisper.interop.hf_export import export_hf

    torch.set_num_threads(a.threads)
    model = load_any(a.ckpt)
    out = Path(a.out) / "hf_export"
    notes = export_hf(a.ckpt, out)
    hfm = WhisperForConditionalGeneration.from_pretrained(out).eval()
    tok = default_tokenizer(model.dims.n_vocab)
    data, utts = utterances(a.data, a.max_utts)
    rows, ours_txt, hf_txt = [], {}, {}
    for u in utts:
        mel = mel_of(data.load_audio(u), model.dims)
        with torch.no_grad():
            mine = ours_tokens(model, mel, u.lang)
            seq = hf_greedy(hfm, mel, u.lang)
        seq = seq.sequences if hasattr(seq, "sequences") else seq
        theirs = [int(t) for t in seq[0] if int(t) < tok.eot]
        ours_txt[u.utt_id], hf_txt[u.utt_id] = tok.decode(mine), tok.decode(theirs)
        rows.append(
            {
                "utt": u.utt_id,
                "match": mine == theirs,
                "ours": tok.decode(mine),
                "hf": tok.decode(theirs),
                "n_ours": len(mine),
                "n_hf": len(theirs),
                "first_diff": next(
                    (i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs))
                ),
            }
        )
    n_match = sum(r["match"] for r in rows)
    return {
        "ckpt": a.ckpt,
        "export_notes": notes,
        "n_utts": len(rows),
        "exact_match": n_match,
        "exact_match_fraction": n_match / len(rows),
        "error_ours": score(utts, ours_txt),
        "error_transformers": score(utts, hf_txt),
        "mismatches": [r for r in rows if not r["match"]],
    }


def _whispercpp_texts(runner, data, utts, dims, mode: str, tok, ids_out: dict | None = None):
    texts, wall, audio_s = {}, 0.0, 0.0
    for u in utts:
        audio = data.load_audio(u)
        audio_s += len(audio) / 16000
        t0 = time.perf_counter()
        if mode == "mel":
            n = min(len(audio), dims.n_audio_ctx * 320) // 160
            mel = mel_of(audio, dims)[:, :n].numpy()
            ids = runner.decode_mel(mel, u.lang, max_tokens=MAX_NEW)
        else:
            ids = runner.decode_pcm(audio[: dims.n_audio_ctx * 320], u.lang, max_tokens=MAX_NEW)
        wall += time.perf_counter() - t0
        texts[u.utt_id] = tok.decode(ids)
        if ids_out is not None:
            ids_out[u.utt_id] = ids
    return texts, wall, audio_s


def _ours_texts(model, data, utts, tok, ids_out: dict | None = None) -> tuple[dict, float]:
    texts, wall = {}, 0.0
    for u in utts:
        audio = data.load_audio(u)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = ours_tokens(model, mel_of(audio, model.dims), u.lang)
        wall += time.perf_counter() - t0
        texts[u.utt_id] = tok.decode(ids)
        if ids_out is not None:
            ids_out[u.utt_id] = ids
    return texts, wall


def divergence(model, data, u, ours: list[int], theirs: list[int]) -> dict:
    """Where two greedy token sequences of one utterance part, and how close our model's call was there: on the
    common prefix (teacher forced, our weights), the logit of our token minus that of whisper.cpp's (a near-tie
    when small: then the runtimes' arithmetic, not the decoding rules, decides), and the rank of theirs in ours."""
    from whisper.tokenizer import get_tokenizer

    i = next((k for k, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
    tok = get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language=u.lang, task="transcribe")
    eot = tok.eot
    prompt = list(tok.sot_sequence_including_notimestamps)
    with torch.no_grad():
        feats = model.embed_audio(mel_of(data.load_audio(u), model.dims)[None])
        logits = model.logits(torch.tensor([prompt + ours[:i]]), feats)[0, -1].float()
    a = ours[i] if i < len(ours) else eot
    b = theirs[i] if i < len(theirs) else eot
    return {
        "utt": u.utt_id,
        "first_diff": i,
        "n_ours": len(ours),
        "n_whispercpp": len(theirs),
        "margin": float(logits[a] - logits[b]),
        "rank_of_whispercpp_token": int((logits > logits[b]).sum()),
    }


def cmd_ggml(a) -> dict:
    from dqwhisper.interop.ggml import load_ggml
    from dqwhisper.interop.ggml_export import export_ggml
    from dqwhisper.interop.whispercpp import WhisperCpp

    torch.set_num_threads(a.threads)
    out = Path(a.out) / f"{Path(a.ckpt).parent.name}_{a.type}.bin"
    info = export_ggml(a.ckpt, out, a.type)
    file_model = load_ggml(out)  # the weights the file holds, dequantized as ggml does
    tok = default_tokenizer(file_model.dims.n_vocab)
    data, utts = utterances(a.data, a.max_utts)
    ours_ids: dict = {}
    ours, ours_wall = _ours_texts(file_model, data, utts, tok, ours_ids)
    fa = {"default": None, "on": True, "off": False}[a.flash_attn]
    runner = WhisperCpp(out, n_threads=a.threads, flash_attn=fa)
    res = {
        "ckpt": a.ckpt,
        "file": str(out),
        "type": a.type,
        "bytes": info["bytes"],
        "audio_ctx": info["audio_ctx"],
        "notes": info["notes"],
        "n_utts": len(utts),
        "whispercpp_flash_attn": runner.flash_attn,
        "error_ours_same_weights": score(utts, ours),
        "runaways_ours_same_weights": runaways(ours_ids, ours),
        "rtf_ours": ours_wall / sum(len(data.load_audio(u)) / 16000 for u in utts),
    }
    for mode in a.modes.split(","):
        ids: dict = {}
        texts, wall, audio_s = _whispercpp_texts(runner, data, utts, file_model.dims, mode, tok, ids)
        e = score(utts, texts)
        res[f"error_whispercpp_{mode}"] = e
        res[f"ratio_{mode}_pooled"] = e["pooled"] / max(res["error_ours_same_weights"]["pooled"], 1e-9)
        res[f"ratio_{mode}_avg"] = e["avg_over_languages"] / max(
            res["error_ours_same_weights"]["avg_over_languages"], 1e-9
        )
        res[f"runaways_whispercpp_{mode}"] = runaways(ids, texts)
        res[f"same_text_{mode}"] = sum(texts[k] == ours[k] for k in ours)
        res[f"same_tokens_{mode}"] = sum(ids[k] == ours_ids[k] for k in ours)
        res[f"rtf_whispercpp_{mode}"] = wall / audio_s
        if a.diverge:
            rows = [divergence(file_model, data, u, ours_ids[u.utt_id], ids[u.utt_id]) for u in utts]
            rows = [r for r in rows if ours_ids[r["utt"]] != ids[r["utt"]]]
            m = sorted(abs(r["margin"]) for r in rows)
            res[f"divergence_{mode}"] = {
                "n": len(rows),
                "abs_margin_median": m[len(m) // 2] if m else None,
                "abs_margin_le_0.5": sum(x <= 0.5 for x in m),
                "abs_margin_le_1": sum(x <= 1.0 for x in m),
                "whispercpp_empty": sum(r["n_whispercpp"] == 0 for r in rows),
                "ours_at_cap": sum(r["n_ours"] >= MAX_NEW for r in rows),
                "rows": rows,
                "texts": {r["utt"]: {"ours": ours[r["utt"]], "whispercpp": texts[r["utt"]]} for r in rows},
            }
    if a.reference:
        ref_model = load_any(a.ckpt)
        ref_ids: dict = {}
        ref, _ = _ours_texts(ref_model, data, utts, tok, ref_ids)
        res["error_ours_original"] = score(utts, ref)
        res["runaways_ours_original"] = runaways(ref_ids, ref)
    return res


def cmd_speed(a) -> dict:
    from transformers import WhisperForConditionalGeneration

    from dqwhisper.interop.ggml_export import export_ggml
    from dqwhisper.interop.hf_export import export_hf
    from dqwhisper.interop.whispercpp import WhisperCpp

    torch.set_num_threads(a.threads)
    model = load_any(a.ckpt)
    data, utts = utterances(a.data, a.max_utts)
    audio_s = sum(len(data.load_audio(u)) / 16000 for u in utts)
    res = {"ckpt": a.ckpt, "n_utts": len(utts), "audio_seconds": audio_s, "threads": a.threads, "rtf": {}}
    runners = {}
    for t in a.types.split(","):
        out = Path(a.out) / f"speed_{t}.bin"
        export_ggml(a.ckpt, out, t)
        runners[t] = WhisperCpp(out, n_threads=a.threads)
    hf_dir = Path(a.out) / "speed_hf"
    export_hf(a.ckpt, hf_dir)
    hfm = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    dqw = None
    if a.dqw:
        from dqwhisper.quant.export import load_exported

        dqw = load_exported(Path(a.dqw), mode="int8", device="cpu")
    for rep in range(a.repeats):  # interleaved, so load changes hit every runtime alike
        for name in (
            ["ours_torch_fp32"]
            + (["ours_dqw_int8"] if dqw is not None else [])
            + ["transformers_fp32"]
            + [f"whispercpp_{t}" for t in runners]
        ):
            wall = 0.0
            for u in utts:
                audio = data.load_audio(u)
                t0 = time.perf_counter()
                with torch.no_grad():
                    mel = mel_of(audio, model.dims)
                    if name == "ours_torch_fp32":
                        ours_tokens(model, mel, u.lang)
                    elif name == "ours_dqw_int8":
                        ours_tokens(dqw, mel, u.lang)
                    elif name == "transformers_fp32":
                        hf_greedy(hfm, mel, u.lang)
                    else:
                        runners[name.split("_", 1)[1]].decode_pcm(
                            audio[: model.dims.n_audio_ctx * 320], u.lang, max_tokens=MAX_NEW
                        )
                wall += time.perf_counter() - t0
            res["rtf"].setdefault(name, []).append(wall / audio_s)
    res["rtf_best"] = {k: min(v) for k, v in res["rtf"].items()}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["hf-roundtrip", "hf-tokens", "ggml", "speed"])
    p.add_argument("ckpt")
    p.add_argument("data", nargs="?", default="data/demo/test")
    p.add_argument("out", nargs="?", default="exp/interop")
    p.add_argument("--type", default="f16")
    p.add_argument("--types", default="f16,q8_0,q4_0")
    p.add_argument("--modes", default="mel,pcm", help="whisper.cpp input: mel (ours, set_mel), pcm (its own mel)")
    p.add_argument("--reference", action="store_true", help="also decode the original checkpoint with ours")
    p.add_argument(
        "--flash_attn",
        choices=["default", "on", "off"],
        default="default",
        help="whisper.cpp's (default: the runner's)",
    )
    p.add_argument("--diverge", action="store_true", help="ggml: where and how near a tie ours and whisper.cpp part")
    p.add_argument("--dqw", default=None, help="speed: also time this .dqw export in int8 mode")
    p.add_argument("--max_utts", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tag", default=None, help="name of the result file (default: the command)")
    a = p.parse_args(argv)
    if a.cmd == "hf-roundtrip" and a.data != "data/demo/test" and a.out == "exp/interop":
        a.out = a.data
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res = {"hf-roundtrip": cmd_hf_roundtrip, "hf-tokens": cmd_hf_tokens, "ggml": cmd_ggml, "speed": cmd_speed}[a.cmd](a)
    res["command"] = " ".join(["python bench/interop.py"] + (argv if argv is not None else sys.argv[1:]))
    path = Path(a.out) / f"{a.tag or a.cmd}.json"
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False))
    brief = {k: v for k, v in res.items() if k not in ("mismatches",) and not k.startswith("divergence_")}
    brief.update(
        {
            k: {x: y for x, y in v.items() if x not in ("rows", "texts")}
            for k, v in res.items()
            if k.startswith("divergence_")
        }
    )
    print(json.dumps(brief, indent=1, ensure_ascii=False))
    if res.get("mismatches"):
        for r in res["mismatches"]:
            print(
                f"MISMATCH {r['utt']} (first diff at token {r['first_diff']}):\n  ours: {r['ours']}\n  hf:   {r['hf']}"
            )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
