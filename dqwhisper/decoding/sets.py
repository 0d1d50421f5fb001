"""Test sets for decoding: reading and checking them before the model loads (every selected audio header, the
output dir), and writing hypotheses as they come. Used by dqwhisper.inference."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dqwhisper.config import DecodeConfig
from dqwhisper.data.kaldi import DataDir, is_pipe
from dqwhisper.decoding.utterances import select_utts
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


@dataclass
class DecodeSet:
    path: Path
    data: object  # DataDir
    utts: list  # the utterances decode.languages / max_utts / shard select
    durations: dict[str, float]  # seconds from the audio headers (pipes: not run here)
    bad: dict[str, str]  # utterances whose audio is missing or unreadable: reason


def load_test_set(path: Path, dcfg: DecodeConfig) -> DecodeSet:
    """DataDir.load, the selection, and every selected audio header read, so that a broken set fails (or its
    unreadable utterances are known) before the model loads. Pipes are not run here: each runs once, when decoded."""
    data = DataDir.load(path)
    if not data.utts:
        raise DQWhisperError(f"{path}: test set has no utterances")
    utts = select_utts(data.utts, dcfg)
    if not utts:
        raise DQWhisperError(f"{path}: no utterance left after decode.languages / max_utts / shard")
    durations, bad = {}, {}
    for u in utts:
        if is_pipe(u.wav):
            continue
        wav = data.resolve(u.wav)
        if not Path(wav).is_file():
            bad[u.utt_id] = f"audio file {wav} does not exist"
            continue
        try:
            durations[u.utt_id] = data.duration(u)
        except Exception as e:  # noqa: BLE001 - any reader error makes the utterance bad
            bad[u.utt_id] = f"unreadable audio {wav}: {e}"
            continue
        if durations[u.utt_id] <= 0:
            bad[u.utt_id] = f"audio {wav} has no samples"
    for utt_id, reason in bad.items():
        log.warning("%s: skipping utterance %s: %s", path, utt_id, reason)
    check_bad_fraction(path, bad, len(utts), dcfg.max_bad_fraction)
    return DecodeSet(path, data, utts, durations, bad)


def check_bad_fraction(path: Path, bad: dict[str, str], n_total: int, max_fraction: float) -> None:
    if len(bad) > max_fraction * n_total:
        first = "; ".join(f"{u}: {r}" for u, r in list(bad.items())[:3])
        raise DQWhisperError(
            f"{path}: {len(bad)} of {n_total} utterances cannot be read, more than "
            f"decode.max_bad_fraction={max_fraction}: {first}"
        )


def check_out_dir(out: Path) -> None:
    """Create `out` and write a probe file there, so an unwritable output dir fails before any decoding."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DQWhisperError(
            f"output dir {out}: cannot write there ({e.strerror or e}); choose another with decode.out_dir=DIR"
        ) from None


UTT_DECODE_COLUMNS = (
    "utt_id",
    "lang",
    "seconds",
    "n_tokens",
    "temperature",
    "n_tries",
    "fallback_reason",
    "first_avg_logprob",
    "avg_logprob",
    "compression_ratio",
    "runaway",
)


def write_utt_decode(path: Path, hyps) -> None:
    """How each utterance was decoded (UttHypothesis): its kept temperature, temperatures tried, why the first
    failed ("logprob", "compression", "cap"; "-" = no fallback), the first and the kept hypothesis's average
    log-probability, the kept one's compression ratio, and whether it is a runaway. Tab-separated, with a header;
    for choosing fallback thresholds (decode.logprob_threshold) on dev."""
    rows = ["\t".join(UTT_DECODE_COLUMNS)]
    for h in hyps:
        values = (
            h.utt_id,
            h.lang,
            f"{h.seconds:.2f}",
            h.n_tokens,
            f"{h.temperature:.1f}",
            h.n_tries,
            h.fallback_reason or "-",
            f"{h.first_avg_logprob:.4f}",
            f"{h.avg_logprob:.4f}",
            f"{h.compression_ratio:.3f}",
            int(h.runaway),
        )
        rows.append("\t".join(map(str, values)))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


class HypWriter:
    """Appends each batch's hypotheses to `hyp.txt` as they come (flushed), so an interrupted run keeps them
    (`run` rewrites the file sorted by utterance id at the end)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w", encoding="utf-8")
        self.n = 0

    def __call__(self, hyps) -> None:
        self.file.write("".join(" ".join([h.utt_id, *h.text.split()]) + "\n" for h in hyps))
        self.file.flush()
        self.n += len(hyps)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def set_names(paths: list[Path]) -> list[str]:
    """Folder names of the test sets, with the parent prepended where two sets share a name."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}_{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
