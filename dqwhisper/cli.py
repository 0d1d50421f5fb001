"""The `dqwhisper` console script: one subcommand per tool, each the `main(argv)` of its module (wrapped by
`dqwhisper.utils.command`: a DQWhisperError is one line on stderr and exit status 1).

    dqwhisper COMMAND [args ...]        dqwhisper --help lists the commands; dqwhisper COMMAND --help its options

A new tool registers here: add its module's `main` to COMMANDS. `python -m <module>` keeps working for every one.
"""

from __future__ import annotations

import sys
from typing import Callable

from dqwhisper import inference, report, scoring, transcribe
from dqwhisper.bin import train
from dqwhisper.data import bpe, demo, importers, validate, vocab
from dqwhisper.interop import ggml_export, hf_export
from dqwhisper.models import convert
from dqwhisper.quant import ct2_export, export, ptq, size

COMMANDS: dict[str, tuple[Callable[[list[str] | None], int | None], str]] = {
    "train": (train.run, "train / distil a student (Hydra: [--config-name X] key=value ...)"),
    "decode": (inference.main, "decode and score test sets: MODEL TARGET [key=value ...] (= python inference.py)"),
    "transcribe": (transcribe.main, "transcribe audio files of any length (openai-whisper's CLI options)"),
    "export": (export.main, "checkpoint -> packed model.dqw [--ct2 DIR] [--check]"),
    "export-ct2": (ct2_export.main, "checkpoint or .dqw -> CTranslate2 / faster-whisper directory"),
    "export-hf": (hf_export.main, "checkpoint or .dqw -> Hugging Face transformers directory (extra: hf)"),
    "export-ggml": (ggml_export.main, "checkpoint or .dqw -> whisper.cpp model file (extra: ggml)"),
    "convert": (convert.main, "openai-whisper .pt <-> CTranslate2 directory"),
    "ptq": (ptq.main, "post-training quantization: STUDENT.pt QUANT_CFG OUT.pt"),
    "size": (size.main, "bytes on disk of a .dqw / .pt / CT2 model, against a teacher"),
    "validate": (validate.main, "check Kaldi data dirs (like validate_data_dir.sh)"),
    "import": (importers.main, "Common Voice, FLEURS, LibriSpeech, AISHELL-1, CSJ, manifest -> Kaldi data dir"),
    "demo-data": (demo.main, "synthesize the offline demo corpus"),
    "bpe": (bpe.main, "train the sentencepiece units of the CTC head"),
    "vocab": (vocab.main, "the token ids a pruned student keeps, from data dirs"),
    "score": (scoring.main, "score a Kaldi hyp file against a data dir"),
    "report": (report.main, "the results table and plot of a set of decoded models"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return f"usage: dqwhisper COMMAND [args ...]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dqwhisper: unknown command '{name}'\n\n{usage()}", file=sys.stderr, end="")
        return 2
    return int(COMMANDS[name][0](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
