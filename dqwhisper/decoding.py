"""Batched decoding with openai-whisper's own machinery and openai-whisper `transcribe`'s rules, and CTC greedy
decoding as a fast path.

`decode_mels` is the one decoder every caller uses (inference.py, transcribe, training validation): a batch of mels
(or encoder outputs), languages forced or detected, then whisper's `DecodingTask` (greedy or beam search) with
- special and timestamp tokens suppressed (no-timestamp mode), an optional no-repeat n-gram rule,
- a token cap per row from its audio duration (`token_cap`),
- temperature fallback as openai's `transcribe` does it: a row is decoded again at the next temperature (sampling,
  best of `best_of`) when its gzip compression ratio > `compression_ratio_threshold`, its average log-probability
  < `logprob_threshold` or it hit its cap; a row whose final hypothesis still hits the cap or fails the compression
  test is a *runaway*.
`ctc_greedy` collapses CTC argmax paths into sentencepiece units. `decode_utterances` ties both to a Kaldi data dir
(batches of one language, longest first) and times the run. `audio_to_mel` makes the encoder input for the model's
own window (`mel_padding` says how the window is filled).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask, LogitFilter
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES, get_tokenizer

from dqwhisper.data.bpe import BPE
from dqwhisper.data.dataset import MEL_PADDINGS, window_log_mel
from dqwhisper.data.kaldi import is_pipe
from dqwhisper.models.student import set_audio_window, window_frames
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 320  # 16 kHz samples per encoder position (mel hop 160, conv stride 2)
DETECT = "detect"
KERNELS = ("auto", "fbgemm", "int_mm", "weight_only", "float")  # dqwhisper.quant.kernels.CHOICES


@dataclass
class DecodeConfig:
    test_sets: list[str] = field(default_factory=list)  # data dirs; [] = the experiment's data.data_dir/<test_sets>
    out_dir: Optional[str] = None  # output folder; null = TARGET's decode_<set>_<tag>/
    tag: Optional[str] = None  # output folder tag; null = <checkpoint>_<greedy|beamN|ctc>
    checkpoint: str = "best"  # best | last | avg | export | path to a .pt file
    export_mode: str = "int8"  # how export/model.dqw runs: int8 (the `kernel` below) | dequant (exact float reference)
    kernel: str = "auto"  # auto (fastest per shape that runs what was trained) | fbgemm | int_mm | weight_only | float
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
    # openai-whisper transcribe's rules (see decode_mels)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # [0.0] = no fallback
    compression_ratio_threshold: Optional[float] = 2.4  # fall back when gzip ratio of the text is above; null = never
    logprob_threshold: Optional[float] = -1.0  # fall back when the average token log-probability is below; null = never
    no_speech_threshold: Optional[float] = 0.6  # no fallback when P(no speech) is above and the logprob test failed
    best_of: int = 5  # samples per fallback temperature (the most likely is kept)
    tokens_per_second: Optional[float] = 12.0  # token cap per utterance: tokens_per_second * seconds + token_cap_margin
    token_cap_margin: int = 10  # (and at most max_new_tokens); null tokens_per_second = only max_new_tokens
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens is produced twice in one hypothesis
    seed: int = 0  # seed of the fallback sampling (the same input decodes the same way)
    max_bad_fraction: float = 0.1  # unreadable utterances are skipped and counted; more than this fraction: error


def check_decode_config(cfg: DecodeConfig) -> None:
    """Value checks that need no model, so a bad setting fails before anything loads."""
    checks = [
        (cfg.beam_size >= 1, f"decode.beam_size={cfg.beam_size}: must be >= 1"),
        (cfg.batch_size >= 1, f"decode.batch_size={cfg.batch_size}: must be >= 1"),
        (cfg.max_new_tokens is None or cfg.max_new_tokens >= 1,
         f"decode.max_new_tokens={cfg.max_new_tokens}: must be >= 1 (or null)"),
        (cfg.patience is None or cfg.patience > 0, f"decode.patience={cfg.patience}: must be > 0 (or null)"),
        (cfg.length_penalty is None or 0 <= cfg.length_penalty <= 1,
         f"decode.length_penalty={cfg.length_penalty}: must be in [0, 1] (or null)"),
        (cfg.audio_window is None or cfg.audio_window > 0, f"decode.audio_window={cfg.audio_window}: must be > 0"),
        (cfg.mel_padding in MEL_PADDINGS, f"decode.mel_padding={cfg.mel_padding}: one of {', '.join(MEL_PADDINGS)}"),
        (cfg.export_mode in ("int8", "dequant"), f"decode.export_mode={cfg.export_mode}: int8 | dequant"),
        (cfg.kernel in KERNELS, f"decode.kernel={cfg.kernel}: one of {' | '.join(KERNELS)}"),
        (0 <= cfg.max_bad_fraction <= 1, f"decode.max_bad_fraction={cfg.max_bad_fraction}: must be in [0, 1]"),
        (cfg.num_threads >= 0, f"decode.num_threads={cfg.num_threads}: must be >= 0"),
        (cfg.best_of >= 1, f"decode.best_of={cfg.best_of}: must be >= 1"),
        (len(cfg.temperatures) > 0, "decode.temperatures: give at least one ([0.0] = no fallback)"),
        (cfg.no_repeat_ngram_size >= 0, f"decode.no_repeat_ngram_size={cfg.no_repeat_ngram_size}: must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DQWhisperError(msg)


def decoding_options(cfg: DecodeConfig, language: str | None, fp16: bool = False, temperature: float = 0.0,
                     sample_len: int | None = None) -> DecodingOptions:
    """Whisper options for one batch, no timestamps: greedy or beam search per `cfg` at temperature 0, sampling
    (best of `cfg.best_of`) above it, as openai's transcribe does."""
    beam = cfg.beam_size > 1 and temperature == 0
    return DecodingOptions(
        task="transcribe", language=language, temperature=temperature,
        sample_len=sample_len if sample_len is not None else cfg.max_new_tokens,
        beam_size=cfg.beam_size if beam else None, patience=cfg.patience if beam else None,
        best_of=cfg.best_of if temperature > 0 and cfg.best_of > 1 else None,
        length_penalty=cfg.length_penalty, without_timestamps=True, fp16=fp16,
    )


class SuppressSpecial(LogitFilter):
    """No-timestamp mode: every token after end-of-text (language, task, timestamp, notimestamps ...) is barred."""

    def __init__(self, eot: int):
        self.eot = eot

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        logits[:, self.eot + 1:] = -math.inf


class NoRepeatNGram(LogitFilter):
    """Bars any token that would complete an n-gram the row's sampled text already holds."""

    def __init__(self, n: int, sample_begin: int):
        self.n, self.sample_begin = n, sample_begin

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        text = tokens[:, self.sample_begin:]
        if text.shape[1] < self.n:
            return
        grams = text.unfold(1, self.n, 1)  # (rows, k, n)
        prefix = text[:, text.shape[1] - self.n + 1:]  # (rows, n - 1)
        hit = (grams[:, :, :-1] == prefix[:, None, :]).all(-1)  # (rows, k)
        rows, k = hit.nonzero(as_tuple=True)
        logits[rows, grams[rows, k, -1]] = -math.inf


class TokenCap(LogitFilter):
    """Ends row r with end-of-text once it holds caps[r] sampled tokens (applied after every other filter)."""

    def __init__(self, caps: Tensor, sample_begin: int, eot: int):
        self.caps, self.sample_begin, self.eot = caps, sample_begin, eot

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        done = (tokens.shape[1] - self.sample_begin) >= self.caps.to(logits.device)
        if done.any():
            logits[done] = -math.inf
            logits[done, self.eot] = 0.0


class BatchedDecodingTask(DecodingTask):
    """openai-whisper's DecodingTask with beam search that works for batches of more than one utterance, plus our
    filters (special tokens suppressed, optional no-repeat n-gram, optional per-row token cap).

    openai-whisper 20250625 repeats the prompt tokens `n_group` times per utterance but not the audio features, so
    beam search over a batch > 1 cross-attends beam rows to the wrong utterances' features (a size mismatch, or the
    assertion after the main loop). Here the encoder output is repeated per beam once, after language detection
    (which runs on one row per utterance); `run()` itself, the decoders, rankers and logit filters are whisper's.
    """

    def __init__(self, model: Whisper, options: DecodingOptions, caps: Sequence[int] | None = None,
                 no_repeat_ngram_size: int = 0):
        super().__init__(model, options)
        eot = self.tokenizer.eot
        if options.without_timestamps:
            self.logit_filters.append(SuppressSpecial(eot))
        if no_repeat_ngram_size > 0:
            self.logit_filters.append(NoRepeatNGram(no_repeat_ngram_size, self.sample_begin))
        if caps is not None:
            rows = torch.as_tensor(list(caps), dtype=torch.long).repeat_interleave(self.n_group)
            self.logit_filters.append(TokenCap(rows, self.sample_begin, eot))

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        return super()._get_audio_features(mel).repeat_interleave(self.n_group, dim=0)

    def _detect_language(self, audio_features: Tensor, tokens: Tensor):
        return super()._detect_language(audio_features[:: self.n_group], tokens)


@torch.no_grad()
def decode_batch(model: Whisper, mel: Tensor, options: DecodingOptions) -> list[DecodingResult]:
    """mel (B, n_mels, 2 * n_audio_ctx), or encoder output (B, n_audio_ctx, n_audio_state) which whisper then does not
    re-encode -> one whisper DecodingResult per row (beam search safe for B > 1)."""
    if mel.ndim != 3:
        raise ValueError(f"mel must be (B, n_mels, frames) or (B, n_ctx, d), got {tuple(mel.shape)}")
    return BatchedDecodingTask(model, options).run(mel)


@dataclass
class Hypothesis:
    """One row of `decode_mels`: the kept hypothesis and how it was reached."""
    text: str
    tokens: list[int]
    language: str
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float  # of the kept hypothesis
    n_tries: int  # temperatures tried (1 = no fallback)
    cap: int  # token cap of the row
    hit_cap: bool  # the kept hypothesis reached the cap
    runaway: bool  # the kept hypothesis hits the cap or fails the compression test (after every fallback)


def token_cap(seconds: float | None, cfg: DecodeConfig, model: Whisper) -> int:
    """Most tokens a row may sample: tokens_per_second * seconds + token_cap_margin, at most max_new_tokens
    (default n_text_ctx // 2)."""
    limit = cfg.max_new_tokens or model.dims.n_text_ctx // 2
    if cfg.tokens_per_second is None or seconds is None:
        return limit
    return max(1, min(limit, math.ceil(cfg.tokens_per_second * seconds) + cfg.token_cap_margin))


def _fails(r: DecodingResult, hit_cap: bool, cfg: DecodeConfig) -> bool:
    """openai transcribe's fallback test (plus hitting the cap): True = decode this row again, hotter."""
    ratio = cfg.compression_ratio_threshold
    too_repetitive = ratio is not None and r.compression_ratio > ratio
    unlikely = cfg.logprob_threshold is not None and r.avg_logprob < cfg.logprob_threshold
    if unlikely and cfg.no_speech_threshold is not None and r.no_speech_prob > cfg.no_speech_threshold:
        unlikely = False  # silence: openai's transcribe does not fall back (and drops the segment)
    return too_repetitive or unlikely or hit_cap


def _is_runaway(r: DecodingResult, hit_cap: bool, cfg: DecodeConfig) -> bool:
    return hit_cap or (cfg.compression_ratio_threshold is not None
                       and r.compression_ratio > cfg.compression_ratio_threshold)


def _language_codes(model: Whisper, features: Tensor, languages: list[str | None]) -> list[str]:
    """Forced codes kept; None / "detect" rows get Whisper's language ID (English for English-only models)."""
    out = list(languages)
    todo = [i for i, lang in enumerate(languages) if lang in (None, DETECT)]
    if todo:
        if model.is_multilingual:
            tok = get_tokenizer(True, num_languages=model.num_languages, task="transcribe")
            _, probs = model.detect_language(features[todo], tok)
            for i, p in zip(todo, probs):
                out[i] = max(p, key=p.get)
        else:
            for i in todo:
                out[i] = "en"
    for lang in out:
        _check_language(lang, "language")
    return out


@torch.no_grad()
def decode_mels(model: Whisper, mel: Tensor, languages: str | None | Sequence[str | None],
                seconds: Sequence[float] | None = None, cfg: DecodeConfig | None = None,
                fp16: bool = False) -> list[Hypothesis]:
    """Decode a batch the way inference.py and transcribe do (module docstring): openai transcribe's temperature
    fallback, a token cap per row, special tokens suppressed, optional no-repeat n-gram; greedy or beam search.

    mel (B, n_mels, 2 * n_audio_ctx), or encoder output (B, n_audio_ctx, n_audio_state) (then not re-encoded);
    languages: one code for all rows, or one per row; None / "detect" = Whisper's language ID;
    seconds: audio seconds per row (for the token cap); None = the cap is max_new_tokens.
    The encoder runs once; fallback reruns only the decoder, on the rows that need it.
    """
    cfg = cfg or DecodeConfig()
    if mel.ndim != 3:
        raise ValueError(f"mel must be (B, n_mels, frames) or (B, n_ctx, d), got {tuple(mel.shape)}")
    n = mel.shape[0]
    if isinstance(languages, str) or languages is None:
        languages = [languages] * n
    if len(languages) != n or (seconds is not None and len(seconds) != n):
        raise ValueError(f"{n} rows but {len(languages)} languages / {None if seconds is None else len(seconds)} "
                         "durations")
    if not cfg.temperatures:
        raise DQWhisperError("decode.temperatures is empty: give at least [0.0]")
    dims = model.dims
    if tuple(mel.shape[-2:]) == (dims.n_audio_ctx, dims.n_audio_state):
        features = mel.half() if fp16 else mel
    else:
        features = model.encoder(mel.half() if fp16 else mel)
    codes = _language_codes(model, features, list(languages))
    caps = [token_cap(None if seconds is None else seconds[i], cfg, model) for i in range(n)]
    out: list[Hypothesis | None] = [None] * n
    for lang in dict.fromkeys(codes):
        rows = [i for i in range(n) if codes[i] == lang]
        for i, h in zip(rows, _decode_one_language(model, features[rows], lang, [caps[i] for i in rows], cfg, fp16)):
            out[i] = h
    return out


def _decode_one_language(model: Whisper, features: Tensor, language: str, caps: list[int], cfg: DecodeConfig,
                         fp16: bool) -> list[Hypothesis]:
    tried: list[list[tuple[DecodingResult, bool]]] = [[] for _ in caps]
    pending = list(range(len(caps)))
    for k, t in enumerate(cfg.temperatures):
        if not pending:
            break
        if t > 0:  # sampling: one row at a time, so that its draws do not depend on the batch it came in
            results = []
            for i in pending:
                options = decoding_options(cfg, language, fp16, float(t), caps[i])
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed * 1000 + k)  # fresh draws per temperature, repeatable
                    task = BatchedDecodingTask(model, options, [caps[i]], cfg.no_repeat_ngram_size)
                    results += task.run(features[i: i + 1])
        else:
            sub_caps = [caps[i] for i in pending]
            options = decoding_options(cfg, language, fp16, float(t), max(sub_caps))
            results = BatchedDecodingTask(model, options, sub_caps, cfg.no_repeat_ngram_size).run(features[pending])
        still = []
        for i, r in zip(pending, results):
            hit = len(r.tokens) >= caps[i]
            tried[i].append((r, hit))
            if _fails(r, hit, cfg):
                still.append(i)
        pending = still
    failed, out = set(pending), []
    for i, cands in enumerate(tried):
        r, hit = cands[-1]
        if i in failed and len(cands) > 1:  # every temperature failed: as faster-whisper, keep the most likely of
            sound = [c for c in cands if not _is_runaway(*c, cfg)] or cands  # those that are not runaways
            r, hit = max(sound, key=lambda c: c[0].avg_logprob)
        out.append(Hypothesis(r.text, list(r.tokens), r.language, r.avg_logprob, r.compression_ratio,
                              r.no_speech_prob, r.temperature, len(cands), caps[i], hit, _is_runaway(r, hit, cfg)))
    return out


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
    runaway: bool = False  # still hits the token cap or fails the compression test after fallback
    n_tries: int = 1  # temperatures tried


@dataclass
class DecodeRun:
    hyps: list[UttHypothesis]
    wall_seconds: float  # audio loading, mel, encoder and decoder, model loading excluded
    audio_seconds: float
    n_tokens: int
    n_trimmed: int  # utterances longer than the window, cut to it
    skipped: dict[str, str] = field(default_factory=dict)  # utterances whose audio could not be read: reason

    @property
    def runaways(self) -> list[UttHypothesis]:
        return [h for h in self.hyps if h.runaway]

    @property
    def n_fallbacks(self) -> int:
        """Utterances decoded at more than one temperature."""
        return sum(h.n_tries > 1 for h in self.hyps)

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
                      bpe_fallback: str | Path | None = None, durations: dict[str, float] | None = None,
                      on_batch: Callable[[list[UttHypothesis]], None] | None = None,
                      on_skip: Callable[[str, str], None] | None = None) -> DecodeRun:
    """Decode `utts` of DataDir `data` (anything with load_audio(utt) and duration(utt)) in batches of one language
    (forced from utt2lang or cfg.language, or detected), longest first, and time it (audio reading included).

    `durations` (seconds by utt_id, e.g. from a header check) orders the batches without reading audio again; a
    wav.scp pipe is never run for its duration (its command runs once, when it is decoded; unknown lengths sort
    last). `on_batch` gets each batch's hypotheses as soon as they exist (to write them incrementally). An
    utterance whose audio cannot be read is skipped: `on_skip(utt_id, reason)` (which may raise) and `skipped`."""

    device = next(model.parameters()).device
    fp16 = bool(cfg.fp16) and device.type == "cuda"
    check_decode_config(cfg)
    bpe = None
    if cfg.ctc:
        if getattr(model, "ctc_head", None) is None:
            raise DQWhisperError("decode.ctc=true but this model has no CTC head")
        bpe = load_ctc_bpe(model, bpe_fallback)
    groups: dict[str | None, list] = {}
    for u in utts:
        if cfg.language == DETECT:
            key = None  # detected per utterance in decode_mels
        else:
            key = cfg.language or u.lang
            _check_language(key, f"utterance {u.utt_id}" if not cfg.language else "decode.language")
        groups.setdefault(key, []).append(u)

    padding = cfg.mel_padding
    n_window = window_samples(model)
    hyps, n_tokens, n_trimmed, audio_seconds = [], 0, 0, 0.0
    skipped: dict[str, str] = {}
    bar = tqdm(total=len(utts), desc="decode", unit="utt", disable=not progress, leave=False)
    start = time.perf_counter()
    for language, members in groups.items():
        members = sorted(members, key=lambda u: (-_duration(data, u, durations), u.utt_id))  # similar lengths
        for i in range(0, len(members), cfg.batch_size):
            batch, waves = [], []
            for u in members[i: i + cfg.batch_size]:
                try:
                    wave = data.load_audio(u)
                    if len(wave) == 0:
                        raise DQWhisperError("zero samples")
                except Exception as e:  # noqa: BLE001 - any decoder error makes the utterance bad, as in training
                    reason = f"unreadable audio: {e}"
                    skipped[u.utt_id] = reason
                    log.warning("skipping utterance %s: %s", u.utt_id, reason)
                    if on_skip is not None:
                        on_skip(u.utt_id, reason)
                    continue
                batch.append(u)
                waves.append(wave)
            bar.update(len(members[i: i + cfg.batch_size]) - len(batch))
            if not batch:
                continue
            n_trimmed += sum(len(w) > n_window for w in waves)
            audio_seconds += sum(len(w) for w in waves) / SAMPLE_RATE
            mel = audio_to_mel(waves, model, device, padding)
            if bpe is not None:
                results = [(text, n, language or "", False, 1)
                           for text, n in ctc_decode_batch(model, mel, [len(w) for w in waves], bpe)]
            else:
                seconds = [min(len(w), n_window) / SAMPLE_RATE for w in waves]
                results = [(h.text, len(h.tokens), h.language, h.runaway, h.n_tries)
                           for h in decode_mels(model, mel, language, seconds, cfg, fp16)]
            new = [UttHypothesis(u.utt_id, u.lang, text.strip(), n, len(w) / SAMPLE_RATE, lang_used, runaway, tries)
                   for u, w, (text, n, lang_used, runaway, tries) in zip(batch, waves, results)]
            hyps += new
            n_tokens += sum(h.n_tokens for h in new)
            if on_batch is not None:
                on_batch(new)
            bar.update(len(batch))
    wall = time.perf_counter() - start
    bar.close()
    if n_trimmed:
        log.warning("%d of %d utterances are longer than the model's %.2f s window and were cut to it",
                    n_trimmed, len(utts), n_window / SAMPLE_RATE)
    hyps.sort(key=lambda h: h.utt_id)
    return DecodeRun(hyps, wall, audio_seconds, n_tokens, n_trimmed, skipped)


def _duration(data, utt, durations: dict[str, float] | None) -> float:
    """Seconds for ordering: the known value, else the header; 0 for a pipe (not run just to measure it)."""
    if durations is not None and utt.utt_id in durations:
        return durations[utt.utt_id]
    if is_pipe(getattr(utt, "wav", "") or ""):
        return 0.0
    try:
        return data.duration(utt)
    except Exception:  # noqa: BLE001 - unreadable: decoding skips it with the reason
        return 0.0


def apply_audio_window(model: Whisper, seconds: float | None) -> Whisper:
    """Shrink the encoder window to `seconds` for decoding (None: keep the model's own)."""
    if seconds is None:
        return model

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


__all__ = ["DecodeConfig", "check_decode_config", "BatchedDecodingTask", "decoding_options", "decode_batch",
           "decode_mels", "Hypothesis", "token_cap", "SuppressSpecial", "NoRepeatNGram", "TokenCap", "audio_to_mel",
           "ctc_greedy", "ctc_decode_batch", "load_ctc_bpe", "decode_utterances", "select_utts", "apply_audio_window",
           "search_tag", "DecodeRun", "UttHypothesis", "window_samples", "DETECT",
]
