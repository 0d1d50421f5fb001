"""Batched decoding with openai-whisper's own machinery, and CTC greedy decoding as a fast path.

`decode_batch` runs `whisper.decoding.DecodingTask` (greedy or beam search, its logit filters, no timestamps,
temperature 0) on a batch of one language. `ctc_greedy` collapses CTC argmax paths into sentencepiece units.
`decode_data_dir` ties both to a Kaldi data dir and times the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DecodeConfig:
    test_sets: list[str] = field(default_factory=list)  # data dirs; [] = the experiment's data.data_dir/<test_sets>
    out_dir: Optional[str] = None  # output folder; null = TARGET's decode_<set>_<tag>/
    tag: Optional[str] = None  # output folder tag; null = <checkpoint>_<greedy|beamN|ctc>
    checkpoint: str = "best"  # best | last | avg | export | path to a .pt file
    beam_size: int = 1  # 1 = greedy; N > 1 = beam search with N beams
    patience: Optional[float] = None  # beam search patience; null = 1.0
    length_penalty: Optional[float] = None  # alpha in [0, 1] for ranking finished beams; null = length normalization
    max_new_tokens: Optional[int] = None  # tokens sampled per utterance at most; null = n_text_ctx // 2
    language: Optional[str] = None  # null = each utterance's utt2lang; "detect" = Whisper language ID; or one code
    ctc: bool = False  # CTC greedy decoding over the CTC head's sentencepiece units (no autoregressive decoder)
    audio_window: Optional[float] = None  # encoder window in seconds; null = the model's own (n_audio_ctx / 50)
    batch_size: int = 8  # utterances per whisper decoding call (one language per batch)
    device: str = "cpu"  # cpu | cuda | auto
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    fp16: bool = False  # half-precision decoding (CUDA only; ignored on the CPU)
    raw: bool = False  # score the text as is: no Whisper normalizers (case and punctuation count)
    cer_languages: list[str] = field(default_factory=lambda: ["ja", "zh", "yue", "th", "lo", "my", "km", "bo"])  # CER
    languages: Optional[list[str]] = None  # decode only these utt2lang languages; null = all
    max_utts: Optional[int] = None  # decode only the first N utterances (by id) of each set; null = all
    shard: Optional[str] = None  # "k/n": decode only the k-th (1-based) of n interleaved parts (scripts/decode.sh)
