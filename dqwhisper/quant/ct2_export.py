"""A quantized (or float) student -> CTranslate2 / faster-whisper model directory.

    python -m dqwhisper.quant.ct2_export SOURCE OUT_DIR [--float float16|float32|int8]

SOURCE: a checkpoint (.pt, fake-quantized or float) or an export file (.dqw). Weights quantized with one scale per
output row that fit int8 (symmetric, any bits up to 8; asymmetric up to 7) are written as the student's own integer
codes with CT2's per-row scale (`scale = 1 / step`): with symmetric per-channel 8-bit QAT, the int8 weights CT2
runs are exactly the trained ones. Other weights (per-group scales, float layers) are written dequantized, in
`--float` precision (`int8`: CTranslate2's own per-row int8 rounding). The fused CT2 matrices (self-attention
q|k|v, cross-attention k|v) take the student's codes only when all their parts have them. Pruned vocabularies and
the CTC head: see dqwhisper.models.ct2 (zero rows + a large negative projection bias at pruned ids; no CTC head).
A student with a shorter audio window runs in CTranslate2 (`ct2_greedy`), not in faster-whisper 1.2's transcribe,
which pads features to 30 s.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dqwhisper.models.ct2 import Int8Weight, openai_to_ct2
from dqwhisper.models.student import export_state, load_checkpoint
from dqwhisper.quant.dqw import load_exported
from dqwhisper.quant.fake_quant import FAKE_QUANTIZED_TYPES
from dqwhisper.quant.prepare import quantize_module_weight
from dqwhisper.quant.quantized import QUANTIZED_TYPES, QuantizedTensor
from dqwhisper.utils import DQWhisperError, command, get_logger

log = get_logger(__name__)
FLOAT_CHOICES = {"float16": "float16", "float32": "float32", "int8": "int8_float16"}
_FUSED = (
    re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.attn\.(query|key|value)\.weight$"),
    re.compile(r"^decoder\.blocks\.(\d+)\.cross_attn\.(key|value)\.weight$"),
)


def _load(source) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    return load_exported(path, "dequant") if path.suffix == ".dqw" else load_checkpoint(path)


def _quantized_tensor(module: nn.Module) -> QuantizedTensor:
    if isinstance(module, QUANTIZED_TYPES):
        return module.quantized_tensor()
    return quantize_module_weight(module)


def _fused_group(name: str) -> str | None:
    m = _FUSED[0].match(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}.attn"
    m = _FUSED[1].match(name)
    return f"decoder.{m.group(1)}.cross_attn" if m else None


def student_state_for_ct2(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Int8Weight]]:
    """(openai-layout float state dict with dequantized weights, {weight name: the student's own int8 codes})."""
    state: dict[str, Tensor] = {}
    int8: dict[str, Int8Weight] = {}
    quantized_prefixes = []
    for name, module in model.named_modules():
        if not isinstance(module, FAKE_QUANTIZED_TYPES + QUANTIZED_TYPES):
            continue
        quantized_prefixes.append(name + ".")
        qt = _quantized_tensor(module)
        state[name + ".weight"] = qt.dequantize()
        if getattr(module, "bias", None) is not None:
            state[name + ".bias"] = module.bias.detach().float()
        rows = qt.int8_rows()
        if rows is not None:
            q, step = rows
            int8[name + ".weight"] = Int8Weight.from_step(q.reshape(qt.shape), step)
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in quantized_prefixes) or not torch.is_floating_point(value):
            continue
        state[key] = value.detach().float()
    groups: dict[str, list[str]] = {}
    for key in state:
        g = _fused_group(key)
        if g:
            groups.setdefault(g, []).append(key)
    for g, keys in groups.items():
        if any(k in int8 for k in keys) and not all(k in int8 for k in keys):
            log.info("%s: not all of %s have per-row int8 codes; writing the group dequantized", g, keys)
            for k in keys:
                int8.pop(k, None)
    return state, int8


def ct2_greedy(
    ct2_dir: str | Path, mel, prompts: list[list[int]], max_length: int = 128, compute_type: str = "int8"
) -> list[list[int]]:
    """Greedy decoding with CTranslate2 itself on our own log-mel features (B, n_mels, 2 * n_audio_ctx): works for
    any audio window (faster-whisper's transcribe pads features to 30 s, so it runs only full-window students).
    Returns the generated token ids after each prompt, without eot."""
    import ctranslate2  # optional: only this function needs it

    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type=compute_type)
    feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.asarray(mel, dtype=np.float32)))
    results = model.generate(
        feats,
        prompts,
        beam_size=1,
        max_length=max_length,
        return_scores=False,
        suppress_blank=False,
        suppress_tokens=[],
    )
    return [r.sequences_ids[0] for r in results]


def export_ct2(source, out_dir: str | Path, float_precision: str = "float16", tokenizer_dir: str | Path | None = None):
    """Write a faster-whisper directory for `source` (model, .pt or .dqw); returns (out_dir, number of int8 weights
    that are the student's own codes)."""
    if float_precision not in FLOAT_CHOICES:
        raise DQWhisperError(f"--float {float_precision!r}: use one of {list(FLOAT_CHOICES)}")
    model = _load(source)
    state, int8 = student_state_for_ct2(model)
    meta = export_state(model)
    out = openai_to_ct2(
        model.dims,
        state,
        out_dir,
        FLOAT_CHOICES[float_precision],
        vocab_keep=meta["vocab_keep"],
        alignment_heads=meta["alignment_heads"],
        int8_weights=int8,
        tokenizer_dir=tokenizer_dir,
    )
    if model.dims.n_audio_ctx != 1500:
        log.warning(
            "the student's audio window is %.1f s: faster-whisper's transcribe pads features to 30 s and "
            "will refuse it; run it through ctranslate2.models.Whisper (ct2_greedy)",
            model.dims.n_audio_ctx / 50,
        )
    log.info("CT2 export: %d weights are the student's own int8 codes", len(int8))
    return Path(out), len(int8)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dqwhisper.quant.ct2_export",
        description="Write a CTranslate2/faster-whisper model directory for a DQ-Whisper "
        "student (its own int8 codes where they fit).",
    )
    p.add_argument("source", help="checkpoint .pt or export .dqw")
    p.add_argument("out_dir")
    p.add_argument(
        "--float",
        dest="float_precision",
        default="float16",
        choices=sorted(FLOAT_CHOICES),
        help="precision of the weights that are not per-row int8 codes (default float16)",
    )
    p.add_argument("--tokenizer-dir", help="a CT2 dir with tokenizer.json/vocabulary.txt (default: the model store)")
    args = p.parse_args(argv)
    out, n = export_ct2(args.source, args.out_dir, args.float_precision, args.tokenizer_dir)
    size = (out / "model.bin").stat().st_size
    print(f"wrote {out} (model.bin {size:,} bytes; {n} weights as the student's own int8 codes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
