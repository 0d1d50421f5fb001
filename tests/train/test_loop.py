"""The training loop on a tiny random Whisper and a tiny written data dir: end to end, caches, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dqwhisper.models.student import load_checkpoint, read_checkpoint
from dqwhisper.train import make_trainer, train
from dqwhisper.train.build import lr_lambda
from dqwhisper.train.cache_set import collate_training
from dqwhisper.utils import DQWhisperError
from tests.train.fixtures import tiny_config, write_data_dir, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_tiny_model(root / "teacher.pt"), write_data_dir(root / "data"), root


def losses_by_step(expdir: Path) -> dict[int, dict]:
    out = {}
    for line in (expdir / "train_losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec  # a rerun step (after resume) replaces the killed run's record
    return out


def test_end_to_end_kd_dynamic_matching(assets, tmp_path):
    teacher, data, _ = assets
    exp = tmp_path / "exp"
    summary = train(tiny_config(exp, data, teacher))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    for name in ("last.pt", "best.pt", "avg.pt", "bpe.model", "train_losses.jsonl", "dev_results.jsonl"):
        assert (exp / name).exists(), name
    assert len(list(exp.glob("step_*.pt"))) == 2  # keep_top_k of the cpu trainer config
    assert list((exp / "tensorboard").glob("events.*"))
    recs = losses_by_step(exp)
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    for r in recs.values():
        assert r["loss_kd"] > 0 and r["loss_match"] > 0 and r["loss_ctc"] > 0 and r["loss_ce"] > 0
        assert len(r["chosen"]) == 2 and r["chosen"][0] <= r["chosen"][1]
        assert r["loss"] == pytest.approx(
            0.1 * r["loss_ctc"] + 0.5 * r["loss_ce"] + 0.5 * (r["loss_kd"] + r["loss_match"]), rel=1e-4
        )
    model = load_checkpoint(exp / "avg.pt")
    assert model.dims.n_text_layer == 2 and not model.decoder.pruned and model.ctc_head is not None
    assert model.ctc_bpe is not None
    ckpt = read_checkpoint(exp / "last.pt")
    assert ckpt["step"] == 6 and "optimizer" in ckpt
    assert ckpt["dqwhisper"]["config"]["loss"]["alpha"] == 0.5  # conf/demo_student_kd_dm.yaml's, chosen on dev


def test_training_lowers_the_loss_on_a_fixed_batch(assets, tmp_path):
    teacher, data, _ = assets
    # the whole decoder trains (the demo's cut students freeze the token embedding: 0.2M trainable here)
    overrides = ["optim.warmup_steps=0", "optim.scheduler=constant", "student.freeze_embedding=false"]
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=overrides)
    tr = make_trainer(cfg)
    batch = collate_training([tr.parts.train_set[i] for i in range(4)], tr.parts.tokenizer.eot)
    first = tr.train_step([batch])["loss"]
    for _ in range(15):
        last = tr.train_step([batch])["loss"]
    assert last < 0.85 * first


def test_cached_equals_uncached(assets, tmp_path):
    teacher, data, _ = assets
    out = {}
    for cached in (True, False):
        cfg = tiny_config(
            tmp_path / f"exp{cached}",
            data,
            teacher,
            overrides=[f"trainer.cache_encoder={cached}", f"trainer.cache_teacher={cached}", "data.batch_window=null"],
        )
        tr = make_trainer(cfg)
        caches = tr.parts.caches
        assert (caches.enc is not None) == cached and (caches.teacher_logits is not None) == cached
        batch = collate_training([tr.parts.train_set[i] for i in range(4)], tr.parts.tokenizer.eot)
        assert ("enc" in batch) == cached and ("t_logits" in batch) == cached
        named, info = tr.parts.model(batch)
        out[cached] = ({k: float(v.detach()) for k, v in named.items()}, info["chosen"])
    assert out[True][1] == out[False][1]
    for k, v in out[True][0].items():
        assert v == pytest.approx(out[False][0][k], rel=1e-5, abs=1e-6), k


def test_cache_is_reused_and_keyed_by_model(assets, tmp_path):
    teacher, data, root = assets
    cfg = tiny_config(tmp_path / "a", data, teacher, overrides=[f"trainer.cache_dir={tmp_path / 'cache'}"])
    c1 = make_trainer(cfg).parts.caches
    files = sorted(p for p in (tmp_path / "cache").rglob("*.pt"))
    assert files
    stamp = {p: p.stat().st_mtime_ns for p in files}
    shared = [f"trainer.cache_dir={tmp_path / 'cache'}"]
    c2 = make_trainer(tiny_config(tmp_path / "b", data, teacher, overrides=shared)).parts.caches
    assert {p: p.stat().st_mtime_ns for p in files} == stamp  # nothing recomputed
    assert c2.enc.dir == c1.enc.dir
    other = write_tiny_model(tmp_path / "other.pt", seed=1)
    c3 = make_trainer(tiny_config(tmp_path / "c", data, other, overrides=shared)).parts.caches
    assert c3.enc.dir != c1.enc.dir and c3.teacher_logits.dir != c1.teacher_logits.dir
    # KD-only and KD + matching share the teacher's logits; features have their own cache
    c4 = make_trainer(tiny_config(tmp_path / "d", data, teacher, name="demo_student_kd", overrides=shared)).parts.caches
    assert c4.teacher_logits.dir == c1.teacher_logits.dir and c4.teacher_feats is None
    assert c1.teacher_feats is not None
    assert {p: p.stat().st_mtime_ns for p in files} == stamp


def test_teacher_adaptation_config_runs(assets, tmp_path):
    teacher, data, _ = assets
    cfg = tiny_config(
        tmp_path / "exp", data, teacher, name="demo_teacher", overrides=["trainer.max_steps=2", "trainer.valid_every=0"]
    )
    cfg.student.decoder_layers = None
    summary = train(cfg)
    assert summary["steps"] == 2
    model = load_checkpoint(tmp_path / "exp" / "best.pt")
    assert model.dims.n_text_layer == 4 and not model.decoder.pruned
    # a student cut from the adapted teacher inherits its CTC head and sentencepiece units
    cfg2 = tiny_config(tmp_path / "s", data, tmp_path / "exp" / "best.pt", overrides=["trainer.max_steps=1"])
    tr = make_trainer(cfg2)
    assert tr.parts.bpe.model_bytes == model.ctc_bpe
    assert torch.equal(tr.parts.student.ctc_head.weight.cpu(), model.ctc_head.weight)


def test_nonfinite_steps_are_skipped_then_abort(assets, tmp_path, monkeypatch):
    teacher, data, _ = assets
    cfg = tiny_config(tmp_path / "exp", data, teacher, overrides=["trainer.max_nonfinite=2"])
    tr = make_trainer(cfg)
    batch = collate_training([tr.parts.train_set[i] for i in range(2)], tr.parts.tokenizer.eot)
    before = {k: v.clone() for k, v in tr.parts.student.state_dict().items()}
    real = tr.parts.model.forward

    def poisoned(*a, **k):
        named, info = real(*a, **k)
        named["loss"] = named["loss"] * float("nan")
        return named, info

    monkeypatch.setattr(tr.parts.model, "forward", poisoned)
    assert tr.train_step([batch]) is None and tr.nonfinite == 1
    assert all(torch.equal(v, tr.parts.student.state_dict()[k]) for k, v in before.items())
    assert tr.train_step([batch]) is None
    with pytest.raises(DQWhisperError, match="non-finite"):
        tr.train_step([batch])


def test_ptq_quantizes_without_training(assets, tmp_path):
    pytest.importorskip("dqwhisper.quant.prepare")
    teacher, data, _ = assets
    cfg = tiny_config(
        tmp_path / "exp", data, teacher, name="demo_student_ce", overrides=["quant.enabled=true", "quant.ptq=true"]
    )
    summary = train(cfg)
    assert summary["steps"] == 0
    model = load_checkpoint(tmp_path / "exp" / "best.pt")
    assert model.quant_config is not None


def test_lr_schedule():
    assert lr_lambda(0, 4, 100, "linear", 0.0) == pytest.approx(0.25)
    assert lr_lambda(4, 4, 100, "linear", 0.0) == pytest.approx(1.0)
    assert lr_lambda(100, 4, 100, "linear", 0.1) == pytest.approx(0.1)
    assert lr_lambda(52, 4, 100, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_lambda(80, 4, 100, "constant", 0.0) == 1.0


# ----------------------------------------------------------------------------------------------------- resume
def _train_cmd(exp: Path, data: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dqwhisper.bin.train",
        "--config-name",
        "demo_student_kd_dm",
        f"checkpoint_dir={exp}",
        f"data.data_dir={data}",
        f"teacher.name={teacher}",
        "data.audio_window=2.0",
        "data.bpe_vocab_size=300",
        "data.collector.minibatch_size=4",
        "student.decoder_layers=[0,3]",
        f"trainer.cache_dir={exp.parent / 'cache'}",
        "trainer.progress=false",
        "trainer.device=cpu",
        "trainer.num_threads=1",
        "trainer.cache_dtype=float32",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "trainer.max_steps=12",
        "trainer.valid_every=3",
        "trainer.valid_decode=false",
        f"hydra.run.dir={exp}/hydra",
        *extra,
    ]


def test_resume_after_simulated_kill_equals_uninterrupted(assets, tmp_path):
    """In process: 12 steps straight vs stop after 5 (last.pt is from step 3), resume to 12. Exact on the CPU."""
    teacher, data, _ = assets
    ref = tmp_path / "ref"
    train(tiny_config(ref, data, teacher, overrides=["trainer.max_steps=12", "trainer.valid_every=3"]))
    run = tmp_path / "run"
    out = train(
        tiny_config(
            run,
            data,
            teacher,
            overrides=["trainer.max_steps=12", "trainer.valid_every=3", "trainer.stop_after_steps=5"],
        )
    )
    assert out.get("stopped")
    assert read_checkpoint(run / "last.pt")["step"] == 3
    train(
        tiny_config(
            run, data, teacher, overrides=["trainer.max_steps=12", "trainer.valid_every=3", "trainer.resume=true"]
        )
    )
    a, b = losses_by_step(ref), losses_by_step(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == b[step], step  # every logged value, to the 6 decimals logged
    sa, sb = read_checkpoint(ref / "last.pt"), read_checkpoint(run / "last.pt")
    for k, v in sa["model_state_dict"].items():
        assert torch.equal(v, sb["model_state_dict"][k]), k


def test_resume_after_kill_minus_9(assets, tmp_path):
    """A real SIGKILL of the training process after its step-6 checkpoint; the resumed curve equals a straight run."""
    teacher, data, _ = assets
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_train_cmd(ref, data, teacher), cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        _train_cmd(run, data, teacher, "trainer.stop_after_steps=0"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if (run / "last.pt").exists():
            try:
                step = read_checkpoint(run / "last.pt")["step"]
            except DQWhisperError:
                step = 0
            if step >= 6:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait()
    if killed_at is None or killed_at >= 12:
        pytest.skip("the run finished before it could be killed mid-way")
    subprocess.run(
        _train_cmd(run, data, teacher, "trainer.resume=true"), cwd=ROOT, env=env, check=True, capture_output=True
    )
    a, b = losses_by_step(ref), losses_by_step(run)
    assert sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in range(1, 13))


# -------------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, teacher: str, data: str, exp: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    tr = make_trainer(
        tiny_config(Path(exp), Path(data), Path(teacher), overrides=["optim.warmup_steps=0", "optim.grad_clip=0"])
    )
    items = [tr.parts.train_set[i] for i in (range(4) if world == 1 else range(2 * rank, 2 * rank + 2))]
    values = tr.train_step([collate_training(items, tr.parts.tokenizer.eot)])
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in tr.parts.student.named_parameters() if p.grad is not None}
        torch.save(
            {
                "state": tr.parts.student.state_dict(),
                "grads": grads,
                "chosen": values["chosen"],
                "ddp": isinstance(tr.model, torch.nn.parallel.DistributedDataParallel),
            },
            out,
        )
    torch.distributed.destroy_process_group() if world > 1 else None


def test_ddp_two_ranks_equal_one_rank_on_the_combined_batch(assets, tmp_path):
    """2 gloo ranks with 2 utterances each vs 1 process with the 4: same gradients and same updated weights. DDP
    wraps the DistillModel and averages the gradients (nothing syncs them by hand); no clipping, so the gradients
    themselves are compared. The utterances have different token counts (losses are normalised by the global
    count over the world size). Tolerances: gradients
    rtol 1e-4 / atol 1e-8 (float32 sums in a different order); weights atol 1e-5 = 1% of one Adam step at lr 1e-3
    (Adam's first step is about lr * sign(g), so a gradient element near 0 may differ by a fraction of a step)."""
    teacher, data, _ = assets
    make_trainer(tiny_config(tmp_path / "warm", data, teacher))  # fill the cache once
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _ddp_worker(0, 1, 0, str(teacher), str(data), str(tmp_path / "e1"), str(one))
    port = 29500 + os.getpid() % 2000
    mp.spawn(_ddp_worker, args=(2, port, str(teacher), str(data), str(tmp_path / "e2"), str(two)), nprocs=2)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["chosen"] == b["chosen"] and b["ddp"] and not a["ddp"]
    init = make_trainer(tiny_config(tmp_path / "e3", data, teacher)).parts.student.state_dict()
    moved = 0
    assert set(a["grads"]) == set(b["grads"]) and a["grads"]
    for k, g in a["grads"].items():
        torch.testing.assert_close(b["grads"][k], g, rtol=1e-4, atol=1e-8, msg=k)
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, atol=1e-5, rtol=0, msg=k)
        moved += int(not torch.equal(v, init[k]))
    assert moved > 0


# ------------------------------------------------------------------------------------------- the paper's command
@pytest.mark.parametrize("nj,alpha", [(1, "0"), (2, "0.9")])
def test_paper_command_runs(assets, tmp_path, nj, alpha):
    teacher, data, _ = assets
    exp = tmp_path / "X"
    cmd = [
        "bash",
        "scripts/train_ce_ctc.sh",
        "--nj",
        str(nj),
        "--expdir",
        str(exp),
        "--conf",
        "conf/jap_ts.yaml",
        f"checkpoint_dir={exp}",
        f"data.data_dir={data}",
        "optim.lr=3e-5",
        "data.collector.minibatch_size=20",
        f"loss.alpha={alpha}",
        # tiny-model settings
        f"teacher.name={teacher}",
        "data.audio_window=2.0",
        "data.bpe_vocab_size=300",
        "student.decoder_layers=[0,3]",
        f"trainer.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=2",
        "trainer.valid_every=1",
        "trainer.progress=false",
        "trainer.num_threads=1",
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("config.yaml", "train.log", "last.pt", "best.pt", "avg.pt"):
        assert (exp / name).exists(), name
    assert list((exp / "tensorboard").glob("events.*"))
    saved = (exp / "config.yaml").read_text()
    assert f"alpha: {alpha}" in saved and "minibatch_size: 20" in saved and "- ja" in saved
    recs = losses_by_step(exp)
    assert sorted(recs) == [1, 2]
    assert (recs[1]["loss_kd"] > 0) == (alpha != "0")
    if alpha != "0":
        tags = set()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for ev in (exp / "tensorboard").glob("events.*"):
            acc = EventAccumulator(str(ev))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert "match/teacher_layer_of_student_layer_1" in tags and "dev/error" in tags


def test_script_rejects_unknown_option_and_typo(assets, tmp_path):
    res = subprocess.run(
        ["bash", "scripts/train_ce_ctc.sh", "--njobs", "1", "--expdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "unknown option --njobs" in res.stderr
    teacher, data, _ = assets
    res = subprocess.run(
        [
            "bash",
            "scripts/train_ce_ctc.sh",
            "--expdir",
            str(tmp_path / "x"),
            "--conf",
            "conf/jap_ts.yaml",
            "loss.alpa=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert res.returncode != 0 and "loss.alpa" in res.stdout + res.stderr


def test_trainable_encoder_uncached_with_encoder_matching_and_specaugment(assets, tmp_path):
    """The GPU-style path on the CPU: the encoder trains (no encoder cache for the student), SpecAugment on,
    encoder layers matched too."""
    teacher, data, _ = assets
    cfg = tiny_config(
        tmp_path / "exp",
        data,
        teacher,
        overrides=[
            "student.freeze_encoder=false",
            "data.batch_window=null",
            "loss.match.encoder=true",
            "data.spec_augment.enabled=true",
            "data.spec_augment.time_mask_param=10",
            "trainer.max_steps=2",
            "trainer.valid_every=0",
        ],
    )
    tr = make_trainer(cfg)
    p = tr.parts
    assert p.caches.enc is None and p.train_base.spec_augment is not None and p.model.enc_adapter is not None
    before = tr.parts.student.encoder.blocks[0].mlp[0].weight.detach().clone()
    batch = collate_training([tr.parts.train_set[i] for i in range(4)], tr.parts.tokenizer.eot)
    assert "mel" in batch and "enc" not in batch
    named, info = tr.parts.model(batch)
    assert "enc_chosen" in info and len(info["enc_chosen"]) == 2
    tr.train_step([batch])
    assert not torch.equal(before, tr.parts.student.encoder.blocks[0].mlp[0].weight)
    assert tr.parts.train_base.spec_augment.time_mask_param == 10


def test_resume_with_time_masks_and_a_live_teacher_equals_uninterrupted(assets, tmp_path):
    """The demo's float students draw time masks every step: from a seed of (trainer.seed, step, micro-batch, rank),
    not the global generator the data loader also draws from, so a resumed run masks what the uninterrupted one did
    (before, every step after the resume differed)."""
    teacher, data, _ = assets
    masks = ["data.feature_mask.num_time_masks=2", "data.feature_mask.teacher=true", "trainer.cache_teacher=false"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ["trainer.max_steps=12", "trainer.valid_every=3", *masks]
    train(tiny_config(ref, data, teacher, overrides=common))
    assert train(tiny_config(run, data, teacher, overrides=[*common, "trainer.stop_after_steps=5"])).get("stopped")
    train(tiny_config(run, data, teacher, overrides=[*common, "trainer.resume=true"]))
    a, b = losses_by_step(ref), losses_by_step(run)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == b[step], step


def test_on_policy_kd_starts_at_its_step(assets, tmp_path):
    """loss.on_policy.start_step=3: the first 3 optimizer steps take KD on the labels only, the rest mix in KD on the
    student's own hypotheses (logged as loss_kd_on_policy, loss_kd the mix of both)."""
    teacher, data, _ = assets
    over = ["trainer.cache_teacher=false", "loss.on_policy.weight=0.5", "loss.on_policy.start_step=3"]
    train(tiny_config(tmp_path / "exp", data, teacher, overrides=over))
    recs = losses_by_step(tmp_path / "exp")
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    for step, r in recs.items():
        assert ("loss_kd_on_policy" in r) == (step > 3) == (r.get("n_on_policy", 0) > 0), step
        if step > 3:
            assert r["loss_kd"] == pytest.approx(0.5 * r["loss_kd_labels"] + 0.5 * r["loss_kd_on_policy"], rel=1e-4)
