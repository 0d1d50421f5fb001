"""CTranslate2 model.bin reader/writer and the openai <-> CT2 converter on tiny random models (no download)."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from dqwhisper.models import ct2
from dqwhisper.models.student import export_state
from dqwhisper.models.student import from_whisper
from dqwhisper.utils import DQWhisperError


@pytest.fixture(autouse=True)
def empty_model_store(tmp_path, monkeypatch):
    """Hermetic: the exporter must not pick up tokenizer files from a real store."""
    monkeypatch.setenv("DQWHISPER_MODEL_STORE", str(tmp_path / "empty-store"))


def _export(model, tmp_path, **kw):
    return ct2.openai_to_ct2(**export_state(model), out_dir=tmp_path / "ct2", tokenizer_dir=None, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bit_exact(tiny_whisper, tmp_path, dtype):
    model = tiny_whisper.to(dtype)
    want = model.state_dict()
    out = _export(model, tmp_path)
    dims, got = ct2.ct2_to_openai(out)
    assert dims == model.dims
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], tensor), name
    # the tied projection is an alias, not a copy
    raw = ct2.read_model_bin(out / "model.bin")
    assert raw.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert "decoder/projection/weight" not in raw.variables
    # reading and writing again reproduces the file byte for byte
    assert ct2.model_bin_bytes(raw) == (out / "model.bin").read_bytes()


def test_export_writes_faster_whisper_files(tiny_whisper, tmp_path):
    out = _export(tiny_whisper, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert len(config["lang_ids"]) == 99 and config["lang_ids"][0] == 50259
    assert config["suppress_ids_begin"] == [220, 50257]
    assert [2, 0] in config["alignment_heads"] and [0, 0] not in config["alignment_heads"]
    vocab = (out / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    assert len(vocab) == 51865 + 1 and vocab[-1] == ""
    assert vocab[50257] == "<|endoftext|>" and vocab[50364] == "<|0.00|>" and vocab[51864] == "<|30.00|>"
    assert vocab[220] == "Ġ"  # byte-level BPE spelling of a space


def test_given_int8_weights_are_written_as_is(tiny_whisper, tmp_path):
    sd = tiny_whisper.state_dict()
    given = {}
    for part in ("query", "key", "value"):
        name = f"decoder.blocks.1.attn.{part}.weight"
        given[name] = ct2.quantize_int8_rows(sd[name])
    given["encoder.blocks.0.mlp.0.weight"] = ct2.Int8Weight.from_step(
        torch.randint(-127, 128, (256, 64), dtype=torch.int8), torch.full((256,), 0.01)
    )
    out = _export(tiny_whisper, tmp_path, int8_weights=given)
    raw = ct2.read_model_bin(out / "model.bin")
    fused = raw.variables["decoder/layer_1/self_attention/linear_0/weight"]
    assert fused.dtype == torch.int8
    qkv = [given[f"decoder.blocks.1.attn.{p}.weight"].q for p in ("query", "key", "value")]
    assert torch.equal(fused, torch.cat(qkv))
    assert torch.equal(raw.variables["encoder/layer_0/ffn/linear_0/weight"], given["encoder.blocks.0.mlp.0.weight"].q)
    assert torch.allclose(raw.variables["encoder/layer_0/ffn/linear_0/weight_scale"], torch.full((256,), 100.0))
    # untouched weights stay float; reading back dequantizes the int8 ones
    assert raw.variables["decoder/layer_0/self_attention/linear_0/weight"].dtype == torch.float32
    _, back = ct2.ct2_to_openai(out)
    q = given["decoder.blocks.1.attn.key.weight"]
    assert torch.equal(back["decoder.blocks.1.attn.key.weight"], q.dequantize())
    err = (back["decoder.blocks.1.attn.key.weight"] - sd["decoder.blocks.1.attn.key.weight"]).abs()
    assert bool((err <= 0.5 / q.scale[:, None] + 1e-7).all())


def test_int8_fused_parts_must_come_together(tiny_whisper, tmp_path):
    sd = tiny_whisper.state_dict()
    name = "decoder.blocks.0.cross_attn.key.weight"
    with pytest.raises(DQWhisperError, match="cross_attn.value.weight"):
        _export(tiny_whisper, tmp_path, int8_weights={name: ct2.quantize_int8_rows(sd[name])})


def test_int8_quantization_matches_ctranslate2_rule(tiny_whisper, tmp_path):
    out = _export(tiny_whisper, tmp_path, quantization="int8")
    raw = ct2.read_model_bin(out / "model.bin")
    w = tiny_whisper.state_dict()["encoder.conv2.weight"]
    q, scale = raw.variables["encoder/conv2/weight"], raw.variables["encoder/conv2/weight_scale"]
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
    assert torch.equal(scale, 127.0 / w.reshape(w.shape[0], -1).abs().amax(1))
    assert raw.variables["decoder/embeddings/weight"].dtype == torch.int8
    assert raw.variables["decoder/layer_norm/gamma"].dtype == torch.float32
    dims, back = ct2.ct2_to_openai(out)
    assert (back["encoder.conv2.weight"] - w).abs().max() <= 0.5 / scale.min() + 1e-7


def _ct2_greedy(ct2_dir, mel, n):
    """Greedy tokens from ctranslate2 itself (no blank/token suppression) after the usual 4-token prompt."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(mel.numpy())
    result = model.generate(features, [PROMPT], beam_size=1, suppress_blank=False, suppress_tokens=[], max_length=n)
    return model, result[0].sequences_ids[0]


def _torch_greedy(model, mel, n):
    with torch.no_grad():
        xa = model.encoder(mel)
        tokens = list(PROMPT)
        for _ in range(n):
            nxt = int(model.decoder(torch.tensor([tokens]), xa)[0, -1].argmax())
            if nxt == 50257:
                break
            tokens.append(nxt)
    return xa, tokens[len(PROMPT) :]


PROMPT = [50258, 50259, 50359, 50363]  # sot, en, transcribe, notimestamps


def test_ctranslate2_runs_the_export(tiny_whisper, tmp_path):
    out = _export(tiny_whisper, tmp_path)
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(1))
    model, got = _ct2_greedy(out, mel, 10)
    xa, want = _torch_greedy(tiny_whisper, mel, len(got))
    import ctranslate2

    enc = torch.from_numpy(np.asarray(model.encode(ctranslate2.StorageView.from_array(mel.numpy()))))
    assert (enc - xa).abs().max() < 1e-4
    assert got and got == want


def test_pruned_vocabulary_is_expanded_and_suppressed(tiny_whisper, tmp_path):
    keep = list(range(0, 5000, 7)) + list(range(50257, 51865))
    student = from_whisper(tiny_whisper, vocab_keep=keep).eval()
    out = _export(student, tmp_path)
    raw = ct2.read_model_bin(out / "model.bin")
    emb = raw.variables["decoder/embeddings/weight"]
    full = tiny_whisper.decoder.token_embedding.weight.detach()
    assert emb.shape == full.shape
    assert torch.equal(emb[keep], full[keep])
    pruned = sorted(set(range(51865)) - set(keep))
    assert bool((emb[pruned] == 0).all())
    bias = raw.variables["decoder/projection/bias"]
    assert bool((bias[pruned] == ct2.PRUNED_LOGIT).all()) and bool((bias[keep] == 0).all())
    assert set(pruned) <= set(json.loads((out / "config.json").read_text())["suppress_ids"])
    # CTranslate2 decodes the student's tokens, all kept, where the unpruned model picks a pruned id
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(1))
    _, got = _ct2_greedy(out, mel, 10)
    _, want = _torch_greedy(student, mel, len(got))
    _, unpruned = _torch_greedy(tiny_whisper, mel, 1)
    assert unpruned[0] not in keep
    assert got and got == want and set(got) <= set(keep)
    with pytest.raises(DQWhisperError, match="projection bias"):
        ct2.ct2_to_openai(out)
