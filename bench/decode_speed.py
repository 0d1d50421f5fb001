#!/usr/bin/env python
"""Decoding speed of the teacher and the student, measured in one run on the same utterances.

Systems (each decodes every utterance with its language forced, no timestamps, temperature 0):
  teacher-openai-fp32     the anchor: openai-whisper fp32 (greedy unless --beam-size), one utterance at a time
  teacher-fw-int8         faster-whisper int8 on the teacher's CT2 dir (exp/models/base-ct2)
  teacher-fw-fp32         faster-whisper fp32 (with --fw-fp32): its agreement with the anchor is the parity check
  student-float           --student PATH: a float student checkpoint through our decoding (its own audio window)
  <name>-float            --student-export PATH (repeatable; a model.dqw or an experiment dir with export/model.dqw):
                          the export with its weights dequantized to float (decode.kernel=float: its "float self")
  <name>-ours             the same export through our kernels as chosen by decode.kernel=auto (what was trained)
  <name>-ours-int8        the same export with int8 activations through fbgemm (decode.kernel=fbgemm), when auto
                          chose otherwise: the like-for-like partner of CTranslate2's int8
  <name>-ours-bw<S>s      with --batch-window S: the same, each batch's encoder window cut to its longest utterance + S
                          seconds (decode.batch_window=S)
  <name>-ct2-int8         CTranslate2 int8 on the export's CT2 conversion (quant/ct2_export.py; written once under
                          --ct2-cache), same windows, same threads
  An experiment dir whose config.yaml sets decode.batch_window (a student trained on per-utterance windows,
  data.batch_window) is timed with it in its -float, -ours and -ct2-int8 rows, as inference.py decodes it; the
  whisper.cpp rows keep the whole window. Ours then mixes windows in a batch (each row encoded and cross-attended
  on its own window, decode.group_windows=false); CTranslate2 has no per-row window, so its row gets batches of one
  window each (what it can run as trained), and two more rows show the batching alone:
  <name>-ours-grouped     ours on CTranslate2's batches (decode.group_windows=true)
  <name>-ct2-int8-padded  CTranslate2 on our batches, each padded to its longest row's window (shorter rows see
                          padding they were not trained on: its transcripts can differ)
  <name>-whispercpp-<type> whisper.cpp (--ggml-types, e.g. q8_0,q4_0) on the export's `export-ggml` file, our log-mel,
                          same window, same threads, same token cap
  student-fw-ct2          --student-ct2 DIR: faster-whisper on the student's CT2 export (--student-ct2-compute)

Prints per system (--repeat N: the fastest of N timed passes): RTF (wall seconds / audio seconds, model loading and one
warm-up utterance excluded), CPU RTF (this process's CPU seconds, all its threads, / audio seconds: time lost to other
jobs on a shared machine does not count), speed relative to the anchor (anchor RTF / RTF), tokens per second, the pooled
error (when the data has references) and the fraction of transcripts identical to the anchor's; per student, ours vs
CTranslate2 int8 (wall, CPU and tokens/s ratios). The CTranslate2 rows stop at our decoder's token cap per utterance, so
a runaway costs both sides alike. The students' rows (ours and CTranslate2's) decode --batch-size utterances per call
(default 8, as inference.py), in the batches inference.py forms; the anchor, faster-whisper and whisper.cpp one at a
time, as their transcribe functions do. Machine load moves absolute numbers: compare the ratios of one run. The header
names the CPU, its SIMD flags, an AVX2 emulation (scripts/emulate_avx2.sh) and the load average. Example:
  nice python bench/decode_speed.py --data data/demo/test --max-utts 12 --threads 2 --fw-fp32
  python bench/decode_speed.py --student-export exp/demo/student_kd_dm_q8 --student-export exp/demo/student_kd_dm_q4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dqwhisper.data.kaldi import DataDir  # noqa: E402
from dqwhisper.decoding import DecodeConfig, decode_utterances  # noqa: E402
from dqwhisper.scoring import score_utterances, summarize  # noqa: E402
from dqwhisper.utils import DQWhisperError  # noqa: E402

SAMPLE_RATE = 16000


class Preloaded:
    """The audio of the chosen utterances, read once, so that file reading is not timed."""

    def __init__(self, data: DataDir, utts: list):
        self.audio = {u.utt_id: data.load_audio(u) for u in utts}

    def load_audio(self, utt):
        return self.audio[utt.utt_id]

    def duration(self, utt):
        return len(self.audio[utt.utt_id]) / SAMPLE_RATE


Timing = tuple[dict[str, str], float, int, float]  # (transcripts, wall seconds, tokens, process CPU seconds)
WARM_ALL = False  # --warmup all: every system decodes the whole set once, untimed, before its timed pass
REPEAT = 1  # --repeat N: N timed passes per system, the fastest (wall) kept


def fastest(timed) -> Timing:
    """`timed() -> Timing` REPEAT times; the pass with the least wall time (a shared VM only ever adds time)."""
    return min((timed() for _ in range(REPEAT)), key=lambda t: t[1])


def time_ours(model, data: Preloaded, utts: list, cfg: DecodeConfig, mel_padding: str) -> Timing:
    cfg = replace(cfg, mel_padding=mel_padding)
    decode_utterances(model, data, utts if WARM_ALL else utts[:1], cfg, progress=False)  # warm-up

    def timed():
        cpu = time.process_time()
        run = decode_utterances(model, data, utts, cfg, progress=False)
        cpu = time.process_time() - cpu
        return {h.utt_id: h.text for h in run.hyps}, run.wall_seconds, run.n_tokens, cpu

    return fastest(timed)


def time_each(one, utts: list) -> Timing:
    """Run `one(utt) -> (text, n_tokens)` once to warm up, then over every utterance: (texts, wall seconds, tokens,
    CPU seconds of this process, all its threads)."""

    def run(batch):
        text, n = one(batch[0])
        return {batch[0].utt_id: text}, n

    return time_batches(run, [[u] for u in utts])


def time_batches(run, batches: list[list]) -> Timing:
    """time_each for `run(batch) -> ({utt_id: text}, n_tokens)` over batches of utterances (warm-up: the first
    batch's first utterance, or every batch with --warmup all; then the fastest of --repeat timed passes)."""
    for batch in batches if WARM_ALL else [batches[0][:1]]:
        run(batch)

    def timed():
        texts, n_tokens = {}, 0
        cpu, start = time.process_time(), time.perf_counter()
        for batch in batches:
            out, n = run(batch)
            texts.update(out)
            n_tokens += n
        return texts, time.perf_counter() - start, n_tokens, time.process_time() - cpu

    return fastest(timed)


def token_caps(utts: list, data: Preloaded, cfg: DecodeConfig, model, window_seconds: float) -> dict[str, int]:
    """Our decoder's token cap per utterance (decoding.token_cap on the windowed duration), for the CT2 rows."""
    from dqwhisper.decoding import token_cap

    return {u.utt_id: token_cap(min(data.duration(u), window_seconds), cfg, model) for u in utts}


def batches_like_ours(utts: list, data: Preloaded, cfg: DecodeConfig, n_ctx: int, mixed: bool = False) -> list[list]:
    """The batches our decoding forms (decoding.decode_utterances): one language each, longest first; with
    decode.batch_window, one window each unless `mixed` (decode.group_windows=false)."""
    from dqwhisper.decoding.utterances import utterance_batches

    groups: dict[str, list] = {}
    for u in utts:
        groups.setdefault(u.lang, []).append(u)
    return [b for members in groups.values() for b in utterance_batches(data, members, None, cfg, n_ctx, mixed)]


def own_decode_config(spec: str, cfg: DecodeConfig) -> DecodeConfig:
    """`cfg` with the experiment's own decode.batch_window (its config.yaml) when `spec` is an experiment dir: a
    student trained on per-utterance windows (data.batch_window) is timed the way inference.py decodes it."""
    path = Path(spec) / "config.yaml"
    if not path.is_file():
        return cfg
    from omegaconf import OmegaConf

    bw = OmegaConf.load(path).get("decode", {}).get("batch_window")
    return cfg if bw is None else replace(cfg, batch_window=float(bw))


def time_ct2_generate(
    path: str,
    compute_type: str,
    data: Preloaded,
    utts: list,
    threads: int,
    window_seconds: float,
    caps: dict[str, int] | None = None,
    batch_size: int = 1,
    batch_window: float | None = None,
    mixed: bool = False,
) -> Timing:
    """Greedy CTranslate2 decoding on our own mel for the export's window (log-mel included in the time). caps: the
    most tokens per utterance (our decoder's cap, so that a runaway costs both sides alike; a batch stops at its
    members' largest cap); default 224. batch_size > 1: the batches our decoding forms, one generate call each.
    batch_window: each batch's window cut as decode.batch_window cuts ours (CTranslate2 takes any mel length), one
    window a batch, or with `mixed` our batches of mixed windows, each padded to its longest row's window."""
    import ctranslate2
    import numpy as np
    from whisper.tokenizer import get_tokenizer

    from dqwhisper.data.dataset import window_log_mel
    from dqwhisper.models.student import margin_frames

    model = ctranslate2.models.Whisper(path, device="cpu", compute_type=compute_type, intra_threads=threads)
    tok = get_tokenizer(multilingual=True)
    n_ctx = round(window_seconds * 50)
    cfg = DecodeConfig(batch_size=batch_size, batch_window=batch_window)

    def run(batch):
        longest = max(len(data.audio[u.utt_id]) for u in batch) / SAMPLE_RATE
        ctx = margin_frames(min(longest, window_seconds), batch_window, n_ctx)
        mel = np.stack([window_log_mel(data.audio[u.utt_id], model.n_mels, ctx).numpy() for u in batch])
        prompts = [[tok.sot, tok.to_language_token(u.lang), tok.transcribe, tok.no_timestamps] for u in batch]
        cap = max(224 if caps is None else caps[u.utt_id] for u in batch)
        results = model.generate(  # CTranslate2's Whisper samples at most max_length // 2 tokens
            ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), prompts, beam_size=1, max_length=2 * cap
        )
        ids = [r.sequences_ids[0] for r in results]
        return {u.utt_id: tok.decode(i).strip() for u, i in zip(batch, ids)}, sum(len(i) for i in ids)

    return time_batches(run, batches_like_ours(utts, data, cfg, n_ctx, mixed))


def time_whispercpp(
    path: Path, data: Preloaded, utts: list, threads: int, window_seconds: float, caps: dict[str, int]
) -> Timing:
    """whisper.cpp (pywhispercpp, the `ggml` extra) on our log-mel of the audio in the export's window (log-mel
    included in the time; whisper.cpp pads it), greedy, language forced, stopped at our token cap per utterance."""
    from whisper.tokenizer import get_tokenizer

    from dqwhisper.data.dataset import window_log_mel
    from dqwhisper.interop.whispercpp import WhisperCpp

    runner = WhisperCpp(path, n_threads=threads)
    tok = get_tokenizer(multilingual=True)
    n_ctx = round(window_seconds * 50)

    def one(utt):
        audio = data.audio[utt.utt_id]
        frames = min(len(audio), n_ctx * 320) // 160
        mel = window_log_mel(audio, runner.n_mels, n_ctx).numpy()[:, :frames]
        ids = runner.decode_mel(mel, utt.lang, max_tokens=caps[utt.utt_id])
        return tok.decode(ids).strip(), len(ids)

    return time_each(one, utts)


def time_faster_whisper(
    path: str, compute_type: str, data: Preloaded, utts: list, threads: int, beam_size: int, window_seconds: int | None
) -> Timing:
    from faster_whisper import WhisperModel

    model = WhisperModel(path, device="cpu", compute_type=compute_type, cpu_threads=threads)
    options = dict(
        beam_size=beam_size,
        temperature=0.0,
        without_timestamps=True,
        condition_on_previous_text=False,
        vad_filter=False,
        no_speech_threshold=None,
        log_prob_threshold=None,
        compression_ratio_threshold=None,
        chunk_length=window_seconds,
    )

    def one(utt):
        segments, _ = model.transcribe(data.audio[utt.utt_id], language=utt.lang, **options)
        segments = list(segments)
        return "".join(s.text for s in segments).strip(), sum(len(s.tokens) for s in segments)

    return time_each(one, utts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="data/demo/test", help="Kaldi data dir to decode")
    p.add_argument("--max-utts", type=int, default=12, help="utterances decoded, spread over the languages; 0 = all")
    p.add_argument("--threads", type=int, default=2, help="torch / CTranslate2 threads")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--teacher", default=str(ROOT / "exp/models/base.pt"))
    p.add_argument("--teacher-ct2", default=str(ROOT / "exp/models/base-ct2"))
    p.add_argument("--fw-fp32", action="store_true", help="also faster-whisper fp32 on the teacher")
    p.add_argument("--student", help="float student checkpoint (.pt)")
    p.add_argument(
        "--student-export",
        action="append",
        default=[],
        help="exported student: model.dqw or an experiment dir (repeatable)",
    )
    p.add_argument("--ct2-cache", default="/tmp/dqw-bench-ct2", help="where the students' CT2 int8 exports go")
    p.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 rows of --student-export")
    p.add_argument(
        "--ggml-types",
        default="",
        help="comma-separated whisper.cpp weight types (q8_0, q4_0, f16 ...): a whisper.cpp row per --student-export "
        "and type (its `dqwhisper export-ggml` file, written once under --ct2-cache; needs the ggml extra)",
    )
    p.add_argument("--student-ct2", help="CT2 export of the student (export/ct2)")
    p.add_argument("--student-ct2-compute", default="int8", help="compute type for --student-ct2")
    p.add_argument(
        "--student-window",
        type=float,
        help="audio window (s) of the CT2 student; default: from --student or --student-export, else 30",
    )
    p.add_argument(
        "--teacher-mel-padding",
        default="zeros",
        choices=["zeros", "audio"],
        help="the teacher's mel: zeros = as openai transcribe / faster-whisper; audio = as training",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="utterances per call of the students' rows, ours and CTranslate2's alike (batches of one language, "
        "longest first, as inference.py forms them; 8 = decode.batch_size's default); the anchor and the "
        "faster-whisper / whisper.cpp rows always decode one utterance at a time, as their transcribe functions do",
    )
    p.add_argument(
        "--batch-window",
        type=float,
        help="also time each --student-export through our kernels with decode.batch_window=S (a row <name>-ours-bwSs)",
    )
    p.add_argument(
        "--warmup",
        choices=("one", "all"),
        default="one",
        help="untimed warm-up per system: one utterance (default), or the whole set (every batch shape seen once: "
        "with decode.batch_window each batch has its own window)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed passes per system, the fastest kept (on a shared VM other jobs only ever add time; 3 for the "
        "README's tables)",
    )
    p.add_argument("--json", help="write the table as JSON here")
    p.add_argument("--dump", help="folder for each system's transcripts (<system>.txt, Kaldi lines)")
    p.add_argument(
        "--only",
        help="comma-separated systems to run (default: all available); without the anchor there are no speed ratios",
    )
    p.add_argument("--against", help="a hyp.txt (e.g. inference.py's) to compare every system's transcripts with")
    args = p.parse_args(argv)
    global WARM_ALL, REPEAT
    WARM_ALL = args.warmup == "all"
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    REPEAT = args.repeat

    torch.set_num_threads(args.threads)
    from dqwhisper.quant import kernels

    print(kernels.describe_cpu(args.threads), flush=True)
    data = DataDir.load(args.data)
    if args.max_utts <= 0:
        args.max_utts = len(data.utts)
    by_lang: dict[str, list] = {}
    for u in data.utts:
        by_lang.setdefault(u.lang, []).append(u)
    utts = []  # round-robin over languages so a small sample covers all of them
    while len(utts) < min(args.max_utts, len(data.utts)):
        for lang in sorted(by_lang):
            if by_lang[lang] and len(utts) < args.max_utts:
                utts.append(by_lang[lang].pop(0))
    utts.sort(key=lambda u: u.utt_id)
    audio = Preloaded(data, utts)
    audio_seconds = sum(len(a) for a in audio.audio.values()) / SAMPLE_RATE
    print(
        f"{len(utts)} utterances, {audio_seconds:.1f} s of audio, languages {sorted({u.lang for u in utts})}, "
        f"{args.threads} threads, beam {args.beam_size}, the fastest of {REPEAT} timed pass(es) per system",
        flush=True,
    )
    # temperature 0 only, as the CTranslate2 / faster-whisper rows: no fallback re-decoding in the timings
    cfg = DecodeConfig(beam_size=args.beam_size, batch_size=args.batch_size, temperatures=[0.0])

    from dqwhisper.models.load import load_model

    systems = []
    window = args.student_window

    only = None if args.only is None else set(args.only.split(","))

    def add(name, fn):
        if only is not None and not any(name.startswith(o) for o in only):
            return
        texts, wall, n_tokens, cpu = fn()
        systems.append(dict(name=name, texts=texts, wall=wall, n_tokens=n_tokens, cpu=cpu))
        print(f"  {name}: {wall:.1f} s ({cpu:.1f} s CPU)", flush=True)

    # the anchor as openai-whisper's transcribe runs it: one utterance at a time, whatever --batch-size
    anchor_cfg = replace(cfg, batch_size=1)
    add(
        "teacher-openai-fp32",
        lambda: time_ours(load_model(args.teacher), audio, utts, anchor_cfg, args.teacher_mel_padding),
    )
    if Path(args.teacher_ct2, "model.bin").is_file():
        add(
            "teacher-fw-int8",
            lambda: time_faster_whisper(args.teacher_ct2, "int8", audio, utts, args.threads, args.beam_size, None),
        )
        if args.fw_fp32:
            add(
                "teacher-fw-fp32",
                lambda: time_faster_whisper(
                    args.teacher_ct2, "float32", audio, utts, args.threads, args.beam_size, None
                ),
            )
    else:
        print(f"  (no {args.teacher_ct2}/model.bin: faster-whisper rows skipped)")
    if args.student:
        student = load_model(args.student)
        window = window or student.dims.n_audio_ctx / 50
        add("student-float", lambda: time_ours(student, audio, utts, cfg, "zeros"))
    students = []
    for spec in args.student_export:
        path = Path(spec) / "export" / "model.dqw" if Path(spec).is_dir() else Path(spec)
        name = path.parent.parent.name if path.parent.name == "export" else path.stem
        students.append((name, path, own_decode_config(spec, cfg)))
    if students:
        from dqwhisper.quant.export import load_exported
        from dqwhisper.quant.quantized import log_kernels

    for name, path, scfg in students:
        batch = args.batch_size * args.beam_size
        ref = load_exported(path, mode="float", batch=batch)
        window = window or ref.dims.n_audio_ctx / 50
        if scfg.batch_window is not None:
            print(f"    {name}: its own decode.batch_window={scfg.batch_window:g} (trained on those windows)")
        add(f"{name}-float", lambda: time_ours(ref, audio, utts, scfg, "zeros"))
        ours = load_exported(path, mode="auto", batch=batch)
        print(f"    {name}-ours kernels: {log_kernels(ours)}", flush=True)
        add(f"{name}-ours", lambda: time_ours(ours, audio, utts, scfg, "zeros"))
        if args.batch_window is not None:
            bw = replace(scfg, batch_window=args.batch_window)
            add(f"{name}-ours-bw{args.batch_window:g}s", lambda: time_ours(ours, audio, utts, bw, "zeros"))
        mixed = scfg.batch_window is not None and not scfg.group_windows  # ours mixes windows in a batch
        if mixed:
            grouped = replace(scfg, group_windows=True)
            add(f"{name}-ours-grouped", lambda: time_ours(ours, audio, utts, grouped, "zeros"))
        if set(log_kernels(ours)) != {"fbgemm"}:
            int8 = load_exported(path, mode="fbgemm", batch=batch)
            print(f"    {name}-ours-int8 kernels: {log_kernels(int8)}", flush=True)
            add(f"{name}-ours-int8", lambda: time_ours(int8, audio, utts, scfg, "zeros"))
        if not args.no_ct2:
            from dqwhisper.quant.ct2_export import export_ct2

            ct2_dir = Path(args.ct2_cache) / name
            if not (ct2_dir / "model.bin").is_file() or (ct2_dir / "model.bin").stat().st_mtime < path.stat().st_mtime:
                export_ct2(path, ct2_dir)
            seconds = ref.dims.n_audio_ctx / 50
            caps = token_caps(utts, audio, cfg, ref, seconds)
            add(
                f"{name}-ct2-int8",
                lambda: time_ct2_generate(
                    str(ct2_dir), "int8", audio, utts, args.threads, seconds, caps, args.batch_size, scfg.batch_window
                ),
            )
            if mixed:
                add(
                    f"{name}-ct2-int8-padded",
                    lambda: time_ct2_generate(
                        str(ct2_dir),
                        "int8",
                        audio,
                        utts,
                        args.threads,
                        seconds,
                        caps,
                        args.batch_size,
                        scfg.batch_window,
                        mixed=True,
                    ),
                )
        for ggml_type in filter(None, args.ggml_types.split(",")):
            from dqwhisper.interop.ggml_export import export_ggml

            seconds = ref.dims.n_audio_ctx / 50
            caps = token_caps(utts, audio, cfg, ref, seconds)
            ggml_file = Path(args.ct2_cache) / f"{name}-{ggml_type}.bin"
            if not ggml_file.is_file() or ggml_file.stat().st_mtime < path.stat().st_mtime:
                export_ggml(path, ggml_file, ggml_type)
            add(
                f"{name}-whispercpp-{ggml_type}",
                lambda: time_whispercpp(ggml_file, audio, utts, args.threads, seconds, caps),
            )
    if args.student_ct2 and window and window < 30:
        # faster-whisper's transcribe pads features to 30 s; a short-window export runs in CTranslate2 directly
        add(
            f"student-ct2-{args.student_ct2_compute}",
            lambda: time_ct2_generate(
                args.student_ct2, args.student_ct2_compute, audio, utts, args.threads, window, None, args.batch_size
            ),
        )
    elif args.student_ct2:
        add(
            f"student-fw-ct2-{args.student_ct2_compute}",
            lambda: time_faster_whisper(
                args.student_ct2,
                args.student_ct2_compute,
                audio,
                utts,
                args.threads,
                args.beam_size,
                round(window) if window else None,
            ),
        )

    refs = {u.utt_id: u.text for u in utts}
    langs = {u.utt_id: u.lang for u in utts}
    anchor = next((s for s in systems if s["name"] == "teacher-openai-fp32"), None)
    against = None
    if args.against:
        from dqwhisper.scoring import read_kaldi_text

        against = read_kaldi_text(args.against)
        missing = sorted(set(refs) - set(against))
        if missing:
            raise DQWhisperError(f"{args.against} has no transcript for {len(missing)} utterances (e.g. {missing[0]})")

    def same(texts, other):
        return None if other is None else sum(texts[u] == other[u] for u in refs) / len(refs)

    def fmt(x, scale=1.0, suffix=""):
        return "-" if x is None else f"{scale * x:.2f}{suffix}"

    rows = []
    print(
        f"\n{'system':<26}{'RTF':>8}{'CPU RTF':>9}{'speed vs anchor':>17}{'tokens/s':>10}{'error %':>9}"
        f"{'same as anchor':>16}"
        f"{'same as --against':>19}"
    )
    for s in systems:
        rtf = s["wall"] / audio_seconds
        row = dict(
            system=s["name"],
            rtf=rtf,
            cpu_rtf=s["cpu"] / audio_seconds,
            n_tokens=s["n_tokens"],
            speed_vs_anchor=None if anchor is None else anchor["wall"] / s["wall"],
            tokens_per_second=s["n_tokens"] / s["wall"],
            error=summarize(score_utterances(refs, s["texts"], langs)[0])["overall"]["error"],
            same_as_anchor=same(s["texts"], None if anchor is None else anchor["texts"]),
            same_as_against=same(s["texts"], against),
        )
        rows.append(row)
        print(
            f"{s['name']:<26}{rtf:>8.3f}{row['cpu_rtf']:>9.3f}{fmt(row['speed_vs_anchor'], suffix='x'):>17}"
            f"{row['tokens_per_second']:>10.1f}{fmt(row['error'], 100):>9}{fmt(row['same_as_anchor'], 100, '%'):>16}"
            f"{fmt(row['same_as_against'], 100, '%'):>19}"
        )
    by_name = {r["system"]: r for r in rows}
    texts_of = {s["name"]: s["texts"] for s in systems}
    if students:
        print()
    for name, _, _ in students:
        f, o = by_name.get(f"{name}-float"), by_name.get(f"{name}-ours")
        c2 = by_name.get(f"{name}-ct2-int8")
        line = f"{name}: ours {f['rtf'] / o['rtf']:.2f}x its float self" if f and o else f"{name}:"
        print(line)
        pairs = [(o, c2), (by_name.get(f"{name}-ours-int8"), c2)]
        pairs += [(by_name.get(f"{name}-ours-grouped"), c2), (o, by_name.get(f"{name}-ct2-int8-padded"))]
        for mine, c2 in pairs:
            if mine and c2:
                same_c2 = same(texts_of[mine["system"]], texts_of[c2["system"]])
                print(
                    f"  {mine['system']} / {c2['system']}: time {mine['rtf'] / c2['rtf']:.2f}x (wall), "
                    f"{mine['cpu_rtf'] / c2['cpu_rtf']:.2f}x (CPU); tokens/s {mine['tokens_per_second']:.1f} vs "
                    f"{c2['tokens_per_second']:.1f} ({mine['tokens_per_second'] / c2['tokens_per_second']:.2f}x); "
                    f"tokens {mine['n_tokens']} vs {c2['n_tokens']}; same transcript {100 * same_c2:.0f}%"
                )
    fastest = min(
        (r for r in rows if r["system"].endswith(("-ours", "-ours-int8"))), key=lambda r: r["rtf"], default=None
    )
    if fastest and anchor:
        print(
            f"fastest student through our kernels: {fastest['system']}, "
            f"{fastest['speed_vs_anchor']:.2f}x openai-whisper fp32"
        )
    if args.dump:
        from dqwhisper.scoring import write_kaldi_text

        for s in systems:
            write_kaldi_text(Path(args.dump) / f"{s['name']}.txt", s["texts"])
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(
                    n_utts=len(utts),
                    audio_seconds=audio_seconds,
                    threads=args.threads,
                    beam_size=args.beam_size,
                    rows=rows,
                ),
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    try:
        main()
    except DQWhisperError as e:
        sys.exit(f"decode_speed.py: error: {e}")
