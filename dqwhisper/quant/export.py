"""Export a checkpoint as `model.dqw` (the file format and its loader: dqwhisper.quant.dqw), optionally a
CTranslate2 directory too, and check the file against the checkpoint.

    python -m dqwhisper.quant.export CKPT OUT.dqw [--float-dtype float16|float32] [--ct2 DIR] [--check]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dqwhisper.models.ct2.tokenizer import whisper_tokenizer_for
from dqwhisper.models.student import load_checkpoint, model_from_checkpoint, read_checkpoint
from dqwhisper.quant.ct2_export import export_ct2
from dqwhisper.quant.dqw import ALIGN, FLOAT_DTYPES, export_model, load_exported, read_header
from dqwhisper.utils import command, get_logger, sha256_file

log = get_logger(__name__)
__all__ = [
    "ALIGN",
    "FLOAT_DTYPES",
    "export_model",
    "load_exported",
    "read_header",
    "export_checkpoint",
    "main",
    "check_export",
]


def export_checkpoint(ckpt_path: str | Path, out: str | Path, float_dtype: str = "float16") -> dict:
    """A training checkpoint (fake-quantized when it has a quant config; float otherwise) -> model.dqw."""
    ckpt = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, str(ckpt_path)).eval()
    meta = ckpt.get("dqwhisper") or {}
    if not meta.get("quant"):
        log.warning("%s has no quant config: exporting its float weights (%s)", ckpt_path, float_dtype)
    source = {"checkpoint": str(ckpt_path), "sha256": sha256_file(ckpt_path), "step": ckpt.get("step")}
    return export_model(model, out, float_dtype=float_dtype, config=meta.get("config"), source=source)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dqwhisper.quant.export",
        description="Export a DQ-Whisper checkpoint as a packed low-bit model.dqw "
        "(and optionally a CTranslate2/faster-whisper directory).",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint (fake-quantized by QAT or PTQ, or float)")
    p.add_argument("out", help="output model.dqw")
    p.add_argument(
        "--float-dtype",
        default="float16",
        choices=sorted(FLOAT_DTYPES),
        help="storage of the non-quantized tensors (default float16)",
    )
    p.add_argument("--ct2", metavar="DIR", help="also write a CTranslate2 model directory (see quant/ct2_export.py)")
    p.add_argument("--check", action="store_true", help="reload the file and compare with the checkpoint's forward")
    args = p.parse_args(argv)
    header = export_checkpoint(args.checkpoint, args.out, args.float_dtype)
    size = Path(args.out).stat().st_size
    nq = sum(e["kind"] == "quantized" for e in header["tensors"].values())
    print(f"wrote {args.out}: {size:,} bytes ({size / 1e6:.2f} MB), {nq} quantized tensors")
    if args.check:
        print(check_export(args.checkpoint, args.out))
    if args.ct2:
        export_ct2(args.checkpoint, args.ct2)
        print(f"wrote {args.ct2}")
    return 0


@torch.no_grad()
def check_export(ckpt_path: str | Path, dqw_path: str | Path, seed: int = 0) -> dict:
    """Max |logit difference| on random mel/tokens: checkpoint (fake-quant) vs the file in both run modes."""
    ref_model = load_checkpoint(ckpt_path)
    g = torch.Generator().manual_seed(seed)
    dims = ref_model.dims
    mel = torch.randn(1, dims.n_mels, 2 * dims.n_audio_ctx, generator=g)
    text = [int(i) for i in torch.randint(220, 5000, (12,), generator=g)]
    tok = whisper_tokenizer_for(dims)  # the model's own: *.en, 99 or 100 languages
    prompt = [tok.sot, tok.to_language_token("en"), tok.transcribe] if dims.n_vocab >= 51865 else [tok.sot]
    tokens = torch.tensor([prompt + [tok.no_timestamps] + text])
    keep = getattr(ref_model.decoder, "vocab_keep", None)
    if keep is not None:
        tokens = keep[torch.searchsorted(keep, tokens).clamp(max=len(keep) - 1)]
    ref = ref_model.decoder(tokens, ref_model.encoder(mel))
    finite = torch.isfinite(ref)
    out = {}
    for mode in ("dequant", "int8"):
        m = load_exported(dqw_path, mode)
        y = m.decoder(tokens, m.encoder(mel))
        out[mode] = {
            "max_abs_diff": float((y[finite] - ref[finite]).abs().max()),
            "ref_max_abs": float(ref[finite].abs().max()),
            "argmax_agree": float((y.argmax(-1) == ref.argmax(-1)).float().mean()),
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
