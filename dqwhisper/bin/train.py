"""Training entry point: `python -m dqwhisper.bin.train [--config-name X] [key=value ...]` (scripts/train_ce_ctc.sh),
or `dqwhisper train ...`.

Thin on purpose: compose the config (conf/ + dqwhisper/config.py schemas), write the resolved copy into the
experiment dir, hand over to dqwhisper.train (set up, build the parts, run the loop).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dqwhisper.config import register_configs
from dqwhisper.train import train
from dqwhisper.utils import CONF_DIR, DQWhisperError

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)  # rank 0 writes the resolved config.yaml once it holds the experiment dir
    except DQWhisperError as e:
        raise SystemExit(f"train: {e}") from None


def run(argv: list[str] | None = None) -> int:
    """`dqwhisper train [--config-name X] [key=value ...]`: Hydra reads its arguments from sys.argv."""
    sys.argv = ["dqwhisper train", *(sys.argv[1:] if argv is None else argv)]
    main()
    return 0


if __name__ == "__main__":
    main()
