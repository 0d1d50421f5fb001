"""bench/ggml_q4_parts.py split: one half's tensors from the ggml file (as ggml dequantizes them), the rest float."""

from dataclasses import asdict

import pytest
import torch

from bench.ggml_q4_parts import cmd_split
from dqwhisper.interop.ggml import load_ggml, write_ggml
from dqwhisper.utils import DQWhisperError
from tests.conftest import random_tiny_whisper


def test_split_takes_one_half_from_the_file(tmp_path):
    model = random_tiny_whisper(seed=3)
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, tmp_path / "f.pt")
    write_ggml(model, tmp_path / "q.bin", "q4_0")
    q = load_ggml(tmp_path / "q.bin").state_dict()
    f = model.state_dict()
    cmd_split(str(tmp_path / "q.bin"), str(tmp_path / "f.pt"), tmp_path / "out")
    enc = torch.load(tmp_path / "out" / "q4_0_encoder_only.pt")["model_state_dict"]
    dec = torch.load(tmp_path / "out" / "q4_0_decoder_only.pt")["model_state_dict"]
    we, wd = "encoder.blocks.0.mlp.0.weight", "decoder.blocks.0.mlp.0.weight"
    assert not torch.equal(q[we], f[we]) and not torch.equal(q[wd], f[wd])  # q4_0 moved them
    assert torch.equal(enc[we], q[we]) and torch.equal(enc[wd], f[wd])
    assert torch.equal(dec[wd], q[wd]) and torch.equal(dec[we], f[we])


def test_split_refuses_other_tensors(tmp_path):
    model = random_tiny_whisper(seed=3)
    write_ggml(model, tmp_path / "q.bin", "q4_0")
    other = random_tiny_whisper(seed=3, n_text_layer=1)  # a decoder layer fewer than the file's
    torch.save({"dims": asdict(other.dims), "model_state_dict": other.state_dict()}, tmp_path / "f.pt")
    with pytest.raises(DQWhisperError, match="same tensors"):
        cmd_split(str(tmp_path / "q.bin"), str(tmp_path / "f.pt"), tmp_path / "out")
