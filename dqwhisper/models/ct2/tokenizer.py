"""The tokenizer files of a faster-whisper directory: vocabulary.txt, config.json, a matching tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from whisper.model import ModelDimensions
from whisper.tokenizer import get_tokenizer

from dqwhisper.utils import DQWhisperError


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def whisper_tokenizer_for(dims: ModelDimensions):
    multilingual = dims.n_vocab >= 51865
    num_languages = dims.n_vocab - 51765 - int(multilingual)
    return get_tokenizer(multilingual, num_languages=num_languages)


def vocabulary_lines(dims: ModelDimensions) -> list[str]:
    """CT2's vocabulary.txt (one token per id) from openai-whisper's tiktoken vocabulary."""
    tok = whisper_tokenizer_for(dims)
    enc, table = tok.encoding, _byte_to_unicode()
    # HF's Whisper vocabularies (which faster-whisper's tokenizer.json follows) name the no-speech token nocaptions
    special = {i: s.replace("<|nospeech|>", "<|nocaptions|>") for s, i in enc._special_tokens.items()}
    lines = []
    for i in range(dims.n_vocab):
        if i in special:
            lines.append(special[i])
        elif i < enc.n_vocab:
            lines.append("".join(table[b] for b in enc.decode_single_token_bytes(i)))
        else:
            lines.append(f"<|{(i - tok.timestamp_begin) * 0.02:.2f}|>")
    if len(set(lines) - {""}) != len(lines) - lines.count(""):
        raise DQWhisperError(f"vocabulary for n_vocab={dims.n_vocab} has duplicate tokens")
    return lines


def whisper_config(
    dims: ModelDimensions, alignment_heads: list | None, extra_suppress: list[int] | None = None
) -> dict:
    """config.json as faster-whisper / CTranslate2 read it."""
    tok = whisper_tokenizer_for(dims)
    suppress = set(tok.non_speech_tokens) | {
        tok.transcribe,
        tok.translate,
        tok.sot,
        tok.sot_prev,
        tok.sot_lm,
        tok.no_speech,
    }
    suppress |= set(extra_suppress or [])
    if alignment_heads is None:
        alignment_heads = [
            [layer, head]
            for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
            for head in range(dims.n_text_head)
        ]
    return {
        "alignment_heads": [[int(a), int(b)] for a, b in alignment_heads],
        "lang_ids": sorted(tok.all_language_tokens),
        "suppress_ids": sorted(int(i) for i in suppress),
        "suppress_ids_begin": [tok.encode(" ")[0], tok.eot],
    }


def find_tokenizer_dir(dims: ModelDimensions, candidates: list[Path]) -> Path | None:
    """The first candidate CT2 dir with a tokenizer.json whose vocabulary.txt has this model's size and the same
    byte-level tokens (special-token spellings differ between HF releases, e.g. <|iw|> / <|he|>)."""
    want = vocabulary_lines(dims)
    n_text = whisper_tokenizer_for(dims).eot
    for d in candidates:
        vocab, tj = Path(d) / "vocabulary.txt", Path(d) / "tokenizer.json"
        if not (vocab.is_file() and tj.is_file()):
            continue
        lines = vocab.read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        if len(lines) == len(want) and lines[:n_text] == want[:n_text]:
            return Path(d)
    return None
