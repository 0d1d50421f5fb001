"""Training entry point: `python -m dqwhisper.bin.train [--config-name X] [key=value ...]` (scripts/train_ce_ctc.sh).

Thin on purpose: compose the config (conf/ + dqwhisper/config.py schemas), write the resolved copy into the
experiment dir, hand over to dqwhisper.train (set up, build the parts, run the loop).
"""
from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dqwhisper.config import register_configs
from dqwhisper.train import train
from dqwhisper.utils import DQWhisperError, atomic_write_bytes

CONF = str(Path(__file__).resolve().parents[2] / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_bytes(Path(cfg.checkpoint_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    try:
        train(cfg)
    except DQWhisperError as e:
        raise SystemExit(f"train: {e}") from None


if __name__ == "__main__":
    main()
