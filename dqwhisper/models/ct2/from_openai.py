"""openai-whisper dims + state_dict -> CTranslate2 variables and a faster-whisper model directory.

Pruned vocabularies (DQWhisper `decoder.vocab_keep`): CT2 needs every token id, so the exporter expands the
embedding with zero rows for pruned ids and writes a projection bias of `PRUNED_LOGIT` at those ids (0 elsewhere),
so CT2 never emits them; the pruned ids are also added to config.json's `suppress_ids`. Such a model is one-way:
`ct2_to_openai` refuses a projection bias.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor
from whisper.model import ModelDimensions

from dqwhisper.models.ct2.binfile import FLOATS, PRUNED_LOGIT, CT2ModelFile, Int8Weight, write_model_bin
from dqwhisper.models.ct2.names import DECODER_FLAGS, fused, is_norm, layer_pairs, top_pairs
from dqwhisper.models.ct2.tokenizer import find_tokenizer_dir, vocabulary_lines, whisper_config
from dqwhisper.models.store import model_store
from dqwhisper.utils import DQWhisperError, atomic_write_bytes, get_logger

log = get_logger(__name__)
QUANTIZATIONS = (None, "float32", "float16", "int8", "int8_float32", "int8_float16")


def quantize_int8_rows(w: Tensor) -> Int8Weight:
    """Symmetric per-output-row int8 as ctranslate2's converter does it: scale = 127 / max|row|, q = rint(w * scale)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    amax = w2.abs().amax(dim=1)
    amax = torch.where(amax == 0, torch.full_like(amax, 127.0), amax)
    amax = amax.clamp(min=127.0 / torch.finfo(torch.float32).max)
    scale = 127.0 / amax
    q = torch.round(w2 * scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(w.shape)
    return Int8Weight(q, scale)


def _cast(t: Tensor, float_dtype: torch.dtype | None) -> Tensor:
    t = t.detach().cpu()
    if float_dtype is not None and t.dtype in FLOATS:
        return t.to(float_dtype)
    return t


def openai_to_ct2_variables(
    dims: ModelDimensions,
    state_dict: Mapping[str, Tensor],
    *,
    quantization: str | None = None,
    int8_weights: Mapping[str, Int8Weight | tuple[Tensor, Tensor]] | None = None,
    vocab_keep: list[int] | None = None,
) -> CT2ModelFile:
    """openai-whisper dims + state_dict -> CT2 variables.

    quantization: None keeps every float tensor's dtype; "float32"/"float16" cast floats; "int8" quantizes every
    linear, conv and embedding weight per row (others keep their dtype); "int8_float32"/"int8_float16" also cast
    the remaining floats. int8_weights: openai weight names (e.g. "decoder.blocks.0.mlp.0.weight") -> already
    quantized Int8Weight or (q, scale) with w ~= q / scale; they are written as given, whatever `quantization` says.
    The q|k|v (and cross k|v) of a layer must then be given all together (they are one fused CT2 matrix).
    vocab_keep: the kept token ids when the embedding rows are a pruned subset (see the module docstring).
    """
    if quantization not in QUANTIZATIONS:
        raise DQWhisperError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")
    float_dtype = {
        "float32": torch.float32,
        "int8_float32": torch.float32,
        "float16": torch.float16,
        "int8_float16": torch.float16,
    }.get(quantization)
    quantize_all = quantization is not None and quantization.startswith("int8")
    given = {k: v if isinstance(v, Int8Weight) else Int8Weight(*v) for k, v in (int8_weights or {}).items()}
    for k, v in given.items():
        if v.q.dtype != torch.int8 or v.scale.ndim != 1 or v.scale.shape[0] != v.q.shape[0]:
            raise DQWhisperError(
                f"int8 weight {k}: expected an int8 tensor and one float scale per row, got "
                f"{v.q.dtype} {tuple(v.q.shape)} and scale {tuple(v.scale.shape)}"
            )
    unknown = sorted(set(given) - set(state_dict))
    if unknown:
        raise DQWhisperError(f"int8 weights given for names the model does not have: {unknown[:5]}")
    used: set[str] = set()

    def need(name: str) -> Tensor:
        if name not in state_dict:
            raise DQWhisperError(f"the model has no {name}: not an openai-whisper layout")
        used.add(name)
        return state_dict[name]

    variables: dict[str, Tensor] = {}

    def put_weight(ct2_name: str, oa_names: list[str], zero_bias_part: int | None = None) -> None:
        """Write CT2 `<ct2_name>` from the openai weights stacked by rows (quantizing where asked)."""
        if any(n in given for n in oa_names):
            missing = [n for n in oa_names if n not in given]
            if missing:
                raise DQWhisperError(f"int8 weights for {ct2_name} need all of {oa_names}; missing {missing}")
            parts = [given[n] for n in oa_names]
            for n in oa_names:
                used.add(n)
            variables[ct2_name] = torch.cat([p.q for p in parts]).contiguous()
            variables[ct2_name + "_scale"] = torch.cat([p.scale.float() for p in parts]).contiguous()
            return
        w = torch.cat([need(n) for n in oa_names]) if len(oa_names) > 1 else need(oa_names[0])
        if quantize_all:
            qw = quantize_int8_rows(w)
            variables[ct2_name], variables[ct2_name + "_scale"] = qw.q, qw.scale
        else:
            variables[ct2_name] = _cast(w, float_dtype).contiguous()

    def put_bias(ct2_name: str, oa_names: list[str], n_rows: list[int]) -> None:
        chunks = []
        for name, rows in zip(oa_names, n_rows):
            if name.endswith(".key.bias"):
                ref = state_dict[oa_names[-1]]
                chunks.append(torch.zeros(rows, dtype=ref.dtype))
            else:
                chunks.append(need(name))
        variables[ct2_name] = _cast(torch.cat(chunks), float_dtype).contiguous()

    def put_norm(ct2_prefix: str, oa_prefix: str) -> None:
        variables[ct2_prefix + "/gamma"] = _cast(need(oa_prefix + ".weight"), float_dtype)
        variables[ct2_prefix + "/beta"] = _cast(need(oa_prefix + ".bias"), float_dtype)

    def put_linear(ct2_prefix: str, oa_prefix: str) -> None:
        put_weight(ct2_prefix + "/weight", [oa_prefix + ".weight"])
        variables[ct2_prefix + "/bias"] = _cast(need(oa_prefix + ".bias"), float_dtype)

    for ct2_prefix, oa_prefix in top_pairs():
        (put_norm if is_norm(ct2_prefix) else put_linear)(ct2_prefix, oa_prefix)
    for side, n in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n):
            for ct2_prefix, oa_prefix in layer_pairs(side, i):
                (put_norm if is_norm(ct2_prefix) else put_linear)(ct2_prefix, oa_prefix)
            for ct2_prefix, parts in fused(side, i):
                put_weight(ct2_prefix + "/weight", [p + ".weight" for p in parts])
                rows = [
                    state_dict[p + ".weight"].shape[0]
                    if p + ".weight" in state_dict
                    else given[p + ".weight"].q.shape[0]
                    for p in parts
                ]
                put_bias(ct2_prefix + "/bias", [p + ".bias" for p in parts], rows)
    variables["encoder/position_encodings/encodings"] = _cast(need("encoder.positional_embedding"), float_dtype)
    variables["decoder/position_encodings/encodings"] = _cast(need("decoder.positional_embedding"), float_dtype)

    emb_name = "decoder.token_embedding.weight"
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    if vocab_keep is None:
        put_weight("decoder/embeddings/weight", [emb_name])
    else:
        keep = torch.as_tensor(vocab_keep, dtype=torch.long)
        ref = given[emb_name].q if emb_name in given else need(emb_name)
        if ref.shape[0] != len(keep):
            raise DQWhisperError(f"the embedding has {ref.shape[0]} rows but vocab_keep lists {len(keep)} ids")
        used.add(emb_name)
        if emb_name in given:
            sub = given[emb_name]
            q = torch.zeros(dims.n_vocab, sub.q.shape[1], dtype=torch.int8)
            scale = torch.ones(dims.n_vocab, dtype=torch.float32)
            q[keep], scale[keep] = sub.q, sub.scale.float()
            variables["decoder/embeddings/weight"], variables["decoder/embeddings/weight_scale"] = q, scale
        else:
            full = torch.zeros(dims.n_vocab, ref.shape[1], dtype=ref.dtype)
            full[keep] = ref.detach().cpu()
            if quantize_all:
                qw = quantize_int8_rows(full)
                variables["decoder/embeddings/weight"], variables["decoder/embeddings/weight_scale"] = qw.q, qw.scale
            else:
                variables["decoder/embeddings/weight"] = _cast(full, float_dtype)
        float_ref = variables["decoder/position_encodings/encodings"]
        bias = torch.full((dims.n_vocab,), PRUNED_LOGIT, dtype=float_ref.dtype)
        bias[keep] = 0
        variables["decoder/projection/bias"] = bias

    variables["encoder/num_heads"] = torch.tensor(dims.n_audio_head, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(dims.n_text_head, dtype=torch.int16)
    for name, (dtype, value) in DECODER_FLAGS.items():
        variables[f"decoder/{name}"] = torch.tensor(value, dtype=dtype)

    ignored = [
        k
        for k in state_dict
        if k not in used and not k.startswith(("ctc_head.", "decoder.vocab_keep", "decoder.full_to_sub"))
    ]
    if ignored:
        log.warning("export ignores %d tensors that CTranslate2 has no place for: %s", len(ignored), ignored[:5])
    if any(k.startswith("ctc_head.") for k in state_dict):
        log.info("the CTC head is not exported (CTranslate2's Whisper has no CTC head)")
    return CT2ModelFile(variables, aliases)


def openai_to_ct2(
    dims: ModelDimensions,
    state_dict: Mapping[str, Tensor],
    out_dir: str | Path,
    quantization: str | None = None,
    *,
    vocab_keep: list[int] | None = None,
    alignment_heads: list | None = None,
    int8_weights: Mapping[str, Int8Weight | tuple[Tensor, Tensor]] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write a faster-whisper model directory: model.bin, config.json, vocabulary.txt, tokenizer.json.

    dims, state_dict (openai layout), vocab_keep, alignment_heads: as `dqwhisper.models.student.export_state` gives
    them for a model or a checkpoint. tokenizer.json + vocabulary.txt (faster-whisper reads tokenizer.json; without
    it, it downloads one) are copied from `tokenizer_dir`, else from a CT2 dir in the model store whose vocabulary
    matches (base-ct2, tiny.en-ct2); else vocabulary.txt is generated from openai-whisper's tokenizer and
    tokenizer.json is left out, with a warning.
    """
    ct2 = openai_to_ct2_variables(
        dims, state_dict, quantization=quantization, int8_weights=int8_weights, vocab_keep=vocab_keep
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_model_bin(out / "model.bin", ct2)
    pruned = sorted(set(range(dims.n_vocab)) - set(vocab_keep)) if vocab_keep is not None else None
    config = whisper_config(dims, alignment_heads, pruned)
    atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    if tokenizer_dir is None:
        store = model_store()
        tokenizer_dir = find_tokenizer_dir(dims, [store / "base-ct2", store / "tiny.en-ct2"])
    if tokenizer_dir is None:
        log.warning(
            "no tokenizer.json for n_vocab=%d found (looked in the model store); faster-whisper will try "
            "to download one",
            dims.n_vocab,
        )
        atomic_write_bytes(out / "vocabulary.txt", ("\n".join(vocabulary_lines(dims)) + "\n").encode("utf-8"))
    else:
        for name in ("tokenizer.json", "vocabulary.txt"):
            src = Path(tokenizer_dir) / name
            if not src.is_file():
                raise DQWhisperError(f"tokenizer file {src} does not exist")
            if src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    log.info(
        "wrote CTranslate2 model %s (%.1f MB, quantization %s)",
        out,
        (out / "model.bin").stat().st_size / 1e6,
        quantization or "none",
    )
    return out
