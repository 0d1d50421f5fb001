"""Check a data dir the way Kaldi's validate_data_dir.sh does, plus what Whisper training needs.

python -m dqwhisper.data.validate DIR [--no-audio-check] [--run-pipes] [--max-seconds 30]

Errors (exit 1): missing files, malformed or unsorted lines (LC_ALL=C order), duplicate keys, key sets that differ
between text / utt2spk / utt2lang / wav.scp (or segments), segments naming unknown recordings, spk2utt that
contradicts utt2spk, missing or unreadable audio, empty transcripts, transcripts over Whisper's 448-token limit,
language codes Whisper does not know. Warnings (exit 0): audio longer than the window, recordings no utterance
uses, pipes not run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from whisper.tokenizer import LANGUAGES

from dqwhisper.data.dataset import default_tokenizer, text_ids
from dqwhisper.data.kaldi import SAMPLE_RATE, is_pipe, kaldi_lines, load_wav, split_kaldi_line, wav_duration
from dqwhisper.utils import DQWhisperError, command

PER_UTT_FILES = ("text", "utt2spk", "utt2lang")


@dataclass
class Report:
    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_utts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


def _read(report: Report, name: str, allow_empty: bool = False, n_fields: int | None = None) -> dict[str, str] | None:
    """Parse `key value` lines, reporting bad lines, duplicates and sort order. None if the file is absent."""
    path = report.path / name
    if not path.is_file():
        return None
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        report.error(f"{path}: not UTF-8 ({e})")
        return {}
    values: dict[str, str] = {}
    prev_key: bytes | None = None
    unsorted_reported = False
    for lineno, raw in enumerate(kaldi_lines(content), 1):  # split as DataDir.load splits
        if raw[:1].isspace() and raw.strip():
            report.error(f"{path}:{lineno}: leading whitespace")
        line = raw.strip()
        if not line:
            report.error(f"{path}:{lineno}: empty line")
            continue
        key, value = split_kaldi_line(line)
        if not value and not allow_empty:
            report.error(f"{path}:{lineno}: '{key}' has no value")
        if n_fields is not None and len(line.split()) != n_fields:
            report.error(f"{path}:{lineno}: expected {n_fields} fields, got {len(line.split())}")
        if key in values:
            report.error(f"{path}:{lineno}: duplicate key '{key}'")
        kb = key.encode("utf-8")
        if prev_key is not None and kb < prev_key and not unsorted_reported:
            report.error(
                f"{path}:{lineno}: not sorted (LC_ALL=C): '{key}' after '{prev_key.decode()}' "
                "(sort with: LC_ALL=C sort -k1,1)"
            )
            unsorted_reported = True
        prev_key = kb
        values[key] = value
    if content and not content.endswith("\n"):
        report.error(f"{path}: last line has no newline")
    return values


def _compare_keys(report: Report, name: str, keys: set[str], ref_name: str, ref: set[str]) -> None:
    missing, extra = sorted(ref - keys), sorted(keys - ref)
    if missing:
        report.error(f"{report.path / name}: {len(missing)} utterance(s) of {ref_name} missing, e.g. '{missing[0]}'")
    if extra:
        report.error(f"{report.path / name}: {len(extra)} key(s) not in {ref_name}, e.g. '{extra[0]}'")


def validate_data_dir(
    path: str | Path,
    check_audio: bool = True,
    run_pipes: bool = False,
    max_seconds: float = 30.0,
    max_tokens: int = 448,
) -> Report:
    report = Report(Path(path))
    if not report.path.is_dir():
        report.error(f"{report.path}: not a directory")
        return report
    for name in ("wav.scp", *PER_UTT_FILES):
        if not (report.path / name).is_file():
            report.error(f"{report.path / name}: missing")
    wavs = _read(report, "wav.scp") or {}
    text = _read(report, "text", allow_empty=True) or {}
    utt2spk = _read(report, "utt2spk", n_fields=2) or {}
    utt2lang = _read(report, "utt2lang", n_fields=2) or {}
    segments = _read(report, "segments", n_fields=4)
    spk2utt = _read(report, "spk2utt")
    keys = set(text)
    report.n_utts = len(keys)
    if not keys and (report.path / "text").is_file():
        report.error(f"{report.path / 'text'}: no utterances")
    for name, mapping in (("utt2spk", utt2spk), ("utt2lang", utt2lang)):
        if (report.path / name).is_file():
            _compare_keys(report, name, set(mapping), "text", keys)

    seg_times: dict[str, tuple[str, float, float]] = {}
    if segments is None:
        _compare_keys(report, "wav.scp", set(wavs), "text", keys)
    else:
        _compare_keys(report, "segments", set(segments), "text", keys)
        for utt, value in segments.items():
            parts = value.split()
            if len(parts) != 3:
                continue
            rec = parts[0]
            try:
                start, end = float(parts[1]), float(parts[2])
            except ValueError:
                report.error(f"{report.path / 'segments'}: '{utt}': start/end are not numbers")
                continue
            if start < 0 or (end != -1 and end <= start):
                report.error(f"{report.path / 'segments'}: '{utt}': bad times {start}..{end}")
            if rec not in wavs:
                report.error(f"{report.path / 'segments'}: '{utt}' refers to recording '{rec}' not in wav.scp")
            seg_times[utt] = (rec, start, end)
        unused = sorted(set(wavs) - {r for r, _, _ in seg_times.values()})
        if unused:
            report.warn(f"{report.path / 'wav.scp'}: {len(unused)} recording(s) no segment uses, e.g. '{unused[0]}'")

    if spk2utt is not None:
        want: dict[str, set[str]] = {}
        for utt, spk in utt2spk.items():
            want.setdefault(spk, set()).add(utt)
        got = {spk: set(v.split()) for spk, v in spk2utt.items()}
        if got != want:
            bad = sorted(set(want) ^ set(got)) or sorted(s for s in want if want[s] != got.get(s))
            report.error(
                f"{report.path / 'spk2utt'}: does not match utt2spk (e.g. speaker '{bad[0]}'; "
                "regenerate it from utt2spk)"
            )

    tokenizer = default_tokenizer()
    for utt in sorted(keys):
        lang = utt2lang.get(utt)
        if lang is not None and lang not in LANGUAGES:
            report.error(
                f"{report.path / 'utt2lang'}: '{utt}': unknown language code '{lang}' "
                "(Whisper knows ISO 639-1 codes such as en, ja, zh)"
            )
        if not text[utt].strip():
            report.error(f"{report.path / 'text'}: '{utt}': empty transcript")
        else:
            n = 4 + len(text_ids(tokenizer, text[utt], lang or "en")) + 1
            if n > max_tokens:
                report.error(
                    f"{report.path / 'text'}: '{utt}': transcript too long ({n} tokens with prefix "
                    f"and eot > {max_tokens})"
                )

    if check_audio:
        _check_audio(report, wavs, seg_times, keys if segments is None else None, run_pipes, max_seconds)
    return report


def _check_audio(
    report: Report,
    wavs: dict[str, str],
    seg_times: dict,
    utt_keys: set[str] | None,
    run_pipes: bool,
    max_seconds: float,
) -> None:
    durations: dict[str, float] = {}
    skipped_pipes = 0
    for rec, value in wavs.items():
        if is_pipe(value):
            if not run_pipes:
                skipped_pipes += 1
                continue
            resolved = value
        else:
            p = Path(value)
            resolved = str(p if p.is_absolute() else report.path / p)
            if not Path(resolved).is_file():
                report.error(f"{report.path / 'wav.scp'}: '{rec}': audio file missing: {resolved}")
                continue
        try:
            if is_pipe(value):  # run the command once: its decoded samples give the duration
                durations[rec] = len(load_wav(resolved)) / SAMPLE_RATE
            else:
                durations[rec] = wav_duration(resolved)
        except DQWhisperError as e:
            report.error(f"{report.path / 'wav.scp'}: '{rec}': unreadable audio: {e}")
        except Exception as e:  # noqa: BLE001
            report.error(f"{report.path / 'wav.scp'}: '{rec}': unreadable audio: {type(e).__name__}: {e}")
    if skipped_pipes:
        report.warn(f"{report.path / 'wav.scp'}: {skipped_pipes} pipe command(s) not run (--run-pipes runs them)")
    if utt_keys is not None:
        per_utt = {u: durations[u] for u in utt_keys if u in durations}
    else:
        per_utt = {}
        for utt, (rec, start, end) in seg_times.items():
            if rec not in durations:
                continue
            total = durations[rec]
            if end != -1 and end > total + 0.05:
                report.error(
                    f"{report.path / 'segments'}: '{utt}': ends at {end} s, recording '{rec}' has {total:.2f} s"
                )
            per_utt[utt] = (min(end, total) if end != -1 else total) - start
    long = sorted(u for u, d in per_utt.items() if d > max_seconds)
    if long:
        report.warn(
            f"{report.path}: {len(long)} utterance(s) longer than {max_seconds} s (trimmed or skipped by "
            f"training with that window), e.g. '{long[0]}' ({per_utt[long[0]]:.1f} s)"
        )
    report.seconds = sum(per_utt.values())


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dqwhisper.data.validate", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="+")
    ap.add_argument("--no-audio-check", action="store_true", help="skip opening the audio files")
    ap.add_argument("--run-pipes", action="store_true", help="also run wav.scp commands and decode their output")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="warn about utterances longer than this")
    args = ap.parse_args(argv)
    rc = 0
    for d in args.data_dir:
        r = validate_data_dir(d, not args.no_audio_check, args.run_pipes, args.max_seconds)
        for w in r.warnings:
            print(f"WARNING {w}", file=sys.stderr)
        for e in r.errors:
            print(f"ERROR {e}", file=sys.stderr)
        hours = f", {r.seconds / 3600:.3f} h" if r.seconds else ""
        if r.ok:
            print(f"{d}: OK ({r.n_utts} utterances{hours}, {len(r.warnings)} warning(s))")
        else:
            print(f"{d}: FAILED ({len(r.errors)} error(s), {r.n_utts} utterances)")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
