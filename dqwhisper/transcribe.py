"""Transcribe wav files with a Whisper teacher (greedy, one 30 s window per file).

    python -m dqwhisper.transcribe --model base [--language ja] FILE.wav [...]

Prints `<file>\t<language>\t<text>` per file. Without --language the language is detected per file.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import whisper

from dqwhisper.models.load import load_whisper
from dqwhisper.data.dataset import window_log_mel
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Transcript:
    path: str
    language: str
    text: str
    tokens: tuple[int, ...]


def load_wav(path: str | Path):
    """float32 mono 16 kHz samples (ffmpeg through openai-whisper), errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DQWhisperError(f"audio file {path} does not exist")
    try:
        return whisper.load_audio(str(path))
    except Exception as e:
        raise DQWhisperError(f"audio file {path} could not be decoded ({e})") from e


@torch.no_grad()
def transcribe_file(model: whisper.model.Whisper, path: str | Path, language: str | None = None) -> Transcript:
    """Greedy decoding without timestamps of the first 30 s window; language forced or detected."""
    audio = load_wav(path)
    n_ctx = model.dims.n_audio_ctx
    mel = window_log_mel(audio, model.dims.n_mels, n_ctx)
    mel = mel.to(next(model.parameters()).device)
    if language is None and model.is_multilingual:
        _, probs = model.detect_language(mel)
        language = max(probs, key=probs.get)
    options = whisper.DecodingOptions(language=language or "en", without_timestamps=True, temperature=0.0,
                                      fp16=mel.device.type == "cuda")
    result = whisper.decode(model, mel, options)
    return Transcript(str(path), result.language, result.text.strip(), tuple(result.tokens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dqwhisper.transcribe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", help="store name, .pt path or CTranslate2 directory")
    parser.add_argument("--language", default=None, help="ISO 639-1 code; detected when left out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    try:
        model = load_whisper(args.model, args.device)
        for f in args.files:
            t = transcribe_file(model, f, args.language)
            print(f"{t.path}\t{t.language}\t{t.text}", flush=True)
    except DQWhisperError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
