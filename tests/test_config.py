"""Every config in conf/ composes against the schema; typos fail; each composes into a model build (tiny dims)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dqwhisper.config import TrainConfig, register_configs, validate
from dqwhisper.utils import DQWhisperError

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = sorted((d.name, p.stem) for d in CONF.iterdir() if d.is_dir() for p in d.glob("*.yaml"))


def compose_cfg(name="config", overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_found_configs():
    assert {"config", "jap_ts", "demo_teacher", "demo_student_ce", "demo_student_kd_dm"} <= set(PRIMARY)
    assert ("quant", "none") in GROUPS and ("loss", "kd_match") in GROUPS


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes_and_validates(name):
    cfg = compose_cfg(name)
    validate(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)


@pytest.mark.parametrize("group,option", GROUPS)
def test_group_option_composes(group, option):
    cfg = compose_cfg("config", [f"{group}={option}"])
    if group == "teacher" and option == "none":
        cfg.student.init = "pretrained"
        cfg.student.name = "tiny"
    validate(cfg)


def test_paper_command_keys():
    cfg = compose_cfg(
        "jap_ts",
        [
            "checkpoint_dir=exp/X",
            "data.data_dir=data/demo",
            "optim.lr=3e-5",
            "data.collector.minibatch_size=20",
            "loss.alpha=0",
        ],
    )
    assert cfg.checkpoint_dir == "exp/X" and cfg.optim.lr == 3e-5 and cfg.loss.alpha == 0
    assert cfg.data.collector.minibatch_size == 20 and cfg.data.languages == ["ja"]
    assert cfg.loss.match.mode == "dynamic_limit"


@pytest.mark.parametrize("bad", ["loss.alpa=0", "data.collector.minibatchsize=3", "optim.learning_rate=1"])
def test_typo_is_an_error(bad):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("jap_ts", [bad])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("config", ["optim.lr=fast"])


@pytest.mark.parametrize(
    "bad", ["loss.match.mode=dynamic", "loss.alpha=1.5", "student.init=grow", "student.dropout=1.0"]
)
def test_bad_values_rejected(bad):
    with pytest.raises(DQWhisperError):
        validate(compose_cfg("config", [bad]))


def test_the_demo_qat_student_keeps_its_ptq_start_for_run_sh():
    """run.sh's student_ptq4 is the 4-bit QAT run's start.pt: the demo's QAT config must write it."""
    cfg = compose_cfg("demo_student_kd_dm_q4", [])
    assert cfg.trainer.save_start and cfg.quant.enabled
    assert not compose_cfg("demo_student_kd_dm", []).trainer.save_start
