"""Whisper models: loading (`load_model`), CTranslate2 conversion (`ct2`), the DQWhisper student (`student`)."""
from dqwhisper.models.load import load_model, load_whisper, model_store

__all__ = ["load_model", "load_whisper", "model_store"]
