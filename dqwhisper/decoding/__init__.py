"""Batched decoding with openai-whisper's own machinery and openai-whisper `transcribe`'s rules, and CTC greedy
decoding as a fast path.

Modules: search.py (decode_mels and its filters), ctc.py, audio.py (window, mel), utterances.py
(decode_utterances); DecodeConfig lives with the other schemas in dqwhisper/config.py.

`decode_mels` is the one decoder every caller uses (inference.py, transcribe, training validation): a batch of mels
(or encoder outputs), languages forced or detected, then whisper's `DecodingTask` (greedy or beam search) with
- special and timestamp tokens suppressed (no-timestamp mode), an optional no-repeat n-gram rule,
- a token cap per row from its audio duration (`token_cap`),
- temperature fallback as openai's `transcribe` does it: a row is decoded again at the next temperature (sampling,
  best of `best_of`, every pending row of the batch at once, each utterance with its own seeded generator:
  `SeededSampler`) when its gzip compression ratio > `compression_ratio_threshold`, its average log-probability
  < `logprob_threshold` or it hit its cap; a row whose final hypothesis still hits the cap or fails the compression
  test is a *runaway*.
`decode_mels(..., defer=True)` returns the rows that fail the first temperature as `PendingRow`s, which a
`FallbackPool` decodes together with other batches' (decode.pool_fallback: decode_utterances and training validation).
`ctc_greedy` collapses CTC argmax paths into sentencepiece units. `decode_utterances` ties both to a Kaldi data dir
(batches of one language, longest first) and times the run. `audio_to_mel` makes the encoder input for the model's
own window (`mel_padding` says how the window is filled).
"""

from dqwhisper.config import KERNELS, DecodeConfig, check_decode_config
from dqwhisper.decoding.audio import apply_audio_window, audio_to_mel, batch_frames, encoder_window, window_samples
from dqwhisper.decoding.ctc import ctc_decode_batch, ctc_greedy, load_ctc_bpe
from dqwhisper.decoding.search import (
    DETECT,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    BatchedDecodingTask,
    FallbackPool,
    Hypothesis,
    NoRepeatNGram,
    PendingRow,
    SuppressSpecial,
    TokenCap,
    decode_batch,
    decode_mels,
    decoding_options,
    token_cap,
)
from dqwhisper.decoding.utterances import DecodeRun, UttHypothesis, decode_utterances, search_tag, select_utts

__all__ = [
    "DecodeConfig",
    "check_decode_config",
    "BatchedDecodingTask",
    "decoding_options",
    "decode_batch",
    "decode_mels",
    "FallbackPool",
    "PendingRow",
    "Hypothesis",
    "token_cap",
    "SuppressSpecial",
    "NoRepeatNGram",
    "TokenCap",
    "audio_to_mel",
    "ctc_greedy",
    "ctc_decode_batch",
    "load_ctc_bpe",
    "decode_utterances",
    "select_utts",
    "apply_audio_window",
    "batch_frames",
    "encoder_window",
    "search_tag",
    "DecodeRun",
    "UttHypothesis",
    "window_samples",
    "DETECT",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "KERNELS",
]
