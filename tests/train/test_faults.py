"""Bad inputs and faults around a training run (docs/bad_inputs.md): the experiment-dir lock, existing experiments,
resume without a checkpoint, the model's own tokenizer (*.en, 128 mels / 51866 ids), teacher/student compatibility,
last.pt between validations, logs without repeated steps after resume, one-line errors of train_ce_ctc.sh, and a
fault-injection run (random kill -9s, some inside a checkpoint write) that ends bit-identical to an uninterrupted
one."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dqwhisper.models.student import read_checkpoint
from dqwhisper.train import make_trainer, train
from dqwhisper.utils import DQWhisperError
from tests.train.fixtures import tiny_config, write_data_dir, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
FAST = ["trainer.valid_decode=false", "trainer.tensorboard=false"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_tiny_model(root / "teacher.pt"), write_data_dir(root / "data"), root


def steps_logged(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ the experiment dir
def test_locked_dir_refuses_a_second_run_naming_the_holder(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "exp"
    exp.mkdir()
    with open(exp / ".lock", "w") as held:  # what a running training holds
        held.write("pid 4242 on host elsewhere since 2026-11-30 12:00:00\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(
            DQWhisperError,
            match=rf"{exp} is in use by another training \(pid 4242 on host "
            r"elsewhere since 2026-11-30 12:00:00\): wait for it to end",
        ):
            train(tiny_config(exp, data, teacher))
    assert not (exp / "config.yaml").exists()  # the refused run wrote nothing


def test_existing_experiment_needs_resume_or_overwrite(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "exp"
    train(
        tiny_config(
            exp, data, teacher, overrides=FAST + ["trainer.max_steps=2", "trainer.valid_every=1", "trainer.seed=1"]
        )
    )
    old_steps = {p.name for p in exp.glob("step_*.pt")}
    assert old_steps
    with pytest.raises(
        DQWhisperError,
        match=rf"{exp} already holds an experiment \(.*\): continue it with "
        r"trainer.resume=true, replace it with trainer.overwrite=true",
    ):
        train(tiny_config(exp, data, teacher, overrides=FAST))
    # overwrite: nothing of the first run survives into the second (no avg.pt mixing both runs' step files)
    train(
        tiny_config(
            exp,
            data,
            teacher,
            overrides=FAST + ["trainer.overwrite=true", "trainer.max_steps=3", "trainer.valid_every=3"],
        )
    )
    ckpt = read_checkpoint(exp / "avg.pt")
    assert ckpt["averaged"] == ["step_3.pt"]
    assert {p.name for p in exp.glob("step_*.pt")} == {"step_3.pt"}
    assert read_checkpoint(exp / "best.pt")["dqwhisper"]["config"]["trainer"]["max_steps"] == 3
    assert steps_logged(exp / "train_losses.jsonl") == [1, 2, 3]


def test_resume_without_last_pt_says_so(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "exp"
    with pytest.raises(
        DQWhisperError,
        match=rf"trainer.resume=true but {exp}/last.pt does not exist: nothing to "
        "resume",
    ):
        train(tiny_config(exp, data, teacher, overrides=["trainer.resume=true"]))


# ------------------------------------------------------------------------- last.pt between validations, logs
def test_periodic_last_pt_and_no_repeated_log_steps_after_resume(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "exp"
    common = FAST + ["trainer.max_steps=8", "trainer.valid_every=0", "trainer.save_every_steps=2"]
    out = train(tiny_config(exp, data, teacher, overrides=common + ["trainer.stop_after_steps=5"]))
    assert out["stopped"] and read_checkpoint(exp / "last.pt")["step"] == 4  # no validation ran before the stop
    assert steps_logged(exp / "train_losses.jsonl") == [1, 2, 3, 4, 5]
    (exp / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # what a kill inside torch.save leaves
    train(tiny_config(exp, data, teacher, overrides=common + ["trainer.resume=true"]))
    assert steps_logged(exp / "train_losses.jsonl") == list(range(1, 9))
    assert steps_logged(exp / "dev_results.jsonl") == [8]
    assert not list(exp.glob("*.tmp")) and not list(exp.glob(".*.tmp"))


# ---------------------------------------------------------------------------- the model's own tokenizer, mels
def test_english_only_source_trains_with_its_own_tokenizer(assets, tmp_path):
    """tiny.en's layout (51864 ids, no language tokens): prompts are [sot, notimestamps] of the GPT-2 vocabulary."""
    _, data, root = assets
    en = write_tiny_model(root / "tiny_en.pt", n_vocab=51864)
    tr = make_trainer(
        tiny_config(
            tmp_path / "exp", data, en, name="demo_student_ce", overrides=["data.languages=[en]", "trainer.max_steps=1"]
        )
    )
    tok = tr.parts.tokenizer
    assert (tok.sot, tok.eot, tok.no_timestamps) == (50257, 50256, 50362)
    _, tokens, _, _ = tr.parts.train_base.items[0]
    assert tokens[:2] == [50257, 50362] and tokens[-1] == 50256
    batch = next(iter(tr.loader(tr.parts.train_set, [[0, 1]])))
    # notimestamps is the only prompt target masked; the first text token is learnt (no language / task prompt)
    assert (batch["targets"][:, 0] == -100).all() and (batch["targets"][:, 1] == batch["tokens_in"][:, 2]).all()
    assert (batch["targets"][:, 1] != -100).all()
    assert tr.train_step([batch]) is not None


def test_english_only_source_refuses_other_languages_at_set_up(assets, tmp_path):
    _, data, root = assets
    en = write_tiny_model(root / "tiny_en.pt", n_vocab=51864)
    with pytest.raises(
        DQWhisperError,
        match=r"tiny_en.pt is an English-only model .* has languages \['ja'\]: set "
        r"data.languages=\[en\]",
    ):
        make_trainer(tiny_config(tmp_path / "exp", data, en, name="demo_student_ce"))


def test_large_v3_layout_128_mels_51866_ids(assets, tmp_path):
    _, data, root = assets
    v3 = write_tiny_model(root / "tiny_v3.pt", n_mels=128, n_vocab=51866)
    tr = make_trainer(
        tiny_config(
            tmp_path / "exp",
            data,
            v3,
            name="demo_student_ce",
            overrides=["trainer.cache_encoder=false", "data.batch_window=null", "trainer.max_steps=1"],
        )
    )
    tok = tr.parts.tokenizer
    assert tok.transcribe == 50360 and tok.no_timestamps == 50364  # large-v3's ids (one language more than base)
    item = tr.parts.train_set[0]
    assert item["mel"].shape[0] == 128 and item["tokens"][2:4] == [50360, 50364]
    assert tr.train_step([next(iter(tr.loader(tr.parts.train_set, [[0, 1]])))]) is not None


@pytest.mark.parametrize(
    "dims,message",
    [
        (
            dict(n_mels=128, n_vocab=51866),
            r"the teacher takes 128-bin log-mels, the student 80; the teacher's vocabulary "
            r"has 51866 ids \(multilingual, 100 languages\), the student's 51865",
        ),
        (dict(n_vocab=51864), r"the teacher's vocabulary has 51864 ids \(English-only\)"),
    ],
)
def test_incompatible_teacher_is_refused_at_set_up(assets, tmp_path, dims, message):
    teacher, data, root = assets
    other = write_tiny_model(root / "other_teacher.pt", **dims)
    cfg = tiny_config(tmp_path / "exp", data, other, overrides=[f"student.name={teacher}"])
    with pytest.raises(DQWhisperError, match=rf"teacher {other} cannot teach a student cut from {teacher}: {message}"):
        make_trainer(cfg)


# ------------------------------------------------------------------------------------------ train_ce_ctc.sh
def _paper_cmd(exp: Path, data: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "bash",
        "scripts/train_ce_ctc.sh",
        "--nj",
        "1",
        "--expdir",
        str(exp),
        "--conf",
        "conf/jap_ts.yaml",
        f"data.data_dir={data}",
        f"teacher.name={teacher}",
        "data.audio_window=2.0",
        "data.bpe_vocab_size=300",
        "student.decoder_layers=[0,3]",
        f"trainer.cache_dir={exp.parent / 'cache'}",
        "trainer.progress=false",
        "trainer.num_threads=1",
        *extra,
    ]


def test_second_train_ce_ctc_into_a_running_experiment_exits_at_once(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "X"
    env = {**os.environ, "PYTHON": sys.executable}
    first = subprocess.Popen(
        _paper_cmd(exp, data, teacher, "trainer.max_steps=100000"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "pid" not in ((exp / ".lock").read_text() if (exp / ".lock").exists() else ""):
            time.sleep(0.05)
        assert first.poll() is None, "the first training ended early"
        t0 = time.time()
        second = subprocess.run(
            _paper_cmd(exp, data, teacher, "trainer.max_steps=1"),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        took = time.time() - t0
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode != 0 and took < 5, (second.returncode, took)
    [line] = second.stderr.strip().splitlines()
    assert f"{exp} is in use by another training (pid {first.pid} on host " in line


def test_train_ce_ctc_error_is_one_line(assets, tmp_path):
    """A training error under torchrun reaches the user as its one line, last, without torchrun's traceback."""
    teacher, data, _ = assets
    exp = tmp_path / "X"
    res = subprocess.run(
        _paper_cmd(exp, data, tmp_path / "no_such_teacher.pt"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert res.returncode == 1
    out = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert out[-1] == f"train: model {tmp_path / 'no_such_teacher.pt'} does not exist", out[-5:]
    assert not any("Traceback" in line or "ChildFailedError" in line for line in out), out


# ------------------------------------------------------------------------------------------- fault injection
FAULT_RUN = FAST + [
    "trainer.max_steps=40",
    "trainer.valid_every=6",
    "trainer.save_every_steps=1",
    "trainer.save_every_minutes=0",
    "trainer.keep_top_k=2",
]


def _child_main() -> None:
    """A training process for the fault test: argv = expdir data teacher kill_in_save [overrides...]. With
    kill_in_save = k > 0 it SIGKILLs itself inside its k-th checkpoint write, after half of the temp file."""
    expdir, data, teacher, kill_in_save, *extra = sys.argv[1:]
    k = int(kill_in_save)
    if k > 0:
        real_save, calls = torch.save, [0]

        def save(obj, f, *a, **kw):
            calls[0] += 1
            real_save(obj, f, *a, **kw)
            if calls[0] == k:
                os.truncate(f, os.path.getsize(f) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
    train(tiny_config(Path(expdir), Path(data), Path(teacher), overrides=FAULT_RUN + extra))


def _start(exp: Path, data: Path, teacher: Path, kill_in_save: int = 0) -> subprocess.Popen:
    extra = (
        ["trainer.resume=true"] if (exp / "last.pt").exists() else (["trainer.overwrite=true"] if exp.exists() else [])
    )  # run.sh's rule for a rerun
    code = "import sys; from tests.train.test_faults import _child_main; _child_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(exp), str(data), str(teacher), str(kill_in_save), *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _n_logged(exp: Path) -> int:
    path = exp / "train_losses.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_random_kill_minus_9_and_resume_end_bit_identical(assets, tmp_path):
    """12 kill -9s at random points of a 40-step run (a third of them inside a checkpoint write, leaving half a temp
    file), each followed by a resume: the final weights (last.pt, best.pt, avg.pt) equal an uninterrupted run's bit
    for bit, every step is logged once with the same values, and no temp file is left."""
    teacher, data, _ = assets
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = _start(ref, data, teacher)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    rng = random.Random(13)
    kills = in_write = 0
    for i in range(12):
        if i % 3 == 1:  # inside the 1st-3rd checkpoint write of this process
            proc = _start(run, data, teacher, kill_in_save=rng.randint(1, 3))
            proc.wait(timeout=600)
            in_write += proc.returncode == -signal.SIGKILL
        else:  # at a random moment once this process has trained one or two steps (counted, not timed: a fast
            # machine must not finish the run before the 12 kills)
            start, steps = _n_logged(run), rng.randint(1, 2)
            proc = _start(run, data, teacher)
            deadline = time.time() + 300
            while proc.poll() is None and _n_logged(run) < start + steps and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
        if proc.returncode == 0:
            break
    assert kills >= 10 and in_write >= 3, (kills, in_write)
    if proc.returncode != 0:
        proc = _start(run, data, teacher)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    for name in ("last.pt", "best.pt", "avg.pt"):
        a, b = read_checkpoint(ref / name), read_checkpoint(run / name)
        assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
        for k, v in a["model_state_dict"].items():
            assert torch.equal(v, b["model_state_dict"][k]), (name, k)
    assert (ref / "train_losses.jsonl").read_text() == (run / "train_losses.jsonl").read_text()
    assert steps_logged(run / "train_losses.jsonl") == list(range(1, 41))
    assert (ref / "dev_results.jsonl").read_text() == (run / "dev_results.jsonl").read_text()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_last_pt_by_time_and_a_failed_set_up_leaves_no_experiment(assets, tmp_path):
    """save_every_minutes writes last.pt between validations; a run that failed at set-up (config.yaml, no
    checkpoint) does not make the next run need trainer.overwrite."""
    teacher, data, root = assets
    exp = tmp_path / "exp"
    with pytest.raises(DQWhisperError, match="does not exist"):
        train(tiny_config(exp, data, root / "missing_teacher.pt", overrides=FAST))
    assert (exp / "config.yaml").exists()
    common = FAST + ["trainer.max_steps=8", "trainer.valid_every=0", "trainer.save_every_minutes=1e-9"]
    out = train(tiny_config(exp, data, teacher, overrides=common + ["trainer.stop_after_steps=3"]))
    assert out["stopped"] and read_checkpoint(exp / "last.pt")["step"] == 3


def test_cache_drops_temp_files_of_killed_runs(tmp_path):
    """A kill while filling the shared feature cache leaves `.<key>.pt.*.tmp`; the next open removes it once it is
    old enough not to be another experiment's write in progress."""
    from dqwhisper.cache import STALE_TEMP_SECONDS, FeatureCache

    sub = tmp_path / "encoder" / "k" / "ab"
    sub.mkdir(parents=True)
    old, fresh = sub / ".abcd.pt.x1.tmp", sub / ".abce.pt.x2.tmp"
    for p in (old, fresh):
        p.write_bytes(b"half")
    os.utime(old, (time.time() - STALE_TEMP_SECONDS - 60,) * 2)
    FeatureCache(tmp_path / "encoder", "k")
    assert not old.exists() and fresh.exists()
