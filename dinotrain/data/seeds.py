"""Seeds derived from integers: the one place that turns (seed, position, ...) into RNG seeds.

Every random draw of training (a sample's augmentations, an image's replacement, a batch's iBOT masks,
the permutation of an epoch, a step's dropout, a student's initialisation) is seeded from the run's seed
and where it happens, never from RNG state carried along, so resume is exact and the draws do not depend
on the number of processes or workers. These functions must never change: a new value here is a new
data order and new steps for every run.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike hash())."""
    x = _GOLDEN
    for v in values:
        x = (x ^ (int(v) + _GOLDEN + (x << 6) + (x >> 2))) & _MASK64
    return x & 0x7FFFFFFFFFFFFFFF


def _splitmix64(value: int) -> int:
    """SplitMix64 finaliser: spreads nearby integers over 64 bits."""
    value = (value + _GOLDEN) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the sample permutation of `epoch` (its own scheme: it fixed the data order before `mix_seed`)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))


def seed_step(seed: int, iteration: int, rank: int) -> None:
    """Reseed torch (drop path etc.) for one training step; needs no RNG state in checkpoints."""
    torch.manual_seed(mix_seed(seed, iteration, rank, 1))
