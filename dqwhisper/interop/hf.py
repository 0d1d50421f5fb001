"""Hugging Face `transformers` Whisper in and out.

Import: a local directory as `save_pretrained` writes it (config.json + model.safetensors or pytorch_model.bin,
possibly sharded with an index) becomes an openai-whisper `Whisper` (any size; the names mapped by `HF_TO_OPENAI`).
Reading needs `safetensors` for .safetensors files; `transformers` itself is not needed to import.

Export: `export_hf(CKPT, OUT_DIR)` writes a directory that `WhisperForConditionalGeneration.from_pretrained` and
`WhisperProcessor.from_pretrained` load offline: config (the student's audio window as `max_source_positions`),
model.safetensors, generation_config.json (language/task token ids; suppressed as our decoder does: openai-whisper's
non-speech set, every special and timestamp token, the ids a pruned vocabulary dropped), the feature extractor
(chunk length = the audio window) and tokenizer files built from openai-whisper's bundled tiktoken ranks. A pruned
vocabulary is expanded back to the full id space (zero rows, suppressed in generation); a quantized student is
written with its dequantized weights (HF has no format for our codes) and the export says so. Needs the `hf` extra
(transformers, safetensors).
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import torch
import whisper.tokenizer as wt
from torch import Tensor
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import LANGUAGES

from dqwhisper.models import ct2
from dqwhisper.utils import DQWhisperError, get_logger

log = get_logger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FRAMES_PER_SECOND = 50

# (HF name pattern, openai name pattern); {i} is a layer index
_LAYER = [
    ("self_attn.q_proj", "attn.query"),
    ("self_attn.k_proj", "attn.key"),
    ("self_attn.v_proj", "attn.value"),
    ("self_attn.out_proj", "attn.out"),
    ("self_attn_layer_norm", "attn_ln"),
    ("encoder_attn.q_proj", "cross_attn.query"),
    ("encoder_attn.k_proj", "cross_attn.key"),
    ("encoder_attn.v_proj", "cross_attn.value"),
    ("encoder_attn.out_proj", "cross_attn.out"),
    ("encoder_attn_layer_norm", "cross_attn_ln"),
    ("fc1", "mlp.0"),
    ("fc2", "mlp.2"),
    ("final_layer_norm", "mlp_ln"),
]
_TOP = [
    ("model.encoder.conv1", "encoder.conv1"),
    ("model.encoder.conv2", "encoder.conv2"),
    ("model.encoder.embed_positions.weight", "encoder.positional_embedding"),
    ("model.encoder.layer_norm", "encoder.ln_post"),
    ("model.decoder.embed_tokens.weight", "decoder.token_embedding.weight"),
    ("model.decoder.embed_positions.weight", "decoder.positional_embedding"),
    ("model.decoder.layer_norm", "decoder.ln"),
]


def hf_to_openai_name(name: str) -> str | None:
    """An HF Whisper parameter name -> openai-whisper's; None for names openai has no place for (proj_out: tied)."""
    if name == "proj_out.weight":
        return None
    return _rename(name, _HF_SIDE)


def openai_to_hf_name(name: str) -> str:
    return _rename(name, _OPENAI_SIDE)


# (label, layer-name pattern, layer-name format, index into the (HF, openai) pairs, the other side's label)
_HF_SIDE = (
    "HF Whisper",
    r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)",
    "{}.blocks.{}.{}.{}",
    0,
    "openai-whisper",
)
_OPENAI_SIDE = (
    "openai-whisper",
    r"(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)",
    "model.{}.layers.{}.{}.{}",
    1,
    "HF",
)


def _rename(name: str, side: tuple) -> str:
    """A parameter name of one side -> the other's, through the _LAYER / _TOP tables."""
    label, pattern, layer_fmt, src, other = side
    m = re.fullmatch(pattern, name)
    if m:
        where, i, part, kind = m.groups()
        for pair in _LAYER:
            if part == pair[src]:
                return layer_fmt.format(where, i, pair[1 - src], kind)
        raise DQWhisperError(f"{label} weight {name}: unknown layer part '{part}'")
    for pair in _TOP:
        if name == pair[src] or name.startswith(pair[src] + "."):
            return pair[1 - src] + name[len(pair[src]) :]
    raise DQWhisperError(f"{label} weight {name}: no {other} counterpart")


def dims_from_hf_config(cfg: dict, source: str = "config.json") -> ModelDimensions:
    if cfg.get("model_type") not in (None, "whisper"):
        raise DQWhisperError(f"{source}: model_type '{cfg.get('model_type')}' is not whisper")
    try:
        d = int(cfg["d_model"])
        for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
            if int(cfg.get(key, 4 * d)) != 4 * d:
                raise DQWhisperError(
                    f"{source}: {key} = {cfg[key]} but openai-whisper's blocks need 4 * d_model = {4 * d}"
                )
        return ModelDimensions(
            n_mels=int(cfg["num_mel_bins"]),
            n_audio_ctx=int(cfg["max_source_positions"]),
            n_audio_state=d,
            n_audio_head=int(cfg["encoder_attention_heads"]),
            n_audio_layer=int(cfg["encoder_layers"]),
            n_vocab=int(cfg["vocab_size"]),
            n_text_ctx=int(cfg["max_target_positions"]),
            n_text_state=d,
            n_text_head=int(cfg["decoder_attention_heads"]),
            n_text_layer=int(cfg["decoder_layers"]),
        )
    except KeyError as e:
        raise DQWhisperError(f"{source}: missing key {e} of a Whisper config") from e


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def _read_weights(path: Path) -> dict[str, Tensor]:
    files: list[Path]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise DQWhisperError(f"{path / index}: not a weight index ({e})") from e
            files = [path / f for f in sorted(set(weight_map.values()))]
            break
    else:
        files = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()][:1]
    sd: dict[str, Tensor] = {}
    for f in files:
        if not f.is_file():
            raise DQWhisperError(f"{f}: weight file named by the index does not exist")
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd.update(load_file(str(f)))
            else:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except ImportError as e:
            raise DQWhisperError(f"{f}: reading safetensors needs the 'hf' extra (pip install -e .[hf])") from e
        except Exception as e:  # safetensors / torch raise several types for damaged files
            raise DQWhisperError(f"{f}: could not be read ({type(e).__name__}: {e})") from e
    return sd


def load_hf_dir(path: str | Path) -> Whisper:
    """A local HF Whisper directory -> openai-whisper `Whisper` (float32, CPU, eval)."""
    path = Path(path)
    if not is_hf_dir(path):
        raise DQWhisperError(
            f"{path}: not a Hugging Face Whisper directory (config.json + {' or '.join(WEIGHT_FILES)})"
        )
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise DQWhisperError(f"{path / 'config.json'}: not JSON ({e})") from e
    dims = dims_from_hf_config(cfg, str(path / "config.json"))
    hf = _read_weights(path)
    hf = {k[len("model.") :] if k.startswith("model.model.") else k: v for k, v in hf.items()}
    if not any(k.startswith("model.") for k in hf):  # a bare WhisperModel checkpoint ("encoder.", "decoder.")
        hf = {("model." + k if k.startswith(("encoder.", "decoder.")) else k): v for k, v in hf.items()}
    sd = {}
    for name, value in hf.items():
        new = hf_to_openai_name(name)
        if new is not None:
            sd[new] = value.float()
    model = Whisper(dims)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DQWhisperError(
            f"{path}: HF weights do not fill openai-whisper {dims}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    if "proj_out.weight" in hf and not torch.equal(hf["proj_out.weight"].float(), model.decoder.token_embedding.weight):
        raise DQWhisperError(
            f"{path}: proj_out.weight differs from the token embedding (untied output projection "
            "has no place in openai-whisper)"
        )
    heads = cfg.get("alignment_heads") or _generation_alignment_heads(path)
    if heads:
        ct2.set_alignment_heads(model, heads)
    log.info("loaded HF Whisper %s: %s", path, dims)
    return model.eval()


def _generation_alignment_heads(path: Path) -> list | None:
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            return json.loads(gen.read_text()).get("alignment_heads")
        except json.JSONDecodeError:
            return None
    return None


# ------------------------------------------------------------------------------------------------------- export
def dequantized_float_model(model: Whisper) -> tuple[Whisper, list[str]]:
    """A plain float openai-whisper copy of any model of ours: fake-quantized weights replaced by their dequantized
    values, a pruned vocabulary expanded to the full ids (zero rows). Returns (model, notes on what changed)."""
    notes: list[str] = []
    sd: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    quantized = {name for name, m in modules.items() if hasattr(m, "weight_fake_quantizer")}
    packed = {name for name, m in modules.items() if hasattr(m, "qtensor") or hasattr(m, "qweight")}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            mod, _, leaf = key.rpartition(".")
            if mod in quantized:
                if leaf == "weight":
                    sd[key] = modules[mod].weight_fake_quantizer(modules[mod].weight).float().clone()
                elif leaf == "bias":
                    sd[key] = value.float().clone()
                continue  # scales / zero points
            if mod in packed:
                continue
            if key.startswith(("ctc_head.", "decoder.vocab_keep", "decoder.full_to_sub")):
                continue
            sd[key] = value.float().clone()
        for name in packed:
            m = modules[name]
            qt = m.quantized_tensor() if hasattr(m, "quantized_tensor") else None
            if qt is None:
                raise DQWhisperError(f"{name}: a packed quantized module without quantized_tensor()")
            sd[name + ".weight"] = qt.dequantize().float()
            if getattr(m, "bias", None) is not None:
                sd[name + ".bias"] = m.bias.float().clone()
    if quantized or packed:
        notes.append(
            f"{len(quantized | packed)} quantized weights written dequantized (float), "
            f"quant config {getattr(model, 'quant_config', None)}"
        )
    keep = getattr(model.decoder, "vocab_keep", None)
    dims = model.dims
    if keep is not None:
        emb = sd["decoder.token_embedding.weight"]
        full = emb.new_zeros(dims.n_vocab, emb.shape[1])
        full[keep] = emb
        sd["decoder.token_embedding.weight"] = full
        notes.append(f"pruned vocabulary ({len(keep)} of {dims.n_vocab} ids) expanded to the full ids with zero rows")
    if getattr(model, "ctc_head", None) is not None:
        notes.append("CTC head left out (no place in a Whisper model)")
    out = Whisper(dims)
    out.load_state_dict(sd)
    return out.eval(), notes


def pruned_ids(model: Whisper) -> list[int]:
    keep = getattr(model.decoder, "vocab_keep", None)
    if keep is None:
        return []
    mask = torch.ones(model.dims.n_vocab, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten().tolist()


def hf_config(dims: ModelDimensions, tok) -> dict:
    if dims.n_audio_state != dims.n_text_state:
        raise DQWhisperError(
            f"HF Whisper needs one width for encoder and decoder, this model has "
            f"{dims.n_audio_state} / {dims.n_text_state}"
        )
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": dims.n_vocab,
        "num_mel_bins": dims.n_mels,
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": tok.eot,
        "bos_token_id": tok.eot,
        "eos_token_id": tok.eot,
        "decoder_start_token_id": tok.sot,
        "begin_suppress_tokens": [tok.encode(" ")[0], tok.eot],
        "use_cache": True,
        "torch_dtype": "float32",
    }


def openai_suppress_tokens(tok) -> list[int]:
    """openai-whisper's default suppression ("-1"): non-speech symbols and the task/prefix tokens."""
    ids = set(tok.non_speech_tokens)
    ids.update([tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm])
    if tok.no_speech is not None:
        ids.add(tok.no_speech)
    return sorted(ids)


def generation_config(dims: ModelDimensions, tok, suppress_extra: list[int], alignment_heads: list | None) -> dict:
    langs = list(LANGUAGES)[: tok.num_languages] if dims.n_vocab >= 51865 else []
    return {
        "decoder_start_token_id": tok.sot,
        "eos_token_id": tok.eot,
        "pad_token_id": tok.eot,
        "bos_token_id": tok.eot,
        "max_length": dims.n_text_ctx,
        "begin_suppress_tokens": [tok.encode(" ")[0], tok.eot],
        # as our decoder (no-timestamp mode): openai's default set and every token after end-of-text
        "suppress_tokens": sorted(
            set(openai_suppress_tokens(tok)) | set(range(tok.eot + 1, dims.n_vocab)) | set(suppress_extra)
        ),
        "no_timestamps_token_id": tok.no_timestamps,
        "prev_sot_token_id": tok.sot_prev,
        "is_multilingual": dims.n_vocab >= 51865,
        "lang_to_id": {f"<|{c}|>": tok.encoding._special_tokens[f"<|{c}|>"] for c in langs},
        "task_to_id": {"transcribe": tok.transcribe, "translate": tok.translate} if langs else {},
        "alignment_heads": alignment_heads or [],
        "return_timestamps": False,
    }


def _tiktoken_ranks(multilingual: bool) -> dict[bytes, int]:
    name = "multilingual" if multilingual else "gpt2"
    path = os.path.join(os.path.dirname(wt.__file__), "assets", f"{name}.tiktoken")
    with open(path) as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
