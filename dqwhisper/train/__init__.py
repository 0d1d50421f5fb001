"""Training: build(cfg) -> parts (build.py), the cache set (cache_set.py), checkpoints (checkpoint.py), distributed
helpers (dist.py), the loop (loop.py). `train(cfg)` runs a composed config (the Hydra entry point's body)."""

from dqwhisper.train.loop import Trainer, make_trainer, train

__all__ = ["Trainer", "make_trainer", "train"]
