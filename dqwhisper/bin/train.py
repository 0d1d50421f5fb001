"""Training entry point: `python -m dqwhisper.bin.train [--config-name X] [key=value ...]` (scripts/train_ce_ctc.sh).

Thin on purpose: compose the config (conf/ + dqwhisper/config.py schemas), write the resolved copy into the
experiment dir, hand over to dqwhisper.train (set up, build the parts, run the loop).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from dqwhisper.config import register_configs
from dqwhisper.train import train
from dqwhisper.utils import DQWhisperError

CONF = str(Path(__file__).resolve().parents[2] / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)  # rank 0 writes the resolved config.yaml once it holds the experiment dir
    except DQWhisperError as e:
        raise SystemExit(f"train: {e}") from None


if __name__ == "__main__":
    main()
