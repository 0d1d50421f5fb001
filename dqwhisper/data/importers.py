"""Corpus importers: each reads a corpus in its own on-disk layout and writes Kaldi data dirs (with utt2lang).

python -m dqwhisper.data.importers commonvoice SRC DEST [--splits train dev test] [--lang LANG]
    SRC: a Common Voice language folder (train.tsv, dev.tsv, test.tsv, ..., clips/*.mp3) -> DEST/<split>/
python -m dqwhisper.data.importers fleurs SRC DEST [--splits ...] [--lang LANG] [--normalized-text]
    SRC: a FLEURS language folder, e.g. ja_jp/ (train.tsv, dev.tsv, test.tsv, audio/<split>/*.wav) -> DEST/<split>/
python -m dqwhisper.data.importers librispeech SRC DEST [--lowercase]
    SRC: one LibriSpeech subset, e.g. LibriSpeech/dev-clean (<spk>/<chapter>/*.flac + *.trans.txt) -> DEST/
python -m dqwhisper.data.importers aishell SRC DEST [--splits ...]
    SRC: data_aishell/ (wav/<split>/<spk>/*.wav, transcript/aishell_transcript_v0.8.txt) -> DEST/<split>/
python -m dqwhisper.data.importers csj SRC DEST
    SRC: a Kaldi data dir made by the standard CSJ recipe (wav.scp, segments, text with word+POS tokens,
    utt2spk) -> DEST/ with plain Japanese text, absolute audio paths, utt2lang = ja
python -m dqwhisper.data.importers manifest SRC DEST [--lang LANG]
    SRC: a CSV/TSV file with a header naming at least an audio path column (path|audio|file|wav|filename) and a
    text column (text|sentence|transcript|transcription); optional language (language|lang|locale), speaker
    (speaker|client_id|spk), id (id|utt_id). Relative paths are relative to the manifest's folder -> DEST/

Audio is referenced where it lies (absolute paths; mp3 is decoded at load time), not copied. Rows whose audio file
is missing or whose transcript is empty are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
from pathlib import Path

from whisper.tokenizer import LANGUAGES

from dqwhisper.data.kaldi import DataDir, Utterance, is_pipe, write_data_dir
from dqwhisper.utils import DQWhisperError, command, get_logger

log = get_logger("dqwhisper.data.importers")  # not __name__: "__main__" under python -m

DEFAULT_SPLITS = ("train", "dev", "test")
# corpus language tags whose ISO 639-1 code is not their first part
LANGUAGE_ALIASES = {
    "cmn": "zh",
    "zh-cn": "zh",
    "zh-tw": "zh",
    "zh-hk": "yue",
    "yue": "yue",
    "fil": "tl",
    "nb-no": "no",
    "nn-no": "nn",
    "sv-se": "sv",
    "es-es": "es",
    "pt-br": "pt",
    "ga-ie": "ga",
}


class ImportStats(dict):
    """{dest dir: utterances written}, with `skipped` {reason: count}."""

    def __init__(self):
        super().__init__()
        self.skipped: dict[str, int] = {}

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.skipped[reason] <= 3:
            log.warning("skipping %s: %s", what, reason)


def to_iso639_1(tag: str, override: str | None = None) -> str:
    """'ja' -> 'ja', 'zh-CN' -> 'zh', 'ja_jp' -> 'ja', 'cmn_hans_cn' -> 'zh'. Raises for codes Whisper lacks."""
    if override:
        tag = override
    t = tag.strip().lower().replace("_", "-")
    for cand in (t, "-".join(t.split("-")[:2]), t.split("-")[0]):
        code = LANGUAGE_ALIASES.get(cand, cand)
        if code in LANGUAGES:
            return code
    raise DQWhisperError(f"language '{tag}' has no Whisper code (pass --lang with an ISO 639-1 code)")


def safe_id(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", s.strip())


def clean_text(s: str) -> str:
    return " ".join(s.split())


def _write(dest: Path, utts: list[Utterance], stats: ImportStats, recordings: dict[str, str] | None = None) -> None:
    if not utts:
        raise DQWhisperError(f"{dest}: nothing to write (skipped: {stats.skipped or 'none'})")
    write_data_dir(dest, utts, recordings)
    stats[str(dest)] = len(utts)
    log.info("%s: %d utterances", dest, len(utts))


def _usable(stats: ImportStats, what: str, audio: Path, text: str) -> bool:
    """False (and the reason counted) for a row whose audio file is missing or whose transcript is empty."""
    if not audio.is_file():
        stats.skip("missing audio", f"{what} ({audio})")
        return False
    if not text:
        stats.skip("empty transcript", what)
        return False
    return True


def _split_files(src: Path, splits, name: str, hint: str = "") -> list[tuple[str, Path]]:
    """(split, src / name.format(split)) for the splits that exist; an error naming them all when none does."""
    found = [(split, src / name.format(split)) for split in splits if (src / name.format(split)).exists()]
    if not found:
        raise DQWhisperError(f"{src}: none of {', '.join(name.format(s) for s in splits)} found{hint}")
    return found


# ---------------------------------------------------------------- Common Voice


def import_commonvoice(
    src: str | Path, dest: str | Path, splits=DEFAULT_SPLITS, lang: str | None = None
) -> ImportStats:
    src, dest = Path(src), Path(dest)
    stats = ImportStats()
    for split, tsv in _split_files(src, splits, "{}.tsv", " (a Common Voice language folder holds them beside clips/)"):
        utts = []
        with tsv.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for col in ("client_id", "path", "sentence"):
                if col not in (reader.fieldnames or []):
                    raise DQWhisperError(f"{tsv}: no '{col}' column (header: {reader.fieldnames})")
            for lineno, row in enumerate(reader, 2):
                code = to_iso639_1(row.get("locale") or src.name, lang)
                audio = src / "clips" / row["path"]
                text = clean_text(row["sentence"] or "")
                what = f"{tsv}:{lineno}"
                if not _usable(stats, what, audio, text):
                    continue
                spk = "cv" + hashlib.sha1(row["client_id"].encode()).hexdigest()[:12]
                utts.append(
                    Utterance(f"{spk}-{safe_id(Path(row['path']).stem)}", str(audio.resolve()), text, spk, code)
                )
        _write(dest / split, utts, stats)
    return stats


# ---------------------------------------------------------------- FLEURS


def import_fleurs(
    src: str | Path, dest: str | Path, splits=DEFAULT_SPLITS, lang: str | None = None, normalized_text: bool = False
) -> ImportStats:
    """FLEURS tsv rows (no header): id, file_name, raw_transcription, transcription, phonemes, num_samples,
    gender. The raw (cased, punctuated) transcription is used unless `normalized_text`."""
    src, dest = Path(src), Path(dest)
    code = to_iso639_1(src.name, lang)
    stats = ImportStats()
    for split, tsv in _split_files(src, splits, "{}.tsv"):
        utts = []
        for lineno, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 4:
                raise DQWhisperError(f"{tsv}:{lineno}: expected >= 4 tab-separated columns, got {len(cols)}")
            file_name = cols[1]
            text = clean_text(cols[3] if normalized_text else cols[2])
            audio = next(
                (
                    p
                    for p in (src / "audio" / split / file_name, src / split / file_name, src / "audio" / file_name)
                    if p.is_file()
                ),
                None,
            )
            what = f"{tsv}:{lineno}"
            if audio is None:
                stats.skip("missing audio", f"{what} ({file_name})")
                continue
            if not text:
                stats.skip("empty transcript", what)
                continue
            utt = f"{code}-{safe_id(Path(file_name).stem)}"
            utts.append(Utterance(utt, str(audio.resolve()), text, utt, code))
        _write(dest / split, utts, stats)
    return stats


# ---------------------------------------------------------------- LibriSpeech


def import_librispeech(src: str | Path, dest: str | Path, lowercase: bool = False) -> ImportStats:
    src, dest = Path(src), Path(dest)
    stats = ImportStats()
    trans_files = sorted(src.rglob("*.trans.txt"))
    if not trans_files:
        raise DQWhisperError(f"{src}: no *.trans.txt (expected LibriSpeech/<subset>/<speaker>/<chapter>/)")
    utts = []
    for trans in trans_files:
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            utt_id = parts[0]
            text = clean_text(parts[1] if len(parts) > 1 else "")
            what = f"{trans}:{lineno}"
            id_parts = utt_id.split("-")
            if len(id_parts) != 3:
                raise DQWhisperError(f"{what}: utterance id '{utt_id}' is not SPEAKER-CHAPTER-NUMBER")
            audio = trans.parent / f"{utt_id}.flac"
            if not _usable(stats, what, audio, text):
                continue
            utts.append(
                Utterance(
                    utt_id,
                    str(audio.resolve()),
                    text.lower() if lowercase else text,
                    f"{id_parts[0]}-{id_parts[1]}",
                    "en",
                )
            )
    _write(dest, utts, stats)
    return stats


# ---------------------------------------------------------------- AISHELL-1


def import_aishell(src: str | Path, dest: str | Path, splits=DEFAULT_SPLITS) -> ImportStats:
    """Transcripts are word-segmented with spaces; Whisper text for Chinese has none, so spaces are removed.
    Speaker = characters 7-11 of the id (BAC009S0002W0122 -> S0002), as the Kaldi recipe does."""
    src, dest = Path(src), Path(dest)
    transcript = next(iter(sorted((src / "transcript").glob("aishell_transcript*.txt"))), None)
    if transcript is None:
        raise DQWhisperError(f"{src / 'transcript'}: no aishell_transcript*.txt")
    texts = {}
    for line in transcript.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            texts[parts[0]] = "".join(parts[1].split())
    stats = ImportStats()
    for split, folder in _split_files(src / "wav", splits, "{}", " (split folders)"):
        utts = []
        for wav in sorted(folder.rglob("*.wav")):
            utt = wav.stem
            if utt not in texts:
                stats.skip("no transcript", str(wav))
                continue
            spk = utt[6:11]
            utts.append(Utterance(f"{spk}-{utt}", str(wav.resolve()), texts[utt], spk, "zh"))
        _write(dest / split, utts, stats)
    return stats


# ---------------------------------------------------------------- CSJ (Kaldi dir from the CSJ recipe)

_CSJ_TAG = re.compile(r"<[^>]*>")


def csj_text(kaldi_text: str) -> str:
    """'えー+感動詞 今日+名詞 は+助詞/係助詞 <sp>' -> 'えー今日は': surfaces without POS tags, no <sp>/<...> markers,
    joined without spaces."""
    words = []
    for token in kaldi_text.split():
        surface = token.split("+", 1)[0]
        surface = _CSJ_TAG.sub("", surface)
        if surface and surface.lower() != "sp":
            words.append(surface)
    return "".join(words)


def import_csj(src: str | Path, dest: str | Path) -> ImportStats:
    src, dest = Path(src), Path(dest)
    data = DataDir.load(src, default_lang="ja")
    stats = ImportStats()

    def absolute(v: str) -> str:
        return v if is_pipe(v) else str(Path(data.resolve(v)).resolve())

    new_recordings = {rec: absolute(v) for rec, v in data.recordings.items()}
    utts = []
    for u in data.utts:
        text = csj_text(u.text)
        if not text:
            stats.skip("empty transcript after removing tags", u.utt_id)
            continue
        utts.append(
            Utterance(
                u.utt_id, absolute(u.wav), text, u.speaker, "ja" if u.lang not in LANGUAGES else u.lang, u.segment
            )
        )
    _write(dest, utts, stats, new_recordings)
    return stats


# ---------------------------------------------------------------- generic manifest

_COLUMNS = {
    "path": ("path", "audio", "file", "wav", "filename", "audio_path", "file_name"),
    "text": ("text", "sentence", "transcript", "transcription"),
    "lang": ("language", "lang", "locale"),
    "speaker": ("speaker", "client_id", "spk", "speaker_id"),
    "id": ("id", "utt_id", "utterance_id"),
}


def import_manifest(src: str | Path, dest: str | Path, lang: str | None = None) -> ImportStats:
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise DQWhisperError(f"{src}: manifest file does not exist")
    sample = src.read_text(encoding="utf-8")
    delimiter = "\t" if src.suffix.lower() == ".tsv" or "\t" in sample.splitlines()[0] else ","
    reader = csv.DictReader(sample.splitlines(), delimiter=delimiter)
    header = {h.strip().lower(): h for h in (reader.fieldnames or [])}
    col = {k: next((header[c] for c in names if c in header), None) for k, names in _COLUMNS.items()}
    for need in ("path", "text"):
        if col[need] is None:
            raise DQWhisperError(
                f"{src}:1: no {need} column (one of {', '.join(_COLUMNS[need])}); header: {reader.fieldnames}"
            )
    if col["lang"] is None and lang is None:
        raise DQWhisperError(f"{src}:1: no language column ({', '.join(_COLUMNS['lang'])}): pass --lang")
    stats = ImportStats()
    utts, seen = [], set()
    for lineno, row in enumerate(reader, 2):
        what = f"{src}:{lineno}"
        rel = (row[col["path"]] or "").strip()
        audio = Path(rel) if Path(rel).is_absolute() else src.parent / rel
        text = clean_text(row[col["text"]] or "")
        if not rel or not audio.is_file():
            stats.skip("missing audio", f"{what} ({audio})")
            continue
        if not text:
            stats.skip("empty transcript", what)
            continue
        tag = (row[col["lang"]] or "").strip() if col["lang"] else ""
        try:
            code = to_iso639_1(tag or lang or "", None if tag else lang)
        except DQWhisperError as e:
            raise DQWhisperError(f"{what}: {e}") from None
        spk = safe_id(row[col["speaker"]]) if col["speaker"] and row[col["speaker"]] else None
        base = (
            safe_id(row[col["id"]]) if col["id"] and row[col["id"]] else safe_id(Path(rel).with_suffix("").as_posix())
        )
        utt = f"{spk}-{base}" if spk and not base.startswith(spk) else base
        if utt in seen:
            raise DQWhisperError(f"{what}: duplicate utterance id '{utt}'")
        seen.add(utt)
        utts.append(Utterance(utt, str(audio.resolve()), text, spk or utt, code))
    _write(dest, utts, stats)
    return stats


IMPORTERS = {
    "commonvoice": import_commonvoice,
    "fleurs": import_fleurs,
    "librispeech": import_librispeech,
    "aishell": import_aishell,
    "csj": import_csj,
    "manifest": import_manifest,
}


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dqwhisper.data.importers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("corpus", choices=sorted(IMPORTERS))
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS))
    ap.add_argument("--lang", default=None, help="ISO 639-1 code overriding the corpus' language tag")
    ap.add_argument("--lowercase", action="store_true", help="librispeech: lowercase the transcripts")
    ap.add_argument("--normalized-text", action="store_true", help="fleurs: use the normalised transcription")
    args = ap.parse_args(argv)
    kwargs = {
        "commonvoice": dict(splits=args.splits, lang=args.lang),
        "fleurs": dict(splits=args.splits, lang=args.lang, normalized_text=args.normalized_text),
        "librispeech": dict(lowercase=args.lowercase),
        "aishell": dict(splits=args.splits),
        "csj": {},
        "manifest": dict(lang=args.lang),
    }[args.corpus]
    stats = IMPORTERS[args.corpus](args.src, args.dest, **kwargs)
    for d, n in stats.items():
        print(f"{d}: {n} utterances")
    if stats.skipped:
        print("skipped: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
