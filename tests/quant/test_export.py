"""model.dqw: fake-quant forward == exported-and-reloaded forward; sizes; whisper.decode on the loaded model."""

from __future__ import annotations

import pytest
import torch
import whisper

from dqwhisper.models.student import save_checkpoint
from dqwhisper.quant import QuantizedEmbedding, QuantizedLinear, prepare
from dqwhisper.quant.export import export_checkpoint, export_model, load_exported, main, read_header
from dqwhisper.quant.fake_quant import FAKE_QUANTIZED_TYPES
from dqwhisper.utils import DQWhisperError
from tests.quant.conftest import make_student
from tests.quant.test_prepare import CONFIGS


def forward(model, mel, tokens):
    with torch.no_grad():
        xa = model.encoder(mel)
        return xa, model.decoder(tokens, xa)


def round_floats_to_fp16(model):
    """What float16 storage does to the non-quantized tensors (quantized weights are stored exactly, and the
    encoder's sinusoid table is regenerated on load, not stored)."""
    fq_weights = {id(m.weight) for m in model.modules() if isinstance(m, FAKE_QUANTIZED_TYPES)}
    fq_weights.add(id(model.encoder.positional_embedding))
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if torch.is_floating_point(p) and id(p) not in fq_weights:
                p.copy_(p.half().float())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dequant_reload_equals_fake_quant_exactly_fp32(name, tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(ctc_units=7), CONFIGS[name])
    model.ctc_bpe = b"\x00spm-bytes"
    ref_xa, ref = forward(model, mel, tokens)
    export_model(model, tmp_path / "m.dqw", float_dtype="float32")
    loaded = load_exported(tmp_path / "m.dqw", "dequant")
    xa, out = forward(loaded, mel, tokens)
    torch.testing.assert_close(xa, ref_xa, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert loaded.ctc_bpe == model.ctc_bpe and loaded.quant_config == model.quant_config
    assert torch.equal(loaded.decoder.vocab_keep, model.decoder.vocab_keep)
    torch.testing.assert_close(loaded.ctc_logits(xa), model.ctc_logits(ref_xa), atol=0, rtol=0)


def test_dequant_reload_fp16_equals_fake_quant_with_fp16_floats(tmp_path, inputs):
    """float16 storage rounds only the non-quantized tensors: equal to the fake-quant model with those rounded."""
    mel, tokens = inputs
    model = prepare(make_student(), CONFIGS["w4g16_lsq_all"])
    export_model(model, tmp_path / "m.dqw")
    _, before = forward(model, mel, tokens)
    round_floats_to_fp16(model)
    _, ref = forward(model, mel, tokens)
    _, out = forward(load_exported(tmp_path / "m.dqw"), mel, tokens)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not torch.equal(out, before)  # the rounding is real, so this comparison could fail


def test_int8_mode_keeps_float_activations_of_a_weight_only_student(tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), {"enabled": True, "scope": "all", "weight": {"bits": 4, "lsq": True}})
    export_model(model, tmp_path / "m.dqw")
    ref_model, fast = load_exported(tmp_path / "m.dqw", "dequant"), load_exported(tmp_path / "m.dqw", "int8")
    kernels = {m.kernel for m in fast.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert kernels <= {"float", "weight_only"}
    _, ref = forward(ref_model, mel, tokens)
    _, out = forward(fast, mel, tokens)
    finite = torch.isfinite(ref)
    if kernels == {"float"}:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:  # float32 rounding of another summation order only
        assert float((out[finite] - ref[finite]).abs().max()) <= 1e-4 * float(ref[finite].abs().max())


def test_fbgemm_mode_runs_int8_activations(tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), {"enabled": True, "scope": "all", "weight": {"bits": 4, "lsq": True}})
    export_model(model, tmp_path / "m.dqw")
    ref_model, fast = load_exported(tmp_path / "m.dqw", "dequant"), load_exported(tmp_path / "m.dqw", "fbgemm")
    assert fast.decoder.token_embedding.kernel == "fbgemm"
    assert all(m.kernel == "fbgemm" for m in fast.modules() if isinstance(m, QuantizedLinear))
    _, ref = forward(ref_model, mel, tokens)
    _, out = forward(fast, mel, tokens)
    finite = torch.isfinite(ref)
    # the only difference: 8-bit per-token activations (half a step of 1/127.5 of each token's max per input)
    rel = float((out[finite] - ref[finite]).abs().max() / ref[finite].abs().max())
    assert 0 < rel < 0.05


def test_file_is_packed_and_small(tmp_path):
    model = make_student(vocab_keep=None)
    n_quant = 0
    prepare(
        model, {"enabled": True, "scope": "all", "weight": {"bits": 4, "granularity": "per_group", "group_size": 32}}
    )
    for m in model.modules():
        if isinstance(m, FAKE_QUANTIZED_TYPES):
            n_quant += m.weight.numel()
    header = export_model(model, tmp_path / "m.dqw")
    size = (tmp_path / "m.dqw").stat().st_size
    codes = sum(e["codes"]["nbytes"] for e in header["tensors"].values() if e["kind"] == "quantized")
    assert codes == sum(
        (e["shape"][0] * (torch.tensor(e["shape"][1:]).prod().item()) * 4 + 7) // 8
        for e in header["tensors"].values()
        if e["kind"] == "quantized"
    )
    assert codes * 2 >= n_quant  # 4 bits per weight
    n_float = sum(p.numel() for n, p in model.state_dict().items()) - n_quant
    # codes + fp16 scales (1 per 32 weights) + the rest in fp16 + header/alignment < 4.5 bits/quantized weight
    assert size < n_quant * 4.5 / 8 + n_float * 2 + 64 * 1024


def test_whisper_decode_runs_on_loaded_model(tmp_path, inputs):
    mel, _ = inputs
    model = prepare(make_student(), CONFIGS["w8"])
    export_model(model, tmp_path / "m.dqw")
    opts = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=8)
    ref = whisper.decode(model, mel[0], opts)
    for mode in ("dequant", "int8"):
        res = whisper.decode(load_exported(tmp_path / "m.dqw", mode), mel[0], opts)
        assert len(res.tokens) > 0
        assert all(int(model.decoder.full_to_sub[t]) >= 0 for t in res.tokens)  # never a pruned id
        if mode == "dequant":
            assert res.tokens == ref.tokens


def test_checkpoint_cli_and_header(tmp_path, capsys):
    model = prepare(make_student(), CONFIGS["w8"])
    save_checkpoint(model, tmp_path / "q.pt", config={"data": {"languages": ["ja", "en"]}})
    assert main([str(tmp_path / "q.pt"), str(tmp_path / "m.dqw"), "--check"]) == 0
    assert "wrote" in capsys.readouterr().out
    header, _ = read_header(tmp_path / "m.dqw")
    assert header["tokenizer"]["languages"] == ["ja", "en"] and header["tokenizer"]["multilingual"]
    assert header["dims"]["n_text_state"] == 64 and header["encoder_positional"] == "sinusoids"
    assert header["quant"]["weight"]["bits"] == 8


def test_bad_files_fail_clearly(tmp_path):
    (tmp_path / "x.dqw").write_bytes(b"not a model")
    with pytest.raises(DQWhisperError, match="bad magic"):
        load_exported(tmp_path / "x.dqw")
    with pytest.raises(DQWhisperError, match="does not exist"):
        load_exported(tmp_path / "missing.dqw")
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "o.dqw")]) == 1


def test_float_checkpoint_exports_fp16(tmp_path, inputs):
    mel, tokens = inputs
    model = make_student()
    save_checkpoint(model, tmp_path / "f.pt")
    export_checkpoint(tmp_path / "f.pt", tmp_path / "f.dqw")
    loaded = load_exported(tmp_path / "f.dqw")
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in loaded.modules())
    round_floats_to_fp16(model)
    torch.testing.assert_close(forward(loaded, mel, tokens)[1], forward(model, mel, tokens)[1], atol=0, rtol=0)


def test_float16_sinusoids_are_regenerated_not_stored(tmp_path):
    """A checkpoint converted from a float16 file holds the encoder's sinusoid table rounded to float16: the
    export regenerates it on load (no 2 * n_audio_ctx * d bytes in the file) and the loaded table is identical."""
    model = prepare(make_student(), CONFIGS["w8"])
    pos = model.encoder.positional_embedding
    pos.copy_(pos.half().float())
    save_checkpoint(model, tmp_path / "q.pt")
    assert main([str(tmp_path / "q.pt"), str(tmp_path / "m.dqw")]) == 0
    header, _ = read_header(tmp_path / "m.dqw")
    assert header["encoder_positional"] == "sinusoids_float16"
    assert "encoder.positional_embedding" not in header["tensors"]
    loaded = load_exported(tmp_path / "m.dqw", "dequant")
    assert torch.equal(loaded.encoder.positional_embedding, pos)
    pos.add_(1e-3)  # anything else is stored
    save_checkpoint(model, tmp_path / "r.pt")
    main([str(tmp_path / "r.pt"), str(tmp_path / "r.dqw")])
    header, _ = read_header(tmp_path / "r.dqw")
    assert header["encoder_positional"] == "stored" and "encoder.positional_embedding" in header["tensors"]
    assert torch.equal(load_exported(tmp_path / "r.dqw", "dequant").encoder.positional_embedding, pos.half().float())


def test_float64_sinusoids_of_ctranslate2_teachers_are_regenerated_not_stored(tmp_path):
    """CTranslate2's float16 Whisper files hold the sinusoid table computed in float64, then rounded to float16,
    which float32's computation misses in a few entries (1,175 of 204,800 at base's 8 s window): such a table is
    regenerated on load too, bit for bit."""
    from dqwhisper.quant.dqw import sinusoids64

    model = prepare(make_student(n_audio_ctx=100, n_audio_state=64), CONFIGS["w8"])
    pos = model.encoder.positional_embedding
    table = sinusoids64(100, 64).half().float()
    assert not torch.equal(table, whisper.model.sinusoids(100, 64).half().float())  # the case is a real one
    pos.copy_(table)
    save_checkpoint(model, tmp_path / "q.pt")
    assert main([str(tmp_path / "q.pt"), str(tmp_path / "m.dqw")]) == 0
    header, _ = read_header(tmp_path / "m.dqw")
    assert header["encoder_positional"] == "sinusoids64_float16"
    assert "encoder.positional_embedding" not in header["tensors"]
    assert torch.equal(load_exported(tmp_path / "m.dqw", "dequant").encoder.positional_embedding, pos)
