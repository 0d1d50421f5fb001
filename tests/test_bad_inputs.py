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


@pytest.mark.parametrize(
    "what,edit,message",
    [
        ("truncated by 100 bytes", lambda b: b[:-100], "is truncated: .* bytes, its header says"),
        (
            "one byte flipped",
            lambda b: b[:-5000] + bytes([b[-5000] ^ 0xFF]) + b[-4999:],
            "is damaged: the data's SHA-256",
        ),
        ("bytes appended", lambda b: b + b"\0" * 64, "is damaged: .* bytes, its header says"),
        ("cut inside the header", lambda b: b[:40], "is truncated or damaged: its header says"),
    ],
)
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
    header = json.loads(raw[12 : 12 + n])
    data = raw[12 + n + (-(12 + n)) % ALIGN :]
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


# ------------------------------------------------------------------------------------------ decoding (inference.py)
from tests.test_inference import checkpoint, data_dir  # noqa: E402,F401 - module fixtures: tiny model, 4-utt set


def _copy_set(data_dir, dst, edit_text=None, wav_scp=None):
    import shutil

    shutil.copytree(data_dir, dst)
    if edit_text is not None:
        (dst / "text").write_text(edit_text((dst / "text").read_text(encoding="utf-8")), encoding="utf-8")
    if wav_scp is not None:
        (dst / "wav.scp").write_text(wav_scp((dst / "wav.scp").read_text(encoding="utf-8")), encoding="utf-8")
    return dst


def _no_model_load(monkeypatch):
    from dqwhisper import inference

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(inference, "load_model", refuse)


def _decode(checkpoint, test_set, out, *extra):
    from dqwhisper import inference

    return inference.run(
        "tiny",
        checkpoint,
        [
            f"decode.test_sets=[{test_set}]",
            f"decode.out_dir={out}",
            "decode.max_new_tokens=3",
            "decode.num_threads=1",
            *extra,
        ],
        progress=False,
    )


@pytest.mark.parametrize("empty", ["", "[noise]"])
def test_empty_reference_is_decoded_not_scored(checkpoint, data_dir, tmp_path, empty):
    import json

    # utt2 "good morning" (en) gets an empty reference, or one the normalizer empties
    ts = _copy_set(data_dir, tmp_path / "set", edit_text=lambda t: t.replace("utt2 good morning", f"utt2 {empty}"))
    [res] = _decode(checkpoint, ts, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["empty_references"] == ["utt2"] and res["empty_references"] == ["utt2"]
    assert saved["per_language"]["en"]["n_utts"] == 1 and saved["overall"]["n_utts"] == 3
    assert "utt2" in (tmp_path / "out" / "hyp.txt").read_text()
    assert "utt2" not in (tmp_path / "out" / "utt_errors.tsv").read_text()


def test_all_references_empty_is_an_error(checkpoint, data_dir, tmp_path):
    from dqwhisper.utils import DQWhisperError

    ts = _copy_set(
        data_dir, tmp_path / "set", edit_text=lambda t: "".join(line.split(" ")[0] + "\n" for line in t.splitlines())
    )
    with pytest.raises(DQWhisperError, match="all 4 reference transcripts are empty.*hypotheses are in"):
        _decode(checkpoint, ts, tmp_path / "out")
    assert len((tmp_path / "out" / "hyp.txt").read_text().splitlines()) == 4


def test_unreadable_audio_fails_before_the_model_loads(checkpoint, data_dir, tmp_path, monkeypatch):
    from dqwhisper.utils import DQWhisperError

    ts = _copy_set(data_dir, tmp_path / "set")
    (ts / "u3.wav").write_bytes(b"RIFF this is not a wav file" * 20)  # utt3, de: the last language decoded
    _no_model_load(monkeypatch)
    with pytest.raises(
        DQWhisperError,
        match=r"1 of 4 utterances cannot be read, more than decode.max_bad_fraction"
        r"=0.1: utt3: unreadable audio .*u3.wav",
    ):
        _decode(checkpoint, ts, tmp_path / "out")


def test_unreadable_audio_is_skipped_and_counted(checkpoint, data_dir, tmp_path):
    ts = _copy_set(data_dir, tmp_path / "set")
    (ts / "u3.wav").write_bytes(b"RIFF this is not a wav file" * 20)
    [res] = _decode(checkpoint, ts, tmp_path / "out", "decode.max_bad_fraction=0.25")
    assert list(res["skipped"]) == ["utt3"] and res["n_skipped"] == 1 and res["n_selected"] == 4
    assert res["overall"]["n_utts"] == 3 and "de" not in res["per_language"]
    assert "utt3" not in (tmp_path / "out" / "hyp.txt").read_text()


def test_unwritable_out_dir_fails_before_the_model_loads(checkpoint, data_dir, tmp_path, monkeypatch):
    from dqwhisper.utils import DQWhisperError

    (tmp_path / "a_file").write_text("")
    _no_model_load(monkeypatch)
    with pytest.raises(DQWhisperError, match=r"output dir .*a_file/out: cannot write there"):
        _decode(checkpoint, data_dir, tmp_path / "a_file" / "out")


@pytest.mark.parametrize("setting", ["decode.beam_size=0", "decode.batch_size=0", "decode.max_new_tokens=0"])
def test_bad_search_settings_fail_before_the_model_loads(checkpoint, data_dir, tmp_path, monkeypatch, setting):
    from dqwhisper.utils import DQWhisperError

    _no_model_load(monkeypatch)
    with pytest.raises(DQWhisperError, match=setting.replace(".", r"\.") + ": must be >= 1"):
        _decode(checkpoint, data_dir, tmp_path / "out", setting)


def test_hypotheses_decoded_before_a_failure_are_kept(checkpoint, data_dir, tmp_path):
    """A pipe that fails when decoded (utt3, the last language), with no bad utterance allowed: the run stops with
    one error, and hyp.txt holds every hypothesis decoded before it."""
    from dqwhisper.utils import DQWhisperError

    ts = _copy_set(data_dir, tmp_path / "set", wav_scp=lambda s: s.replace("utt3 u3.wav", "utt3 false |"))
    with pytest.raises(
        DQWhisperError,
        match=r"1 of 4 utterances cannot be read.*utt3: unreadable audio: wav.scp "
        r"command failed",
    ):
        _decode(checkpoint, ts, tmp_path / "out", "decode.max_bad_fraction=0")
    kept = sorted(line.split(" ")[0] for line in (tmp_path / "out" / "hyp.txt").read_text().splitlines())
    assert kept == ["utt0", "utt1", "utt2"]


def test_wav_scp_pipes_run_once_per_utterance(checkpoint, data_dir, tmp_path):
    from dqwhisper.data.validate import validate_data_dir

    log = tmp_path / "runs.log"
    ts = _copy_set(
        data_dir,
        tmp_path / "set",
        wav_scp=lambda s: "".join(
            f"{k} sh -c 'echo {k} >> {log}; cat {data_dir / v}' |\n" for k, v in (x.split() for x in s.splitlines())
        ),
    )
    _decode(checkpoint, ts, tmp_path / "out")
    assert sorted(log.read_text().split()) == ["utt0", "utt1", "utt2", "utt3"]
    log.unlink()
    assert validate_data_dir(ts, run_pipes=True).ok
    assert sorted(log.read_text().split()) == ["utt0", "utt1", "utt2", "utt3"]
