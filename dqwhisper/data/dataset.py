"""Whisper training data: log-mel + token targets per utterance, collate, a batch sampler, bad-utterance skipping.

Item (see docs/DESIGN.md): `utt_id`, `lang`, `mel (n_mels, 2*n_audio_ctx)` float32, `tokens` =
`[sot, lang, transcribe, notimestamps] + text_ids + [eot]`, `ctc_targets` (bpe ids + 1, 0 = blank), `n_frames`
(encoder frames covered by real audio, 50 per second).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
import torchaudio.transforms as T
import whisper
from whisper.tokenizer import LANGUAGES, Tokenizer, get_tokenizer

from dqwhisper.data.bpe import BPE
from dqwhisper.data.kaldi import DataDir, Utterance, is_pipe
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)

SAMPLES_PER_FRAME = 320  # encoder frame = 2 mel frames of 160 samples = 20 ms
MAX_TEXT_TOKENS = 448  # Whisper's n_text_ctx: prefix + text + eot must fit
PREFIX_LEN = 4  # sot, lang, transcribe, notimestamps (English-only models: sot, notimestamps)
# Scripts written without spaces: their transcripts are tokenized as they are. Others get a leading space, as
# Whisper itself emits (" Hello world").
NO_SPACE_LANGUAGES = {"ja", "zh", "yue", "th", "lo", "my", "km", "bo"}


MEL_PADDINGS = ("zeros", "audio")


def window_log_mel(
    audio: np.ndarray | torch.Tensor, n_mels: int, n_audio_ctx: int, padding: str = "zeros"
) -> torch.Tensor:
    """Whisper's log-mel of one utterance for an encoder window of `n_audio_ctx` positions: (n_mels, 2*n_audio_ctx).

    "zeros" (the toolkit's convention): the mel of the audio, normalized as openai-whisper's `transcribe` does (with
    30 s of trailing silence), cut after the audio's frames and zero-padded to the window. openai's transcribe and
    faster-whisper feed this; released Whisper models decode short clips far better from it.
    "audio": the waveform padded/trimmed to the window, then the mel (the `whisper.decode` README example).
    """
    if padding not in MEL_PADDINGS:
        raise DQWhisperError(f"mel padding '{padding}': one of {', '.join(MEL_PADDINGS)}")
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32)) if not torch.is_tensor(audio) else audio.float()
    n = n_audio_ctx * SAMPLES_PER_FRAME
    if padding == "audio":
        return whisper.audio.log_mel_spectrogram(whisper.pad_or_trim(a, n), n_mels)
    mel = whisper.audio.log_mel_spectrogram(a[:n], n_mels, padding=whisper.audio.N_SAMPLES)
    frames = min(len(a), n) // whisper.audio.HOP_LENGTH
    return whisper.pad_or_trim(mel[:, :frames], 2 * n_audio_ctx)


N_VOCAB_ENGLISH = 51864  # the *.en models (GPT-2 vocabulary + specials, no language tokens)


def default_tokenizer(n_vocab: int = 51865) -> Tokenizer:
    """The tokenizer of a model's vocabulary `dims.n_vocab`: 51864 English-only (*.en), 51865 multilingual
    (99 languages), 51866 large-v3's 100 languages."""
    if n_vocab == N_VOCAB_ENGLISH:
        return get_tokenizer(multilingual=False)
    if n_vocab < 51865:
        raise DQWhisperError(
            f"a Whisper vocabulary of {n_vocab} ids is neither English-only ({N_VOCAB_ENGLISH}) nor "
            "multilingual (51865 + languages added)"
        )
    return get_tokenizer(multilingual=True, num_languages=n_vocab - 51765 - 1, task="transcribe")


def is_multilingual(tokenizer: Tokenizer) -> bool:
    return not tokenizer.encoding.name.startswith("gpt2")


def text_ids(tokenizer: Tokenizer, text: str, lang: str) -> list[int]:
    text = " ".join(text.split())
    return tokenizer.encode(text if lang in NO_SPACE_LANGUAGES else " " + text)


def prefix_ids(tokenizer: Tokenizer, lang: str) -> list[int]:
    """The decoder prompt Whisper decodes with: [sot, lang, transcribe, notimestamps]; English-only models have no
    language or task token: [sot, notimestamps]."""
    if not is_multilingual(tokenizer):
        return [tokenizer.sot, tokenizer.no_timestamps]
    return [tokenizer.sot, tokenizer.to_language_token(lang), tokenizer.transcribe, tokenizer.no_timestamps]


def text_tokens(
    data: DataDir | str | os.PathLike, tokenizer: Tokenizer | None = None, languages: list[str] | None = None
) -> dict[str, list[int]]:
    """{utt_id: Whisper text token ids} (no prefix, no eot) of a data dir, e.g. for vocabulary pruning.
    Utterances with an unknown language are left out."""
    if not isinstance(data, DataDir):
        data = DataDir.load(data)
    tokenizer = tokenizer or default_tokenizer()
    return {
        u.utt_id: text_ids(tokenizer, u.text, u.lang)
        for u in data.utts
        if (languages is None or u.lang in languages) and u.lang in LANGUAGES
    }


def token_vocabulary(
    data: DataDir | str | os.PathLike, tokenizer: Tokenizer | None = None, languages: list[str] | None = None
) -> set[int]:
    """The set of Whisper text token ids the transcripts of `data` use (no special tokens)."""
    return {t for ids in text_tokens(data, tokenizer, languages).values() for t in ids}


@dataclass
class SpecAugment:
    """Frequency and time masking (torchaudio), time masks only within the real-audio frames."""

    freq_mask_param: int = 27  # F: max width of a frequency mask (mel bins)
    num_freq_masks: int = 2
    time_mask_param: int = 40  # T: max width of a time mask (mel frames, 10 ms each)
    num_time_masks: int = 2
    mask_value: float | None = None  # None: the mean of the utterance's log-mel

    _ALIASES = {
        "freq_mask_param": ("freq_mask",),
        "time_mask_param": ("time_mask",),
        "num_freq_masks": ("n_freq_masks",),
        "num_time_masks": ("n_time_masks",),
    }

    def __post_init__(self):
        self._freq = T.FrequencyMasking(self.freq_mask_param)
        self._time = T.TimeMasking(self.time_mask_param)

    @classmethod
    def from_config(cls, cfg: Any) -> "SpecAugment | None":
        """None/False/{"enabled": False} -> None; True -> defaults; a mapping or object -> its known fields."""
        if cfg is None or cfg is False:
            return None
        if isinstance(cfg, SpecAugment):
            return cfg
        if cfg is True:
            return cls()
        get = (
            (lambda k: cfg.get(k))
            if isinstance(cfg, Mapping) or hasattr(cfg, "get")
            else (lambda k: getattr(cfg, k, None))
        )
        if get("enabled") is False:
            return None
        values = {}
        for f in fields(cls):  # also the short names of dqwhisper.config.SpecAugmentConfig
            for key in (f.name, *cls._ALIASES.get(f.name, ())):
                if get(key) is not None:
                    values[f.name] = get(key)
        return cls(**values)

    def __call__(self, mel: torch.Tensor, n_mel_frames: int | None = None) -> torch.Tensor:
        """mel: (n_mels, T) -> masked copy. Masks time only within the first `n_mel_frames` frames."""
        mel = mel.clone()
        n = mel.shape[-1] if n_mel_frames is None else max(1, min(n_mel_frames, mel.shape[-1]))
        value = float(mel[:, :n].mean()) if self.mask_value is None else self.mask_value
        real = mel[:, :n].unsqueeze(0)
        for _ in range(self.num_freq_masks):
            real = self._freq(real, value)
        if n > 1:
            for _ in range(self.num_time_masks):
                real = self._time(real, value)
        mel[:, :n] = real[0]
        return mel


class TooManyBadUtterances(DQWhisperError):
    pass


class WhisperDataset(torch.utils.data.Dataset):
    """Map-style dataset over a data dir. Utterances that cannot be used (missing/unreadable audio, audio longer
    than the window, empty or too-long transcript, unknown language) are skipped, logged with id and reason and
    counted in `self.bad`; more than `max_bad_fraction` of them raises `TooManyBadUtterances`.

    Checks done up front: text, language, token length, audio file existence and header duration (not for pipes;
    `check_audio=False` skips the header reads). Audio that fails to decode later, in `__getitem__`, gives `None`,
    which `collate` drops (the count and the fraction check continue there, per worker process)."""

    def __init__(
        self,
        data_dir: DataDir | str | os.PathLike,
        tokenizer: Tokenizer | None,
        n_mels: int,
        n_audio_ctx: int,
        bpe: BPE | None = None,
        spec_augment: Any = None,
        max_bad_fraction: float = 0.1,
        languages: list[str] | None = None,
        check_audio: bool = True,
    ):
        self.data = data_dir if isinstance(data_dir, DataDir) else DataDir.load(data_dir)
        if languages is not None:
            self.data = self.data.filter(languages=list(languages))
        self.tokenizer = tokenizer or default_tokenizer()
        self.prefix_len = len(prefix_ids(self.tokenizer, "en"))
        self.n_mels = n_mels
        self.n_audio_ctx = n_audio_ctx
        self.n_samples = n_audio_ctx * SAMPLES_PER_FRAME
        self.bpe = bpe
        self.spec_augment = SpecAugment.from_config(spec_augment)
        self.max_bad_fraction = max_bad_fraction
        self.n_total = len(self.data.utts)
        if self.n_total == 0:
            raise DQWhisperError(
                f"{self.data.path}: no utterances" + (f" of languages {languages}" if languages else "")
            )
        self.bad: dict[str, str] = {}
        self.items: list[tuple[Utterance, list[int], list[int], int]] = []  # utt, tokens, ctc targets, n_frames
        for utt in self.data.utts:
            reason, entry = self._check(utt, check_audio)
            if reason:
                self._mark_bad(utt.utt_id, reason, raise_now=False)
            else:
                self.items.append(entry)
        self._check_fraction()
        if self.bad:
            counts = Counter(r.split(":")[0] for r in self.bad.values())
            log.warning(
                "%s: skipped %d of %d utterances (%s)",
                self.data.path,
                len(self.bad),
                self.n_total,
                ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
            )

    def _check(self, utt: Utterance, check_audio: bool) -> tuple[str | None, Any]:
        if not utt.text.strip():
            return "empty transcript", None
        if utt.lang not in LANGUAGES:
            return f"unknown language: '{utt.lang}'", None
        if utt.lang != "en" and not is_multilingual(self.tokenizer):
            return f"language '{utt.lang}': the model is English-only", None
        tokens = (
            prefix_ids(self.tokenizer, utt.lang) + text_ids(self.tokenizer, utt.text, utt.lang) + [self.tokenizer.eot]
        )
        if len(tokens) > MAX_TEXT_TOKENS:
            return f"transcript too long: {len(tokens)} tokens > {MAX_TEXT_TOKENS}", None
        n_frames = self.n_audio_ctx
        if not is_pipe(utt.wav):
            wav = self.data.resolve(utt.wav)
            if not os.path.isfile(wav):
                return f"missing audio: {wav}", None
            if check_audio:
                try:
                    seconds = self.data.duration(utt)
                except Exception as e:  # noqa: BLE001 - any decoder error makes the utterance bad
                    return f"unreadable audio: {e}", None
                frames = math.ceil(seconds * 50 - 1e-6)
                if frames > self.n_audio_ctx:
                    return f"audio too long: {seconds:.2f} s > {self.n_audio_ctx / 50:.2f} s window", None
                if frames <= 0:
                    return "unreadable audio: zero length", None
                n_frames = frames
        ctc = self.bpe.ctc_targets(utt.text) if self.bpe is not None else []
        if len(ctc) > n_frames:
            return f"transcript too long for CTC: {len(ctc)} units > {n_frames} frames", None
        return None, (utt, tokens, ctc, n_frames)

    def _mark_bad(self, utt_id: str, reason: str, raise_now: bool = True) -> None:
        self.bad[utt_id] = reason
        log.warning("skipping utterance %s: %s", utt_id, reason)
        if raise_now:
            self._check_fraction()

    def _check_fraction(self) -> None:
        if len(self.bad) > self.max_bad_fraction * self.n_total:
            raise TooManyBadUtterances(
                f"{self.data.path}: {len(self.bad)} of {self.n_total} utterances are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction}; first: "
                + "; ".join(f"{k}: {v}" for k, v in list(self.bad.items())[:3])
            )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        """Encoder frames of real audio per item (the window size where unknown), for the batch sampler."""
        return [n for _, _, _, n in self.items]

    @property
    def utt_ids(self) -> list[str]:
        return [u.utt_id for u, _, _, _ in self.items]

    def log_mel(self, audio: np.ndarray) -> torch.Tensor:
        """(n_mels, 2*n_audio_ctx) log-mel of the audio for the window (`window_log_mel`, zero-padded mel)."""
        return window_log_mel(audio, self.n_mels, self.n_samples // SAMPLES_PER_FRAME)

    def __getitem__(self, index: int) -> dict | None:
        utt, tokens, ctc, _ = self.items[index]
        if utt.utt_id in self.bad:
            return None
        try:
            audio = self.data.load_audio(utt)
            if len(audio) == 0:
                raise DQWhisperError("zero samples")
        except Exception as e:  # noqa: BLE001
            self._mark_bad(utt.utt_id, f"unreadable audio: {e}")
            return None
        if len(audio) > self.n_samples:
            self._mark_bad(
                utt.utt_id, f"audio too long: {len(audio) / 16000:.2f} s > {self.n_audio_ctx / 50:.2f} s window"
            )
            return None
        n_frames = min(self.n_audio_ctx, math.ceil(len(audio) / SAMPLES_PER_FRAME))
        mel = self.log_mel(audio)
        if self.spec_augment is not None:
            mel = self.spec_augment(mel, 2 * n_frames)
        return dict(
            utt_id=utt.utt_id,
            lang=utt.lang,
            mel=mel,
            tokens=list(tokens),
            ctc_targets=list(ctc),
            n_frames=n_frames,
            prefix_len=self.prefix_len,
        )


def collate(items: list[dict | None], pad_id: int) -> dict:
    """Batch items (None = skipped bad utterance, dropped). `pad_id` is normally the eot token.
    tokens_in (B, L) = tokens[:-1] padded with pad_id; targets (B, L) = tokens[1:] with the prefix targets
    (lang, transcribe, notimestamps; the item's `prefix_len` - 1 of them, 3 unless given) and padding set to -100."""
    items = [it for it in items if it is not None]
    if not items:
        raise DQWhisperError("collate: every utterance of this batch was bad")
    length = max(len(it["tokens"]) for it in items) - 1
    tokens_in = torch.full((len(items), length), pad_id, dtype=torch.long)
    targets = torch.full((len(items), length), -100, dtype=torch.long)
    for i, it in enumerate(items):
        tok = torch.tensor(it["tokens"], dtype=torch.long)
        tokens_in[i, : len(tok) - 1] = tok[:-1]
        targets[i, : len(tok) - 1] = tok[1:]
        targets[i, : it.get("prefix_len", PREFIX_LEN) - 1] = -100
    ctc = [torch.tensor(it["ctc_targets"], dtype=torch.long) for it in items]
    return dict(
        utt_ids=[it["utt_id"] for it in items],
        langs=[it["lang"] for it in items],
        mel=torch.stack([it["mel"] for it in items]),
        tokens_in=tokens_in,
        targets=targets,
        ctc_targets=torch.cat(ctc) if ctc else torch.zeros(0, dtype=torch.long),
        ctc_target_lengths=torch.tensor([len(c) for c in ctc], dtype=torch.long),
        enc_lengths=torch.tensor([it["n_frames"] for it in items], dtype=torch.long),
    )
