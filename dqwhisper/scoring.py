"""WER / CER with jiwer and Whisper's text normalizers, per language and overall.

Each utterance is scored in its reference language (utt2lang): CER with all whitespace removed for the languages
written without spaces (`cer_languages`), WER otherwise. Text is normalized first with Whisper's
`EnglishTextNormalizer` for English and `BasicTextNormalizer` for every other language, unless `raw` is set.

Overall figures, stated in `results.json` too:
- `error`: pooled, total edit errors / total reference units over all languages (words of the WER languages and
  characters of the CER languages added together, so a character-scored language weighs by its character count);
- `macro_error`: the unweighted mean of the per-language errors.

CLI: `python -m dqwhisper.scoring --data DIR --hyp hyp.txt --out DIR` rescoring a hypothesis file;
`python -m dqwhisper.scoring --data DIR --merge PART_DIR... --out DIR` joining decode.sh's parallel parts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from dqwhisper.data.kaldi import DataDir, kaldi_lines
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, command, get_logger

UTT_DECODE = "utt_decode.tsv"  # per-utterance decoding details, written by dqwhisper.decoding.sets.write_utt_decode

log = get_logger(__name__)

CER_LANGUAGES = ("ja", "zh", "yue", "th", "lo", "my", "km", "bo")
AGGREGATION = (
    "error = total errors / total reference units (words of WER languages + characters of CER "
    "languages); macro_error = unweighted mean of the per-language errors"
)


@lru_cache(maxsize=None)
def _normalizer(english: bool) -> Callable[[str], str]:
    return EnglishTextNormalizer() if english else BasicTextNormalizer()


def normalize(text: str, lang: str, raw: bool = False) -> str:
    """Whisper's normalizer for `lang` (English or basic); `raw` keeps the text, only collapsing whitespace."""
    if not raw:
        text = _normalizer(lang == "en")(text)
    return " ".join(text.split())


def metric_for(lang: str, cer_languages: Iterable[str] = CER_LANGUAGES) -> str:
    return "cer" if lang in set(cer_languages) else "wer"


@dataclass
class UttScore:
    utt_id: str
    lang: str
    metric: str  # wer | cer
    ref: str  # the scored (normalized) reference
    hyp: str  # the scored (normalized) hypothesis
    n_ref: int  # reference words (wer) or characters without spaces (cer)
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def _counts(alignment: Sequence[jiwer.AlignmentChunk]) -> tuple[int, int, int]:
    sub = dele = ins = 0
    for chunk in alignment:
        if chunk.type == "substitute":
            sub += chunk.ref_end_idx - chunk.ref_start_idx
        elif chunk.type == "delete":
            dele += chunk.ref_end_idx - chunk.ref_start_idx
        elif chunk.type == "insert":
            ins += chunk.hyp_end_idx - chunk.hyp_start_idx
    return sub, dele, ins


def _process(metric: str, refs: list[str], hyps: list[str]):
    if metric == "cer":
        return jiwer.process_characters(["".join(r.split()) for r in refs], ["".join(h.split()) for h in hyps])
    return jiwer.process_words(refs, hyps)


def _alignment_lines(visualization: str) -> str:
    """jiwer's REF/HYP/marker lines of a one-sentence visualization (its header and blank lines dropped)."""
    lines = [line for line in visualization.splitlines() if line.strip() and not line.startswith("===")]
    return "\n".join(lines)


def score_utterances(
    refs: dict[str, str],
    hyps: dict[str, str],
    langs: dict[str, str],
    raw: bool = False,
    cer_languages: Iterable[str] = CER_LANGUAGES,
) -> tuple[list[UttScore], dict[str, str]]:
    """Score every utterance of `refs` (a missing hypothesis counts as empty) whose reference is not empty.

    A reference that is empty after normalization (blank, or only "[noise]"-like text the normalizers remove) has no
    error rate: it is left out with a warning (`empty_references` lists them); when every reference is empty this is
    an error. Returns the per-utterance scores (sorted by utterance id) and jiwer's alignment per utterance.
    """
    extra = sorted(set(hyps) - set(refs))
    if extra:
        raise DQWhisperError(f"{len(extra)} hypotheses have no reference (e.g. '{extra[0]}')")
    missing = sorted(set(refs) - set(hyps))
    if missing:
        log.warning("%d utterances have no hypothesis (scored as empty), e.g. %s", len(missing), missing[0])
    no_lang = sorted(set(refs) - set(langs))
    if no_lang:
        raise DQWhisperError(f"{len(no_lang)} utterances have no language (e.g. '{no_lang[0]}')")
    cer_languages = tuple(cer_languages)
    empty = set(empty_references(refs, langs, raw))
    if empty:
        if len(empty) == len(refs):
            raise DQWhisperError(
                f"all {len(refs)} reference transcripts are empty (after normalization): nothing to score"
            )
        log.warning(
            "%d utterance(s) have an empty reference transcript (after normalization) and are not scored, e.g. %s",
            len(empty),
            sorted(empty)[0],
        )
    scores, alignments = [], {}
    for utt in sorted(set(refs) - empty):
        lang = langs[utt]
        metric = metric_for(lang, cer_languages)
        ref, hyp = normalize(refs[utt], lang, raw), normalize(hyps.get(utt, ""), lang, raw)
        out = _process(metric, [ref], [hyp])
        scores.append(UttScore(utt, lang, metric, ref, hyp, len(out.references[0]), *_counts(out.alignments[0])))
        alignments[utt] = _alignment_lines(jiwer.visualize_alignment(out, show_measures=False, skip_correct=False))
    return scores, alignments


def empty_references(refs: dict[str, str], langs: dict[str, str], raw: bool = False) -> list[str]:
    """Utterances whose reference is empty once normalized as scoring normalizes it (sorted ids)."""
    return sorted(u for u, text in refs.items() if not normalize(text, langs.get(u, ""), raw))


def _rate(errors: int, n_ref: int) -> float:
    return errors / max(n_ref, 1)


def summarize(scores: Sequence[UttScore]) -> dict:
    """{"per_language": {lang: {metric, error, n_utts, n_errors, n_ref_units, substitutions, deletions,
    insertions}}, "overall": {metric, error, macro_error, n_utts, n_errors, n_ref_units, aggregation}}."""
    per_language = {}
    for lang in sorted({s.lang for s in scores}):
        mine = [s for s in scores if s.lang == lang]
        sub, dele, ins = (sum(getattr(s, k) for s in mine) for k in ("substitutions", "deletions", "insertions"))
        n_ref = sum(s.n_ref for s in mine)
        per_language[lang] = {
            "metric": mine[0].metric,
            "error": _rate(sub + dele + ins, n_ref),
            "n_utts": len(mine),
            "n_errors": sub + dele + ins,
            "n_ref_units": n_ref,
            "substitutions": sub,
            "deletions": dele,
            "insertions": ins,
        }
    metrics = {v["metric"] for v in per_language.values()}
    n_errors = sum(v["n_errors"] for v in per_language.values())
    n_ref = sum(v["n_ref_units"] for v in per_language.values())
    overall = {
        "metric": metrics.pop() if len(metrics) == 1 else "mixed",
        "error": _rate(n_errors, n_ref),
        "macro_error": sum(v["error"] for v in per_language.values()) / max(len(per_language), 1),
        "n_utts": len(scores),
        "n_errors": n_errors,
        "n_ref_units": n_ref,
        "aggregation": AGGREGATION,
    }
    return {"per_language": per_language, "overall": overall}


def format_table(summary: dict, title: str = "") -> str:
    """A readable table of a `summarize` result (plus rtf / tokens per second when present)."""
    lines = [title] if title else []
    lines.append(
        f"{'lang':<8}{'metric':<8}{'error %':>9}{'utts':>7}{'errors':>8}{'ref units':>11}{'sub':>7}{'del':>7}{'ins':>7}"
    )
    for lang, v in summary["per_language"].items():
        lines.append(
            f"{lang:<8}{v['metric']:<8}{100 * v['error']:>9.2f}{v['n_utts']:>7}{v['n_errors']:>8}"
            f"{v['n_ref_units']:>11}{v['substitutions']:>7}{v['deletions']:>7}{v['insertions']:>7}"
        )
    o = summary["overall"]
    lines.append(
        f"{'overall':<8}{o['metric']:<8}{100 * o['error']:>9.2f}{o['n_utts']:>7}{o['n_errors']:>8}"
        f"{o['n_ref_units']:>11}"
    )
    lines.append(f"macro average over {len(summary['per_language'])} languages: {100 * o['macro_error']:.2f} %")
    if o.get("n_runaways") is not None:
        per = ", ".join(f"{lang} {v.get('n_runaways', 0)}" for lang, v in summary["per_language"].items())
        lines.append(
            f"runaways (cap or compression test failed after fallback): {o['n_runaways']} ({per}); "
            f"{o.get('n_fallbacks', 0)} utterances fell back"
            + (
                " (first hypothesis failed: " + ", ".join(f"{k} {v}" for k, v in o["fallback_reasons"].items()) + ")"
                if o.get("fallback_reasons")
                else ""
            )
        )
    if summary.get("rtf") is not None:
        lines.append(
            f"RTF {summary['rtf']:.4f}"
            + (f", {summary['tokens_per_second']:.1f} tokens/s" if summary.get("tokens_per_second") is not None else "")
        )
    return "\n".join(lines)


def write_kaldi_text(path: str | Path, texts: dict[str, str]) -> None:
    body = "".join(" ".join([k, *v.split()]) + "\n" for k, v in sorted(texts.items()))
    atomic_write_bytes(path, body.encode("utf-8"))


def read_kaldi_text(path: str | Path) -> dict[str, str]:
    """`utt-id text` lines; the text may be empty."""

    out = {}
    for lineno, line in enumerate(kaldi_lines(Path(path).read_text(encoding="utf-8")), 1):
        if not line.strip():
            continue
        key, _, text = line.strip().partition(" ")
        if key in out:
            raise DQWhisperError(f"{path}:{lineno}: duplicate utterance '{key}'")
        out[key] = text.strip()
    return out


def write_results(
    out_dir: str | Path, scores: Sequence[UttScore], alignments: dict[str, str], summary: dict, title: str = ""
) -> str:
    """Write utt_errors.tsv, alignment.txt, results.json and summary.txt into `out_dir`; return the table."""
    out_dir = Path(out_dir)
    rows = ["utt_id\tlang\tmetric\tn_ref\tsub\tdel\tins\terrors\terror\tref\thyp"]
    rows += [
        f"{s.utt_id}\t{s.lang}\t{s.metric}\t{s.n_ref}\t{s.substitutions}\t{s.deletions}\t{s.insertions}\t"
        f"{s.errors}\t{_rate(s.errors, s.n_ref):.4f}\t{s.ref}\t{s.hyp}"
        for s in scores
    ]
    atomic_write_bytes(out_dir / "utt_errors.tsv", ("\n".join(rows) + "\n").encode("utf-8"))
    blocks = [
        f"{s.utt_id} ({s.lang}, {s.metric}: {s.errors} errors / {s.n_ref})\n{alignments.get(s.utt_id, '')}\n"
        for s in sorted(scores, key=lambda s: (s.lang, s.utt_id))
    ]
    atomic_write_bytes(out_dir / "alignment.txt", "\n".join(blocks).encode("utf-8"))
    atomic_write_bytes(out_dir / "results.json", (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
    table = format_table(summary, title)
    atomic_write_bytes(out_dir / "summary.txt", (table + "\n").encode("utf-8"))
    return table


def score_files(
    data_dir: str | Path, hyp_path: str | Path, raw: bool = False, cer_languages: Iterable[str] = CER_LANGUAGES
) -> tuple[list[UttScore], dict[str, str], dict]:
    """Score a Kaldi hyp file against a data dir's `text` and `utt2lang`."""

    data = DataDir.load(data_dir)
    hyps = read_kaldi_text(hyp_path)
    refs = {u.utt_id: u.text for u in data.utts if u.utt_id in hyps}
    langs = {u.utt_id: u.lang for u in data.utts}
    scores, alignments = score_utterances(refs, hyps, langs, raw, cer_languages)
    return scores, alignments, summarize(scores)


def merge_parts(
    part_dirs: Sequence[str | Path], data_dir: str | Path, out_dir: str | Path, elapsed_seconds: float | None = None
) -> str:
    """Join the outputs of `inference.py ... decode.shard=k/n` runs (scripts/decode.sh) and score them as one.

    hyp.txt / ref.txt are concatenated; the scoring switches come from the parts' results.json; `rtf` is the
    parts' summed decoding time over the audio (compute per audio second), `rtf_elapsed` the wall-clock time of
    the parallel run (when given) over the audio."""

    hyps: dict[str, str] = {}
    refs: dict[str, str] = {}
    parts = []
    for d in map(Path, part_dirs):
        if not (d / "results.json").is_file():
            raise DQWhisperError(f"{d}: no results.json (did this part fail?)")
        parts.append(json.loads((d / "results.json").read_text()))
        for target, name in ((hyps, "hyp.txt"), (refs, "ref.txt")):
            new = read_kaldi_text(d / name)
            overlap = set(new) & set(target)
            if overlap:
                raise DQWhisperError(f"{d / name}: utterance '{sorted(overlap)[0]}' is in two parts")
            target.update(new)
    first = parts[0]["decode"]
    langs = {u.utt_id: u.lang for u in DataDir.load(data_dir).utts}
    scores, alignments = score_utterances(refs, hyps, langs, first["raw"], first["cer_languages"])
    summary = summarize(scores)
    totals = {
        k: sum(p.get(k, 0) for p in parts)
        for k in ("wall_seconds", "audio_seconds", "n_tokens", "n_trimmed", "n_skipped")
    }
    skipped = {u: r for p in parts for u, r in (p.get("skipped") or {}).items()}
    summary.update(
        {
            "rtf": totals["wall_seconds"] / max(totals["audio_seconds"], 1e-9),
            "rtf_elapsed": None if elapsed_seconds is None else elapsed_seconds / max(totals["audio_seconds"], 1e-9),
            "tokens_per_second": totals["n_tokens"] / max(totals["wall_seconds"], 1e-9),
            **totals,
            **{
                k: parts[0][k]
                for k in ("model", "checkpoint", "test_set", "tag", "normalized", "device", "num_threads")
            },
            "n_jobs": len(parts),
            "decode": {**first, "shard": None},
            "skipped": skipped,
            "empty_references": empty_references(refs, langs, first["raw"]),
        }
    )
    if all("n_runaways" in p["overall"] for p in parts):
        for lang, entry in summary["per_language"].items():
            entry["n_runaways"] = sum(p["per_language"].get(lang, {}).get("n_runaways", 0) for p in parts)
        for key in ("n_runaways", "n_fallbacks"):
            summary["overall"][key] = sum(p["overall"].get(key, 0) for p in parts)
        reasons: dict[str, int] = {}
        for p in parts:
            for why, n in p["overall"].get("fallback_reasons", {}).items():
                reasons[why] = reasons.get(why, 0) + n
        summary["overall"]["fallback_reasons"] = dict(sorted(reasons.items()))
        summary["runaway_utts"] = sorted(u for p in parts for u in p.get("runaway_utts", []))
    out_dir = Path(out_dir)
    write_kaldi_text(out_dir / "hyp.txt", hyps)
    write_kaldi_text(out_dir / "ref.txt", refs)
    tables = [Path(d) / UTT_DECODE for d in part_dirs]
    if all(t.is_file() for t in tables):  # utt_decode.tsv (inference.py; absent for parts decoded before it was)
        header, rows = None, []
        for t in tables:
            lines = t.read_text(encoding="utf-8").splitlines()
            header = lines[0]
            rows += lines[1:]
        (out_dir / UTT_DECODE).write_text("\n".join([header, *sorted(rows)]) + "\n", encoding="utf-8")
    return write_results(
        out_dir,
        scores,
        alignments,
        summary,
        title=f"{summary['test_set']} | {summary['checkpoint']} | {summary['tag']} | {len(parts)} jobs",
    )


@command
def main(argv: Sequence[str] | None = None) -> int | None:
    p = argparse.ArgumentParser(description="Score a Kaldi hyp file against a data dir (per-language WER/CER).")
    p.add_argument("--data", required=True, help="data dir with text and utt2lang")
    p.add_argument("--hyp", help="hypotheses, 'utt-id text' lines; only these utterances are scored")
    p.add_argument("--out", help="folder for utt_errors.tsv, alignment.txt, results.json, summary.txt")
    p.add_argument("--raw", action="store_true", help="no Whisper normalizers")
    p.add_argument("--cer-languages", default=",".join(CER_LANGUAGES), help="comma-separated CER languages")
    p.add_argument("--extra", help="JSON object merged into results.json (rtf, model, checkpoint, ...)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="PART_DIR",
        help="join these decode.shard outputs into --out (--hyp is then not read)",
    )
    p.add_argument("--elapsed", type=float, help="with --merge: wall-clock seconds of the parallel run")
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        print(merge_parts(args.merge, args.data, args.out, args.elapsed))
        return
    if not args.hyp:
        p.error("--hyp is required (unless --merge)")
    scores, alignments, summary = score_files(args.data, args.hyp, args.raw, args.cer_languages.split(","))
    if args.extra:
        summary.update(json.loads(args.extra))
    if args.out:
        print(write_results(args.out, scores, alignments, summary, title=str(args.hyp)))
    else:
        print(format_table(summary, title=str(args.hyp)))


__all__ = [
    "CER_LANGUAGES",
    "UttScore",
    "normalize",
    "empty_references",
    "metric_for",
    "score_utterances",
    "summarize",
    "format_table",
    "write_results",
    "write_kaldi_text",
    "read_kaldi_text",
    "score_files",
    "merge_parts",
]

if __name__ == "__main__":
    raise SystemExit(main())
