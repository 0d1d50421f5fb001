#!/usr/bin/env python
"""Long-form transcription against per-utterance decoding of the same clips (one run, ratios only).

    python bench/longform.py --model M [--model M2 ...] [--data data/demo/test] [--languages ja,en,it,ru]
                             [--min-seconds 50] [--hour 3600] [--threads 2] [--json out.json]

Per language, held-out test clips are joined in id order with seeded pauses of 0.6-1.4 s into one recording of at
least --min-seconds (written as 16 kHz wav). Per model:
- per-utterance: the clips decoded one by one, in batches, as inference.py does (`decode_utterances`);
- long-form: the joined recording through `dqwhisper.transcribe.transcribe_file` (ffmpeg stream, VAD, chunks);
and both are scored against the same references (the clips' texts; long-form: joined, one "utterance" per
recording), so the ratio long-form / per-utterance error is on the same words. It also checks that segment times
are increasing, do not overlap and lie within the recording, and reports RTF of both in this one run.

--hour S: additionally a recording of S seconds (the --hour-language clip set repeated) is transcribed in a child
process by the first model, language given; its peak RSS (getrusage of the child) and RTF are reported against the
per-utterance RTF of the same clips measured in this run. A timing taken while other jobs share the CPU is only a
ratio within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dqwhisper.data.kaldi import DataDir  # noqa: E402
from dqwhisper.decoding import SAMPLE_RATE, DecodeConfig, decode_utterances  # noqa: E402
from dqwhisper.scoring import score_utterances, summarize  # noqa: E402
from dqwhisper.utils import DQWhisperError  # noqa: E402

DEFAULT_LANGUAGES = "ja,en,it,ru"


def join_clips(data: DataDir, utts: list, min_seconds: float, seed: int = 0) -> tuple[np.ndarray, list, list]:
    """(audio, used utterances, clip (start, end) seconds): clips in order with 0.6-1.4 s pauses, cycling through
    `utts` until at least `min_seconds`."""
    rng = np.random.default_rng(seed)
    parts, used, times, t = [], [], [], 0.0
    while t < min_seconds or not used:
        u = utts[len(used) % len(utts)]
        audio = data.load_audio(u)
        if parts:
            pause = np.zeros(int(SAMPLE_RATE * rng.uniform(0.6, 1.4)), np.float32)
            parts.append(pause)
            t += len(pause) / SAMPLE_RATE
        times.append((t, t + len(audio) / SAMPLE_RATE))
        parts.append(audio)
        used.append(u)
        t += len(audio) / SAMPLE_RATE
    return np.concatenate(parts), used, times


def check_segments(segments: list[dict], seconds: float) -> list[str]:
    """Problems with segment times: not increasing, overlapping, outside [0, seconds]."""
    bad, prev_end = [], 0.0
    for s in segments:
        if not (0 <= s["start"] < s["end"] <= seconds + 1e-3):
            bad.append(f"segment {s['id']} [{s['start']}, {s['end']}] outside [0, {seconds:.3f}] or empty")
        if s["start"] < prev_end - 1e-6:
            bad.append(f"segment {s['id']} starts at {s['start']} before the previous end {prev_end}")
        prev_end = s["end"]
    return bad


def per_utterance(model, data, utts, cfg) -> tuple[dict, float, float]:
    run = decode_utterances(model, data, utts, cfg, progress=False)
    return {h.utt_id: h.text for h in run.hyps}, run.wall_seconds, run.audio_seconds


def _peak_rss_child(cmd: list[str]) -> tuple[float, str]:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise DQWhisperError(f"hour run failed: {out.stderr.strip().splitlines()[-1:]}")
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, out.stdout  # KiB -> MiB


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="anything load_model reads; repeatable")
    p.add_argument("--data", default="data/demo/test")
    p.add_argument("--languages", default=DEFAULT_LANGUAGES)
    p.add_argument("--min-seconds", type=float, default=50.0)
    p.add_argument("--hour", type=float, default=0.0, help="seconds of the repeated recording (3600 = 1 h); 0 = skip")
    p.add_argument("--export-mode", default="int8", choices=["int8", "dequant"], help="how a .dqw model runs")
    p.add_argument("--hour-language", default="en")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-chunk-seconds", type=float, default=None)
    p.add_argument(
        "--merge", default="auto", choices=["auto", "yes", "no"], help="merge VAD regions up to the window (auto: 30 s)"
    )
    p.add_argument("--speech-pad-ms", type=int, default=None, help="VAD padding; default: VadConfig's")
    p.add_argument("--workdir", default=None, help="where the recordings are written (default: a temp dir)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dqwhisper.models.load import load_model
    from dqwhisper.transcribe import LongFormConfig, VadConfig, load_vad, transcribe_file

    load_vad()  # loaded once before timing, as the models are

    data = DataDir.load(args.data)
    langs = args.languages.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="longform_"))
    work.mkdir(parents=True, exist_ok=True)
    recordings = {}
    for lang in langs:
        utts = sorted((u for u in data.utts if u.lang == lang), key=lambda u: u.utt_id)
        if not utts:
            raise DQWhisperError(f"{args.data}: no {lang} utterances")
        audio, used, times = join_clips(data, utts, args.min_seconds)
        path = work / f"long_{lang}.wav"
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        recordings[lang] = dict(path=path, utts=used, seconds=len(audio) / SAMPLE_RATE)
        print(f"{lang}: {path} {len(audio) / SAMPLE_RATE:.1f} s, {len(used)} clips", flush=True)
    cfg = DecodeConfig(batch_size=args.batch_size)
    report = {"languages": langs, "min_seconds": args.min_seconds, "threads": args.threads, "models": []}
    vad = VadConfig() if args.speech_pad_ms is None else VadConfig(speech_pad_ms=args.speech_pad_ms)
    merge = {"auto": None, "yes": True, "no": False}[args.merge]
    for name in args.model:
        model = load_model(name, export_mode=args.export_mode)
        row = {"model": name, "window_seconds": model.dims.n_audio_ctx / 50, "per_language": {}}
        per_wall = per_audio = long_wall = long_audio = 0.0
        pooled = {"utt": [0, 0], "long": [0, 0]}
        for lang, rec in recordings.items():
            utts = list({u.utt_id: u for u in rec["utts"]}.values())  # each clip once
            hyps, wall, secs = per_utterance(model, data, utts, cfg)
            per_wall, per_audio = per_wall + wall, per_audio + secs
            row["per_language"].setdefault(lang, {})["per_utterance_rtf"] = wall / secs
            refs = {u.utt_id: u.text for u in utts}
            s_utt = summarize(score_utterances(refs, hyps, {u: lang for u in refs})[0])["overall"]
            lcfg = LongFormConfig(decode=cfg, vad=vad, max_chunk_seconds=args.max_chunk_seconds, merge=merge)
            t0 = time.perf_counter()
            result = transcribe_file(model, rec["path"], lang, lcfg)
            long_wall += time.perf_counter() - t0
            long_audio += rec["seconds"]
            sep = "" if lang == "ja" else " "
            ref_long = sep.join(u.text for u in rec["utts"])
            s_long = summarize(score_utterances({"rec": ref_long}, {"rec": result["text"]}, {"rec": lang})[0])
            s_long = s_long["overall"]
            # per-utterance errors counted over the clips as they occur in the recording (repeats included)
            n_err = {u.utt_id: 0 for u in utts}
            for sc in score_utterances(refs, hyps, {u: lang for u in refs})[0]:
                n_err[sc.utt_id] = (sc.errors, sc.n_ref)
            utt_errors = sum(n_err[u.utt_id][0] for u in rec["utts"])
            utt_ref = sum(n_err[u.utt_id][1] for u in rec["utts"])
            problems = check_segments(result["segments"], rec["seconds"])
            entry = {
                "seconds": rec["seconds"],
                "n_clips": len(rec["utts"]),
                "metric": s_utt["metric"],
                "per_utterance_error": utt_errors / max(utt_ref, 1),
                "long_form_error": s_long["n_errors"] / max(s_long["n_ref_units"], 1),
                "n_segments": len(result["segments"]),
                "segment_problems": problems,
                "n_runaway_segments": sum(s["runaway"] for s in result["segments"]),
                "detected_or_forced_language": result["language"],
            }
            entry["ratio"] = entry["long_form_error"] / max(entry["per_utterance_error"], 1e-9)
            pooled["utt"][0] += utt_errors
            pooled["utt"][1] += utt_ref
            pooled["long"][0] += s_long["n_errors"]
            pooled["long"][1] += s_long["n_ref_units"]
            row["per_language"][lang].update(entry)
            print(
                f"  {name} {lang}: per-utterance {100 * entry['per_utterance_error']:.1f}% long-form "
                f"{100 * entry['long_form_error']:.1f}% (x{entry['ratio']:.2f}), {len(result['segments'])} "
                f"segments, time problems: {len(problems)}",
                flush=True,
            )
        row["per_utterance_error"] = pooled["utt"][0] / max(pooled["utt"][1], 1)
        row["long_form_error"] = pooled["long"][0] / max(pooled["long"][1], 1)
        row["ratio"] = row["long_form_error"] / max(row["per_utterance_error"], 1e-9)
        row["per_utterance_rtf"] = per_wall / per_audio
        row["long_form_rtf"] = long_wall / long_audio
        row["rtf_ratio"] = row["long_form_rtf"] / row["per_utterance_rtf"]
        row["load_average"] = os.getloadavg()  # how busy the machine was (1, 5, 15 min) when the model was done
        print(
            f"{name}: pooled error per-utterance {100 * row['per_utterance_error']:.2f}% long-form "
            f"{100 * row['long_form_error']:.2f}% (x{row['ratio']:.3f}); RTF per-utterance "
            f"{row['per_utterance_rtf']:.3f} long-form {row['long_form_rtf']:.3f} (x{row['rtf_ratio']:.2f}); "
            f"load average {' '.join(f'{x:.2f}' for x in row['load_average'])}",
            flush=True,
        )
        report["models"].append(row)
        del model
    if args.hour > 0:
        report["hour"] = hour_run(args, data, langs, work, report["models"][0])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    return report


def hour_run(args, data, langs, work: Path, first: dict) -> dict:
    lang = args.hour_language
    utts = sorted((u for u in data.utts if u.lang == lang), key=lambda u: u.utt_id)
    audio, used, _ = join_clips(data, utts, args.hour, seed=1)
    path = work / "hour.flac"
    sf.write(path, audio, SAMPLE_RATE)
    seconds = len(audio) / SAMPLE_RATE
    del audio
    print(f"hour: {path} {seconds:.0f} s ({len(used)} clips), transcribing in a child process", flush=True)
    code = (
        "import sys, time, json, torch; torch.set_num_threads(int(sys.argv[3]));"
        "from dqwhisper.models.load import load_model; from dqwhisper.transcribe import transcribe_file;"
        "m = load_model(sys.argv[1]); t = time.perf_counter(); r = transcribe_file(m, sys.argv[2], sys.argv[4]);"
        "print(json.dumps({'wall': time.perf_counter() - t, 'n_segments': len(r['segments']),"
        " 'text_chars': len(r['text'])}))"
    )
    rss_mb, out = _peak_rss_child([sys.executable, "-c", code, first["model"], str(path), str(args.threads), lang])
    res = json.loads(out.strip().splitlines()[-1])
    rtf = res["wall"] / seconds
    base_rtf = first["per_language"][lang]["per_utterance_rtf"]
    row = {
        "model": first["model"],
        "language": lang,
        "seconds": seconds,
        "peak_rss_mb": rss_mb,
        "rtf": rtf,
        "per_utterance_rtf": base_rtf,
        "rtf_ratio": rtf / base_rtf,
        "n_segments": res["n_segments"],
        "text_chars": res["text_chars"],
    }
    print(
        f"hour: {seconds:.0f} s, peak RSS {rss_mb:.0f} MiB, RTF {rtf:.3f} = x{row['rtf_ratio']:.2f} the "
        f"per-utterance RTF of the clips in this run",
        flush=True,
    )
    return row


if __name__ == "__main__":
    try:
        main()
    except DQWhisperError as e:
        sys.exit(f"longform.py: error: {e}")
