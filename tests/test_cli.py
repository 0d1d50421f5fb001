"""The `dqwhisper` console script: the registry, and the one wrapper that turns a DQWhisperError into one line."""

from __future__ import annotations

import pytest

from dqwhisper import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out
    assert {"train", "decode", "transcribe", "export", "export-hf", "export-ggml", "convert", "validate"} <= set(
        cli.COMMANDS
    )


def test_no_or_unknown_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n != "train"])
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_an_error_is_one_line_and_status_1(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "out.dqw")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.pt" in err[0]
