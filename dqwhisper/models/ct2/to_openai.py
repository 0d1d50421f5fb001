"""CTranslate2 Whisper directory -> openai-whisper dims + state_dict (int8 weights dequantized)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from whisper.model import ModelDimensions, Whisper

from dqwhisper.models.ct2.binfile import FLOATS, SPEC_NAME, SPEC_REVISION, CT2ModelFile, Int8Weight, read_model_bin
from dqwhisper.models.ct2.names import PARAM, count_layers, fused, is_norm, layer_pairs, top_pairs
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)


def _dequantized(model: CT2ModelFile, name: str, source: Path) -> Tensor:
    t = model.get(name)
    if t is None:
        raise DQWhisperError(f"{source} has no variable {name}: not a Whisper model of the expected layout")
    if t.dtype in FLOATS:
        return t
    scale = model.get(name + "_scale")
    if scale is None:
        raise DQWhisperError(f"{source}: variable {name} is {t.dtype} without a {name}_scale")
    if scale.ndim == 0:
        return t.float() / scale.float()
    return Int8Weight(t, scale).dequantize()


def ct2_to_openai(ct2_dir: str | Path) -> tuple[ModelDimensions, dict[str, Tensor]]:
    """Read a CTranslate2 Whisper directory (or its model.bin) into openai-whisper dims + state_dict.

    Float weights keep their stored dtype (the shipped base is float16, so the state dict is float16, bit-exact);
    int8/int16 weights are dequantized to float32.
    """
    path = Path(ct2_dir)
    bin_path = path / "model.bin" if path.is_dir() or not path.name.endswith(".bin") else path
    if not path.exists():
        raise DQWhisperError(f"CTranslate2 model {path} does not exist")
    model = read_model_bin(bin_path)
    if model.spec != SPEC_NAME:
        raise DQWhisperError(f"{bin_path} holds a {model.spec}, not a {SPEC_NAME}")
    if model.revision != SPEC_REVISION:
        log.warning(
            "%s has WhisperSpec revision %d; this reader was written for revision %d",
            bin_path,
            model.revision,
            SPEC_REVISION,
        )
    proj = model.aliases.get("decoder/projection/weight")
    if "decoder/projection/bias" in model.variables or (
        proj != "decoder/embeddings/weight" and "decoder/projection/weight" in model.variables
    ):
        raise DQWhisperError(
            f"{bin_path} has an untied output projection or a projection bias (a pruned-vocabulary "
            f"export?); openai-whisper ties the projection to the token embedding"
        )
    get = lambda name: _dequantized(model, name, bin_path)  # noqa: E731

    sd: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(ct2_prefix: str, oa_prefix: str) -> None:
        for ct2_param in ("gamma", "beta") if is_norm(ct2_prefix) else ("weight", "bias"):
            sd[f"{oa_prefix}.{PARAM[ct2_param]}"] = get(f"{ct2_prefix}/{ct2_param}")
            used.update({f"{ct2_prefix}/{ct2_param}", f"{ct2_prefix}/{ct2_param}_scale"})

    n_enc = count_layers(model.variables, "encoder")
    n_dec = count_layers(model.variables, "decoder")
    for ct2_prefix, oa_prefix in top_pairs():
        put(ct2_prefix, oa_prefix)
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            for ct2_prefix, oa_prefix in layer_pairs(side, i):
                put(ct2_prefix, oa_prefix)
            for ct2_prefix, parts in fused(side, i):
                weight, bias = get(ct2_prefix + "/weight"), get(ct2_prefix + "/bias")
                if weight.shape[0] % len(parts):
                    raise DQWhisperError(
                        f"{bin_path}: {ct2_prefix}/weight has {weight.shape[0]} rows, not a multiple of {len(parts)}"
                    )
                for part, w, b in zip(parts, weight.chunk(len(parts)), bias.chunk(len(parts))):
                    sd[part + ".weight"] = w.clone()
                    if not part.endswith(".key"):
                        sd[part + ".bias"] = b.clone()
                used.update(ct2_prefix + s for s in ("/weight", "/weight_scale", "/bias"))
    for ct2_name, oa_name in (
        ("encoder/position_encodings/encodings", "encoder.positional_embedding"),
        ("decoder/position_encodings/encodings", "decoder.positional_embedding"),
        ("decoder/embeddings/weight", "decoder.token_embedding.weight"),
    ):
        sd[oa_name] = get(ct2_name)
        used.update({ct2_name, ct2_name + "_scale"})

    leftover = [n for n, t in model.variables.items() if n not in used and t.ndim > 0]
    if leftover:
        raise DQWhisperError(f"{bin_path} has variables this converter does not know: {leftover[:5]}")
    heads = {}
    for side in ("encoder", "decoder"):
        t = model.variables.get(f"{side}/num_heads")
        if t is None:
            raise DQWhisperError(f"{bin_path} has no variable {side}/num_heads")
        heads[side] = int(t)
    emb = sd["decoder.token_embedding.weight"]
    dims = ModelDimensions(
        n_mels=sd["encoder.conv1.weight"].shape[1],
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=sd["encoder.positional_embedding"].shape[1],
        n_audio_head=heads["encoder"],
        n_audio_layer=n_enc,
        n_vocab=emb.shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=emb.shape[1],
        n_text_head=heads["decoder"],
        n_text_layer=n_dec,
    )
    return dims, sd


def read_ct2_config(ct2_dir: str | Path) -> dict:
    path = Path(ct2_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DQWhisperError(f"{path} is not valid JSON: {e}") from e


def load_ct2_model(ct2_dir: str | Path) -> Whisper:
    """A CTranslate2 directory as an openai-whisper `Whisper` (float32, eval, alignment heads from config.json)."""
    dims, sd = ct2_to_openai(ct2_dir)
    model = Whisper(dims)
    model.load_state_dict(sd)
    heads = read_ct2_config(ct2_dir).get("alignment_heads") if Path(ct2_dir).is_dir() else None
    if heads:
        set_alignment_heads(model, heads)
    return model.eval()


def set_alignment_heads(model: Whisper, heads: list) -> None:
    mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[int(layer), int(head)] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
