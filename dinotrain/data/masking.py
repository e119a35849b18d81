"""Block-wise patch masking (BEiT / iBOT style) for the iBOT masked-image objective.

Masking whole rectangles instead of scattered patches makes the student predict content it
cannot simply interpolate from neighbours. Randomness comes from an explicit generator
(`random.Random` or `numpy.random.Generator`) so masks are reproducible.
"""

from __future__ import annotations

import math
import os
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch

Rng = Union[random.Random, np.random.Generator]
MAX_ATTEMPTS_PER_BLOCK = 10


# --- generator-agnostic draws ------------------------------------------------------------------


def _check_rng(rng) -> Rng:
    if not isinstance(rng, (random.Random, np.random.Generator)):
        raise TypeError(f"rng must be a random.Random or numpy.random.Generator, got {type(rng).__name__}")
    return rng


def rng_uniform(rng: Rng, low: float, high: float) -> float:
    """A float drawn uniformly between `low` and `high` (either may be the larger, as in `random`)."""
    return low + (high - low) * float(rng.random())


def rng_randint(rng: Rng, low: int, high: int) -> int:
    """An integer drawn uniformly from ``[low, high]`` (both ends included)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def rng_shuffle(rng: Rng, items: list) -> None:
    """Shuffle `items` in place."""
    if isinstance(rng, np.random.Generator):
        items[:] = [items[i] for i in rng.permutation(len(items))]
    else:
        rng.shuffle(items)


class _ProcessRng:
    """A `random.Random` per process, seeded from `torch.initial_seed()`.

    A plain module-level generator would be copied into every forked DataLoader worker, which
    would then all draw the same masks. Re-seeding on first use in a process, and whenever
    torch's seed changes to a new value, mirrors what PyTorch does for the global `random` module
    in workers (seed = base_seed + worker_id), and is deterministic once the trainer has seeded
    torch.
    """

    def __init__(self):
        self._key = None
        self._rng = random.Random()

    def get(self) -> random.Random:
        key = (os.getpid(), torch.initial_seed())
        if key != self._key:
            self._key = key
            self._rng = random.Random(key[1])
        return self._rng


_PROCESS_RNG = _ProcessRng()


def default_rng() -> random.Random:
    """This process's default generator for masks (see `_ProcessRng`)."""
    return _PROCESS_RNG.get()


# --- the generator -----------------------------------------------------------------------------


class MaskingGenerator:
    """Random boolean (H, W) masks made of rectangular blocks, distributed as the official DINOv2 ones.

    ``generator(n)`` masks about `n` patches (never more). Blocks are added one at a time while
    the count is below `n`; the run stops when a block adds nothing. For each block the
    remaining budget is ``min(n - count, max_num_patches)``, and up to `MAX_ATTEMPTS_PER_BLOCK`
    tries each draw a target area uniformly between `min_num_patches` and the budget (the
    budget may be the smaller end) and an aspect ratio h/w log-uniformly from
    ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``), round h and w to whole patches,
    and place the rectangle uniformly on the grid; a try succeeds when it masks at least one new
    patch and no more new patches than the budget (blocks may overlap earlier ones; only new
    patches count). So a block may be smaller than `min_num_patches` (rounding, or a budget
    below it): that is what lets a mask reach its target exactly.

    Block size bound: blocks are strictly smaller than the grid on both sides (``h < H`` and
    ``w < W``, as in the official code) whenever the grid less one row and one column can hold a
    block of `min_num_patches` (``(H - 1) * (W - 1) >= min_num_patches``, e.g. 4x4 and larger
    with the default 4). Only otherwise (e.g. 2x2 with ``min_num_patches=2``, or a 1-patch-wide
    grid), where the strict bound would leave no room for a minimum block, may a block span the
    full height or width (``h <= H``, ``w <= W``).
    """

    def __init__(
        self,
        input_size: Union[int, Sequence[int]],
        num_masking_patches: Optional[int] = None,
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        rng: Optional[Rng] = None,
    ):
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise ValueError(f"input_size must be a positive int or a pair (H, W) of them, got {input_size!r}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.num_masking_patches = num_masking_patches
        if isinstance(min_num_patches, bool) or not isinstance(min_num_patches, int) or min_num_patches < 1:
            raise ValueError(f"min_num_patches must be a positive integer, got {min_num_patches!r}")
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches < min_num_patches:
            raise ValueError(
                f"a {height}x{width} patch grid cannot hold blocks of min_num_patches={min_num_patches} "
                f"(max_num_patches={self.max_num_patches:g}); lower min_num_patches or use larger crops / "
                "smaller patches"
            )
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect!r}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not min_aspect <= max_aspect:
            raise ValueError(
                f"need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect!r}, max_aspect={max_aspect!r}"
            )
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = None if rng is None else _check_rng(rng)
        # See the class docstring: full-side blocks only where a minimum block cannot fit otherwise.
        self.allow_full_side = (height - 1) * (width - 1) < min_num_patches

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.height}x{self.width}, blocks of {self.min_num_patches}-"
            f"{self.max_num_patches:g} patches, aspect {math.exp(self.log_aspect_ratio[0]):.3g}-"
            f"{math.exp(self.log_aspect_ratio[1]):.3g})"
        )

    def _fits(self, h: int, w: int) -> bool:
        if h < 1 or w < 1:
            return False
        if self.allow_full_side:
            return h <= self.height and w <= self.width
        return h < self.height and w < self.width

    def _add_block(self, mask: np.ndarray, budget: float, rng: Rng) -> int:
        """Try to add one block of at most `budget` new patches; returns how many it added (0: none)."""
        for _ in range(MAX_ATTEMPTS_PER_BLOCK):
            area = rng_uniform(rng, self.min_num_patches, budget)
            aspect = math.exp(rng_uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not self._fits(h, w):
                continue
            top = rng_randint(rng, 0, self.height - h)
            left = rng_randint(rng, 0, self.width - w)
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: Optional[int] = None, rng: Optional[Rng] = None) -> np.ndarray:
        """A new (H, W) bool mask with at most `num_masking_patches` True entries."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        rng = _check_rng(rng) if rng is not None else (self.rng or default_rng())
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask
