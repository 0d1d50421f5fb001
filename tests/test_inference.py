"""inference.py end to end on a tiny random checkpoint: outputs, results.json format, and its error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from dqwhisper import inference
from dqwhisper.data.kaldi import Utterance, write_data_dir
from dqwhisper.models.student import DQWhisper, save_checkpoint
from dqwhisper.utils import DQWhisperError
from tests.conftest import tiny_dims

# "tiny" widths (so MODEL=tiny agrees) but one layer each, a 2 s window and a pruned vocabulary: small and fast
TINY_STUDENT = dict(
    n_audio_state=384, n_audio_head=6, n_audio_layer=1, n_text_state=384, n_text_head=6, n_text_layer=1, n_audio_ctx=100
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    keep = list(range(200, 400)) + list(range(50257, 51865))  # some text tokens + every special token
    model = DQWhisper(tiny_dims(**TINY_STUDENT), vocab_keep=keep)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "embedding" in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    test = root / "test"
    test.mkdir()
    rng = np.random.default_rng(0)
    utts = []
    for i, (lang, text) in enumerate(
        [("en", "hello world"), ("ja", "こんにちは"), ("en", "good morning"), ("de", "guten Tag")]
    ):
        sf.write(test / f"u{i}.wav", (rng.standard_normal(8000 + 4000 * i) * 0.1).astype(np.float32), 16000)
        utts.append(Utterance(f"utt{i}", f"u{i}.wav", text, "spk", lang))  # relative to the data dir
    write_data_dir(test, utts)
    return test


def run(*args, **kw):
    return inference.run(*args, progress=False, **kw)


def test_bare_checkpoint_writes_fixed_format(checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    [res] = run(
        "tiny",
        checkpoint,
        [
            f"decode.test_sets=[{data_dir}]",
            f"decode.out_dir={out}",
            "decode.batch_size=3",
            "decode.max_new_tokens=6",
            "decode.num_threads=1",
        ],
    )
    data = json.loads((out / "results.json").read_text())
    assert set(data["per_language"]) == {"en", "ja", "de"}
    for lang, entry in data["per_language"].items():
        assert entry["metric"] == ("cer" if lang == "ja" else "wer")
        assert isinstance(entry["error"], float) and entry["error"] >= 0
    assert [data["per_language"][k]["n_utts"] for k in ("de", "en", "ja")] == [1, 2, 1]
    assert data["overall"]["n_utts"] == 4 and isinstance(data["overall"]["error"], float)
    assert isinstance(data["rtf"], float) and data["rtf"] > 0
    assert data["model"] == "tiny" and data["checkpoint"] == str(checkpoint)
    hyp = (out / "hyp.txt").read_text().splitlines()
    ref = (out / "ref.txt").read_text().splitlines()
    assert [line.split(" ")[0] for line in hyp] == [f"utt{i}" for i in range(4)]
    assert ref[1] == "utt1 こんにちは"
    for name in ("utt_errors.tsv", "alignment.txt", "summary.txt"):
        assert (out / name).stat().st_size > 0
    assert res["out_dir"] == str(out)


def test_experiment_dir_reads_its_config(checkpoint, data_dir, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copy(checkpoint, exp / "avg.pt")
    cfg = {
        "checkpoint_dir": str(exp),
        "data": {"data_dir": str(data_dir.parent), "test_sets": ["test"], "languages": ["en", "de"]},
        "decode": {"max_new_tokens": 4, "beam_size": 2},
    }
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    [res] = run("tiny", exp, ["decode.checkpoint=avg"])
    out = exp / "decode_test_avg_beam2"
    assert res["out_dir"] == str(out) and (out / "results.json").is_file()
    assert set(res["per_language"]) == {"en", "de"}  # data.languages of the experiment
    assert res["decode"]["beam_size"] == 2 and res["decode"]["max_new_tokens"] == 4


def test_shards_merge_to_the_whole(checkpoint, data_dir, tmp_path):
    """decode.sh's shards: the parts' hypotheses together are the unsharded run's."""
    common = [f"decode.test_sets=[{data_dir}]", "decode.max_new_tokens=5"]
    run("tiny", checkpoint, common + [f"decode.out_dir={tmp_path / 'all'}"])
    parts = []
    for k in (1, 2):
        run("tiny", checkpoint, common + [f"decode.out_dir={tmp_path / str(k)}", f"decode.shard={k}/2"])
        parts += (tmp_path / str(k) / "hyp.txt").read_text().splitlines()
    assert sorted(parts) == (tmp_path / "all" / "hyp.txt").read_text().splitlines()


def test_mel_padding_is_zeros_unless_asked(checkpoint, data_dir, tmp_path):
    common = [f"decode.test_sets=[{data_dir}]", "decode.max_new_tokens=3"]
    [default] = run("tiny", checkpoint, common + [f"decode.out_dir={tmp_path / 'a'}"])
    assert default["decode"]["mel_padding"] == "zeros"
    [audio] = run("tiny", checkpoint, common + [f"decode.out_dir={tmp_path / 'b'}", "decode.mel_padding=audio"])
    assert audio["decode"]["mel_padding"] == "audio"


def test_error_experiment_dir_without_config(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(DQWhisperError, match="not an experiment dir .no config.yaml"):
        run("tiny", tmp_path, [])


def test_error_experiment_dir_without_checkpoint(data_dir, tmp_path):
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"data": {"data_dir": str(data_dir.parent), "test_sets": ["test"]}})
    )
    with pytest.raises(DQWhisperError, match=r"checkpoint 'best' .*does not exist; this experiment has no checkpoint"):
        run("tiny", tmp_path, [])


def test_error_test_dir_fails_validation(checkpoint, data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    (bad / "utt2lang").unlink()
    with pytest.raises(DQWhisperError, match="utt2lang: missing"):
        run("tiny", checkpoint, [f"decode.test_sets=[{bad}]"])
    shutil.copy(data_dir / "utt2lang", bad / "utt2lang")
    (bad / "u2.wav").unlink()
    with pytest.raises(DQWhisperError, match=r"audio file .*u2.wav does not exist"):
        run("tiny", checkpoint, [f"decode.test_sets=[{bad}]"])


def test_error_model_does_not_match(checkpoint, data_dir):
    with pytest.raises(
        DQWhisperError,
        match=r"MODEL 'base' does not match checkpoint .*n_audio_state=384 "
        r"\(512 for base\).*it looks like tiny",
    ):
        run("base", checkpoint, [f"decode.test_sets=[{data_dir}]"])
    with pytest.raises(DQWhisperError, match="MODEL 'tiny.en' does not match .*n_vocab=51865"):
        run("tiny.en", checkpoint, [f"decode.test_sets=[{data_dir}]"])
    with pytest.raises(DQWhisperError, match="MODEL 'huge' is not a Whisper size"):
        run("huge", checkpoint, [f"decode.test_sets=[{data_dir}]"])


def test_model_check_accepts_a_cut_student():
    from whisper.model import ModelDimensions

    base_cut = ModelDimensions(80, 500, 512, 8, 6, 51865, 448, 512, 8, 2)  # 10 s window, 2 decoder layers
    inference.check_model_name("base", base_cut, "x.pt")
    with pytest.raises(DQWhisperError, match="n_text_layer=8 .at most 6"):
        inference.check_model_name("base", ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 8), "x.pt")


def test_error_unknown_override_and_main_exit_code(checkpoint, data_dir, capsys):
    with pytest.raises(DQWhisperError, match="unknown key 'decode.beamsize'"):
        run("tiny", checkpoint, [f"decode.test_sets=[{data_dir}]", "decode.beamsize=5"])
    with pytest.raises(DQWhisperError, match="decode.beam_size=five"):
        run("tiny", checkpoint, ["decode.beam_size=five"])
    assert inference.main(["tiny", str(checkpoint), "decode.nope=1"]) == 1
    assert "error: override 'decode.nope=1': unknown key" in capsys.readouterr().err


def test_no_test_set_for_a_bare_checkpoint(checkpoint):
    with pytest.raises(DQWhisperError, match=r"no test set: give decode.test_sets"):
        run("tiny", checkpoint, [])


def test_decode_sh_parallel_jobs_equal_one_run(checkpoint, data_dir, tmp_path):
    import subprocess

    from tests.conftest import ROOT

    common = [f"decode.test_sets=[{data_dir}]", "decode.max_new_tokens=5"]
    [single] = run("tiny", checkpoint, common + [f"decode.out_dir={tmp_path / 'one'}"])
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "decode.sh"),
            "--nj",
            "2",
            "tiny",
            str(checkpoint),
            *common,
            f"decode.out_dir={tmp_path / 'two'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (tmp_path / "two" / "hyp.txt").read_text() == (tmp_path / "one" / "hyp.txt").read_text()
    assert (tmp_path / "two" / "utt_decode.tsv").read_text() == (tmp_path / "one" / "utt_decode.tsv").read_text()
    assert merged["overall"]["fallback_reasons"] == single["overall"]["fallback_reasons"]
    assert merged["per_language"] == single["per_language"] and merged["n_jobs"] == 2
    assert merged["rtf_elapsed"] > 0 and merged["decode"]["shard"] is None
    assert sorted(p.name for p in (tmp_path / "two" / "split2").iterdir()) == ["1", "1.log", "2", "2.log"]


def test_experiment_export_checkpoint(checkpoint, data_dir, tmp_path):
    """decode.checkpoint=export decodes export/model.dqw (here a float export: same transcripts as the .pt)."""
    from dqwhisper.quant.export import export_checkpoint

    exp = tmp_path / "exp"
    export_checkpoint(checkpoint, exp / "export" / "model.dqw", float_dtype="float32")
    (exp / "config.yaml").write_text(yaml.safe_dump({"decode": {"max_new_tokens": 4}}))
    common = [f"decode.test_sets=[{data_dir}]"]
    [res] = run("tiny", exp, common + ["decode.checkpoint=export", "decode.export_mode=dequant"])
    assert res["out_dir"] == str(exp / "decode_test_export_greedy")
    [ref] = run("tiny", checkpoint, common + ["decode.max_new_tokens=4", f"decode.out_dir={tmp_path / 'pt'}"])
    assert (exp / "decode_test_export_greedy" / "hyp.txt").read_text() == (tmp_path / "pt" / "hyp.txt").read_text()


@pytest.mark.parametrize("option", ["drop_finished", "pool_fallback"])
def test_bench_decode_loop_compares_an_option(checkpoint, data_dir, tmp_path, capsys, option):
    """bench/decode_loop.py: both settings decode, the same hyp.txt (exit 0), a table with the sampled tasks that the
    fallback ran (every first hypothesis of this random model fails the logprob test), and the decoding loop as it
    was after (its counters removed)."""
    from bench import decode_loop
    from dqwhisper.decoding import search

    before = search.BatchedDecodingTask.run, search.SeededSampler.update
    args = [str(checkpoint), "--model", "tiny", "--option", option, "--data", str(data_dir), "--rounds", "2"]
    args += ["--threads", "1", "--out", str(tmp_path), "--", "decode.max_new_tokens=4", "decode.best_of=2"]
    assert decode_loop.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("round ") == 4 and "hyp.txt: the same in every run" in out
    table = [line.split("|") for line in out.splitlines() if line.startswith(("| true", "| false"))]
    assert len(table) == 2 and all(int(row[4]) > 0 for row in table)  # sampled tasks ran
    assert (search.BatchedDecodingTask.run, search.SeededSampler.update) == before
