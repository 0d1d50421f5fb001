"""Export to a Hugging Face transformers Whisper directory (model.safetensors, config.json, generation_config.json,
the WhisperProcessor files built offline from openai-whisper's assets).

    dqwhisper export-hf CKPT OUT_DIR        (python -m dqwhisper.interop.hf_export)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from whisper.model import ModelDimensions
from whisper.tokenizer import get_tokenizer

from dqwhisper.data.dataset import default_tokenizer
from dqwhisper.interop.hf import (
    FRAMES_PER_SECOND,
    _tiktoken_ranks,
    dequantized_float_model,
    generation_config,
    hf_config,
    openai_to_hf_name,
    pruned_ids,
)
from dqwhisper.models.load import load_model
from dqwhisper.utils import DQWhisperError, command, get_logger

log = get_logger(__name__)


def bpe_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2 byte-level vocab.json / merges of a tiktoken rank table (merge of a token: the split into two lower-ranked
    tokens that byte-pair encoding with the lower ranks reaches)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[c] for c in b)

    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([c]) for c in token]
        while len(parts) > 2:  # byte-pair encode with the ranks below this token's
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
            if ranks.get(parts[best] + parts[best + 1], 1 << 62) >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise DQWhisperError(f"tiktoken token {token!r} (rank {rank}) is not one merge of two lower tokens")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


def write_processor(out_dir: Path, dims: ModelDimensions, tok) -> None:
    """WhisperProcessor files (tokenizer + feature extractor) built offline from openai-whisper's assets."""
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    multilingual = dims.n_vocab >= 51865
    vocab, merges = bpe_vocab_merges(_tiktoken_ranks(multilingual))
    specials = sorted(tok.encoding._special_tokens.items(), key=lambda kv: kv[1])
    for name, i in specials:
        vocab[name] = i
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens(
        [AddedToken(n, special=True, normalized=False) for n, _ in specials if not re.fullmatch(r"<\|\d+\.\d+\|>", n)],
        special_tokens=True,
    )
    tokenizer.add_tokens(
        [AddedToken(n, special=False, normalized=False) for n, _ in specials if re.fullmatch(r"<\|\d+\.\d+\|>", n)]
    )
    bad = [(n, i) for n, i in specials if tokenizer.convert_tokens_to_ids(n) != i]
    if bad:
        raise DQWhisperError(f"tokenizer build: special tokens got other ids than openai-whisper's: {bad[:4]}")
    seconds = dims.n_audio_ctx / FRAMES_PER_SECOND
    seconds = int(seconds) if seconds == int(seconds) else seconds
    fe = WhisperFeatureExtractor(feature_size=dims.n_mels, chunk_length=seconds)
    fe.n_samples = dims.n_audio_ctx * 320
    fe.nb_max_frames = 2 * dims.n_audio_ctx
    WhisperProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(out_dir)


def export_hf(ckpt: str | Path, out_dir: str | Path) -> list[str]:
    """Write CKPT (anything `load_whisper` reads, a .dqw export too) as a transformers Whisper directory.
    Returns the notes (also written to OUT_DIR/DQWHISPER_EXPORT.md)."""
    from safetensors.torch import save_file  # the hf extra

    out_dir = Path(out_dir)
    model = load_model(str(ckpt), device="cpu", export_mode="dequant")
    float_model, notes = dequantized_float_model(model)
    dims = float_model.dims
    tok = get_tokenizer(multilingual=False) if dims.n_vocab < 51865 else default_tokenizer(dims.n_vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {openai_to_hf_name(k): v.contiguous() for k, v in float_model.state_dict().items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(dims, tok), indent=2))
    heads = None
    if getattr(model, "alignment_heads", None) is not None:
        dense = model.alignment_heads.to_dense() if model.alignment_heads.is_sparse else model.alignment_heads
        heads = dense.nonzero().tolist()
    dropped = pruned_ids(model)
    if dropped:
        notes.append(f"{len(dropped)} pruned ids added to generation_config.suppress_tokens")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(dims, tok, dropped, heads), indent=2))
    write_processor(out_dir, dims, tok)
    seconds = dims.n_audio_ctx / FRAMES_PER_SECOND
    notes.insert(
        0,
        f"audio window {seconds:g} s: max_source_positions = {dims.n_audio_ctx}, feature extractor "
        f"chunk_length = {seconds:g} (input_features of {2 * dims.n_audio_ctx} frames)",
    )
    (out_dir / "DQWHISPER_EXPORT.md").write_text(
        f"# Exported by dqwhisper export-hf from {ckpt}\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"\ndims: {json.dumps(asdict(dims))}\n"
    )
    for n in notes:
        log.info("export-hf: %s", n)
    return notes


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dqwhisper export-hf", description=export_hf.__doc__)
    p.add_argument("checkpoint", help=".pt checkpoint, .dqw export, store name, CT2 or HF directory")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    try:
        notes = export_hf(args.checkpoint, args.out_dir)
    except ImportError as e:
        raise DQWhisperError(f"needs the 'hf' extra (pip install .[hf]): {e}") from e
    print(f"wrote {args.out_dir}" + "".join(f"\n  {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
