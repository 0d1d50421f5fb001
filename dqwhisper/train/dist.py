"""Distributed helpers (torchrun): the process group, the rank's device, barriers, sums across ranks.

Gradients are not synced here: `torch.nn.parallel.DistributedDataParallel` wraps the `DistillModel` and averages
them. What is summed by hand is forward-side: token counts (losses are normalised by the global count over the
world size, so DDP's average is exactly the gradient of the whole batch) and the matching distance matrix (every
rank chooses the same teacher layers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """torchrun's environment -> a process group (nccl on GPU, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device, dist: DistInfo) -> torch.device:
    """On GPUs each rank takes the GPU of its local rank."""
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        x = x.clone()
        torch_dist.all_reduce(x)
    return x


def wrap(model: nn.Module, dist: DistInfo, device: torch.device) -> nn.Module:
    """DDP around `model` when there are several ranks (the model itself otherwise). Buffers are not broadcast at
    every forward (they never change in training); unused parameters are allowed (e.g. a CTC head with loss.beta=0)."""
    if not dist.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
    )


def cleanup(dist: DistInfo) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
