"""SentencePiece BPE units for the CTC head: train on the training transcripts, load, encode/decode.

Byte fallback is on, so characters the training text never showed (rare kanji, other scripts) still encode, as
UTF-8 byte pieces. CTC targets are `piece id + 1`: id 0 of the CTC head is the blank.

CLI: python -m dqwhisper.data.bpe DATA_DIR OUT.model [--vocab-size 500]
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from dqwhisper.data.kaldi import DataDir
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, command, get_logger

log = get_logger("dqwhisper.data.bpe")  # not __name__: "__main__" under python -m

DEFAULT_VOCAB_SIZE = 500


class BPE:
    """A loaded sentencepiece model. `n_ctc_units` = vocab size + 1 (the blank)."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)

    @classmethod
    def load(cls, path_or_bytes: str | os.PathLike | bytes) -> "BPE":
        if isinstance(path_or_bytes, (bytes, bytearray)):
            return cls(bytes(path_or_bytes))
        path = Path(path_or_bytes)
        if not path.is_file():
            raise DQWhisperError(f"{path}: sentencepiece model does not exist")
        return cls(path.read_bytes())

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.model_bytes)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def n_ctc_units(self) -> int:
        return self.vocab_size + 1

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def ctc_targets(self, text: str) -> list[int]:
        """Piece ids shifted by one (0 is the CTC blank)."""
        return [i + 1 for i in self.encode(text)]

    def decode_ctc(self, units: Iterable[int]) -> str:
        """Inverse of ctc_targets: drops blanks (0), shifts back, decodes."""
        return self.decode([u - 1 for u in units if u > 0])


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out_path: str | os.PathLike | None = None,
    character_coverage: float = 0.9995,
) -> BPE:
    """Train a BPE model on `texts` (one transcript each). The vocabulary is a soft limit: a small corpus gives
    fewer pieces than asked. Deterministic for the same input (one thread, no sampling)."""
    sentences = [" ".join(t.split()) for t in texts]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise DQWhisperError("train_bpe: no non-empty transcript to train on")
    # byte fallback needs 256 byte pieces + <unk>, <s>, </s> before any merge
    if vocab_size < 300:
        raise DQWhisperError(f"train_bpe: vocab_size {vocab_size} too small with byte fallback (need >= 300)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage,
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            split_digits=True,
            max_sentence_length=1 << 16,
            minloglevel=2,
            bos_id=-1,
            eos_id=-1,
            unk_id=0,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        raise DQWhisperError(
            f"train_bpe: sentencepiece could not train {vocab_size} pieces on {len(sentences)} transcripts "
            f"({str(e).strip().splitlines()[-1]}); a larger data.bpe_vocab_size covers more scripts"
        ) from e
    bpe = BPE(model.getvalue())
    if out_path is not None:
        bpe.save(out_path)
    log.info("trained BPE on %d transcripts: %d pieces", len(sentences), bpe.vocab_size)
    return bpe


def train_bpe_from_data_dir(
    data_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out_path: str | os.PathLike | None = None,
    languages: list[str] | None = None,
) -> BPE:
    data = DataDir.load(data_dir)
    if languages is not None:
        data = data.filter(languages=list(languages))
    return train_bpe([u.text for u in data.utts], vocab_size, out_path)


@command
def main(argv: list[str] | None = None) -> int | None:
    ap = argparse.ArgumentParser(prog="python -m dqwhisper.data.bpe", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("out")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--languages", nargs="*", default=None)
    args = ap.parse_args(argv)
    bpe = train_bpe_from_data_dir(args.data_dir, args.vocab_size, args.out, args.languages)
    print(f"{args.out}: {bpe.vocab_size} pieces, {bpe.n_ctc_units} CTC units")


if __name__ == "__main__":
    raise SystemExit(main())
