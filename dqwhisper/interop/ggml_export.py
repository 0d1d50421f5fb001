"""Export to a whisper.cpp model file (f16 or ggml's q8_0/q5_0/q4_0 blocks).

dqwhisper export-ggml CKPT OUT.bin [--type f16|q8_0|q5_0|q4_0]   (python -m dqwhisper.interop.ggml_export)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dqwhisper.interop.ggml import TYPES, write_ggml
from dqwhisper.models.load import load_model
from dqwhisper.utils import command


def export_ggml(ckpt: str | Path, out: str | Path, file_type: str = "f16") -> dict:
    """Write CKPT (anything `load_model` reads; a .dqw export dequantized) as a whisper.cpp model file."""
    return write_ggml(load_model(str(ckpt), device="cpu", export_mode="dequant"), out, file_type)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dqwhisper export-ggml", description="write a whisper.cpp model file")
    p.add_argument("checkpoint", help=".pt checkpoint, .dqw export, store name, CT2 or HF directory")
    p.add_argument("out", help="OUT.bin (a sidecar OUT.bin.json says how to run it)")
    p.add_argument("--type", default="f16", choices=TYPES, help="weight type of the 2-D tensors (default f16)")
    args = p.parse_args(argv)
    info = export_ggml(args.checkpoint, args.out, args.type)
    print(
        f"wrote {args.out} ({info['bytes'] / 1e6:.1f} MB, {args.type}; tensors {info['tensor_types']})"
        + "".join(f"\n  {n}" for n in info["notes"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
