"""Batched decoding with openai-whisper's own machinery, and CTC greedy decoding as a fast path.

`decode_batch` runs `whisper.decoding.DecodingTask` (greedy or beam search, its logit filters, no timestamps,
temperature 0) on a batch of one language. `ctc_greedy` collapses CTC argmax paths into sentencepiece units.
`decode_utterances` ties both to a Kaldi data dir (batches of one language, longest first) and times the run.
`audio_to_mel` makes the encoder input for the model's own window (`mel_padding` says how the window is filled).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES

from dqwhisper.data.dataset import window_log_mel
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 320  # 16 kHz samples per encoder position (mel hop 160, conv stride 2)
DETECT = "detect"


@dataclass
class DecodeConfig:
    test_sets: list[str] = field(default_factory=list)  # data dirs; [] = the experiment's data.data_dir/<test_sets>
    out_dir: Optional[str] = None  # output folder; null = TARGET's decode_<set>_<tag>/
    tag: Optional[str] = None  # output folder tag; null = <checkpoint>_<greedy|beamN|ctc>
    checkpoint: str = "best"  # best | last | avg | export | path to a .pt file
    export_mode: str = "int8"  # how export/model.dqw runs: int8 (int8 kernels) | dequant (exact float reference)
    beam_size: int = 1  # 1 = greedy; N > 1 = beam search with N beams
    patience: Optional[float] = None  # beam search patience; null = 1.0
    length_penalty: Optional[float] = None  # alpha in [0, 1] for ranking finished beams; null = length normalization
    max_new_tokens: Optional[int] = None  # tokens sampled per utterance at most; null = n_text_ctx // 2
    language: Optional[str] = None  # null = each utterance's utt2lang; "detect" = Whisper language ID; or one code
    ctc: bool = False  # CTC greedy decoding over the CTC head's sentencepiece units (no autoregressive decoder)
    audio_window: Optional[float] = None  # encoder window in seconds; null = the model's own (n_audio_ctx / 50)
    mel_padding: str = "zeros"  # zeros (transcribe-style, what training uses) | audio; see window_log_mel
    batch_size: int = 8  # utterances per whisper decoding call (one language per batch)
    device: str = "cpu"  # cpu | cuda | auto
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    fp16: bool = False  # half-precision decoding (CUDA only; ignored on the CPU)
    raw: bool = False  # score the text as is: no Whisper normalizers (case and punctuation count)
    cer_languages: list[str] = field(default_factory=lambda: ["ja", "zh", "yue", "th", "lo", "my", "km", "bo"])  # CER
    languages: Optional[list[str]] = None  # decode only these utt2lang languages; null = all
    max_utts: Optional[int] = None  # decode only the first N utterances (by id) of each set; null = all
    shard: Optional[str] = None  # "k/n": decode only the k-th (1-based) of n interleaved parts (scripts/decode.sh)


class BatchedDecodingTask(DecodingTask):
    """openai-whisper's DecodingTask with beam search that works for batches of more than one utterance.

    openai-whisper 20250625 repeats the prompt tokens `n_group` times per utterance but not the audio features, so
    beam search over a batch > 1 cross-attends beam rows to the wrong utterances' features (a size mismatch, or the
    assertion after the main loop). Here the encoder output is repeated per beam once, after language detection
    (which runs on one row per utterance); `run()` itself, the decoders, rankers and logit filters are whisper's.
    """

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        return super()._get_audio_features(mel).repeat_interleave(self.n_group, dim=0)

    def _detect_language(self, audio_features: Tensor, tokens: Tensor):
        return super()._detect_language(audio_features[:: self.n_group], tokens)


def decoding_options(cfg: DecodeConfig, language: str | None, fp16: bool = False) -> DecodingOptions:
    """Whisper options for one batch: temperature 0, no timestamps, greedy or beam search per `cfg`."""
    beam = cfg.beam_size > 1
    return DecodingOptions(
        task="transcribe", language=language, temperature=0.0, sample_len=cfg.max_new_tokens,
        beam_size=cfg.beam_size if beam else None, patience=cfg.patience if beam else None,
        length_penalty=cfg.length_penalty, without_timestamps=True, fp16=fp16,
    )


@torch.no_grad()
def decode_batch(model: Whisper, mel: Tensor, options: DecodingOptions) -> list[DecodingResult]:
    """mel (B, n_mels, 2 * n_audio_ctx), or encoder output (B, n_audio_ctx, n_audio_state) which whisper then does not
    re-encode -> one whisper DecodingResult per row (beam search safe for B > 1)."""
    if mel.ndim != 3:
        raise ValueError(f"mel must be (B, n_mels, frames) or (B, n_ctx, d), got {tuple(mel.shape)}")
    return BatchedDecodingTask(model, options).run(mel)


def window_samples(model: Whisper) -> int:
    """Audio samples the encoder's window covers: n_audio_ctx * 320 (480000 for Whisper's 30 s)."""
    return model.dims.n_audio_ctx * SAMPLES_PER_FRAME




def audio_to_mel(audios: list[np.ndarray], model: Whisper, device: torch.device | str = "cpu",
                 padding: str = "zeros") -> Tensor:
    """Waveforms -> log-mel (B, n_mels, 2 * n_audio_ctx) for the model's window (`window_log_mel`)."""
    return torch.stack([window_log_mel(a, model.dims.n_mels, model.dims.n_audio_ctx, padding)
                        for a in audios]).to(device)


def ctc_greedy(logits: Tensor, lengths: Sequence[int] | None = None, blank: int = 0) -> list[list[int]]:
    """CTC best path: argmax per frame, merge repeats, drop blanks.

    logits (B, T, V); lengths (B) frames per row that hold real audio (None = all T). Returns per row the unit ids
    minus one (CTC label k + 1 is sentencepiece id k, blank = 0), as DESIGN.md's `ctc_targets` define them.
    """
    best = logits.argmax(dim=-1).cpu()
    out = []
    for row, ids in enumerate(best.tolist()):
        n = len(ids) if lengths is None else int(lengths[row])
        units, prev = [], None
        for i in ids[:n]:
            if i != prev and i != blank:
                units.append(i - 1)
            prev = i
        out.append(units)
    return out


def load_ctc_bpe(model: Whisper, fallback: str | Path | None = None):
    """The sentencepiece model of the CTC units: the checkpoint's serialized copy, else a bpe.model file."""
    from dqwhisper.data.bpe import BPE

    proto = getattr(model, "ctc_bpe", None)
    if proto:
        return BPE.load(bytes(proto))
    if fallback is not None and Path(fallback).is_file():
        return BPE.load(fallback)
    raise DQWhisperError("CTC decoding needs the sentencepiece model of the CTC units: the checkpoint has no "
                         f"'bpe_model' and {fallback or 'no bpe.model file'} was not found")


@torch.no_grad()
def ctc_decode_batch(model: Whisper, mel: Tensor, n_samples: Sequence[int], bpe) -> list[tuple[str, int]]:
    """CTC greedy transcripts of a mel batch: (text, number of units) per row. Encoder frames past the real audio
    (padding) are ignored."""
    features = model.encoder(mel)
    lengths = [min(math.ceil(n / SAMPLES_PER_FRAME), features.shape[1]) for n in n_samples]
    out = []
    for units in ctc_greedy(model.ctc_logits(features), lengths):
        bad = [u for u in units if not 0 <= u < bpe.vocab_size]
        if bad:
            raise DQWhisperError(f"CTC head emits unit {bad[0] + 1} but the sentencepiece model has "
                                 f"{bpe.vocab_size} pieces (+ blank)")
        out.append((bpe.decode(units), len(units)))
    return out


@dataclass
class UttHypothesis:
    utt_id: str
    lang: str  # reference language (utt2lang)
    text: str
    n_tokens: int  # text tokens (or CTC units) produced
    seconds: float  # audio duration
    language: str  # language the decoder used (detected or forced)


@dataclass
class DecodeRun:
    hyps: list[UttHypothesis]
    wall_seconds: float  # audio loading, mel, encoder and decoder, model loading excluded
    audio_seconds: float
    n_tokens: int
    n_trimmed: int  # utterances longer than the window, cut to it

    @property
    def rtf(self) -> float:
        return self.wall_seconds / max(self.audio_seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.wall_seconds, 1e-9)


def select_utts(utts: Sequence, cfg: DecodeConfig) -> list:
    """The utterances `cfg` asks for: language filter, then the first max_utts, then shard k/n."""
    utts = [u for u in utts if cfg.languages is None or u.lang in set(cfg.languages)]
    if cfg.max_utts is not None:
        utts = utts[: cfg.max_utts]
    if cfg.shard:
        try:
            k, n = (int(x) for x in str(cfg.shard).split("/"))
            assert 1 <= k <= n
        except (ValueError, AssertionError):
            raise DQWhisperError(f"decode.shard={cfg.shard!r}: expected 'k/n' with 1 <= k <= n") from None
        utts = utts[k - 1:: n]
    return list(utts)


def _check_language(lang: str, where: str) -> None:
    if lang not in LANGUAGES:
        raise DQWhisperError(f"{where}: language '{lang}' is not one of Whisper's language codes")


def decode_utterances(model: Whisper, data, utts: Sequence, cfg: DecodeConfig, progress: bool = True,
                      bpe_fallback: str | Path | None = None) -> DecodeRun:
    """Decode `utts` of DataDir `data` (anything with load_audio(utt) and duration(utt)) in batches of one language
    (forced from utt2lang or cfg.language, or detected), longest first, and time it (audio reading included)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    fp16 = bool(cfg.fp16) and device.type == "cuda"
    if cfg.beam_size < 1 or cfg.batch_size < 1:
        raise DQWhisperError(f"decode.beam_size ({cfg.beam_size}) and decode.batch_size ({cfg.batch_size}) "
                             "must be >= 1")
    bpe = None
    if cfg.ctc:
        if getattr(model, "ctc_head", None) is None:
            raise DQWhisperError("decode.ctc=true but this model has no CTC head")
        bpe = load_ctc_bpe(model, bpe_fallback)
    groups: dict[str | None, list] = {}
    for u in utts:
        if cfg.language == DETECT:
            key = None
        else:
            key = cfg.language or u.lang
            _check_language(key, f"utterance {u.utt_id}" if not cfg.language else "decode.language")
        groups.setdefault(key, []).append(u)

    padding = cfg.mel_padding
    n_window = window_samples(model)
    hyps, n_tokens, n_trimmed, audio_seconds = [], 0, 0, 0.0
    bar = tqdm(total=len(utts), desc="decode", unit="utt", disable=not progress, leave=False)
    start = time.perf_counter()
    for language, members in groups.items():
        options = decoding_options(cfg, language, fp16)
        members = sorted(members, key=lambda u: (-data.duration(u), u.utt_id))  # similar lengths share a batch
        for i in range(0, len(members), cfg.batch_size):
            batch = members[i: i + cfg.batch_size]
            waves = [data.load_audio(u) for u in batch]
            n_trimmed += sum(len(w) > n_window for w in waves)
            audio_seconds += sum(len(w) for w in waves) / SAMPLE_RATE
            mel = audio_to_mel(waves, model, device, padding)
            if bpe is not None:
                results = [(text, n, language or "")
                           for text, n in ctc_decode_batch(model, mel, [len(w) for w in waves], bpe)]
            else:
                results = [(r.text, len(r.tokens), r.language) for r in decode_batch(model, mel, options)]
            for u, w, (text, n, lang_used) in zip(batch, waves, results):
                hyps.append(UttHypothesis(u.utt_id, u.lang, text.strip(), n, len(w) / SAMPLE_RATE, lang_used))
                n_tokens += n
            bar.update(len(batch))
    wall = time.perf_counter() - start
    bar.close()
    if n_trimmed:
        log.warning("%d of %d utterances are longer than the model's %.2f s window and were cut to it",
                    n_trimmed, len(utts), n_window / SAMPLE_RATE)
    hyps.sort(key=lambda h: h.utt_id)
    return DecodeRun(hyps, wall, audio_seconds, n_tokens, n_trimmed)


def apply_audio_window(model: Whisper, seconds: float | None) -> Whisper:
    """Shrink the encoder window to `seconds` for decoding (None: keep the model's own)."""
    if seconds is None:
        return model
    from dqwhisper.models.student import set_audio_window, window_frames

    frames = window_frames(seconds)
    if frames > model.dims.n_audio_ctx:
        raise DQWhisperError(f"decode.audio_window={seconds} s is longer than the model's window of "
                             f"{model.dims.n_audio_ctx / 50:.2f} s")
    return set_audio_window(model, frames)


def search_tag(cfg: DecodeConfig) -> str:
    """greedy | beam<N> | ctc, plus the window / language / raw switches that change the result."""
    tag = "ctc" if cfg.ctc else ("greedy" if cfg.beam_size <= 1 else f"beam{cfg.beam_size}")
    if cfg.audio_window is not None:
        tag += f"_w{cfg.audio_window:g}s"
    if cfg.language == DETECT:
        tag += "_detect"
    elif cfg.language:
        tag += f"_lang{cfg.language}"
    if cfg.mel_padding != "zeros":
        tag += f"_mel{cfg.mel_padding}"
    if cfg.raw:
        tag += "_raw"
    return tag


__all__ = ["DecodeConfig", "BatchedDecodingTask", "decoding_options", "decode_batch", "audio_to_mel", "ctc_greedy",
           "ctc_decode_batch", "load_ctc_bpe", "decode_utterances", "select_utts", "apply_audio_window",
           "search_tag", "DecodeRun", "UttHypothesis", "window_samples", "DETECT", "MEL_PADDINGS",
]
