"""Convert Whisper weights between openai-whisper checkpoints and CTranslate2 (faster-whisper) directories.

python -m dqwhisper.models.convert ct2-to-openai CT2_DIR OUT.pt
python -m dqwhisper.models.convert openai-to-ct2 IN.pt OUT_DIR [--quantization int8]
python -m dqwhisper.models.convert join-parts OUT/model.bin model.bin.part1 model.bin.part2 [--size N]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from dqwhisper.models import ct2
from dqwhisper.models.student import export_state, read_checkpoint
from dqwhisper.utils import atomic_torch_save, command, get_logger

log = get_logger(__name__)


def ct2_dir_to_checkpoint(ct2_dir: str | Path, out_path: str | Path) -> None:
    """Write an openai-whisper checkpoint (`dims`, `model_state_dict` in the stored dtype, plus `alignment_heads`
    from config.json when present) that `whisper.load_model(path)` and `load_whisper(path)` both read."""
    dims, sd = ct2.ct2_to_openai(ct2_dir)
    ckpt = {"dims": asdict(dims), "model_state_dict": sd}
    heads = ct2.read_ct2_config(ct2_dir).get("alignment_heads") if Path(ct2_dir).is_dir() else None
    if heads:
        ckpt["alignment_heads"] = heads
    atomic_torch_save(ckpt, out_path)
    log.info("wrote %s (%s, %d tensors)", out_path, dims, len(sd))


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dqwhisper.models.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ct2-to-openai", help="CTranslate2 directory -> openai-whisper .pt")
    a.add_argument("ct2_dir")
    a.add_argument("out")
    b = sub.add_parser("openai-to-ct2", help="openai-whisper / DQ-Whisper .pt -> CTranslate2 directory")
    b.add_argument("checkpoint")
    b.add_argument("out_dir")
    b.add_argument("--quantization", default=None, choices=[q for q in ct2.QUANTIZATIONS if q])
    b.add_argument(
        "--tokenizer-dir",
        default=None,
        help="a CT2 dir whose tokenizer.json + vocabulary.txt to copy (default: a matching one in store)",
    )
    c = sub.add_parser("join-parts", help="concatenate model.bin.part1 part2 ... into one model.bin")
    c.add_argument("out")
    c.add_argument("parts", nargs="+")
    c.add_argument("--size", type=int, default=None, help="expected total size in bytes")
    args = parser.parse_args(argv)
    if args.command == "ct2-to-openai":
        ct2_dir_to_checkpoint(args.ct2_dir, args.out)
    elif args.command == "join-parts":
        ct2.join_parts(args.parts, args.out, args.size)
    else:
        state = export_state(read_checkpoint(args.checkpoint))
        ct2.openai_to_ct2(
            **state, out_dir=args.out_dir, quantization=args.quantization, tokenizer_dir=args.tokenizer_dir
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
