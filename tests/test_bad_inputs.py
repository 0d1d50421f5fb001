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
