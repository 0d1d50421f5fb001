"""whisper.cpp export: ggml block formats against the gguf package's reference quantizers, the file layout, QAT in
ggml's formats (the file holds the fake-quantized codes bit for bit), and (when pywhispercpp is installed) a load
and decode through whisper.cpp itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqwhisper.interop.ggml import read_ggml, unpack_blocks, write_ggml
from dqwhisper.models.student import from_whisper, load_checkpoint, save_checkpoint
from dqwhisper.quant import prepare
from dqwhisper.quant.ggml_format import quantize_blocks
from dqwhisper.utils import DQWhisperError
from tests.conftest import random_tiny_whisper

FORMATS = ["q4_0", "q5_0", "q8_0"]


def _gguf_type(name):
    gguf = pytest.importorskip("gguf")
    return getattr(gguf.GGMLQuantizationType, name.upper())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["normal", "ties", "zero_blocks", "outliers"])
def test_block_codes_match_gguf_reference(fmt, kind):
    from gguf import quants

    rng = np.random.default_rng(hash((fmt, kind)) % 2**32)
    x = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    if kind == "ties":  # equal magnitudes of both signs: ggml takes the first
        x = np.round(x * 30).astype(np.float32) / 30
    elif kind == "zero_blocks":
        x[:, 32:96] = 0
    elif kind == "outliers":
        x[::3, 7] *= 40
    qt = _gguf_type(fmt)
    ref_bytes = quants.quantize(x, qt).tobytes()
    from dqwhisper.interop.ggml import pack_blocks

    assert pack_blocks(torch.from_numpy(x), fmt) == ref_bytes
    codes, _, scale = quantize_blocks(torch.from_numpy(x), fmt)
    ours = (codes * scale[:, None]).reshape(x.shape).numpy()
    np.testing.assert_array_equal(ours, quants.dequantize(quants.quantize(x, qt), qt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_unpack_inverts_pack(fmt):
    from dqwhisper.interop.ggml import blocks_bytes

    x = torch.randn(8, 64) * 0.1
    codes, d, _ = quantize_blocks(x, fmt)
    back, dh = unpack_blocks(blocks_bytes(codes, d, fmt), fmt, codes.shape[0])
    np.testing.assert_array_equal(back, codes.numpy().astype(np.int16))
    np.testing.assert_array_equal(dh, d.to(torch.float16).numpy())


def _student(quant=None, window=50):
    teacher = random_tiny_whisper(seed=1, bias_std=0.02)
    keep = list(range(0, 400)) + list(range(50257, 51865))
    s = from_whisper(teacher, vocab_keep=keep, decoder_layers=[0, 3], n_audio_ctx=window)
    if quant:
        prepare(s, quant)
    return s.eval()


def test_file_layout_float(tmp_path):
    model = random_tiny_whisper(seed=2)
    info = write_ggml(model, tmp_path / "m.bin", "f16")
    f = read_ggml(tmp_path / "m.bin")
    hp = f["hparams"]
    assert (hp["n_vocab"], hp["n_audio_ctx"], hp["n_audio_state"], hp["n_text_layer"], hp["ftype"]) == (
        51865,
        1500,
        64,
        4,
        1,
    )
    from dqwhisper.data.dataset import default_tokenizer

    enc = default_tokenizer().encoding
    assert len(f["vocab"]) == 50257
    assert all(f["vocab"][i] == enc.decode_single_token_bytes(i) for i in (0, 1000, 38088, 50256))
    t = f["tensors"]
    assert set(t) == set(model.state_dict())
    kind, shape, data = t["decoder.blocks.0.mlp.0.weight"]
    assert (kind, shape) == ("f16", (256, 64))
    np.testing.assert_array_equal(
        np.frombuffer(data, "<f2").reshape(shape),
        model.decoder.blocks[0].mlp[0].weight.detach().numpy().astype(np.float16),
    )
    assert t["encoder.conv1.bias"][:2] == ("f32", (64, 1))
    assert t["encoder.conv1.weight"][:2] == ("f16", (64, 80, 3))
    assert t["encoder.positional_embedding"][:2] == ("f32", (1500, 64))
    assert info["audio_ctx"] == 100  # the tiny dims have a 2 s window


def test_short_window_pruned_student(tmp_path):
    s = _student(window=50)
    info = write_ggml(s, tmp_path / "s.bin", "q8_0")
    f = read_ggml(tmp_path / "s.bin")
    assert info["audio_ctx"] == 50 and "audio_ctx = 50" in info["notes"][0]
    assert info["flash_attn"] is False and "--no-flash-attn" in info["notes"][0]  # 50 is no multiple of 256
    assert f["hparams"]["ftype"] == 7 + 2000
    pos = np.frombuffer(f["tensors"]["encoder.positional_embedding"][2], "<f4").reshape(1500, 64)
    np.testing.assert_array_equal(pos[:50], s.encoder.positional_embedding.numpy())
    from whisper.model import sinusoids

    np.testing.assert_allclose(pos[50:], sinusoids(1500, 64)[50:].numpy(), atol=1e-6)
    kind, shape, data = f["tensors"]["decoder.token_embedding.weight"]
    assert (kind, shape) == ("q8_0", (51865, 64))
    codes, _ = unpack_blocks(data, "q8_0", 51865 * 2)
    codes = codes.reshape(51865, 64)
    keep = s.decoder.vocab_keep.numpy()
    pruned = np.setdiff1d(np.arange(51865), keep)
    assert not codes[pruned].any() and codes[keep].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_qat_codes_written_bit_for_bit(tmp_path, fmt):
    from gguf import quants

    quant = {
        "enabled": True,
        "scope": "decoder",
        "conv": False,
        "weight": {"bits": int(fmt[1]), "granularity": f"ggml_{fmt}", "lsq": False},
    }
    s = _student(quant)
    with torch.no_grad():  # move the latent weights as training would, so codes are not those of the copied float
        for p in s.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_checkpoint(s, tmp_path / "qat.pt")
    s = load_checkpoint(tmp_path / "qat.pt")
    info = write_ggml(s, tmp_path / "qat.bin", fmt)
    assert any("trained codes" in n for n in info["notes"])
    assert not any("written dequantized" in n for n in info["notes"])  # the codes, not floats, are in the file
    tensors = read_ggml(tmp_path / "qat.bin")["tensors"]
    keep = s.decoder.vocab_keep
    n_fq = 0
    for name, m in s.named_modules():
        fq = getattr(m, "weight_fake_quantizer", None)
        if fq is None:
            continue
        n_fq += 1
        q, sc, _ = fq.codes(m.weight)
        kind, shape, data = tensors[name + ".weight"]
        assert kind == fmt
        codes, dh = unpack_blocks(data, fmt, int(np.prod(shape)) // 32)
        codes = torch.from_numpy(codes.astype(np.float32)).reshape(shape[0], -1, 32)
        dh = torch.from_numpy(dh.astype(np.float32)).reshape(shape[0], -1)
        if name == "decoder.token_embedding":
            codes, dh = codes[keep], dh[keep]
        assert torch.equal(codes, q) and torch.equal(dh, sc)  # the trained codes and scales, bit for bit
        # and the runtime's dequantization (gguf's reference) of those blocks is the fake-quantized forward weight
        deq = quants.dequantize(
            np.frombuffer(data, np.uint8).reshape(-1, len(data) // (int(np.prod(shape)) // 32)), _gguf_type(fmt)
        ).reshape(shape)
        if name == "decoder.token_embedding":
            deq = deq[keep.numpy()]
        np.testing.assert_array_equal(deq, fq(m.weight).detach().numpy())
    assert n_fq == 2 * 10 + 1  # 2 decoder layers x 10 linears + the token embedding


def test_ggml_quant_config_errors():
    with pytest.raises(DQWhisperError, match="bits = 4"):
        prepare(_student(), {"enabled": True, "weight": {"bits": 8, "granularity": "ggml_q4_0", "lsq": False}})
    with pytest.raises(DQWhisperError, match="convolution"):
        prepare(
            _student(),
            {"enabled": True, "scope": "all", "weight": {"bits": 4, "granularity": "ggml_q4_0", "lsq": False}},
        )


def test_fake_quant_gradient_is_straight_through():
    s = _student({"enabled": True, "conv": False, "weight": {"bits": 4, "granularity": "ggml_q4_0", "lsq": False}})
    lin = s.decoder.blocks[0].mlp[0]
    x = torch.randn(3, 64)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, torch.ones(3, 256).t() @ x)


# ----------------------------------------------------------------------------------- whisper.cpp itself (optional)
@pytest.mark.ggml
@pytest.mark.parametrize("fmt", ["f16", "q4_0"])
def test_whisper_cpp_loads_and_decodes(tmp_path, fmt):
    pw = pytest.importorskip("_pywhispercpp")
    from dqwhisper.interop.whispercpp import WhisperCpp

    s = _student(window=50)
    write_ggml(s, tmp_path / "s.bin", fmt)
    runner = WhisperCpp(tmp_path / "s.bin", n_threads=1)
    assert pw.whisper_model_n_audio_ctx(runner.ctx) == 1500
    assert runner.flash_attn is False  # its flash attention would attend to 256 - 50 unmasked padding positions
    mel = torch.zeros(80, 60)
    tokens = runner.decode_mel(mel.numpy(), "en", audio_ctx=50, max_tokens=5)
    assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)


@pytest.mark.parametrize("fmt", ["f16", "q5_0"])
def test_load_ggml_gives_the_file_weights(tmp_path, fmt):
    from dqwhisper.models.load import load_whisper

    s = _student(window=50)
    write_ggml(s, tmp_path / "s.bin", fmt)
    back = load_whisper(tmp_path / "s.bin")
    assert back.dims.n_audio_ctx == 50 and back.dims.n_text_layer == 2
    w = s.decoder.blocks[1].mlp[2].weight
    got = back.decoder.blocks[1].mlp[2].weight
    if fmt == "f16":
        assert torch.equal(got, w.half().float())
    else:
        codes, _, scale = quantize_blocks(w, fmt)
        assert torch.equal(got, (codes * scale[:, None]).reshape(w.shape))
    torch.testing.assert_close(back.encoder.ln_post.weight, s.encoder.ln_post.weight, atol=0, rtol=0)


def test_ggml_qat_student_exports_to_dqw_exactly(tmp_path):
    """The project's own packed file (.dqw) stores ggml-format codes too (signed codes, fp16 scales of either sign),
    and runs them bit for bit like the fake-quantized checkpoint."""
    from dqwhisper.quant.export import check_export, export_checkpoint

    quant = {"enabled": True, "conv": False, "weight": {"bits": 4, "granularity": "ggml_q4_0", "lsq": False}}
    s = _student(quant)
    save_checkpoint(s, tmp_path / "qat.pt")
    export_checkpoint(tmp_path / "qat.pt", tmp_path / "qat.dqw", float_dtype="float32")
    res = check_export(tmp_path / "qat.pt", tmp_path / "qat.dqw")
    assert res["dequant"]["max_abs_diff"] == 0.0
    assert res["int8"]["argmax_agree"] == 1.0
