"""Vocabulary pruning (ours): the token ids a student keeps, from the text of its training data.

    python -m dqwhisper.data.vocab DATA_DIR [DATA_DIR ...] [--languages ja en] [--out vocab_keep.json]

Kept: every id the whisper tokenizer produces for the transcripts (as the dataset tokenizes them: a leading space
except for languages written without spaces), every special token (ids >= eot: language, task, timestamp tokens),
and — unless `byte_tokens=False` — the 256 single-byte tokens, so any text stays spellable byte by byte.

Consistency (docs/DESIGN.md): `from_whisper(teacher, vocab_keep=keep)` gathers the embedding rows; the student's
decoder takes full ids and returns full-vocabulary logits with -inf at pruned ids (decoding, export to .dqw keeps
`vocab_keep`; the CT2 export expands to the full vocabulary with a large negative bias at pruned ids); in training
(`decoder.subset_logits = True`) logits come in `vocab_keep` order, and the teacher's KD targets are
`teacher_logits.index_select(-1, keep)` (`gather_teacher_logits`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

from torch import Tensor

from dqwhisper.data.dataset import default_tokenizer, text_tokens
from dqwhisper.models.student import vocab_from_token_lists
from dqwhisper.utils import DQWhisperError, command


def single_byte_tokens(tokenizer) -> list[int]:
    """Ids of the text tokens that are exactly one byte."""
    enc = tokenizer.encoding
    return [i for i in range(tokenizer.eot) if len(enc.decode_single_token_bytes(i)) == 1]


def select_vocab(token_lists: Iterable[Sequence[int]], tokenizer, byte_tokens: bool = True) -> list[int]:
    """Sorted kept ids: the ids in `token_lists` + every special token (+ the single-byte tokens)."""
    lists = list(token_lists)
    if byte_tokens:
        lists.append(single_byte_tokens(tokenizer))
    n_vocab = tokenizer.encoding.n_vocab
    return vocab_from_token_lists(lists, n_vocab, tokenizer.eot)


def vocab_from_data_dirs(
    data_dirs: Sequence[str | Path], languages: Sequence[str] | None = None, tokenizer=None, byte_tokens: bool = True
) -> list[int]:
    tokenizer = tokenizer or default_tokenizer()
    lists = []
    for d in data_dirs:
        lists.extend(text_tokens(d, tokenizer, list(languages) if languages else None).values())
    if not lists:
        raise DQWhisperError(f"no transcripts found in {list(map(str, data_dirs))} for languages {languages}")
    return select_vocab(lists, tokenizer, byte_tokens)


def gather_teacher_logits(logits: Tensor, vocab_keep: Tensor | None) -> Tensor:
    """Full-vocabulary teacher logits (..., n_vocab) -> (..., len(vocab_keep)) in the student's subset order."""
    return logits if vocab_keep is None else logits.index_select(-1, vocab_keep.to(logits.device))


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqwhisper.data.vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dirs", nargs="+", help="Kaldi data dirs whose transcripts define the vocabulary")
    p.add_argument("--languages", nargs="*", help="only utterances of these languages (utt2lang)")
    p.add_argument("--no-byte-tokens", action="store_true", help="do not add the 256 single-byte tokens")
    p.add_argument("--out", help="write the kept ids as a JSON list")
    args = p.parse_args(argv)
    keep = vocab_from_data_dirs(args.data_dirs, args.languages, byte_tokens=not args.no_byte_tokens)
    n_vocab = default_tokenizer().encoding.n_vocab
    print(
        f"kept {len(keep):,} of {n_vocab:,} token ids ({len(keep) / n_vocab:.1%}); the embedding/projection "
        f"shrinks {n_vocab / len(keep):.1f}x"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(keep) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
