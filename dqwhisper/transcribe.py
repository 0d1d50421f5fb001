"""Transcribe recordings of any length with any model of the toolkit (openai-whisper's CLI habits).

    dqwhisper transcribe AUDIO [AUDIO ...] --model M [--language L] [--output_format txt|srt|vtt|tsv|json|all]
                         [--output_dir DIR] [--beam_size N] [--threads N]
    python -m dqwhisper.transcribe ...   (the same)

M is anything `dqwhisper.models.load_model` reads: a store name (base), a .pt checkpoint, a .dqw export, a
CTranslate2 dir or an experiment dir. AUDIO is anything ffmpeg reads (wav, flac, mp3, m4a, a video's sound track; any
rate, any channels), streamed through ffmpeg in blocks, so memory stays bounded on long files.

Per block: Silero VAD (faster-whisper's bundled copy) finds the speech regions (a region longer than the model's
window is split at its last short pause before the limit). For a 30 s window (openai's models) consecutive regions
are merged into chunks that fill the window; for a shorter window (the toolkit's adapted teacher and 8 s students,
trained on single utterances) each region is its own chunk, so a chunk is one sentence-like piece between pauses;
chunks are decoded in batches by `dqwhisper.decoding.decode_mels` (openai transcribe's temperature fallback, token cap,
special tokens suppressed). Each chunk is one segment, its start and end taken from the audio. The language is
detected once per file (first batch) unless given. A file that cannot be read is reported in one line and the other
files go on; a silent or empty file gives an empty transcript.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from tqdm import tqdm
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer
from whisper.utils import get_writer

from dqwhisper.data.dataset import window_log_mel
from dqwhisper.decoding import SAMPLE_RATE, DecodeConfig, decode_mels
from dqwhisper.models.load import load_model
from dqwhisper.utils import DQWhisperError, get_logger, resolve_device

log = get_logger(__name__)

NO_SPACE_LANGUAGES = ("ja", "zh", "yue", "th", "lo", "my", "km", "bo")
OUTPUT_FORMATS = ("txt", "srt", "vtt", "tsv", "json", "all")


@dataclass
class VadConfig:
    threshold: float = 0.5  # Silero speech probability above which a 32 ms frame is speech
    min_silence_ms: int = 500  # a pause at least this long ends a speech region
    speech_pad_ms: int = 400  # regions are widened by this much on each side (within the audio; chosen on dev)
    min_speech_ms: int = 150  # shorter regions are dropped


@dataclass
class LongFormConfig:
    block_seconds: float = 120.0  # audio read (and VAD'd) per step; the memory bound
    vad: VadConfig = field(default_factory=VadConfig)
    max_chunk_seconds: Optional[float] = None  # chunk length limit; None = the model's window
    # merge consecutive speech regions up to the limit (False: one region, one chunk); None = merge only for a 30 s
    # window (openai's models, trained on 30 s of running speech), not for shorter windows (the toolkit's models,
    # trained on single utterances: several sentences in one window make them stop early or loop)
    merge: Optional[bool] = None
    sort_batches: int = 4  # chunks are decoded this many batches at a time, sorted by length (1 = in time order)
    drop_no_speech: bool = True  # drop a chunk whose P(no speech) > no_speech_threshold and logprob < logprob_threshold
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(batch_size=8))


@dataclass
class Segment:
    start: float  # seconds from the start of the file
    end: float
    text: str
    avg_logprob: float = 0.0
    runaway: bool = False


@dataclass
class Chunk:
    start: int  # samples, absolute
    audio: np.ndarray  # float32 16 kHz mono, at most one window

    @property
    def end(self) -> int:
        return self.start + len(self.audio)


# ---------------------------------------------------------------------------------------------------------- audio
def audio_blocks(path: str | Path, block_samples: int) -> Iterator[np.ndarray]:
    """float32 mono 16 kHz blocks of `block_samples` (the last one shorter). A 16 kHz mono file libsndfile reads
    (wav, flac, ogg) is read directly (the same samples ffmpeg gives, without starting a process); anything else
    goes through ffmpeg (`ffmpeg_blocks`)."""
    path = Path(path)
    try:
        info = sf.info(str(path)) if path.is_file() else None
    except (sf.LibsndfileError, RuntimeError):
        info = None
    if info is None or info.samplerate != SAMPLE_RATE or info.channels != 1:
        yield from ffmpeg_blocks(path, block_samples)
        return
    try:
        for block in sf.blocks(str(path), blocksize=block_samples, dtype="int16"):
            yield block.astype(np.float32) / 32768.0
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DQWhisperError(f"audio file {path} could not be decoded (libsndfile: {e})") from None


def ffmpeg_blocks(path: str | Path, block_samples: int) -> Iterator[np.ndarray]:
    """float32 mono 16 kHz blocks of `block_samples` (the last one shorter) decoded by ffmpeg as a stream; errors
    (missing file, not audio) are DQWhisperErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DQWhisperError(f"audio file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if shutil.which("ffmpeg") is None:
        raise DQWhisperError("ffmpeg is not installed (apt-get install ffmpeg)")
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-threads",
        "0",
        "-i",
        str(path),
        "-vn",
        "-f",
        "s16le",
        "-ac",
        "1",
        "-acodec",
        "pcm_s16le",
        "-ar",
        str(SAMPLE_RATE),
        "-",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            data = proc.stdout.read(block_samples * 2)
            if not data:
                break
            yield np.frombuffer(data[: len(data) // 2 * 2], np.int16).astype(np.float32) / 32768.0
        err = proc.stderr.read().decode(errors="replace").strip()
        if proc.wait() != 0:
            last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
            raise DQWhisperError(f"audio file {path} could not be decoded (ffmpeg: {last})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def probe_seconds(path: str | Path) -> float | None:
    """Duration from ffprobe's header read (None when unknown); only for the progress bar."""
    if shutil.which("ffprobe") is None:
        return None
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
        capture_output=True,
        text=True,
    )
    try:
        return float(out.stdout.strip())
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- VAD and chunking
def load_vad() -> None:
    """Load Silero VAD's onnx session now (it is cached), e.g. before timing a run."""
    from faster_whisper.vad import get_vad_model

    get_vad_model()


def speech_regions(audio: np.ndarray, vad: VadConfig, max_samples: int | None = None) -> list[tuple[int, int]]:
    """Silero VAD speech regions [(start, end)] in samples of `audio` (16 kHz). A region longer than `max_samples`
    (padding included) is split by Silero at its last pause of >= 98 ms before the limit (else just before it)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if len(audio) == 0:
        return []
    opts = VadOptions(
        max_speech_duration_s=float("inf") if max_samples is None else max_samples / SAMPLE_RATE,
        threshold=vad.threshold,
        min_silence_duration_ms=vad.min_silence_ms,
        speech_pad_ms=vad.speech_pad_ms,
        min_speech_duration_ms=vad.min_speech_ms,
    )
    return [(int(r["start"]), min(int(r["end"]), len(audio))) for r in get_speech_timestamps(audio, opts)]


def plan_chunks(regions: list[tuple[int, int]], max_samples: int, merge: bool = True) -> list[tuple[int, int]]:
    """Merge consecutive regions into spans of at most `max_samples` (the span keeps the pauses between them; not
    with merge=False) and cut a longer region into equal pieces that fit. Spans are in order and do not overlap."""
    pieces = []
    for start, end in regions:
        n = max(1, math.ceil((end - start) / max_samples))
        step = math.ceil((end - start) / n)
        pieces += [(s, min(s + step, end)) for s in range(start, end, step)]
    spans: list[tuple[int, int]] = []
    for start, end in pieces:
        if merge and spans and end - spans[-1][0] <= max_samples and start >= spans[-1][1]:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((max(start, spans[-1][1]) if spans else start, end))
    return [(s, e) for s, e in spans if e > s]


def stream_chunks(
    blocks: Iterator[np.ndarray], max_samples: int, vad: VadConfig, merge: bool = True
) -> Iterator[Chunk]:
    """Chunks of speech from a stream of audio blocks, in order. The audio kept between blocks is the unfinished
    tail (the last chunk that may still grow, or the last region that may still go on), so memory is bounded by
    about one block plus one window."""
    guard = int(SAMPLE_RATE * (vad.min_silence_ms + 2 * vad.speech_pad_ms) / 1000) + 512
    buf = np.zeros(0, np.float32)
    offset = 0  # absolute sample index of buf[0]
    blocks = iter(blocks)
    nxt = next(blocks, None)
    while nxt is not None:
        buf = np.concatenate([buf, nxt]) if len(buf) else nxt
        nxt = next(blocks, None)
        final = nxt is None
        regions = speech_regions(buf, vad, max_samples)
        keep_from = len(buf)
        if final:
            spans = plan_chunks(regions, max_samples, merge)
        else:
            cut = len(buf) - guard  # a region ending after this may go on in the next block
            closed = [r for r in regions if r[1] <= cut]
            open_start = min([r[0] for r in regions if r[1] > cut], default=cut)
            if open_start < cut - 4 * max_samples:  # minutes of speech without a pause: cut it here
                closed.append((open_start, cut))
                open_start = cut
            spans = plan_chunks(closed, max_samples, merge)
            keep_from = open_start
            if spans:  # the last chunk may still take the next region
                keep_from = min(keep_from, spans[-1][0])
                spans = spans[:-1]
        for s, e in spans:
            yield Chunk(offset + s, buf[s:e].copy())
        buf = buf[keep_from:].copy()
        offset += keep_from


# ------------------------------------------------------------------------------------------------------ decoding
def model_window_samples(model) -> int:
    return model.dims.n_audio_ctx * 320


def detect_language(model, features: Tensor) -> str:
    """The language with the highest summed probability over the rows of encoder output `features`."""
    if not model.is_multilingual:
        return "en"
    tok = get_tokenizer(True, num_languages=model.num_languages, task="transcribe")
    _, probs = model.detect_language(features, tok)
    total: dict[str, float] = {}
    for p in probs:
        for k, v in p.items():
            total[k] = total.get(k, 0.0) + v
    return max(total, key=total.get)


@torch.no_grad()
def transcribe_audio(
    model, blocks: Iterator[np.ndarray], language: str | None = None, cfg: LongFormConfig | None = None, progress=None
) -> dict:
    """{"text", "language", "segments": [{"start", "end", "text"}]} for one recording given as audio blocks."""
    cfg = cfg or LongFormConfig()
    dcfg = cfg.decode
    device = next(model.parameters()).device
    fp16 = bool(dcfg.fp16) and device.type == "cuda"
    window = model_window_samples(model)
    max_samples = window if cfg.max_chunk_seconds is None else min(window, int(cfg.max_chunk_seconds * SAMPLE_RATE))
    merge = cfg.merge if cfg.merge is not None else window >= 30 * SAMPLE_RATE
    segments: list[Segment] = []

    def run(batch: list[Chunk]) -> None:
        nonlocal language
        mel = torch.stack(
            [window_log_mel(c.audio, model.dims.n_mels, model.dims.n_audio_ctx, dcfg.mel_padding) for c in batch]
        ).to(device)
        features = model.encoder(mel.half() if fp16 else mel)
        if language is None:
            language = detect_language(model, features)
        hyps = decode_mels(model, features, language, [len(c.audio) / SAMPLE_RATE for c in batch], dcfg, fp16)
        for c, h in zip(batch, hyps):
            silent = (
                cfg.drop_no_speech
                and dcfg.no_speech_threshold is not None
                and h.no_speech_prob > dcfg.no_speech_threshold
                and dcfg.logprob_threshold is not None
                and h.avg_logprob < dcfg.logprob_threshold
            )
            if h.text and not silent:
                segments.append(
                    Segment(
                        round(c.start / SAMPLE_RATE, 3), round(c.end / SAMPLE_RATE, 3), h.text, h.avg_logprob, h.runaway
                    )
                )
        if progress is not None:
            progress.update(max(0.0, round(max(c.end for c in batch) / SAMPLE_RATE - progress.n, 2)))

    def run_sorted(pending: list[Chunk]) -> None:  # batches of similar lengths: less padding in each decoder call
        pending = sorted(pending, key=lambda c: -len(c.audio))
        for i in range(0, len(pending), dcfg.batch_size):
            run(pending[i : i + dcfg.batch_size])

    pending: list[Chunk] = []
    for chunk in stream_chunks(blocks, max_samples, cfg.vad, merge):
        pending.append(chunk)
        if len(pending) == dcfg.batch_size * cfg.sort_batches:
            run_sorted(pending)
            pending = []
    if pending:
        run_sorted(pending)
    segments.sort(key=lambda s: s.start)
    language = language or ""
    sep = "" if language in NO_SPACE_LANGUAGES else " "
    return {
        "text": sep.join(s.text for s in segments),
        "language": language,
        "segments": [
            {
                "id": i,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "avg_logprob": s.avg_logprob,
                "runaway": s.runaway,
            }
            for i, s in enumerate(segments)
        ],
    }


def transcribe_file(
    model, path: str | Path, language: str | None = None, cfg: LongFormConfig | None = None, progress=None
) -> dict:
    cfg = cfg or LongFormConfig()
    blocks = audio_blocks(path, int(cfg.block_seconds * SAMPLE_RATE))
    return transcribe_audio(model, blocks, language, cfg, progress)


def write_outputs(result: dict, audio_path: str | Path, output_dir: str | Path, output_format: str) -> list[Path]:
    """openai-whisper's writers: <output_dir>/<stem>.<ext>."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = get_writer(output_format, str(out))
    writer(result, str(audio_path), {"max_line_width": None, "max_line_count": None, "highlight_words": False})
    exts = ["txt", "vtt", "srt", "tsv", "json"] if output_format == "all" else [output_format]
    return [out / f"{Path(audio_path).stem}.{e}" for e in exts]


# -------------------------------------------------------------------------------------------------------- the CLI
def build_parser(prog: str = "dqwhisper transcribe") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("audio", nargs="+", help="audio or video files (anything ffmpeg reads)")
    p.add_argument("--model", default="base", help="store name, .pt, .dqw, CTranslate2 dir or experiment dir")
    p.add_argument("--language", default=None, help="language code; detected per file when left out")
    p.add_argument("--output_format", "-f", default="all", choices=OUTPUT_FORMATS)
    p.add_argument("--output_dir", "-o", default=".", help="where <stem>.<format> files go")
    p.add_argument("--beam_size", type=int, default=1, help="1 = greedy")
    p.add_argument("--batch_size", type=int, default=8, help="chunks per decoding call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--export_mode", default="int8", choices=["int8", "dequant"], help="how a .dqw export runs")
    p.add_argument("--no_speech_threshold", type=float, default=0.6)
    p.add_argument("--vad_threshold", type=float, default=VadConfig.threshold)
    p.add_argument(
        "--merge",
        default="auto",
        choices=["auto", "yes", "no"],
        help="merge speech regions up to the window (auto: only for a 30 s window)",
    )
    p.add_argument("--verbose", action="store_true", help="print each segment as it is written")
    return p


def main(argv: list[str] | None = None, prog: str = "dqwhisper transcribe") -> int:
    """Exit status 0 when every file was transcribed, 1 when some failed (each reported on one line), 2 when the
    model could not be loaded."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.language is not None:
        code = args.language.lower()
        code = code if code in LANGUAGES else TO_LANGUAGE_CODE.get(code)
        if code is None:
            parser.error(f"--language {args.language}: not a Whisper language code or name")
        args.language = code
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    decode = DecodeConfig(
        beam_size=args.beam_size,
        batch_size=args.batch_size,
        no_speech_threshold=args.no_speech_threshold,
        device=args.device,
        fp16=args.device != "cpu",
    )
    merge = {"auto": None, "yes": True, "no": False}[args.merge]
    cfg = LongFormConfig(vad=VadConfig(threshold=args.vad_threshold), merge=merge, decode=decode)
    try:
        model = load_model(args.model, resolve_device(args.device), export_mode=args.export_mode)
    except DQWhisperError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    failed = 0
    files = tqdm(args.audio, desc="files", unit="file", disable=len(args.audio) < 2)
    for path in files:
        total = probe_seconds(path) if Path(path).is_file() else None
        bar = tqdm(total=None if total is None else round(total, 2), desc=Path(path).name, unit="s", leave=False)
        try:
            result = transcribe_file(model, path, args.language, cfg, progress=bar)
            written = write_outputs(result, path, args.output_dir, args.output_format)
        except DQWhisperError as e:
            failed += 1
            tqdm.write(f"{prog}: error: {e}", file=sys.stderr)
            continue
        except Exception as e:  # one bad file must not stop the others
            failed += 1
            tqdm.write(f"{prog}: error: {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        finally:
            bar.close()
        if args.verbose:
            for s in result["segments"]:
                tqdm.write(f"[{s['start']:.2f} --> {s['end']:.2f}] {s['text']}")
        log.info(
            "%s: %s, %d segments -> %s",
            path,
            result["language"],
            len(result["segments"]),
            ", ".join(str(w) for w in written),
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m dqwhisper.transcribe"))
