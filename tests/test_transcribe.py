"""python -m dqwhisper.transcribe on a tiny random model: runs end to end, errors name the file."""
from __future__ import annotations

import numpy as np
import soundfile
import torch

from dqwhisper.transcribe import main


def test_transcribe_cli(tiny_whisper, tmp_path, capsys):
    pt = tmp_path / "tiny.pt"
    torch.save({"dims": tiny_whisper.dims.__dict__, "model_state_dict": tiny_whisper.state_dict()}, pt)
    wav = tmp_path / "tone.wav"
    t = np.arange(16000) / 16000
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    assert main(["--model", str(pt), "--language", "ja", str(wav)]) == 0
    path, lang, _ = capsys.readouterr().out.rstrip("\n").split("\t")
    assert (path, lang) == (str(wav), "ja")
    assert main(["--model", str(pt), str(wav)]) == 0  # language detected
    assert capsys.readouterr().out.split("\t")[1] in __import__("whisper").tokenizer.LANGUAGES
    assert main(["--model", str(pt), str(tmp_path / "missing.wav")]) == 1
    assert f"audio file {tmp_path / 'missing.wav'} does not exist" in capsys.readouterr().err
