"""Infinite, sharded, resumable sampler defined by one global index stream.

Training is measured in iterations, not epochs, so the sampler never ends. All ranks read
interleaved positions of the same global stream; a run that consumed `k` samples in total
resumes at global position `k`, on the same or a different number of ranks, and sees exactly
the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from dinotrain.data.seeds import epoch_seed


def _check_int(name: str, value, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    return value


class InfiniteShardedSampler(Sampler[int]):
    """Endless dataset indices for one rank.

    The global stream is epoch 0's order, then epoch 1's, ...; epoch `e` is a permutation of
    ``range(dataset_size)`` drawn from a `torch.Generator` seeded from ``(seed, e)`` (the identity
    when `shuffle` is false). Rank `r` of `world_size` yields the stream's positions
    ``start + r, start + r + world_size, ...``. Pass ``start = samples consumed so far`` (summed
    over all ranks) to resume; jumping to a large `start` costs one permutation, not a replay.
    """

    def __init__(
        self,
        dataset_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ):
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer (is the dataset empty?), got {dataset_size!r}")
        self.dataset_size = dataset_size
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
        self.shuffle = bool(shuffle)
        self.start = _check_int("start", start, 0)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset indices of global epoch `epoch`, in stream order."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        while True:
            epoch, offset = divmod(position, self.dataset_size)
            chunk = self.epoch_order(epoch)[offset :: self.world_size]
            yield from chunk.tolist()
            position += len(chunk) * self.world_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset_size={self.dataset_size}, seed={self.seed}, rank={self.rank}/"
            f"{self.world_size}, shuffle={self.shuffle}, start={self.start})"
        )
