"""decode_utterances: a Kaldi data dir decoded in batches of one language, longest first, and timed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm
from whisper.model import Whisper

from dqwhisper.config import DecodeConfig, check_decode_config
from dqwhisper.data.kaldi import is_pipe
from dqwhisper.decoding.audio import audio_to_mel, batch_frames, encoder_window, window_samples
from dqwhisper.decoding.ctc import ctc_decode_batch, load_ctc_bpe
from dqwhisper.decoding.search import (
    DETECT,
    SAMPLE_RATE,
    FallbackPool,
    Hypothesis,
    PendingRow,
    check_language,
    decode_mels,
)
from dqwhisper.models.student import margin_frames
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


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
    temperature: float = 0.0  # of the kept hypothesis
    avg_logprob: float = math.nan  # the kept hypothesis's average token log-probability (nan: CTC)
    compression_ratio: float = math.nan  # gzip compression ratio of its text (nan: CTC)
    fallback_reason: str = ""  # why the first temperature failed (decoding.search.Hypothesis)
    first_avg_logprob: float = math.nan  # the first temperature's average token log-probability


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

    def fallback_counts(self) -> dict[str, int]:
        """Utterances that fell back, by the tests their first hypothesis failed ("logprob", "compression", "cap",
        or a "+"-joined combination)."""
        counts: dict[str, int] = {}
        for h in self.hyps:
            if h.n_tries > 1:
                counts[h.fallback_reason] = counts.get(h.fallback_reason, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def rtf(self) -> float:
        return self.wall_seconds / max(self.audio_seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.wall_seconds, 1e-9)


def utt_hypothesis(u, seconds: float, h: Hypothesis) -> UttHypothesis:
    """An utterance's row of a DecodeRun from its decode_mels / FallbackPool hypothesis."""
    return UttHypothesis(
        u.utt_id,
        u.lang,
        h.text.strip(),
        len(h.tokens),
        seconds,
        h.language,
        h.runaway,
        h.n_tries,
        h.temperature,
        h.avg_logprob,
        h.compression_ratio,
        h.fallback_reason,
        h.first_avg_logprob,
    )


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
        utts = utts[k - 1 :: n]
    return list(utts)


def decode_utterances(
    model: Whisper,
    data,
    utts: Sequence,
    cfg: DecodeConfig,
    progress: bool = True,
    bpe_fallback: str | Path | None = None,
    durations: dict[str, float] | None = None,
    on_batch: Callable[[list[UttHypothesis]], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> DecodeRun:
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
            check_language(key, f"utterance {u.utt_id}" if not cfg.language else "decode.language")
        groups.setdefault(key, []).append(u)

    padding = cfg.mel_padding
    n_window = window_samples(model)
    mixed = cfg.batch_window is not None and not cfg.group_windows
    if mixed and not hasattr(model.encoder, "row_windows"):
        log.info("%s decodes one encoder window per batch (decode.group_windows)", type(model).__name__)
        mixed = False
    hyps, n_tokens, n_trimmed, audio_seconds = [], 0, 0, 0.0
    skipped: dict[str, str] = {}
    # batches decoded but not yet final: [utterances, seconds, results]; a result is a PendingRow until the pool
    # (decode.pool_fallback) has decoded it
    waiting: list[list] = []
    pool = FallbackPool(model, cfg, fp16)
    bar = tqdm(total=len(utts), desc="decode", unit="utt", disable=not progress, leave=False)

    def emit(new: list[UttHypothesis]) -> None:
        nonlocal n_tokens
        hyps.extend(new)
        n_tokens += sum(h.n_tokens for h in new)
        if on_batch is not None:
            on_batch(new)
        bar.update(len(new))

    def settle(decoded: list) -> None:
        """Put the pool's hypotheses ((results list, index), hypothesis) in place, then emit every batch that has
        all its hypotheses, in decoding order."""
        for (results, j), h in decoded:
            results[j] = h
        while waiting and not any(isinstance(r, PendingRow) for r in waiting[0][2]):
            batch, seconds, results = waiting.pop(0)
            emit([utt_hypothesis(u, s, h) for u, s, h in zip(batch, seconds, results)])

    start = time.perf_counter()
    for language, members in groups.items():
        chunks = utterance_batches(data, members, durations, cfg, model.dims.n_audio_ctx, mixed)
        for chunk in chunks:
            batch, waves = [], []
            for u in chunk:
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
            bar.update(len(chunk) - len(batch))
            if not batch:
                continue
            n_trimmed += sum(len(w) > n_window for w in waves)
            audio_seconds += sum(len(w) for w in waves) / SAMPLE_RATE
            own = [batch_frames(model, min(len(w), n_window), cfg.batch_window) for w in waves]
            frames = max(own)
            windows = own if mixed and min(own) < frames else None
            seconds = [len(w) / SAMPLE_RATE for w in waves]
            with encoder_window(model, frames):
                mel = audio_to_mel(waves, model, device, padding)
                if bpe is not None:
                    decoded = ctc_decode_batch(model, mel, [len(w) for w in waves], bpe, windows)
                    emit(
                        [
                            UttHypothesis(u.utt_id, u.lang, text.strip(), n, s, language or "")
                            for u, s, (text, n) in zip(batch, seconds, decoded)
                        ],
                    )
                    continue
                capped = [min(len(w), n_window) / SAMPLE_RATE for w in waves]
                results = decode_mels(model, mel, language, capped, cfg, fp16, windows, defer=cfg.pool_fallback)
            waiting.append([batch, seconds, results])
            settle([d for j, r in enumerate(results) if isinstance(r, PendingRow) for d in pool.add((results, j), r)])
        settle(pool.flush())  # the language's last pending rows: its hypotheses are all out before the next one's
    wall = time.perf_counter() - start
    wall = time.perf_counter() - start
    bar.close()
    if n_trimmed:
        log.warning(
            "%d of %d utterances are longer than the model's %.2f s window and were cut to it",
            n_trimmed,
            len(utts),
            n_window / SAMPLE_RATE,
        )
    hyps.sort(key=lambda h: h.utt_id)
    return DecodeRun(hyps, wall, audio_seconds, n_tokens, n_trimmed, skipped)


def utterance_batches(
    data, members: list, durations: dict[str, float] | None, cfg: DecodeConfig, n_ctx: int, mixed: bool = False
) -> list[list]:
    """Batches of at most cfg.batch_size, longest utterance first (similar lengths); with decode.batch_window and not
    `mixed` (decode.group_windows), each batch holds utterances of one window (their audio + batch_window rounded up
    to whole seconds, as data.batch_window trains them; an utterance of unknown length counts as the whole window)."""
    seconds = {u.utt_id: _duration(data, u, durations) for u in members}
    members = sorted(members, key=lambda u: (-seconds[u.utt_id], u.utt_id))
    if mixed or cfg.batch_window is None:
        return [members[k : k + cfg.batch_size] for k in range(0, len(members), cfg.batch_size)]
    runs: list[list] = []
    for u in members:
        s = seconds[u.utt_id]
        window = n_ctx if s <= 0 else margin_frames(s, cfg.batch_window, n_ctx)
        if runs and runs[-1][0] == window:
            runs[-1][1].append(u)
        else:
            runs.append((window, [u]))
    return [g[k : k + cfg.batch_size] for _, g in runs for k in range(0, len(g), cfg.batch_size)]


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


def search_tag(cfg: DecodeConfig) -> str:
    """greedy | beam<N> | ctc, plus the window / language / raw switches that change the result."""
    tag = "ctc" if cfg.ctc else ("greedy" if cfg.beam_size <= 1 else f"beam{cfg.beam_size}")
    if cfg.audio_window is not None:
        tag += f"_w{cfg.audio_window:g}s"
    if cfg.language == DETECT:
        tag += "_detect"
    elif cfg.language:
        tag += f"_lang{cfg.language}"
    if cfg.batch_window is not None:
        tag += f"_bw{cfg.batch_window:g}s"
    if cfg.mel_padding != "zeros":
        tag += f"_mel{cfg.mel_padding}"
    if cfg.raw:
        tag += "_raw"
    return tag
