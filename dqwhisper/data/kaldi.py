"""Kaldi-style data dirs: read/write `wav.scp`, `text`, `utt2spk`, `utt2lang`, `segments`, `spk2utt`; load audio.

wav.scp values are a path (absolute, or relative to the data dir) or a shell command ending in `|` whose stdout is
an audio file (wav, flac, mp3, ... anything soundfile or torchcodec decodes). Audio comes back as float32 mono at
16 kHz, resampled with `torchaudio.functional.resample` when the source rate differs.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from dqwhisper.utils import DQWhisperError, atomic_write_bytes

SAMPLE_RATE = 16000
REQUIRED_FILES = ("wav.scp", "text", "utt2spk")
# Formats soundfile (libsndfile) reads with header-only info and sample-exact seeking.
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".au", ".w64", ".sph", ".nist"}


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    wav: str  # the wav.scp value of its recording (path or "cmd |")
    text: str
    speaker: str
    lang: str  # ISO 639-1
    segment: tuple[float, float] | None = None  # (start, end) seconds within the recording, from `segments`


def is_pipe(wav: str) -> bool:
    return wav.rstrip().endswith("|")


def kaldi_lines(content: str) -> list[str]:
    """The lines of a Kaldi file: split at "\\n" only, as Kaldi and `validate` do (str.splitlines would also split
    inside a transcript at U+2028, U+0085, form feeds, ...). A trailing "\\r" stays on its line (callers strip)."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def split_kaldi_line(line: str) -> tuple[str, str]:
    """`key value...` -> (key, value): the key ends at the first whitespace; the value is stripped ("" if none)."""
    parts = line.strip().split(maxsplit=1)
    if not parts:
        return "", ""
    return parts[0], parts[1].strip() if len(parts) > 1 else ""


def read_kaldi_map(path: Path, allow_empty_value: bool = False) -> tuple[dict[str, str], dict[str, int]]:
    """Read a `key value...` file. Returns ({key: value}, {key: line number}). Duplicate keys and missing values
    raise DQWhisperError naming the file and line."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DQWhisperError(f"{path}: not UTF-8 ({e})") from e
    for lineno, line in enumerate(kaldi_lines(content), 1):
        if not line.strip():
            continue
        key, value = split_kaldi_line(line)
        if not value and not allow_empty_value:
            raise DQWhisperError(f"{path}:{lineno}: key '{key}' has no value")
        if key in values:
            raise DQWhisperError(f"{path}:{lineno}: duplicate key '{key}' (first on line {lines[key]})")
        values[key] = value
        lines[key] = lineno
    return values, lines


def _parse_segments(path: Path) -> dict[str, tuple[str, float, float]]:
    segs: dict[str, tuple[str, float, float]] = {}
    for lineno, line in enumerate(kaldi_lines(path.read_text(encoding="utf-8")), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise DQWhisperError(f"{path}:{lineno}: expected 'utt_id recording_id start end', got {line!r}")
        utt, rec, start_s, end_s = parts
        try:
            start, end = float(start_s), float(end_s)
        except ValueError:
            raise DQWhisperError(f"{path}:{lineno}: start/end are not numbers: {line!r}") from None
        if start < 0 or (end != -1 and end <= start):
            raise DQWhisperError(f"{path}:{lineno}: bad segment times {start}..{end}")
        if utt in segs:
            raise DQWhisperError(f"{path}:{lineno}: duplicate utterance '{utt}'")
        segs[utt] = (rec, start, end)
    return segs


class DataDir:
    """A loaded data dir. `utts` is sorted by utt_id; `recordings` maps recording id -> wav.scp value."""

    def __init__(self, path: str | os.PathLike, utts: list[Utterance], recordings: dict[str, str] | None = None):
        self.path = Path(path)
        self.utts = sorted(utts, key=lambda u: u.utt_id)
        self.recordings = dict(recordings or {})
        self._by_id = {u.utt_id: u for u in self.utts}

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, utt_id: str) -> Utterance:
        return self._by_id[utt_id]

    @property
    def languages(self) -> list[str]:
        return sorted({u.lang for u in self.utts})

    def filter(self, languages: list[str] | None = None, utt_ids: set[str] | None = None) -> "DataDir":
        """A view with only the utterances of `languages` (None = all) and/or of `utt_ids`."""
        keep = [
            u
            for u in self.utts
            if (languages is None or u.lang in languages) and (utt_ids is None or u.utt_id in utt_ids)
        ]
        return DataDir(self.path, keep, self.recordings)

    @classmethod
    def load(cls, path: str | os.PathLike, default_lang: str | None = None) -> "DataDir":
        """Read a data dir. `utt2lang` is required unless `default_lang` is given. Utterances are the keys of
        `text`; every other per-utterance file must hold the same keys."""
        path = Path(path)
        if not path.is_dir():
            raise DQWhisperError(f"{path}: data dir does not exist")
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise DQWhisperError(f"{path / name}: missing (a data dir needs {', '.join(REQUIRED_FILES)})")
        wavs, _ = read_kaldi_map(path / "wav.scp")
        texts, _ = read_kaldi_map(path / "text", allow_empty_value=True)
        spks, _ = read_kaldi_map(path / "utt2spk")
        if (path / "utt2lang").is_file():
            langs, _ = read_kaldi_map(path / "utt2lang")
        elif default_lang is not None:
            langs = {u: default_lang for u in texts}
        else:
            raise DQWhisperError(
                f"{path / 'utt2lang'}: missing (needed for the language token; "
                "importers write it, or pass default_lang)"
            )
        segments = _parse_segments(path / "segments") if (path / "segments").is_file() else None

        keys = set(texts)
        for name, mapping in (("utt2spk", spks), ("utt2lang", langs)):
            _same_keys(path / name, keys, set(mapping), path / "text")
        if segments is None:
            _same_keys(path / "wav.scp", keys, set(wavs), path / "text")
        else:
            _same_keys(path / "segments", keys, set(segments), path / "text")
            for utt, (rec, _, _) in segments.items():
                if rec not in wavs:
                    raise DQWhisperError(
                        f"{path / 'segments'}: utterance '{utt}' refers to recording '{rec}' "
                        f"that is not in {path / 'wav.scp'}"
                    )
        utts = []
        for utt in keys:
            if segments is not None:
                rec, start, end = segments[utt]
                seg = None if (start, end) == (0.0, -1.0) else (start, end)  # the whole recording
                utts.append(Utterance(utt, wavs[rec], texts[utt], spks[utt], langs[utt], seg))
            else:
                utts.append(Utterance(utt, wavs[utt], texts[utt], spks[utt], langs[utt]))
        return cls(path, utts, wavs)

    def resolve(self, wav: str) -> str:
        """A wav.scp path made absolute against the data dir (commands are returned as they are)."""
        if is_pipe(wav):
            return wav
        p = Path(wav)
        return str(p if p.is_absolute() else self.path / p)

    def load_audio(self, utt: Utterance) -> np.ndarray:
        """float32 mono 16 kHz samples of `utt` (its segment only, where it has one)."""
        return load_wav(self.resolve(utt.wav), utt.segment)

    def duration(self, utt: Utterance) -> float:
        """Seconds. Reads the header, not the samples, where it can (segments: from the times; pipes: decoded)."""
        if utt.segment is not None and utt.segment[1] != -1:
            return utt.segment[1] - utt.segment[0]
        wav = self.resolve(utt.wav)
        total = wav_duration(wav)
        if utt.segment is not None:
            return max(0.0, total - utt.segment[0])
        return total


def _same_keys(file: Path, want: set[str], got: set[str], ref: Path) -> None:
    missing, extra = sorted(want - got), sorted(got - want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} utterance(s) of {ref.name} missing, e.g. '{missing[0]}'")
        if extra:
            parts.append(f"{len(extra)} key(s) not in {ref.name}, e.g. '{extra[0]}'")
        raise DQWhisperError(f"{file}: key set differs from {ref}: " + "; ".join(parts))


def _run_pipe(cmd: str) -> bytes:
    command = cmd.rstrip()[:-1].strip()
    proc = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DQWhisperError(
            f"wav.scp command failed (exit {proc.returncode}): {command!r}: {err[-1] if err else 'no message'}"
        )
    if not proc.stdout:
        raise DQWhisperError(f"wav.scp command wrote no audio: {command!r}")
    return proc.stdout


def _decode(source: str | bytes, what: str) -> tuple[np.ndarray, int]:
    """Decode a whole file/bytes -> (samples (T,) float32 mono, rate)."""
    try:
        data, rate = sf.read(
            io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32", always_2d=True
        )
        return data.mean(axis=1).astype(np.float32), rate
    except Exception as sf_error:  # noqa: BLE001 - fall back to torchcodec (mp3, m4a, opus, ...)
        try:
            from torchcodec.decoders import AudioDecoder

            samples = AudioDecoder(source).get_all_samples()
            return samples.data.mean(dim=0).numpy().astype(np.float32), int(samples.sample_rate)
        except Exception as tc_error:  # noqa: BLE001
            raise DQWhisperError(f"{what}: cannot decode audio ({sf_error}; {tc_error})") from None


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return samples
    return AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, target).numpy().astype(np.float32)


def load_wav(wav: str, segment: tuple[float, float] | None = None) -> np.ndarray:
    """Load a resolved wav.scp value (absolute path or pipe) -> float32 mono 16 kHz, cut to `segment`."""
    if is_pipe(wav):
        samples, rate = _decode(_run_pipe(wav), wav)
        if segment is not None:
            start = int(round(segment[0] * rate))
            stop = None if segment[1] == -1 else int(round(segment[1] * rate))
            samples = samples[start:stop]
        return resample(samples, rate)
    if not os.path.isfile(wav):
        raise DQWhisperError(f"{wav}: audio file does not exist")
    if Path(wav).suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            info = sf.info(wav)
            start, stop = 0, None
            if segment is not None:
                start = int(round(segment[0] * info.samplerate))
                stop = None if segment[1] == -1 else int(round(segment[1] * info.samplerate))
            data, rate = sf.read(wav, start=start, stop=stop, dtype="float32", always_2d=True)
            return resample(data.mean(axis=1).astype(np.float32), rate)
        except sf.LibsndfileError:
            pass  # e.g. a .wav that holds mp3 or an odd codec: let torchcodec try
    samples, rate = _decode(wav, wav)
    if segment is not None:
        start = int(round(segment[0] * rate))
        stop = None if segment[1] == -1 else int(round(segment[1] * rate))
        samples = samples[start:stop]
    return resample(samples, rate)


def wav_duration(wav: str) -> float:
    """Seconds of a resolved wav.scp value, from the header where the format has one."""
    if is_pipe(wav):
        samples, rate = _decode(_run_pipe(wav), wav)
        return len(samples) / rate
    if not os.path.isfile(wav):
        raise DQWhisperError(f"{wav}: audio file does not exist")
    try:
        info = sf.info(wav)
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001
        pass
    try:
        from torchcodec.decoders import AudioDecoder

        meta = AudioDecoder(wav).metadata
        if meta.duration_seconds_from_header:
            return float(meta.duration_seconds_from_header)
    except Exception:  # noqa: BLE001
        pass
    samples, rate = _decode(wav, wav)
    return len(samples) / rate


def _write_map(path: Path, mapping: dict[str, str]) -> None:
    lines = []
    for key in sorted(mapping):
        value = mapping[key]
        if not key or any(c.isspace() for c in key):
            raise DQWhisperError(f"{path}: key {key!r} is empty or has whitespace")
        if "\n" in value:
            raise DQWhisperError(f"{path}: value of '{key}' has a newline")
        lines.append(f"{key} {value}".rstrip() + "\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def _recording_id(wav: str) -> str:
    stem = Path(wav.split()[0] if is_pipe(wav) else wav).stem or "rec"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return f"{stem}-{hashlib.sha1(wav.encode()).hexdigest()[:8]}"


def write_data_dir(path: str | os.PathLike, utts: list[Utterance], recordings: dict[str, str] | None = None) -> None:
    """Write `utts` as a data dir (files sorted by key, LC_ALL=C order). Utterances without a segment get a
    wav.scp line under their own id. Utterances with a segment refer to a recording: its id is looked up in
    `recordings` ({recording_id: wav.scp value}) by wav value, or made from the path and a hash of it. When any
    utterance has a segment, the others get a whole-recording segment (`rec 0 -1`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = [u.utt_id for u in utts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DQWhisperError(f"{path}: duplicate utterance id '{dup}'")
    rec_of_wav = {wav: rec for rec, wav in (recordings or {}).items()}
    wav_scp: dict[str, str] = {}
    segments: dict[str, str] = {}
    any_segment = any(u.segment is not None for u in utts)
    for u in utts:
        if u.segment is None:
            wav_scp[u.utt_id] = u.wav
            if any_segment:  # a segments file must cover every utterance: "0 -1" is the whole recording
                segments[u.utt_id] = f"{u.utt_id} 0.000 -1.000"
        else:
            rec = rec_of_wav.setdefault(u.wav, _recording_id(u.wav))
            if rec in wav_scp and wav_scp[rec] != u.wav:
                raise DQWhisperError(f"{path}: recording id '{rec}' stands for two wav.scp values")
            wav_scp[rec] = u.wav
            segments[u.utt_id] = f"{rec} {u.segment[0]:.3f} {u.segment[1]:.3f}"
    spk2utt: dict[str, list[str]] = {}
    for u in sorted(utts, key=lambda u: u.utt_id):
        spk2utt.setdefault(u.speaker, []).append(u.utt_id)
    _write_map(path / "wav.scp", wav_scp)
    _write_map(path / "text", {u.utt_id: " ".join(u.text.split()) for u in utts})
    _write_map(path / "utt2spk", {u.utt_id: u.speaker for u in utts})
    _write_map(path / "utt2lang", {u.utt_id: u.lang for u in utts})
    _write_map(path / "spk2utt", {s: " ".join(v) for s, v in spk2utt.items()})
    if segments:
        _write_map(path / "segments", segments)
    elif (path / "segments").exists():
        (path / "segments").unlink()
