"""PTQ, CT2 export and size-report CLIs on tiny models; the CT2 export loads in faster-whisper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dqwhisper.models.ct2 import read_model_bin
from dqwhisper.models.student import load_checkpoint, save_checkpoint
from dqwhisper.quant import prepare
from dqwhisper.quant import ct2_export, ptq, size
from dqwhisper.quant.export import export_model, main as export_main
from dqwhisper.quant.prepare import quantize_module_weight
from tests.quant.conftest import make_student


def test_ptq_cli_writes_fake_quant_checkpoint(tmp_path, inputs):
    mel, tokens = inputs
    student = make_student()
    save_checkpoint(student, tmp_path / "f.pt", config={"data": {"languages": ["en"]}})
    assert ptq.main([str(tmp_path / "f.pt"), "w4", str(tmp_path / "q.pt"), "weight.bits=3"]) == 0
    q = load_checkpoint(tmp_path / "q.pt")
    assert q.quant_config["weight"]["bits"] == 3 and q.quant_config["ptq"] and q.quant_config["scope"] == "all"
    # same quantizer as QAT: preparing the float student directly gives the same forward
    direct = prepare(make_student(), {**q.quant_config})
    with torch.no_grad():
        torch.testing.assert_close(
            q.decoder(tokens, q.encoder(mel)), direct.decoder(tokens, direct.encoder(mel)), atol=0, rtol=0
        )
    assert ptq.main([str(tmp_path / "q.pt"), "w8", str(tmp_path / "qq.pt")]) == 1  # already quantized
    assert ptq.main([str(tmp_path / "f.pt"), "no_such_config", str(tmp_path / "x.pt")]) == 1
    assert ptq.main([str(tmp_path / "f.pt"), "w8", str(tmp_path / "x.pt"), "weight.bits=9"]) == 1
    # overrides after an option are overrides too (argparse's plain parse rejects them)
    out = tmp_path / "q2.pt"
    assert (
        ptq.main([str(tmp_path / "f.pt"), "w4", str(out), "--no-ctc", "weight.bits=3", "module_bits=[^encoder=2]"]) == 0
    )
    q2 = load_checkpoint(out)
    assert q2.quant_config["weight"]["bits"] == 3 and q2.quant_config["module_bits"] == ["^encoder=2"]


def test_size_report_counts_packed_bits(tmp_path, capsys):
    teacher = make_student(vocab_keep=None)
    save_checkpoint(teacher, tmp_path / "t.pt")
    model = prepare(make_student(vocab_keep=None), {"enabled": True, "scope": "all", "weight": {"bits": 4}})
    export_model(model, tmp_path / "m.dqw")
    assert (
        size.main(
            [
                str(tmp_path / "m.dqw"),
                "--teacher",
                str(tmp_path / "t.pt"),
                "--per-tensor",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    n_float = sum(v.numel() for v in teacher.state_dict().values() if torch.is_floating_point(v))
    assert report["teacher"]["fp16_bytes"] == 2 * n_float
    assert report["bytes_on_disk"] == (tmp_path / "m.dqw").stat().st_size
    assert report["ratio_vs_teacher_fp16"] == pytest.approx(2 * n_float / report["bytes_on_disk"])
    emb = next(r for r in report["tensors"] if r["name"] == "decoder.token_embedding")
    assert emb["format"].startswith("int4") and 4.0 < emb["bits"] < 4.5  # codes + one fp16 scale per row of 64
    assert "ratio teacher fp16 / this file" in text


def test_ct2_export_keeps_the_students_int8_codes(tmp_path):
    model = prepare(make_student(), {"enabled": True, "scope": "all"})
    out, n = ct2_export.export_ct2(model, tmp_path / "ct2")
    bin_ = read_model_bin(out)
    assert n == sum(1 for name, _ in model.named_modules() if hasattr(_, "weight_fake_quantizer")) - 0
    keep = model.decoder.vocab_keep
    qt = quantize_module_weight(model.decoder.token_embedding)
    assert torch.equal(bin_.variables["decoder/embeddings/weight"][keep], qt.codes)
    torch.testing.assert_close(bin_.variables["decoder/embeddings/weight_scale"][keep], 1 / qt.scale[:, 0])
    fc1 = quantize_module_weight(model.decoder.blocks[1].mlp[0])
    assert torch.equal(bin_.variables["decoder/layer_1/ffn/linear_0/weight"], fc1.codes)
    qkv = [quantize_module_weight(getattr(model.encoder.blocks[0].attn, p)).codes for p in ("query", "key", "value")]
    assert torch.equal(bin_.variables["encoder/layer_0/self_attention/linear_0/weight"], torch.cat(qkv))


def test_ct2_export_of_per_group_weights_is_dequantized_float(tmp_path):
    model = prepare(
        make_student(), {"enabled": True, "weight": {"bits": 4, "granularity": "per_group", "group_size": 16}}
    )
    out, n = ct2_export.export_ct2(model, tmp_path / "ct2", "float32")
    assert n == 0
    w = read_model_bin(out).variables["decoder/layer_0/ffn/linear_0/weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, quantize_module_weight(model.decoder.blocks[0].mlp[0]).dequantize())


def test_export_cli_with_ct2_loads_in_faster_whisper(tmp_path, inputs):
    faster_whisper = pytest.importorskip("faster_whisper")
    mel, _ = inputs
    model = prepare(make_student(n_audio_ctx=1500), {"enabled": True})  # faster-whisper pads to 30 s
    save_checkpoint(model, tmp_path / "q.pt")
    assert export_main([str(tmp_path / "q.pt"), str(tmp_path / "m.dqw"), "--ct2", str(tmp_path / "ct2")]) == 0
    fw = faster_whisper.WhisperModel(str(tmp_path / "ct2"), device="cpu", compute_type="int8")
    audio = np.random.default_rng(0).normal(0, 0.05, 16000).astype(np.float32)
    segments, _ = fw.transcribe(
        audio,
        language="en",
        beam_size=1,
        without_timestamps=True,
        condition_on_previous_text=False,
        temperature=0.0,
        vad_filter=False,
    )
    list(segments)  # runs end to end (random weights: the text itself is meaningless)


def test_ct2_greedy_agrees_with_our_greedy_decode(tmp_path, inputs):
    pytest.importorskip("ctranslate2")
    import whisper

    mel, _ = inputs
    model = prepare(make_student(), {"enabled": True, "scope": "all"})
    out, _ = ct2_export.export_ct2(model, tmp_path / "ct2", "float32")
    prompt = [50258, 50259, 50359, 50363]  # sot, en, transcribe, notimestamps
    opts = whisper.DecodingOptions(
        language="en", without_timestamps=True, fp16=False, sample_len=10, suppress_tokens="", suppress_blank=False
    )
    ours = [whisper.decode(model, m, opts).tokens for m in mel]
    theirs = ct2_export.ct2_greedy(out, mel.numpy(), [prompt] * len(mel), max_length=64, compute_type="float32")
    # same float weights (int8 codes dequantized by CT2 in float32): the same greedy tokens
    assert [t[: len(o)] for t, o in zip(theirs, ours)] == ours
