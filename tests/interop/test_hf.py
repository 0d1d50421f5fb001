"""Hugging Face import/export: name mapping round trip (no transformers needed), a local HF dir wherever a model
name goes, and (with the hf extra) transformers loading our export offline with the same logits and tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from dqwhisper.interop import hf, hf_export
from dqwhisper.models.load import load_whisper
from dqwhisper.models.student import from_whisper, save_checkpoint
from dqwhisper.quant import prepare
from dqwhisper.utils import DQWhisperError
from tests.conftest import random_tiny_whisper


def _write_hf_dir(model, path, tie=True):
    """An HF directory as save_pretrained writes it, made without transformers (config + safetensors)."""
    from safetensors.torch import save_file

    from dqwhisper.data.dataset import default_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    sd = {hf.openai_to_hf_name(k): v.contiguous() for k, v in model.state_dict().items()}
    if not tie:
        sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"].clone()
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf.hf_config(model.dims, default_tokenizer())))
    return path


def test_name_mapping_is_a_bijection(tiny_whisper):
    names = list(tiny_whisper.state_dict())
    hf_names = [hf.openai_to_hf_name(n) for n in names]
    assert len(set(hf_names)) == len(names)
    assert [hf.hf_to_openai_name(n) for n in hf_names] == names
    assert hf.hf_to_openai_name("proj_out.weight") is None
    with pytest.raises(DQWhisperError, match="no openai-whisper counterpart"):
        hf.hf_to_openai_name("model.encoder.adapter.weight")


def test_hf_dir_loads_with_identical_weights(tmp_path):
    pytest.importorskip("safetensors")
    model = random_tiny_whisper(seed=3, bias_std=0.02)
    d = _write_hf_dir(model, tmp_path / "hfdir", tie=False)
    back = load_whisper(d)  # the loader every entry point uses (teacher.name, transcribe, the trainer)
    assert back.dims == model.dims
    ref = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_hf_dir_errors(tmp_path):
    pytest.importorskip("safetensors")
    model = random_tiny_whisper(seed=3)
    d = _write_hf_dir(model, tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "encoder_ffn_dim": 100}))
    with pytest.raises(DQWhisperError, match="encoder_ffn_dim"):
        load_whisper(d)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(DQWhisperError, match="not whisper"):
        load_whisper(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DQWhisperError, match="model.safetensors: could not be read"):
        load_whisper(d)


def test_dequantized_float_model_expands_vocab_and_dequantizes():
    teacher = random_tiny_whisper(seed=4)
    keep = list(range(0, 300)) + list(range(50257, 51865))
    s = from_whisper(teacher, vocab_keep=keep, decoder_layers=[1, 2])
    prepare(s, {"enabled": True, "weight": {"bits": 4, "granularity": "per_channel"}})
    f, notes = hf.dequantized_float_model(s.eval())
    assert any("dequantized" in n for n in notes) and any("expanded" in n for n in notes)
    emb = f.decoder.token_embedding.weight
    assert emb.shape[0] == 51865 and not emb[300:50257].any()
    fq = s.decoder.blocks[0].mlp[0]
    assert torch.equal(f.decoder.blocks[0].mlp[0].weight, fq.weight_fake_quantizer(fq.weight))
    mel = torch.randn(1, 80, 200)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 10, 20]])
    with torch.no_grad():
        a, b = s(mel, tokens), f(mel, tokens)
    torch.testing.assert_close(a[..., keep], b[..., keep], atol=1e-5, rtol=1e-5)


@pytest.mark.hf
def test_transformers_loads_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    teacher = random_tiny_whisper(seed=5, bias_std=0.02)
    keep = list(range(0, 500)) + list(range(50257, 51865))
    s = from_whisper(teacher, vocab_keep=keep, decoder_layers=[0, 3], n_audio_ctx=50)
    save_checkpoint(s, tmp_path / "s.pt")
    out = tmp_path / "hf"
    hf_export.export_hf(tmp_path / "s.pt", out)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    proc = transformers.WhisperProcessor.from_pretrained(out)
    assert model.config.max_source_positions == 50 and proc.feature_extractor.nb_max_frames == 100
    assert proc.feature_extractor.n_samples == 16000
    gen = model.generation_config
    assert set(range(500, 50257)) <= set(gen.suppress_tokens) and 220 not in gen.suppress_tokens
    mel = torch.randn(2, 80, 100)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 10, 20]] * 2)
    with torch.no_grad():
        ours = s(mel, tokens)[..., keep]
        theirs = model(input_features=mel, decoder_input_ids=tokens).logits[..., keep]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    import whisper

    tok = whisper.tokenizer.get_tokenizer(True, num_languages=99)
    for text in [" hello world, it's 12:30!", "日本語のテキストです。", " Привет, мир", " ¿Qué tal?"]:
        assert proc.tokenizer.encode(text, add_special_tokens=False) == tok.encode(text)
    prefix = [tok.sot, tok.to_language_token("de"), tok.transcribe, tok.no_timestamps]
    ids = prefix + tok.encode(" Guten Tag") + [tok.eot]
    assert proc.tokenizer.decode(ids, skip_special_tokens=True) == " Guten Tag"
    # HF round trip: its directory back through our loader gives the exported weights
    back = load_whisper(out)
    f, _ = hf.dequantized_float_model(s)
    ref = f.state_dict()
    assert all(torch.equal(back.state_dict()[k], ref[k]) for k in ref)


@pytest.mark.hf
def test_inference_and_transcribe_take_an_hf_dir_and_a_ggml_file(tmp_path):
    """inference.py TARGET and transcribe --model accept an HF directory / a whisper.cpp file, with the same hypotheses
    as the checkpoint they came from."""
    pytest.importorskip("transformers")
    import numpy as np
    import soundfile as sf

    from dqwhisper import inference
    from dqwhisper.data.kaldi import Utterance, write_data_dir
    from dqwhisper.interop.ggml import write_ggml
    from dqwhisper.transcribe import main as transcribe_main

    teacher = random_tiny_whisper(
        seed=6,
        bias_std=0.02,
        n_audio_state=384,
        n_audio_head=6,
        n_text_state=384,
        n_text_head=6,
        n_audio_layer=1,
        n_text_layer=2,
    )  # tiny's widths (MODEL=tiny)
    s = from_whisper(teacher, decoder_layers=[0, 1])
    save_checkpoint(s, tmp_path / "s.pt")
    hf_export.export_hf(tmp_path / "s.pt", tmp_path / "hfdir")
    write_ggml(s, tmp_path / "s.bin", "f16")
    test = tmp_path / "data"
    test.mkdir()
    rng = np.random.default_rng(0)
    sf.write(test / "a.wav", (rng.standard_normal(12000) * 0.1).astype(np.float32), 16000)
    write_data_dir(test, [Utterance("a", "a.wav", "hello", "spk", "en")])
    hyps = {}
    for name, target in [("pt", tmp_path / "s.pt"), ("hf", tmp_path / "hfdir")]:
        [res] = inference.run(
            "tiny",
            target,
            [f"decode.test_sets=[{test}]", f"decode.out_dir={tmp_path / name}", "decode.max_new_tokens=8"],
            progress=False,
        )
        hyps[name] = (tmp_path / name / "hyp.txt").read_text()
    assert hyps["hf"] == hyps["pt"]
    assert (
        transcribe_main(
            ["--model", str(tmp_path / "hfdir"), "--language", "en", "-o", str(tmp_path), str(test / "a.wav")]
        )
        == 0
    )
    assert (
        transcribe_main(
            ["--model", str(tmp_path / "s.bin"), "--language", "en", "-o", str(tmp_path), str(test / "a.wav")]
        )
        == 0
    )
