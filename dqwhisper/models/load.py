"""`load_model`: one entry for every way a Whisper model reaches this toolkit.

- a size name ("base", "tiny.en", ...): the local model store `exp/models/<name>.pt` (checksum verified; env
  DQWHISPER_MODEL_STORE moves the folder), then openai-whisper's own `whisper.load_model(name)` (downloads);
- a `.pt` path: an openai-whisper checkpoint or one of ours (training checkpoints best/last/avg/step_N.pt, PTQ);
- a `.dqw` export (`dqwhisper.quant.dqw`): `export_mode` "int8" (int8 kernels) or "dequant" (float reference);
- a CTranslate2 / faster-whisper directory (converted in memory);
- a Hugging Face `transformers` Whisper directory as `save_pretrained` writes it (`dqwhisper.interop.hf`);
- a whisper.cpp model file (`ggml-*.bin`, its weights dequantized as ggml does; `dqwhisper.interop.ggml`);
- an experiment directory (its config.yaml): its export/model.dqw, else best.pt, avg.pt, last.pt.
`load_whisper` is the older name of the same function.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import whisper
from whisper.model import Whisper

from dqwhisper.interop import ggml, hf
from dqwhisper.models import ct2
from dqwhisper.models.student import DQWhisper, model_from_checkpoint, read_checkpoint
from dqwhisper.models.store import model_store, verify_checksum
from dqwhisper.quant.dqw import load_exported
from dqwhisper.utils import DQWhisperError, get_logger, resolve_device

log = get_logger(__name__)


def _from_checkpoint(path: Path) -> DQWhisper:
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, str(path))
    heads = ckpt.get("alignment_heads")
    if heads:
        ct2.set_alignment_heads(model, heads)
    return model


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.endswith((".pt", ".pth", ".bin", ".dqw")) or name.startswith(".")


EXPERIMENT_CHECKPOINTS = ("export/model.dqw", "best.pt", "avg.pt", "last.pt")


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = "cpu",
    export_mode: str = "int8",
    kernel: str = "auto",
    select: bool = True,
) -> Whisper:
    """A Whisper model in eval mode on `device` (module docstring lists what `name_or_path` may be). An export runs
    `kernel` (dqwhisper/quant/kernels.py) in export mode int8; select=False leaves its kernels to a later
    quantized.select_kernels (after an audio window change)."""
    dev = resolve_device(None if device is None else str(device))
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "model.bin").exists() and (path / "config.yaml").is_file():
        found = [path / c for c in EXPERIMENT_CHECKPOINTS if (path / c).is_file()]
        if not found:
            raise DQWhisperError(f"experiment dir {path} has no checkpoint ({', '.join(EXPERIMENT_CHECKPOINTS)})")
        log.info("experiment dir %s: loading %s", path, found[0])
        path = found[0]
    if path.is_dir():
        if hf.is_hf_dir(path):
            model = hf.load_hf_dir(path)
        elif (path / "model.bin").exists():
            model = ct2.load_ct2_model(path)
        else:
            raise DQWhisperError(
                f"{path} is a directory without model.bin (not a CTranslate2 model directory), "
                "without config.json + model.safetensors / pytorch_model.bin (not a Hugging Face "
                "model directory) and without config.yaml (not an experiment dir)"
            )
    elif path.is_file() and path.suffix == ".dqw":
        if export_mode not in ("int8", "dequant"):
            raise DQWhisperError(f"export mode '{export_mode}': one of int8, dequant")
        mode = "dequant" if export_mode == "dequant" else kernel
        return load_exported(path, mode=mode, device=dev, select=select).eval()
    elif path.is_file():
        model = ggml.load_ggml(path) if ggml.is_ggml_file(path) else _from_checkpoint(path)
    elif _looks_like_path(name) or isinstance(name_or_path, Path):
        raise DQWhisperError(f"model {path} does not exist")
    else:
        stored = model_store() / f"{name}.pt"
        if stored.is_file():
            verify_checksum(stored)
            model = _from_checkpoint(stored)
        else:
            model = _load_online(name, stored)
    return model.to(dev).eval()


def _load_online(name: str, stored: Path) -> Whisper:
    if name not in whisper.available_models():
        raise DQWhisperError(
            f"'{name}' is neither an existing path, nor in the model store ({stored}), nor one of "
            f"openai-whisper's model names {whisper.available_models()}"
        )
    log.info("%s not in the model store; asking openai-whisper to load '%s' (downloads when online)", stored, name)
    try:
        return whisper.load_model(name, device="cpu")
    except Exception as e:  # urllib / socket / checksum errors when offline
        raise DQWhisperError(
            f"could not get Whisper '{name}': not in the model store ({stored}) and openai-whisper's "
            f"download failed ({type(e).__name__}: {e}). Offline, run scripts/prepare_models.sh "
            f"(it builds base and tiny.en)"
        ) from e


load_whisper = load_model

__all__ = ["load_model", "load_whisper", "model_store", "verify_checksum"]
