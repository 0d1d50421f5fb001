"""The demo report: exp/demo/RESULTS.md, results.json and wer_vs_size.png from decoded models.

    python -m dqwhisper.report --out exp/demo --teacher-fp16-bytes N \
        --row NAME RESULTS_JSON MODEL_FILE [--row ...] [--stage-times exp/demo/stage_times.tsv]

Each row names a model, the results.json that inference.py wrote for it on the test set, and the file that holds
the model as it would ship (the exported file for quantized students). Parameters are counted from that file.

    --compare A B   (repeatable) A against B by a paired bootstrap over test utterances (resampled within each
                    language, the same draw for both models, the language-averaged error recomputed each time;
                    with --utt2spk the voices are resampled first, then each drawn voice's utterances):
                    A's relative change in average error, its 95% interval and the share of draws where A is better.
                    Read from the utt_errors.tsv next to each row's results.json; written to comparisons.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dqwhisper.data.kaldi import read_kaldi_map
from dqwhisper.models.student import read_checkpoint
from dqwhisper.quant.dqw import read_header
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, command, get_logger

log = get_logger(__name__)


def count_params(model_file: Path) -> int:
    """Weights of the model in `model_file`: every float or quantized tensor of an exported .dqw file (not scales,
    zero points or id tables), or every state-dict entry of a checkpoint but the sinusoid table and id tables."""
    if model_file.suffix == ".dqw":
        header, _ = read_header(model_file)
        return sum(math.prod(e["shape"]) for e in header["tensors"].values() if e["kind"] in ("float", "quantized"))

    sd = read_checkpoint(model_file)["model_state_dict"]
    buffers = ("encoder.positional_embedding", "decoder.vocab_keep", "decoder.full_to_sub")
    return sum(v.numel() for k, v in sd.items() if k not in buffers)


def build_row(
    name: str, results_json: Path, model_file: Path, teacher_fp16_bytes: int, speakers: dict[str, str] | None = None
) -> dict:
    if not results_json.exists():
        raise DQWhisperError(f"row {name}: {results_json} does not exist (was the model decoded?)")
    if not model_file.exists():
        raise DQWhisperError(f"row {name}: model file {model_file} does not exist")
    res = json.loads(results_json.read_text())
    per_lang = {lang: {k: v[k] for k in ("metric", "error", "n_utts")} for lang, v in res["per_language"].items()}
    errors = [v["error"] for v in per_lang.values()]
    size = model_file.stat().st_size
    return {
        "name": name,
        "params": count_params(model_file),
        "size_bytes": size,
        "ratio_vs_teacher_fp16": round(teacher_fp16_bytes / size, 3),
        "per_language": per_lang,
        "avg_error": sum(errors) / len(errors) if errors else None,
        "rtf": res.get("rtf"),
        "n_runaways": res["overall"].get("n_runaways"),
        "model_file": str(model_file),
        **({"per_voice": per_voice_errors(read_utt_errors(results_json), speakers)} if speakers else {}),
    }


def per_voice_errors(utt_errors: dict[str, tuple[str, float, float]], speakers: dict[str, str]) -> dict[str, dict]:
    """{voice: {"lang", "error", "n_utts"}}: each voice's error rate (its errors over its reference units)."""
    sums: dict[str, list] = {}
    for utt, (lang, errors, n_ref) in utt_errors.items():
        if utt not in speakers:
            raise DQWhisperError(f"utterance {utt} has no speaker in utt2spk")
        acc = sums.setdefault(speakers[utt], [lang, 0.0, 0.0, 0])
        acc[1:] = acc[1] + errors, acc[2] + n_ref, acc[3] + 1
    return {v: {"lang": lang, "error": e / max(r, 1.0), "n_utts": n} for v, (lang, e, r, n) in sorted(sums.items())}


def render_voices(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r.get("per_voice")]
    if not rows:
        return []
    voices = sorted({(v["lang"], name) for r in rows for name, v in r["per_voice"].items()})
    lines = [
        "",
        "## Per held-out voice",
        "",
        "Error % of each test voice (the language's metric), so that a gain carried by one voice shows.",
        "",
        "| voice | utts | " + " | ".join(r["name"] for r in rows) + " |",
        "|" + "---|" * (len(rows) + 2),
    ]
    for _, name in voices:
        cells = [name, str(max(r["per_voice"].get(name, {}).get("n_utts", 0) for r in rows))]
        cells += [f"{100 * r['per_voice'][name]['error']:.1f}" if name in r["per_voice"] else "—" for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def read_utt_errors(results_json: Path) -> dict[str, tuple[str, float, float]]:
    """{utterance id: (language, errors, reference units)} from the utt_errors.tsv beside a results.json."""
    path = Path(results_json).parent / "utt_errors.tsv"
    if not path.exists():
        raise DQWhisperError(f"{path} does not exist: a paired comparison needs the per-utterance errors of a decode")
    out = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DQWhisperError(f"{path} is empty")
    head = lines[0].split("\t")
    try:
        i_utt, i_lang, i_err, i_ref = (head.index(k) for k in ("utt_id", "lang", "errors", "n_ref"))
    except ValueError:
        raise DQWhisperError(f"{path}: header {head} lacks one of utt_id, lang, errors, n_ref") from None
    for n, line in enumerate(lines[1:], 2):
        f = line.split("\t")
        try:
            out[f[i_utt]] = (f[i_lang], float(f[i_err]), float(f[i_ref]))
        except (IndexError, ValueError):
            raise DQWhisperError(f"{path}:{n}: not a row of utt_id, lang, errors, n_ref: {line[:80]!r}") from None
    return out


def paired_bootstrap(
    a: dict[str, tuple[str, float, float]],
    b: dict[str, tuple[str, float, float]],
    n_boot: int = 4000,
    seed: int = 0,
    speakers: dict[str, str] | None = None,
) -> dict:
    """A against B on the utterances both decoded: the relative change of A's language-averaged error against B's
    (negative = A better), its 2.5/97.5 percentiles over bootstrap draws, and the share of draws in which A's average
    error is below B's. A draw resamples, within each language, the utterances (the same draw for both models); with
    `speakers` ({utterance: voice}) it resamples the voices first and then each drawn voice's utterances, so that the
    interval covers what another set of voices would give, not only other sentences from the same voices."""
    common = sorted(set(a) & set(b))
    if not common:
        raise DQWhisperError("paired bootstrap: the two decodes share no utterance")
    if speakers is not None:
        missing = [u for u in common if u not in speakers]
        if missing:
            raise DQWhisperError(
                f"paired bootstrap: {len(missing)} utterances have no speaker in utt2spk, e.g. {missing[0]}"
            )
    by_lang: dict[str, dict[str, list[str]]] = {}
    for u in common:
        by_lang.setdefault(a[u][0], {}).setdefault(speakers[u] if speakers else u, []).append(u)
    rng = np.random.default_rng(seed)
    sum_a = np.zeros(n_boot)
    sum_b = np.zeros(n_boot)
    point_a = point_b = 0.0
    n_groups = 0
    for groups in by_lang.values():
        # per group (a voice, or one utterance when there are no voices): its errors and reference units summed
        # over a resample of its utterances, one column per draw
        cols = []
        n_ref = max(sum(a[u][2] for utts in groups.values() for u in utts), 1.0)
        point_a += sum(a[u][1] for utts in groups.values() for u in utts) / n_ref
        point_b += sum(b[u][1] for utts in groups.values() for u in utts) / n_ref
        for utts in groups.values():
            ea, eb, ref = (np.array([x[u][i] for u in utts]) for x, i in ((a, 1), (b, 1), (a, 2)))
            if speakers is None:
                idx = np.zeros((n_boot, 1), dtype=int)
            else:
                idx = rng.integers(0, len(utts), size=(n_boot, len(utts)))
            cols.append((ea[idx].sum(1), eb[idx].sum(1), ref[idx].sum(1)))
        ga, gb, gr = (np.stack([c[i] for c in cols], axis=1) for i in range(3))  # (n_boot, groups)
        pick = rng.integers(0, len(cols), size=(n_boot, len(cols)))
        r = np.maximum(np.take_along_axis(gr, pick, 1).sum(1), 1.0)
        sum_a += np.take_along_axis(ga, pick, 1).sum(1) / r
        sum_b += np.take_along_axis(gb, pick, 1).sum(1) / r
        n_groups += len(cols)
    k = len(by_lang)
    rel = sum_a / np.maximum(sum_b, 1e-12) - 1.0
    return {
        "n_utts": len(common),
        "n_voices": n_groups if speakers is not None else None,
        "avg_error": float(point_a / k),
        "against_avg_error": float(point_b / k),
        "relative_change": float(point_a / max(point_b, 1e-12) - 1.0),
        "ci95": [float(np.percentile(rel, 2.5)), float(np.percentile(rel, 97.5))],
        "p_better": float((sum_a < sum_b).mean()),
        "n_boot": n_boot,
    }


def render_comparisons(comparisons: list[dict]) -> list[str]:
    if not comparisons:
        return []
    lines = [
        "",
        "## Paired comparisons",
        "",
        "Relative change of the first model's average error against the second's on the same test utterances; the "
        "95% interval and P(better) from a paired bootstrap "
        + (
            f"over the held-out voices ({comparisons[0]['n_voices']}) and then their utterances, within each language"
            if comparisons[0].get("n_voices")
            else "over utterances within each language"
        )
        + f" ({comparisons[0]['n_boot']} draws). An interval that contains 0 is not a difference this test set "
        "resolves.",
        "",
        "| model | against | avg % | against avg % | relative change | 95% interval | P(better) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lo, hi = c["ci95"]
        lines.append(
            f"| {c['name']} | {c['against']} | {100 * c['avg_error']:.1f} | {100 * c['against_avg_error']:.1f} | "
            f"{100 * c['relative_change']:+.1f}% | [{100 * lo:+.1f}%, {100 * hi:+.1f}%] | {c['p_better']:.2f} |"
        )
    return lines


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def render_markdown(
    rows: list[dict],
    stage_times: list[tuple[str, float]],
    plot_name: str | None,
    comparisons: list[dict] | None = None,
) -> str:
    langs = sorted({lang for r in rows for lang in r["per_language"]})
    metric = {
        lang: next(r["per_language"][lang]["metric"] for r in rows if lang in r["per_language"]) for lang in langs
    }
    head = ["model", "params (M)", "size (MB)", "x smaller than teacher fp16"]
    head += [f"{lang} {metric[lang].upper()} %" for lang in langs] + ["avg %", "RTF", "runaways"]
    lines = [
        "# DQ-Whisper demo results",
        "",
        f"Run finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_machine()}.",
        "",
        "Error rates are on `data/demo/test` (WER for space-delimited languages, CER for ja/zh), "
        "normalized with Whisper's normalizers; lower is better. RTF = decoding wall seconds / audio seconds. "
        "runaways = hypotheses that still hit the token cap or fail the compression test after "
        "temperature fallback.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r["name"],
            f"{r['params'] / 1e6:.1f}",
            f"{r['size_bytes'] / 1e6:.1f}",
            f"{r['ratio_vs_teacher_fp16']:.2f}",
        ]
        for lang in langs:
            v = r["per_language"].get(lang)
            cells.append("—" if v is None else f"{100 * v['error']:.1f}")
        cells.append("—" if r["avg_error"] is None else f"{100 * r['avg_error']:.1f}")
        cells.append("—" if r["rtf"] is None else f"{r['rtf']:.3f}")
        cells.append("—" if r.get("n_runaways") is None else str(r["n_runaways"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += render_seeds(rows)
    lines += render_comparisons(comparisons or [])
    lines += render_voices(rows)
    if plot_name:
        lines += ["", f"![average error vs size]({plot_name})"]
    if stage_times:
        lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {sec:.0f} |" for name, sec in stage_times]
        lines += [f"| total | {sum(s for _, s in stage_times):.0f} |"]
    return "\n".join(lines) + "\n"


SEED_SUFFIX = re.compile(r"^(?P<base>.+)_seed(?P<seed>\d+)$")


def seed_groups(rows: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """Rows of one configuration trained with several seeds: `name` is seed 1, `name_seedK` seed K. Only
    configurations with more than one seed are returned, {name: [(seed, row), ...]} in seed order."""
    by_name = {r["name"]: r for r in rows}
    groups: dict[str, list[tuple[int, dict]]] = {}
    for r in rows:
        m = SEED_SUFFIX.match(r["name"])
        if m and m["base"] in by_name:
            groups.setdefault(m["base"], [(1, by_name[m["base"]])]).append((int(m["seed"]), r))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in groups.items()}


def render_seeds(rows: list[dict]) -> list[str]:
    groups = seed_groups(rows)
    if not groups:
        return []
    n = max(len(v) for v in groups.values())
    head = ["model"] + [f"seed {k} avg %" for k in range(1, n + 1)] + ["mean avg %"]
    lines = [
        "",
        "## Seeds",
        "",
        "Average error of each configuration trained with each seed, and their mean.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, members in groups.items():
        errors = [r["avg_error"] for _, r in members]
        cells = [name] + ["—" if e is None else f"{100 * e:.1f}" for e in errors] + ["—"] * (n - len(errors))
        known = [e for e in errors if e is not None]
        cells.append(f"{100 * sum(known) / len(known):.1f}" if known else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["avg_error"] is None:
            continue
        x, y = r["size_bytes"] / 1e6, 100 * r["avg_error"]
        ax.scatter(x, y, s=40)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model file size on disk (MB, log scale)")
    ax.set_ylabel("average WER/CER over languages (%)")
    ax.set_title("DQ-Whisper demo: error vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_stage_times(path: Path | None) -> list[tuple[str, float]]:
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, sec = line.rsplit("\t", 1)
            out.append((name, float(sec)))
    return out


@command
def main(argv: list[str] | None = None) -> int | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for RESULTS.md, results.json, wer_vs_size.png")
    p.add_argument("--row", nargs=3, action="append", metavar=("NAME", "RESULTS_JSON", "MODEL_FILE"), required=True)
    p.add_argument(
        "--teacher-fp16-bytes",
        type=int,
        required=True,
        help="size of the teacher in fp16 on disk, the denominator of every ratio",
    )
    p.add_argument("--stage-times", type=Path, help="TSV of stage name and seconds (run.sh writes it)")
    p.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="paired bootstrap of row A against row B (repeatable); rows not given are skipped with a warning",
    )
    p.add_argument(
        "--utt2spk",
        type=Path,
        help="the test set's utt2spk: the bootstrap resamples voices, then their utterances (default: utterances)",
    )
    args = p.parse_args(argv)

    if args.utt2spk and not args.utt2spk.is_file():
        raise DQWhisperError(f"--utt2spk {args.utt2spk}: no such file")
    speakers = read_kaldi_map(args.utt2spk)[0] if args.utt2spk else None
    rows = [build_row(n, Path(r), Path(m), args.teacher_fp16_bytes, speakers) for n, r, m in args.row]
    results = {n: Path(r) for n, r, _ in args.row}
    comparisons = []
    for a, b in args.compare:
        if a not in results or b not in results:
            log.warning("comparison %s vs %s skipped: %s is not a row", a, b, a if a not in results else b)
            continue
        c = paired_bootstrap(read_utt_errors(results[a]), read_utt_errors(results[b]), speakers=speakers)
        comparisons.append({"name": a, "against": b, **c})
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "results.json", (json.dumps(rows, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / "comparisons.json", (json.dumps(comparisons, indent=2) + "\n").encode())
    plot(rows, args.out / "wer_vs_size.png")
    md = render_markdown(rows, read_stage_times(args.stage_times), "wer_vs_size.png", comparisons)
    atomic_write_bytes(args.out / "RESULTS.md", md.encode())
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
