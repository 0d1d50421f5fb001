"""The bad inputs of docs/bad_inputs.md that data, decoding and export handle: each test names its row."""
from __future__ import annotations

import pytest

from dqwhisper.data.kaldi import DataDir
from dqwhisper.data.validate import validate_data_dir
from tests.data.helpers import make_data_dir


# ---------------------------------------------------------------- line separators inside a transcript (row "text")
@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0c", "\x1c"])
def test_validate_and_loader_split_lines_alike(tmp_path, sep):
    """A transcript holding a character str.splitlines() splits at: validate and DataDir.load see the same lines."""
    d = make_data_dir(tmp_path, n=3)
    lines = (d / "text").read_text(encoding="utf-8").split("\n")
    key, text = lines[1].split(" ", 1)
    lines[1] = f"{key} {text.replace(' ', sep, 1)}"
    (d / "text").write_text("\n".join(lines), encoding="utf-8")
    report = validate_data_dir(d, check_audio=False)
    assert report.ok, report.errors
    data = DataDir.load(d)
    assert len(data.utts) == report.n_utts == 3
    assert data[key].text.split() == text.split()


# ------------------------------------------------------------------------------ damaged export files (row ".dqw")
@pytest.fixture(scope="module")
def dqw_file(tmp_path_factory):
    from dqwhisper.models.student import from_whisper
    from dqwhisper.quant import prepare
    from dqwhisper.quant.config import QuantConfig
    from dqwhisper.quant.export import export_model
    from tests.conftest import random_tiny_whisper

    model = from_whisper(random_tiny_whisper(n_text_layer=1, n_audio_layer=1))
    prepare(model, QuantConfig(enabled=True))
    path = tmp_path_factory.mktemp("dqw") / "model.dqw"
    export_model(model, path)
    return path


def _damaged(src, dst, edit):
    raw = bytearray(src.read_bytes())
    dst.write_bytes(bytes(edit(raw)))
    return dst


@pytest.mark.parametrize("what,edit,message", [
    ("truncated by 100 bytes", lambda b: b[:-100], "is truncated: .* bytes, its header says"),
    ("one byte flipped", lambda b: b[:-5000] + bytes([b[-5000] ^ 0xFF]) + b[-4999:], "is damaged: the data's SHA-256"),
    ("bytes appended", lambda b: b + b"\0" * 64, "is damaged: .* bytes, its header says"),
    ("cut inside the header", lambda b: b[:40], "is truncated or damaged: its header says"),
])
def test_damaged_dqw_is_one_error_naming_it(dqw_file, tmp_path, what, edit, message):
    from dqwhisper.quant.export import load_exported
    from dqwhisper.utils import DQWhisperError

    bad = _damaged(dqw_file, tmp_path / "bad.dqw", edit)
    with pytest.raises(DQWhisperError, match=f"{bad}.* {message}"):
        load_exported(bad)


def test_truncated_version1_dqw_is_one_error(dqw_file, tmp_path):
    """Files written before the checksum (version 1) still load, and a truncated one is still one clear error."""
    import json
    import struct

    from dqwhisper.quant.export import ALIGN, load_exported
    from dqwhisper.utils import DQWhisperError

    raw = dqw_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[4:12])
    header = json.loads(raw[12:12 + n])
    data = raw[12 + n + (-(12 + n)) % ALIGN:]
    header.update(version=1)
    del header["data_nbytes"], header["data_sha256"]
    head = json.dumps(header).encode()
    prefix = raw[:4] + struct.pack("<Q", len(head)) + head
    prefix += b"\0" * ((-len(prefix)) % ALIGN)
    (tmp_path / "v1.dqw").write_bytes(prefix + data)
    load_exported(tmp_path / "v1.dqw")
    (tmp_path / "v1cut.dqw").write_bytes(prefix + data[:-100])
    with pytest.raises(DQWhisperError, match="v1cut.dqw is truncated: tensor"):
        load_exported(tmp_path / "v1cut.dqw")
