"""Length-aware, deterministic, DDP-sharded batches of utterance indices for training."""

from __future__ import annotations

from typing import Iterator

import torch

from dqwhisper.utils import DQWhisperError


def chunks_by_key(indices: list[int], keys: list, size: int) -> list[list[int]]:
    """`indices` in chunks of at most `size` whose members share one key (`keys[i]`, e.g. an encoder window under
    data.batch_window), keys in ascending order, each key's indices in their given order."""
    chunks = []
    for key in sorted({keys[i] for i in indices}):
        members = [i for i in indices if keys[i] == key]
        chunks += [members[k : k + size] for k in range(0, len(members), size)]
    return chunks


class BatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of at most `minibatch_size` utterances and, when `max_frames` is set, at most `max_frames` real-audio
    encoder frames in total (an utterance longer than the budget gets a batch of its own). Shuffling is
    deterministic: a permutation drawn from `seed + epoch` (call `set_epoch`). For DDP each rank takes every
    `world_size`-th batch; every rank gets the same number of batches (wrapping around, or dropping the tail
    with `drop_last`).

    `groups` (one key per utterance, e.g. its encoder window under data.batch_window): a batch holds utterances of
    one group only; the batches of all groups are then put in one (seeded) random order."""

    def __init__(
        self,
        lengths: list[int],
        minibatch_size: int,
        max_frames: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        groups: list | None = None,
    ):
        if minibatch_size < 1:
            raise DQWhisperError(f"minibatch_size must be >= 1, got {minibatch_size}")
        if rank is None or world_size is None:
            dist = torch.distributed
            ddp = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
            world_size = world_size if world_size is not None else (dist.get_world_size() if ddp else 1)
        if not 0 <= rank < world_size:
            raise DQWhisperError(f"rank {rank} outside world_size {world_size}")
        self.lengths = list(lengths)
        if groups is not None and len(groups) != len(self.lengths):
            raise DQWhisperError(f"{len(groups)} groups for {len(self.lengths)} utterances")
        self.groups = None if groups is None else list(groups)
        self.minibatch_size = minibatch_size
        self.max_frames = max_frames
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(len(order), generator=g).tolist()
        if self.groups is None:
            return self._pack(order)
        batches, keys = [], sorted(set(self.groups))
        for key in keys:
            batches += self._pack([i for i in order if self.groups[i] == key])
        if self.shuffle and len(keys) > 1:  # one group: the batches of no grouping, in the same order
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _pack(self, order: list[int]) -> list[list[int]]:
        batches, batch, frames = [], [], 0
        for i in order:
            n = self.lengths[i]
            over = self.max_frames is not None and batch and frames + n > self.max_frames
            if len(batch) == self.minibatch_size or over:
                batches.append(batch)
                batch, frames = [], 0
            batch.append(i)
            frames += n
        if batch:
            batches.append(batch)
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self._all_batches()
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            else:
                short = (-len(batches)) % self.world_size
                batches = batches + [batches[i % len(batches)] for i in range(short)]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())
