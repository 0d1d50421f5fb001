"""decode_mels: batched whisper decoding with openai transcribe's rules (see the package docstring)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask, GreedyDecoder, LogitFilter
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import LANGUAGES, get_tokenizer

from dqwhisper.config import DecodeConfig
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 320  # 16 kHz samples per encoder position (mel hop 160, conv stride 2)
DETECT = "detect"


def decoding_options(
    cfg: DecodeConfig, language: str | None, fp16: bool = False, temperature: float = 0.0, sample_len: int | None = None
) -> DecodingOptions:
    """Whisper options for one batch, no timestamps: greedy or beam search per `cfg` at temperature 0, sampling
    (best of `cfg.best_of`) above it, as openai's transcribe does."""
    beam = cfg.beam_size > 1 and temperature == 0
    return DecodingOptions(
        task="transcribe",
        language=language,
        temperature=temperature,
        sample_len=sample_len if sample_len is not None else cfg.max_new_tokens,
        beam_size=cfg.beam_size if beam else None,
        patience=cfg.patience if beam else None,
        best_of=cfg.best_of if temperature > 0 and cfg.best_of > 1 else None,
        length_penalty=cfg.length_penalty,
        without_timestamps=True,
        fp16=fp16,
    )


class SuppressSpecial(LogitFilter):
    """No-timestamp mode: every token after end-of-text (language, task, timestamp, notimestamps ...) is barred."""

    def __init__(self, eot: int):
        self.eot = eot

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        logits[:, self.eot + 1 :] = -math.inf


class NoRepeatNGram(LogitFilter):
    """Bars any token that would complete an n-gram the row's sampled text already holds."""

    def __init__(self, n: int, sample_begin: int):
        self.n, self.sample_begin = n, sample_begin

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        text = tokens[:, self.sample_begin :]
        if text.shape[1] < self.n:
            return
        grams = text.unfold(1, self.n, 1)  # (rows, k, n)
        prefix = text[:, text.shape[1] - self.n + 1 :]  # (rows, n - 1)
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

    def keep_rows(self, rows: Tensor) -> None:
        """The batch now holds only `rows` (of the one before; BatchedDecodingTask dropped finished utterances)."""
        self.caps = self.caps[rows.to(self.caps.device)]


class SeededSampler(GreedyDecoder):
    """whisper's sampling decoder (temperature > 0) with two changes:

    - each utterance's rows (its best-of group) draw from their own generator, all seeded with `seed`, so an
      utterance's draws do not depend on the batch it is in and the fallback samples every pending utterance at once;
    - a draw is one uniform number per row, inverted through the row's cumulative distribution (summed in float64), not
      torch.multinomial, which draws an exponential per vocabulary entry (51,865 a row: ~2 ms a row on these
      CPUs, most of a sampled step). Same distribution, other draws than openai-whisper's for the same seed.
    """

    def __init__(self, temperature: float, eot: int, n_group: int, seed: int):
        super().__init__(temperature, eot)
        self.n_group, self.seed = n_group, seed
        self.generators: list[torch.Generator] = []

    def reset(self) -> None:
        self.generators = []

    def sample(self, logits: Tensor) -> Tensor:
        """One token per row of `logits` (rows, n_vocab), drawn from softmax(logits / temperature)."""
        n = self.n_group
        if not self.generators:
            self.generators = [
                torch.Generator(logits.device).manual_seed(self.seed) for _ in range(logits.shape[0] // n)
            ]
        # probabilities in float32 (as whisper's), summed in float64: the cumulative sum of 51,865 float32 terms would
        # drift; a float64 softmax took 1.6-3.7x as long a step (5-40 rows)
        cdf = torch.softmax(logits.float() / self.temperature, dim=-1).double().cumsum_(dim=-1)
        u = torch.cat([torch.rand(n, generator=g, device=logits.device, dtype=cdf.dtype) for g in self.generators])
        u = (1.0 - u) * cdf[:, -1]  # in (0, total]: a token of zero probability is never drawn
        return torch.searchsorted(cdf, u[:, None])[:, 0].clamp_(max=logits.shape[-1] - 1)

    def keep_groups(self, groups: Tensor) -> None:
        """The batch now holds only the best-of groups `groups` (of the one before): their generators go on."""
        self.generators = [self.generators[i] for i in groups.tolist()] if self.generators else []

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor) -> tuple[Tensor, bool]:
        next_tokens = self.sample(logits)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        sum_logprobs += logprobs[torch.arange(logprobs.shape[0]), next_tokens] * (tokens[:, -1] != self.eot)
        next_tokens[tokens[:, -1] == self.eot] = self.eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())


class BatchedDecodingTask(DecodingTask):
    """openai-whisper's DecodingTask with beam search that works for batches of more than one utterance, plus our
    filters (special tokens suppressed, optional no-repeat n-gram, optional per-row token cap) and, with `seed`,
    sampling whose draws per utterance do not depend on the batch (SeededSampler).

    openai-whisper 20250625 repeats the prompt tokens `n_group` times per utterance but not the audio features, so
    beam search over a batch > 1 cross-attends beam rows to the wrong utterances' features (a size mismatch, or the
    assertion after the main loop). Here the encoder output is repeated per beam once, after language detection
    (which runs on one row per utterance); `run()` itself, the decoders, rankers and logit filters are whisper's.

    Greedy decoding and sampling (not beam search) drop an utterance's rows from the batch once all of them have
    ended (`drop_finished`): whisper's loop steps every row until the batch's last one ends, and on the demo's dev
    set 29% of greedy and 32% of sampled row-steps were of utterances already done. What holds a row (the decoder's
    self- and cross-attention caches, its key mask, the token caps, the sampler's generators) is cut to the rows
    left; the tokens and log-probabilities come back for every row, as whisper's loop returns them
    (decode.drop_finished).
    """

    def __init__(
        self,
        model: Whisper,
        options: DecodingOptions,
        caps: Sequence[int] | None = None,
        no_repeat_ngram_size: int = 0,
        windows: Sequence[int] | None = None,
        seed: int | None = None,
        drop_finished: bool = True,
    ):
        super().__init__(model, options)
        self.drop_finished = drop_finished and not options.beam_size  # beam search keeps state per utterance
        if seed is not None and options.temperature > 0 and not options.beam_size:
            self.decoder = SeededSampler(options.temperature, self.tokenizer.eot, self.n_group, seed)
        self.windows = None if windows is None else torch.as_tensor(list(windows), dtype=torch.long)
        eot = self.tokenizer.eot
        if options.without_timestamps:
            self.logit_filters.append(SuppressSpecial(eot))
        if no_repeat_ngram_size > 0:
            self.logit_filters.append(NoRepeatNGram(no_repeat_ngram_size, self.sample_begin))
        if caps is not None:
            rows = torch.as_tensor(list(caps), dtype=torch.long).repeat_interleave(self.n_group)
            self.logit_filters.append(TokenCap(rows, self.sample_begin, eot))

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        with row_windows(self.model, self.windows, None):
            return super()._get_audio_features(mel).repeat_interleave(self.n_group, dim=0)

    def _detect_language(self, audio_features: Tensor, tokens: Tensor):
        features = audio_features[:: self.n_group]
        with row_windows(self.model, None, self.windows, features.shape[1]):
            return super()._detect_language(features, tokens)

    def _main_loop(self, audio_features: Tensor, tokens: Tensor):
        """whisper's loop (the same logits, filters and decoder updates per row), stepping only the utterances
        that have not ended."""
        if not self.drop_finished:
            return super()._main_loop(audio_features, tokens)
        n_batch, group, eot = tokens.shape[0], self.n_group, self.tokenizer.eot
        sum_logprobs = torch.zeros(n_batch, device=audio_features.device)
        no_speech_probs = [np.nan] * n_batch
        rows = torch.arange(n_batch, device=tokens.device)  # each row's place in the batch as it came
        ended: list[tuple[Tensor, Tensor, Tensor]] = []  # (places, tokens, sums) of the rows dropped
        sums = sum_logprobs.clone()  # the rows still stepping
        decoder = self.model.decoder
        key_mask = getattr(decoder, "key_mask", None)  # _keep cuts it: the caller's is put back after
        try:
            for i in range(self.sample_len):
                logits = self.inference.logits(tokens, audio_features)
                if i == 0 and self.tokenizer.no_speech is not None:
                    probs_at_sot = logits[:, self.sot_index].float().softmax(dim=-1)
                    no_speech_probs = probs_at_sot[:, self.tokenizer.no_speech].tolist()
                logits = logits[:, -1]
                for logit_filter in self.logit_filters:
                    logit_filter.apply(logits, tokens)
                tokens, completed = self.decoder.update(tokens, logits, sums)
                if completed or tokens.shape[-1] > self.n_ctx:
                    break
                done = (tokens[:, -1] == eot).view(-1, group).all(dim=1)
                if done.any():
                    gone = done.repeat_interleave(group)
                    ended.append((rows[gone], tokens[gone], sums[gone]))
                    groups = (~done).nonzero()[:, 0]
                    keep = (~gone).nonzero()[:, 0]
                    self._keep(keep, groups, tokens.shape[0])
                    rows, tokens, sums = rows[keep], tokens[keep], sums[keep]
                    audio_features = audio_features[keep]
        finally:
            self.inference.cleanup_caching()
            if key_mask is not None:
                decoder.key_mask = key_mask
        out = tokens.new_full((n_batch, tokens.shape[1]), eot)
        out[rows] = tokens
        sum_logprobs[rows] = sums
        for places, toks, s in ended:
            out[places, : toks.shape[1]] = toks
            sum_logprobs[places] = s
        return out, sum_logprobs, no_speech_probs

    def _keep(self, rows: Tensor, groups: Tensor, before: int) -> None:
        """Cut what holds a row to `rows` (the best-of groups `groups`) of the `before` rows of the batch."""
        cache = self.inference.kv_cache
        for key, value in cache.items():
            # whisper's caches hold a row each; a DQWhisper decoder's cross-attention keys one per group
            # (rows_share_audio)
            if value.shape[0] == before:
                cache[key] = value[rows.to(value.device)]
            elif value.shape[0] * self.n_group == before:
                cache[key] = value[groups.to(value.device)]
            else:
                raise RuntimeError(f"a decoder cache of {value.shape[0]} rows in a batch of {before}")
        decoder = self.model.decoder
        if getattr(decoder, "key_mask", None) is not None:
            decoder.key_mask = decoder.key_mask[rows.to(decoder.key_mask.device)]
        for logit_filter in self.logit_filters:
            if hasattr(logit_filter, "keep_rows"):
                logit_filter.keep_rows(rows)
        if hasattr(self.decoder, "keep_groups"):
            self.decoder.keep_groups(groups)

    def run(self, mel: Tensor) -> list[DecodingResult]:
        """whisper's run; with `windows` (encoder positions per row of `mel`), each row is encoded and
        cross-attended on its own window (the batch is padded to the longest). A DQWhisper decoder projects the
        cross-attention's keys and values once per utterance, not once per beam or sample (rows_share_audio)."""
        with contextlib.ExitStack() as stack:
            share = getattr(self.model.decoder, "rows_share_audio", None)
            if share is not None and self.n_group > 1:
                stack.enter_context(share(self.n_group))
            if self.windows is None:
                return super().run(mel)
            if len(self.windows) != mel.shape[0]:
                raise ValueError(f"{mel.shape[0]} rows but {len(self.windows)} windows")
            n_keys = int(self.model.dims.n_audio_ctx)
            stack.enter_context(row_windows(self.model, None, self.windows.repeat_interleave(self.n_group), n_keys))
            return super().run(mel)


@contextlib.contextmanager
def row_windows(model: Whisper, encoder: Tensor | None, decoder: Tensor | None = None, n_keys: int = 0):
    """Per-row encoder windows of a padded batch (DQWhisper): `encoder` = positions per row of the encoder's input,
    `decoder` = positions per row of the decoder's batch (its cross-attention keys, n_keys in all). None = as is."""
    with contextlib.ExitStack() as stack:
        if encoder is not None:
            stack.enter_context(_per_row(model, model.encoder, "row_windows")(encoder))
        if decoder is not None:
            stack.enter_context(_per_row(model, model.decoder, "key_lengths")(decoder, n_keys))
        yield


def _per_row(model: Whisper, part: torch.nn.Module, name: str):
    if not hasattr(part, name):
        raise DQWhisperError(
            f"per-row encoder windows need a DQWhisper model; {type(model).__name__} decodes one window per batch "
            "(decode.group_windows=true)"
        )
    return getattr(part, name)


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
    fallback_reason: str = ""  # why the first temperature's hypothesis failed: "logprob", "compression" and / or
    # "cap", joined by "+"; "" = it did not fall back
    first_avg_logprob: float = math.nan  # the first temperature's hypothesis's average log-probability


def token_cap(seconds: float | None, cfg: DecodeConfig, model: Whisper) -> int:
    """Most tokens a row may sample: tokens_per_second * seconds + token_cap_margin, at most max_new_tokens
    (default n_text_ctx // 2)."""
    limit = cfg.max_new_tokens or model.dims.n_text_ctx // 2
    if cfg.tokens_per_second is None or seconds is None:
        return limit
    return max(1, min(limit, math.ceil(cfg.tokens_per_second * seconds) + cfg.token_cap_margin))


def _fails(r: DecodingResult, hit_cap: bool, cfg: DecodeConfig) -> bool:
    """openai transcribe's fallback test (plus hitting the cap): True = decode this row again, hotter."""
    return bool(fallback_reasons(r, hit_cap, cfg))


def fallback_reasons(r: DecodingResult, hit_cap: bool, cfg: DecodeConfig) -> str:
    """Which of openai transcribe's fallback tests `r` failed (plus hitting the cap), "+"-joined ("" = none)."""
    ratio = cfg.compression_ratio_threshold
    unlikely = cfg.logprob_threshold is not None and r.avg_logprob < cfg.logprob_threshold
    if unlikely and cfg.no_speech_threshold is not None and r.no_speech_prob > cfg.no_speech_threshold:
        unlikely = False  # silence: openai's transcribe does not fall back (and drops the segment)
    tests = {"logprob": unlikely, "compression": ratio is not None and r.compression_ratio > ratio, "cap": hit_cap}
    return "+".join(name for name, failed in tests.items() if failed)


def _is_runaway(r: DecodingResult, hit_cap: bool, cfg: DecodeConfig) -> bool:
    return hit_cap or (
        cfg.compression_ratio_threshold is not None and r.compression_ratio > cfg.compression_ratio_threshold
    )


def _language_codes(
    model: Whisper, features: Tensor, languages: list[str | None], windows: Tensor | None = None
) -> list[str]:
    """Forced codes kept; None / "detect" rows get Whisper's language ID (English for English-only models)."""
    out = list(languages)
    todo = [i for i, lang in enumerate(languages) if lang in (None, DETECT)]
    if todo:
        if model.is_multilingual:
            tok = get_tokenizer(True, num_languages=model.num_languages, task="transcribe")
            rows = None if windows is None else windows[todo]
            with row_windows(model, None, rows, features.shape[1]):
                _, probs = model.detect_language(features[todo], tok)
            for i, p in zip(todo, probs):
                out[i] = max(p, key=p.get)
        else:
            for i in todo:
                out[i] = "en"
    for lang in out:
        check_language(lang, "language")
    return out


def check_language(lang: str, where: str) -> None:
    if lang not in LANGUAGES:
        raise DQWhisperError(f"{where}: language '{lang}' is not one of Whisper's language codes")


@dataclass
class PendingRow:
    """A row of `decode_mels(..., defer=True)` whose first temperature's hypothesis failed the fallback test: what
    `fall_back` needs to decode it again, hotter, together with pending rows of other batches."""

    features: Tensor  # (T, d): its encoder output over its own window (no other row's padding)
    language: str
    cap: int
    tried: list  # [(DecodingResult, hit_cap)] per temperature tried so far


@torch.no_grad()
def decode_mels(
    model: Whisper,
    mel: Tensor,
    languages: str | None | Sequence[str | None],
    seconds: Sequence[float] | None = None,
    cfg: DecodeConfig | None = None,
    fp16: bool = False,
    windows: Sequence[int] | None = None,
    defer: bool = False,
) -> list[Hypothesis | PendingRow]:
    """Decode a batch the way inference.py and transcribe do (module docstring): openai transcribe's temperature
    fallback, a token cap per row, special tokens suppressed, optional no-repeat n-gram; greedy or beam search.

    mel (B, n_mels, 2 * n_audio_ctx), or encoder output (B, n_audio_ctx, n_audio_state) (then not re-encoded);
    languages: one code for all rows, or one per row; None / "detect" = Whisper's language ID;
    seconds: audio seconds per row (for the token cap); None = the cap is max_new_tokens;
    windows: encoder positions per row (a DQWhisper batch of rows with their own windows, padded to the longest:
    each row is encoded and cross-attended on its own window alone); None = every row has the whole window.
    The encoder runs once; fallback reruns only the decoder, on the rows that need it. `defer`: only the first
    temperature runs; a row that fails its test comes back as a `PendingRow`, for `fall_back` to decode with the
    pending rows of other batches (`FallbackPool`: decode_utterances and validation, decode.pool_fallback).
    """
    cfg = cfg or DecodeConfig()
    if mel.ndim != 3:
        raise ValueError(f"mel must be (B, n_mels, frames) or (B, n_ctx, d), got {tuple(mel.shape)}")
    n = mel.shape[0]
    if isinstance(languages, str) or languages is None:
        languages = [languages] * n
    if any(v is not None and len(v) != n for v in (languages, seconds, windows)):
        raise ValueError(
            f"{n} rows but {len(languages)} languages / {None if seconds is None else len(seconds)} durations / "
            f"{None if windows is None else len(windows)} windows"
        )
    if not cfg.temperatures:
        raise DQWhisperError("decode.temperatures is empty: give at least [0.0]")
    dims = model.dims
    lengths = None if windows is None else torch.as_tensor(list(windows), dtype=torch.long)
    if lengths is not None and bool((lengths < 1).any() or (lengths > dims.n_audio_ctx).any()):
        raise ValueError(f"windows {lengths.tolist()} must be within 1..{dims.n_audio_ctx} encoder positions")
    if tuple(mel.shape[-2:]) == (dims.n_audio_ctx, dims.n_audio_state):
        features = mel.half() if fp16 else mel
    else:
        with row_windows(model, lengths):
            features = model.encoder(mel.half() if fp16 else mel)
    codes = _language_codes(model, features, list(languages), lengths)
    caps = [token_cap(None if seconds is None else seconds[i], cfg, model) for i in range(n)]
    out: list[Hypothesis | PendingRow | None] = [None] * n
    steps = 1 if defer else len(cfg.temperatures)
    for lang in dict.fromkeys(codes):
        rows = [i for i in range(n) if codes[i] == lang]
        sub = None if lengths is None else lengths[rows]
        tried: list[list[tuple[DecodingResult, bool]]] = [[] for _ in rows]
        pending = _fallback_ladder(model, features[rows], lang, [caps[i] for i in rows], cfg, fp16, sub, tried, steps)
        for j, i in enumerate(rows):
            if j in pending and steps < len(cfg.temperatures):
                own = features.shape[1] if lengths is None else int(lengths[i])
                out[i] = PendingRow(features[i, :own].clone(), lang, caps[i], tried[j])
            else:
                out[i] = _hypothesis(tried[j], j in pending, caps[i], cfg)
    return out


@torch.no_grad()
def fall_back(model: Whisper, rows: Sequence[PendingRow], cfg: DecodeConfig, fp16: bool = False) -> list[Hypothesis]:
    """Decode `PendingRow`s (from any batches of `decode_mels(..., defer=True)`) at the next temperatures, as
    decode_mels would have: per language, their encoder outputs padded to the longest and each row cross-attending
    to its own window only (a DQWhisper model; other models get one call per window length). A row's draws do not
    depend on the rows it is decoded with (SeededSampler), so the hypotheses are decode_mels' own, up to the float
    rounding of attention over a differently padded batch."""
    per_row = hasattr(model.decoder, "key_lengths")
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.language, None if per_row else r.features.shape[0]), []).append(i)
    out: list[Hypothesis | None] = [None] * len(rows)
    for (lang, _), members in groups.items():
        own = [rows[i].features.shape[0] for i in members]
        frames = max(own)
        first = rows[members[0]].features
        features = first.new_zeros(len(members), frames, first.shape[-1])
        for j, i in enumerate(members):
            features[j, : own[j]] = rows[i].features
        windows = torch.as_tensor(own, dtype=torch.long) if min(own) < frames else None
        tried = [list(rows[i].tried) for i in members]
        with _keys_window(model, frames):
            failed = _fallback_ladder(
                model, features, lang, [rows[i].cap for i in members], cfg, fp16, windows, tried, len(cfg.temperatures)
            )
        for j, i in enumerate(members):
            out[i] = _hypothesis(tried[j], j in failed, rows[i].cap, cfg)
    return out


@contextlib.contextmanager
def _keys_window(model: Whisper, frames: int):
    """model.dims.n_audio_ctx = frames for the block, whatever window the caller has cut (a pool may hold rows of a
    longer window than the batch being decoded when it fills): whisper's DecodingTask takes an input of that many
    positions as encoder output, and the decoder's key masks span them. The encoder does not run."""
    dims = model.dims
    model.dims = ModelDimensions(**{**asdict(dims), "n_audio_ctx": frames})
    try:
        yield
    finally:
        model.dims = dims


class FallbackPool:
    """`PendingRow`s from any batches, held per language and decoded together (`fall_back`) once `size` of one
    language wait, or at `flush()`: fewer and fuller sampling calls than each batch falling back on its own rows.
    Each row comes back with the key it was added with."""

    def __init__(self, model: Whisper, cfg: DecodeConfig, fp16: bool = False, size: int | None = None):
        self.model, self.cfg, self.fp16 = model, cfg, fp16
        self.size = max(1, size or cfg.batch_size)
        self.waiting: dict[str, list[tuple[object, PendingRow]]] = {}

    def add(self, key: object, row: PendingRow) -> list[tuple[object, Hypothesis]]:
        """Hold `row`; returns the (key, hypothesis) pairs decoded now (its language's pool, once full)."""
        pool = self.waiting.setdefault(row.language, [])
        pool.append((key, row))
        return self._decode(row.language) if len(pool) >= self.size else []

    def flush(self) -> list[tuple[object, Hypothesis]]:
        """Decode every row still held."""
        return [pair for lang in list(self.waiting) for pair in self._decode(lang)]

    def _decode(self, language: str) -> list[tuple[object, Hypothesis]]:
        pool = self.waiting.pop(language)
        return list(zip([k for k, _ in pool], fall_back(self.model, [r for _, r in pool], self.cfg, self.fp16)))


def _fallback_ladder(
    model: Whisper,
    features: Tensor,
    language: str,
    caps: list[int],
    cfg: DecodeConfig,
    fp16: bool,
    windows: Tensor | None,
    tried: list[list[tuple[DecodingResult, bool]]],
    stop: int,
) -> set[int]:
    """Decode the rows of `features` at cfg.temperatures[len(tried[i]):stop] until each passes openai transcribe's
    test, appending each temperature's (result, hit_cap) to tried[i]; every row has tried as many temperatures
    (none, or the first `k` for pending rows). Returns the rows that still fail."""
    pending = list(range(len(caps)))
    start = len(tried[0]) if tried else 0
    for k in range(start, stop):
        if not pending:
            break
        t = cfg.temperatures[k]
        sub_caps = [caps[i] for i in pending]
        options = decoding_options(cfg, language, fp16, float(t), max(sub_caps))
        sub = None if windows is None else windows[pending]
        seed = cfg.seed * 1000 + k if t > 0 else None  # fresh draws per temperature, repeatable, batch-independent
        task = BatchedDecodingTask(
            model, options, sub_caps, cfg.no_repeat_ngram_size, sub, seed, drop_finished=cfg.drop_finished
        )
        results = task.run(features[pending])
        still = []
        for i, r in zip(pending, results):
            hit = len(r.tokens) >= caps[i]
            tried[i].append((r, hit))
            if _fails(r, hit, cfg):
                still.append(i)
        pending = still
    return set(pending)


def _hypothesis(cands: list[tuple[DecodingResult, bool]], failed: bool, cap: int, cfg: DecodeConfig) -> Hypothesis:
    """The kept hypothesis of a row that tried the temperatures of `cands` (`failed`: the last one failed too)."""
    r, hit = cands[-1]
    if failed and len(cands) > 1:  # every temperature failed: as faster-whisper, keep the most likely of
        sound = [c for c in cands if not _is_runaway(*c, cfg)] or cands  # those that are not runaways
        r, hit = max(sound, key=lambda c: c[0].avg_logprob)
    return Hypothesis(
        r.text,
        list(r.tokens),
        r.language,
        r.avg_logprob,
        r.compression_ratio,
        r.no_speech_prob,
        r.temperature,
        len(cands),
        cap,
        hit,
        _is_runaway(r, hit, cfg),
        fallback_reasons(*cands[0], cfg) if len(cands) > 1 else "",
        cands[0][0].avg_logprob,
    )
