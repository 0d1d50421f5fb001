import numpy as np
import pytest
import soundfile as sf

from dqwhisper.data.kaldi import DataDir, Utterance, write_data_dir
from dqwhisper.utils import DQWhisperError

from .helpers import make_data_dir, write_mp3, write_wav


def test_round_trip_sorted_relative_paths(tmp_path):
    d = make_data_dir(tmp_path, n=4)
    data = DataDir.load(d)
    assert [u.utt_id for u in data.utts] == sorted(u.utt_id for u in data.utts)
    assert data.utts[0] == Utterance("spk0-u0", "../wav/spk0-u0.wav", "hello number 0", "spk0", "en")
    audio = data.load_audio(data.utts[0])
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) == 16000
    for f in ("wav.scp", "text", "utt2spk", "utt2lang", "spk2utt"):
        lines = (d / f).read_text().splitlines()
        assert lines == sorted(lines, key=lambda s: s.split()[0].encode())
    assert (d / "spk2utt").read_text().splitlines()[0] == "spk0 spk0-u0 spk0-u2"
    # writing what was read gives the same files
    write_data_dir(tmp_path / "copy", data.utts)
    for f in ("text", "utt2spk", "utt2lang", "spk2utt"):
        assert (tmp_path / "copy" / f).read_bytes() == (d / f).read_bytes()


def test_absolute_path_pipe_and_resampling(tmp_path):
    w8k = write_wav(tmp_path / "a8k.wav", 2.0, rate=8000, freq=1000.0)
    stereo = write_wav(tmp_path / "st.wav", 0.5, rate=44100, channels=2)
    utts = [
        Utterance("a", str(w8k), "x", "s", "en"),
        Utterance("b", f"cat {w8k} |", "y", "s", "en"),
        Utterance("c", str(stereo), "z", "s", "en"),
    ]
    write_data_dir(tmp_path / "d", utts)
    data = DataDir.load(tmp_path / "d")
    a, b, c = (data.load_audio(u) for u in data.utts)
    assert len(a) == 32000 and np.array_equal(a, b)
    spectrum = np.abs(np.fft.rfft(a))
    assert abs(np.argmax(spectrum) * 16000 / len(a) - 1000.0) < 5  # the 1 kHz tone survives resampling
    assert len(c) == 8000 and c.ndim == 1
    assert data.duration(data.utts[0]) == pytest.approx(2.0)
    assert data.duration(data.utts[1]) == pytest.approx(2.0)


def test_mp3_through_torchcodec(tmp_path):
    mp3 = write_mp3(tmp_path / "clip.mp3", 1.0, rate=48000)
    write_data_dir(tmp_path / "d", [Utterance("a", str(mp3), "x", "s", "en")])
    data = DataDir.load(tmp_path / "d")
    audio = data.load_audio(data.utts[0])
    assert abs(len(audio) - 16000) < 1600  # mp3 encoder padding
    assert data.duration(data.utts[0]) == pytest.approx(1.0, abs=0.1)


def test_segments(tmp_path):
    rec = write_wav(tmp_path / "long.wav", 3.0, rate=16000)
    full = sf.read(rec, dtype="float32")[0]
    utts = [
        Utterance("r-1", str(rec), "one", "r", "ja", (0.5, 1.25)),
        Utterance("r-2", str(rec), "two", "r", "ja", (2.0, 3.0)),
        Utterance("whole", str(rec), "three", "r", "ja"),
    ]
    write_data_dir(tmp_path / "d", utts, {"rec1": str(rec)})
    seg_lines = (tmp_path / "d" / "segments").read_text().splitlines()
    assert seg_lines[0] == "r-1 rec1 0.500 1.250"
    assert seg_lines[2] == "whole whole 0.000 -1.000"
    data = DataDir.load(tmp_path / "d")
    assert data["r-1"].segment == (0.5, 1.25) and data["whole"].segment is None
    np.testing.assert_array_equal(data.load_audio(data["r-1"]), full[8000:20000])
    assert len(data.load_audio(data["whole"])) == 48000
    assert data.duration(data["r-2"]) == pytest.approx(1.0)


def test_language_filter(tmp_path):
    d = make_data_dir(tmp_path, n=2, lang="ja")
    with open(d / "utt2lang", "w") as f:
        f.write("spk0-u0 ja\nspk1-u1 en\n")
    data = DataDir.load(d)
    assert data.languages == ["en", "ja"]
    assert [u.utt_id for u in data.filter(languages=["ja"]).utts] == ["spk0-u0"]


@pytest.mark.parametrize(
    "file,content,match",
    [
        ("text", "spk0-u0 a\nspk0-u0 b\nspk1-u1 c\n", r"text:2: duplicate key 'spk0-u0'"),
        ("utt2spk", "spk0-u0\nspk1-u1 spk1\n", r"utt2spk:1: key 'spk0-u0' has no value"),
        ("utt2lang", "spk0-u0 en\n", r"utt2lang: key set differs .*spk1-u1"),
        ("segments", "spk0-u0 spk0-u0 0.0\n", r"segments:1: expected"),
        ("segments", "spk0-u0 spk0-u0 1.0 0.5\nspk1-u1 spk1-u1 0 1\n", r"segments:1: bad segment times"),
    ],
)
def test_errors_name_file_and_line(tmp_path, file, content, match):
    d = make_data_dir(tmp_path, n=2)
    (d / file).write_text(content)
    with pytest.raises(DQWhisperError, match=match):
        DataDir.load(d)


def test_missing_files_and_audio_errors(tmp_path):
    d = make_data_dir(tmp_path, n=2)
    (d / "utt2lang").unlink()
    with pytest.raises(DQWhisperError, match="utt2lang: missing"):
        DataDir.load(d)
    data = DataDir.load(d, default_lang="de")
    assert {u.lang for u in data.utts} == {"de"}
    (tmp_path / "wav" / "spk0-u0.wav").unlink()
    with pytest.raises(DQWhisperError, match="spk0-u0.wav: audio file does not exist"):
        data.load_audio(data["spk0-u0"])
    bad = Utterance("x", "false |", "t", "s", "en")
    with pytest.raises(DQWhisperError, match="command failed"):
        data.load_audio(bad)
