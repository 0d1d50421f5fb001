"""Whisper models: the DQWhisper student (`student`), loading any kind (`load.load_model`), the model store
(`store`), CTranslate2 conversion (`ct2`)."""
