"""Real Whisper base (the model store): HF round trip and whisper.cpp export, marked slow (and hf / ggml)."""

from __future__ import annotations

import pytest
import torch

from dqwhisper.models.load import load_model


@pytest.mark.slow
@pytest.mark.hf
def test_base_hf_round_trip_identical(base_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from dqwhisper.interop.hf_export import export_hf

    export_hf(base_checkpoint, tmp_path / "hf")
    ours = load_model(base_checkpoint)
    hfm = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hfm.save_pretrained(tmp_path / "resaved")  # a directory transformers itself wrote
    back = load_model(tmp_path / "resaved")
    ref, got = ours.state_dict(), back.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    torch.manual_seed(0)
    mel = torch.randn(1, 80, 3000) * 0.3
    tokens = torch.tensor([[50258, 50261, 50359, 50363, 2977, 2264]])
    with torch.no_grad():
        a = ours(mel, tokens)
        b = hfm(input_features=mel, decoder_input_ids=tokens).logits
    torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
@pytest.mark.ggml
def test_base_ggml_q8_0_loads_in_whisper_cpp(base_checkpoint, tmp_path):
    pytest.importorskip("_pywhispercpp")
    from dqwhisper.interop.ggml_export import export_ggml
    from dqwhisper.interop.whispercpp import WhisperCpp
    from dqwhisper.quant.ggml_format import quantize_blocks

    info = export_ggml(base_checkpoint, tmp_path / "base-q8_0.bin", "q8_0")
    # q8_0: 6 x 6 encoder linears + 6 x 10 decoder linears + the token embedding; f16: the two conv kernels;
    # f32: biases, norms, positional tables and the conv biases
    assert info["tensor_types"] == {"f32": 146, "f16": 2, "q8_0": 97}
    back = load_model(tmp_path / "base-q8_0.bin")
    w = load_model(base_checkpoint).decoder.blocks[2].attn.query.weight
    codes, _, scale = quantize_blocks(w, "q8_0")
    assert torch.equal(back.decoder.blocks[2].attn.query.weight, (codes * scale[:, None]).reshape(w.shape))
    runner = WhisperCpp(tmp_path / "base-q8_0.bin")
    assert runner.decode_mel(torch.zeros(80, 100).numpy(), "en", max_tokens=4) is not None
