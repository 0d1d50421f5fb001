"""Slow: the real Whisper base through PTQ -> model.dqw -> CT2 -> faster-whisper."""

from __future__ import annotations

import pytest
import torch
import whisper

from dqwhisper.models.student import load_checkpoint
from dqwhisper.quant import prepare
from dqwhisper.quant.ct2_export import ct2_greedy, export_ct2
from dqwhisper.quant.export import export_model, load_exported


@pytest.mark.slow
def test_base_w8_export_matches_and_loads_in_faster_whisper(base_checkpoint, tmp_path):
    faster_whisper = pytest.importorskip("faster_whisper")
    model = prepare(load_checkpoint(base_checkpoint), {"enabled": True, "scope": "all"})
    t = torch.linspace(0, 30, 480000)
    audio = (0.1 * torch.sin(2 * torch.pi * 440 * t) * (t < 3)).float()
    mel = whisper.log_mel_spectrogram(audio, 80)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440, 1002]])
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel[None]))
    export_model(model, tmp_path / "b.dqw")
    loaded = load_exported(tmp_path / "b.dqw")
    with torch.no_grad():
        out = loaded.decoder(tokens, loaded.encoder(mel[None]))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # base's floats are fp16 already: exact
    assert (tmp_path / "b.dqw").stat().st_size < 0.55 * 145_187_840
    out_dir, n = export_ct2(model, tmp_path / "ct2", "float32")
    assert n > 90
    faster_whisper.WhisperModel(str(out_dir), device="cpu", compute_type="int8")
    opts = whisper.DecodingOptions(
        language="en", without_timestamps=True, fp16=False, sample_len=20, suppress_tokens="", suppress_blank=False
    )
    ours = whisper.decode(loaded, mel, opts).tokens
    theirs = ct2_greedy(
        out_dir, mel[None].numpy(), [[50258, 50259, 50359, 50363]], max_length=24, compute_type="float32"
    )[0]
    assert [t for t in theirs if t != 50257][: len(ours)] == ours
