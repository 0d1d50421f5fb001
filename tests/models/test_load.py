"""load_whisper and the errors a user meets: each a DQWhisperError naming the file and the problem."""

from __future__ import annotations

import struct

import pytest
import torch
from whisper.model import Whisper

from dqwhisper.models import ct2
from dqwhisper.models.load import load_model, load_whisper
from dqwhisper.models.student import export_state
from dqwhisper.models.convert import ct2_dir_to_checkpoint, main as convert_main
from dqwhisper.models.student import DQWhisper, save_checkpoint
from dqwhisper.utils import DQWhisperError, sha256_file


@pytest.fixture(autouse=True)
def empty_model_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DQWHISPER_MODEL_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture
def tiny_ct2(tiny_whisper, tmp_path):
    return ct2.openai_to_ct2(**export_state(tiny_whisper), out_dir=tmp_path / "tiny-ct2")


def _same_outputs(a: Whisper, b: Whisper) -> None:
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440]])
    with torch.no_grad():
        assert torch.equal(a.logits(tokens, a.embed_audio(mel)), b.logits(tokens, b.embed_audio(mel)))


def test_load_ct2_dir_and_checkpoints(tiny_whisper, tiny_ct2, tmp_path):
    from_dir = load_whisper(tiny_ct2)
    _same_outputs(from_dir, tiny_whisper)
    # openai-format checkpoint written by the converter carries the alignment heads of config.json
    pt = tmp_path / "tiny.pt"
    ct2_dir_to_checkpoint(tiny_ct2, pt)
    from_pt = load_whisper(str(pt))
    assert isinstance(from_pt, DQWhisper)
    _same_outputs(from_pt, tiny_whisper)
    assert torch.equal(from_pt.alignment_heads.to_dense(), tiny_whisper.alignment_heads.to_dense())
    # our own checkpoint format
    ours = tmp_path / "ours.pt"
    save_checkpoint(from_pt, ours)
    _same_outputs(load_whisper(ours), tiny_whisper)


def test_store_lookup_verifies_checksum(tiny_ct2, empty_model_store, tiny_whisper):
    empty_model_store.mkdir()
    pt = empty_model_store / "mini.pt"
    ct2_dir_to_checkpoint(tiny_ct2, pt)
    with pytest.raises(DQWhisperError, match="no checksum file"):
        load_whisper("mini")
    (empty_model_store / "mini.pt.sha256").write_text(f"{sha256_file(pt)}  mini.pt\n")
    _same_outputs(load_whisper("mini"), tiny_whisper)
    with open(pt, "r+b") as f:  # flip one byte
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(DQWhisperError, match=r"mini\.pt does not match its checksum"):
        load_whisper("mini")


def test_unknown_name_offline_points_to_prepare_script(monkeypatch):
    import whisper

    def offline(name, device=None):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(whisper, "load_model", offline)
    with pytest.raises(DQWhisperError, match="prepare_models.sh"):
        load_whisper("small")
    with pytest.raises(DQWhisperError, match="neither an existing path"):
        load_whisper("not-a-model")


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(DQWhisperError, match=f"{missing}.*does not exist"):
        load_whisper(missing)
    with pytest.raises(DQWhisperError, match="does not exist"):
        ct2.ct2_to_openai(tmp_path / "no-such-dir")


def test_dir_without_model_bin(tmp_path):
    with pytest.raises(DQWhisperError, match="without model.bin"):
        load_whisper(tmp_path)


def test_truncated_model_bin(tiny_ct2):
    path = tiny_ct2 / "model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DQWhisperError, match=f"{path} is truncated: the data of .* needs"):
        load_whisper(tiny_ct2)


def test_trailing_bytes(tiny_ct2):
    path = tiny_ct2 / "model.bin"
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(DQWhisperError, match="4 unexpected bytes"):
        ct2.read_model_bin(path)


@pytest.mark.parametrize("version", [0, 5, 7, 0x46554747])  # 0x46554747: a GGUF magic read as a version
def test_wrong_version(tiny_ct2, version):
    path = tiny_ct2 / "model.bin"
    path.write_bytes(struct.pack("<I", version) + path.read_bytes()[4:])
    with pytest.raises(DQWhisperError, match=f"{path} has format version {version}"):
        load_whisper(tiny_ct2)


def test_wrong_spec(tiny_ct2):
    path = tiny_ct2 / "model.bin"
    raw = ct2.read_model_bin(path)
    raw.spec = "TransformerSpec"
    ct2.write_model_bin(path, raw)
    with pytest.raises(DQWhisperError, match="holds a TransformerSpec"):
        load_whisper(tiny_ct2)


def test_missing_variable(tiny_ct2):
    path = tiny_ct2 / "model.bin"
    raw = ct2.read_model_bin(path)
    del raw.variables["decoder/layer_2/ffn/linear_1/bias"]
    ct2.write_model_bin(path, raw)
    with pytest.raises(DQWhisperError, match=r"model.bin has no variable decoder/layer_2/ffn/linear_1/bias"):
        load_whisper(tiny_ct2)


def test_missing_part(tmp_path):
    (tmp_path / "model.bin.part1").write_bytes(b"x" * 10)
    with pytest.raises(DQWhisperError, match=r"part file .*model\.bin\.part2 is missing"):
        ct2.join_parts([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"], tmp_path / "model.bin")
    (tmp_path / "model.bin.part2").write_bytes(b"y" * 5)
    with pytest.raises(DQWhisperError, match="add up to 15 bytes, expected 20"):
        ct2.join_parts([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"], tmp_path / "model.bin", 20)
    ct2.join_parts([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"], tmp_path / "model.bin", 15)
    assert (tmp_path / "model.bin").read_bytes() == b"x" * 10 + b"y" * 5
    assert not (tmp_path / "model.bin").with_name(".model.bin.tmp").exists()


def test_checkpoint_with_missing_keys(tiny_whisper, tmp_path):
    pt = tmp_path / "broken.pt"
    sd = tiny_whisper.state_dict()
    del sd["decoder.blocks.1.mlp.0.weight"]
    torch.save({"dims": tiny_whisper.dims.__dict__, "model_state_dict": sd}, pt)
    with pytest.raises(DQWhisperError, match=rf"{pt} does not match its architecture: 1 missing keys"):
        load_whisper(pt)


def test_truncated_checkpoint(tiny_whisper, tmp_path):
    pt = tmp_path / "cut.pt"
    torch.save({"dims": tiny_whisper.dims.__dict__, "model_state_dict": tiny_whisper.state_dict()}, pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(DQWhisperError, match=rf"{pt} could not be read"):
        load_whisper(pt)


def test_cli_round_trip(tiny_whisper, tmp_path, capsys):
    pt = tmp_path / "in.pt"
    torch.save({"dims": tiny_whisper.dims.__dict__, "model_state_dict": tiny_whisper.state_dict()}, pt)
    assert convert_main(["openai-to-ct2", str(pt), str(tmp_path / "ct2")]) == 0
    assert convert_main(["ct2-to-openai", str(tmp_path / "ct2"), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["dims"] == tiny_whisper.dims.__dict__
    for name, t in tiny_whisper.state_dict().items():
        assert torch.equal(back["model_state_dict"][name], t), name
    assert convert_main(["openai-to-ct2", str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 1
    assert f"error: checkpoint {tmp_path / 'missing.pt'} does not exist" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dqwhisper.models.convert",
            "ct2-to-openai",
            str(tmp_path / "nothing"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_load_model_loads_every_kind(tiny_whisper, tiny_ct2, tmp_path, empty_model_store):
    """Store name, openai .pt, a training checkpoint (QAT, with optimizer state), .dqw (int8 and dequant),
    a CTranslate2 dir and an experiment dir: each loads through `load_model` and computes the same function as the
    model it was made from (exactly, or within the int8 kernels' rounding)."""
    import whisper

    from dqwhisper.quant import prepare
    from dqwhisper.quant.export import export_model
    from tests.quant.conftest import make_student
    from tests.quant.test_prepare import CONFIGS

    empty_model_store.mkdir()
    ct2_dir_to_checkpoint(tiny_ct2, empty_model_store / "mini.pt")
    (empty_model_store / "mini.pt.sha256").write_text(sha256_file(empty_model_store / "mini.pt") + "  mini.pt\n")
    openai_pt = tmp_path / "openai.pt"
    torch.save({"dims": tiny_whisper.dims.__dict__, "model_state_dict": tiny_whisper.state_dict()}, openai_pt)
    for source in ("mini", openai_pt, str(openai_pt), tiny_ct2):
        _same_outputs(load_model(source), tiny_whisper)
    assert isinstance(whisper.load_model(str(openai_pt)), Whisper)  # the file is openai's own format

    qat = prepare(make_student(), CONFIGS["w8"])  # per-channel 8 bit: int8 mode runs the int8 kernels
    exp = tmp_path / "exp"
    save_checkpoint(qat, exp / "last.pt", config={"x": 1}, optimizer={"state": {}}, step=3)
    loaded = load_model(exp / "last.pt")
    assert loaded.quant_config == qat.quant_config and not loaded.training
    _same_outputs(loaded, qat)
    export_model(qat, exp / "export" / "model.dqw", float_dtype="float32")
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440]])
    with torch.no_grad():
        want = qat.logits(tokens, qat.embed_audio(mel))
        for mode, tol in (("dequant", 0.0), ("int8", 0.5)):
            m = load_model(exp / "export" / "model.dqw", export_mode=mode)
            got = m.logits(tokens, m.embed_audio(mel))
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got))
            assert (got[finite] - want[finite]).abs().max() <= tol, mode
    with pytest.raises(DQWhisperError, match="without config.yaml"):
        load_model(exp)  # an experiment dir is recognised by its config.yaml
    (exp / "config.yaml").write_text("x: 1\n")
    m = load_model(exp, export_mode="dequant")  # the experiment's export wins over last.pt
    from dqwhisper.quant import QuantizedLinear

    assert any(isinstance(x, QuantizedLinear) for x in m.modules())
    with torch.no_grad():
        assert torch.equal(m.logits(tokens, m.embed_audio(mel)), want)
    with pytest.raises(DQWhisperError, match="export mode"):
        load_model(exp / "export" / "model.dqw", export_mode="int4")
    empty = tmp_path / "empty_exp"
    empty.mkdir()
    (empty / "config.yaml").write_text("x: 1\n")
    with pytest.raises(DQWhisperError, match="has no checkpoint"):
        load_model(empty)
