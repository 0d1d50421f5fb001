import pytest

from dqwhisper.data.validate import main, validate_data_dir

from .helpers import make_data_dir


def test_valid_dir(tmp_path, capsys):
    d = make_data_dir(tmp_path, n=4)
    r = validate_data_dir(d)
    assert r.ok, r.errors
    assert r.n_utts == 4 and r.seconds == pytest.approx(1.0 + 1.1 + 1.2 + 1.3)
    assert main([str(d)]) == 0
    assert "OK (4 utterances" in capsys.readouterr().out


def _break(d, file, content):
    (d / file).write_text(content)


@pytest.mark.parametrize(
    "file,content,message",
    [
        ("text", "spk1-u1 b\nspk0-u0 a\n", "text:2: not sorted"),
        ("text", "spk0-u0 a\nspk0-u0 a\nspk1-u1 b\n", "text:2: duplicate key"),
        ("text", "spk0-u0 a\n", "wav.scp: 1 key(s) not in text"),
        ("text", "spk0-u0\nspk1-u1 b\n", "'spk0-u0': empty transcript"),
        ("text", "spk0-u0 " + "word " * 500 + "\nspk1-u1 b\n", "'spk0-u0': transcript too long"),
        ("utt2lang", "spk0-u0 xx\nspk1-u1 en\n", "unknown language code 'xx'"),
        ("utt2spk", "spk0-u0 spk0 extra\nspk1-u1 spk1\n", "utt2spk:1: expected 2 fields"),
        ("spk2utt", "spk0 spk0-u0 spk1-u1\n", "spk2utt: does not match utt2spk"),
        ("wav.scp", "spk0-u0 ../wav/nothere.wav\nspk1-u1 ../wav/spk1-u1.wav\n", "audio file missing"),
        ("wav.scp", "spk0-u0 ../wav/garbage.wav\nspk1-u1 ../wav/spk1-u1.wav\n", "unreadable audio"),
        ("segments", "spk0-u0 spk0-u0 0 5.0\nspk1-u1 spk1-u1 0 -1\n", "ends at 5.0 s"),
        ("segments", "spk0-u0 nosuchrec 0 0.5\nspk1-u1 spk1-u1 0 -1\n", "refers to recording 'nosuchrec'"),
    ],
)
def test_errors(tmp_path, capsys, file, content, message):
    d = make_data_dir(tmp_path, n=2)
    (tmp_path / "wav" / "garbage.wav").write_bytes(b"RIFF not really a wav file at all" * 10)
    _break(d, file, content)
    r = validate_data_dir(d)
    assert not r.ok
    assert any(message in e for e in r.errors), r.errors
    assert main([str(d)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and message in captured.err


def test_missing_file_and_warnings(tmp_path):
    d = make_data_dir(tmp_path, n=2, seconds=2.0)
    r = validate_data_dir(d, max_seconds=1.5)
    assert r.ok and any("longer than 1.5 s" in w for w in r.warnings)
    (d / "wav.scp").write_text("spk0-u0 cat ../wav/spk0-u0.wav |\nspk1-u1 ../wav/spk1-u1.wav\n")
    r = validate_data_dir(d)
    assert r.ok and any("pipe command(s) not run" in w for w in r.warnings)
    (d / "utt2lang").unlink()
    r = validate_data_dir(d)
    assert any("utt2lang: missing" in e for e in r.errors)
