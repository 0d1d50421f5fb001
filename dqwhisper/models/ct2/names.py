"""CTranslate2 variable names <-> openai-whisper parameter names (both directions use these maps).

The fused self-attention `linear_0` is q|k|v stacked by rows with a zero key bias (openai's key projection has no
bias: a key bias adds the same amount to every score of a query and cancels in the softmax); the cross-attention
`linear_1` is k|v. The output projection is tied to the token embedding through the alias
`decoder/projection/weight -> decoder/embeddings/weight`.
"""

from __future__ import annotations

import re

import torch

from dqwhisper.utils import DQWhisperError

# rank-0 settings of the decoder that ctranslate2's WhisperSpec writes (values as in the shipped base model)
DECODER_FLAGS: dict[str, tuple[torch.dtype, int]] = {
    "activation": (torch.int8, 3),  # GELU
    "alibi": (torch.int8, 0),
    "alignment_heads": (torch.int16, 1),
    "alignment_layer": (torch.int16, -1),
    "pre_norm": (torch.int8, 1),
    "scale_embeddings": (torch.int8, 0),
    "start_from_zero_embedding": (torch.int8, 0),
}


def layer_pairs(side: str, i: int) -> list[tuple[str, str]]:
    """(CT2 layer prefix, openai module prefix) pairs of the non-fused parts of layer i."""
    ct2, oa = f"{side}/layer_{i}", f"{side}.blocks.{i}"
    pairs = [
        (f"{ct2}/self_attention/linear_1", f"{oa}.attn.out"),
        (f"{ct2}/self_attention/layer_norm", f"{oa}.attn_ln"),
        (f"{ct2}/ffn/linear_0", f"{oa}.mlp.0"),
        (f"{ct2}/ffn/linear_1", f"{oa}.mlp.2"),
        (f"{ct2}/ffn/layer_norm", f"{oa}.mlp_ln"),
    ]
    if side == "decoder":
        pairs += [
            (f"{ct2}/attention/linear_0", f"{oa}.cross_attn.query"),
            (f"{ct2}/attention/linear_2", f"{oa}.cross_attn.out"),
            (f"{ct2}/attention/layer_norm", f"{oa}.cross_attn_ln"),
        ]
    return pairs


def fused(side: str, i: int) -> list[tuple[str, list[str]]]:
    """(CT2 fused linear, openai linears stacked by rows in that order); the key has no bias in openai."""
    ct2, oa = f"{side}/layer_{i}", f"{side}.blocks.{i}"
    fused = [(f"{ct2}/self_attention/linear_0", [f"{oa}.attn.query", f"{oa}.attn.key", f"{oa}.attn.value"])]
    if side == "decoder":
        fused.append((f"{ct2}/attention/linear_1", [f"{oa}.cross_attn.key", f"{oa}.cross_attn.value"]))
    return fused


def top_pairs() -> list[tuple[str, str]]:
    return [
        ("encoder/conv1", "encoder.conv1"),
        ("encoder/conv2", "encoder.conv2"),
        ("encoder/layer_norm", "encoder.ln_post"),
        ("decoder/layer_norm", "decoder.ln"),
    ]


PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def is_norm(ct2_prefix: str) -> bool:
    return ct2_prefix.endswith("layer_norm")


def count_layers(names, side: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise DQWhisperError(f"{side} layers {sorted(found)} are not numbered 0..N-1")
    return len(found)
