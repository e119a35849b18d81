"""The crop sizes of each batch: one (global, local, Gram teacher) size tuple, or the high-res stage's mix.

DINOv3's high-resolution adaptation (official `dinov3/train/train.py`, `build_multi_resolution_data_loader_from_cfg`)
gives `crops.global_crops_size`, `crops.local_crops_size` and `crops.gram_teacher_crops_size` as lists, entry `i`
of each making size tuple `i`, and `crops.global_local_crop_pairs_ratios` the share of batches at each tuple. The
official code draws the tuple of every iteration from one generator seeded at start-up, so a resumed run draws
another sequence; here the tuple of a global batch is drawn from (seed, the batch's first sample position), like
its iBOT masks, so the sizes do not depend on the number of processes, the workers or an interruption. A single
value stands for every entry (the official code requires lists of one length; a single value there is a list of one).
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from dinotrain.data.seeds import mix_seed

_RESOLUTION_SALT = 7  # the mix_seed salt of a batch's size draw (others: 1 steps, 2-3 samples, 4 and 6 masks, 5 swaps)


@dataclass(frozen=True)
class CropSizes:
    """The sides, in pixels, of one batch's crops (gram: None when there are no Gram teacher crops)."""

    global_size: int
    local_size: int
    gram_size: Optional[int]


def crop_size_options(crops: Mapping[str, Any]) -> tuple[list[CropSizes], list[float]]:
    """The size tuples of `crops` (a config's `crops` section as plain values) and the share of batches of each.

    The config check (`config_schema._crop_size_lists`) gives the one-line errors; this repeats the ones that
    would otherwise make wrong batches silently, for callers that build crops without a checked config.
    """
    names = ("global_crops_size", "local_crops_size", "gram_teacher_crops_size", "global_local_crop_pairs_ratios")
    values = {name: crops.get(name) for name in names}
    lengths = {len(v) for v in values.values() if isinstance(v, (list, tuple))}
    if len(lengths) > 1:
        raise ValueError(f"crop size lists must have one length, got {values}")
    n = lengths.pop() if lengths else 1
    globals_, locals_, grams, ratios = (list(v) if isinstance(v, (list, tuple)) else [v] * n for v in values.values())
    if n > 1 and not isinstance(values["global_local_crop_pairs_ratios"], (list, tuple)):
        raise ValueError(f"crops.global_local_crop_pairs_ratios must list one ratio per resolution ({n})")
    ratios = [1.0] if n == 1 else [float(r) for r in ratios]
    if abs(sum(ratios) - 1.0) > 1e-6 or any(r < 0 for r in ratios):
        raise ValueError(f"crops.global_local_crop_pairs_ratios must be >= 0 and sum to 1, got {ratios}")
    options = [CropSizes(int(g), int(loc), None if gram is None else int(gram))
               for g, loc, gram in zip(globals_, locals_, grams)]
    return options, ratios


class ResolutionPlan:
    """Which size tuple each global batch uses: a pure function of (seed, the batch's first sample position).

    Global batches are `global_batch` consecutive positions of the sample stream counted from `origin`, as
    `GlobalMaskCollator` counts them, so every rank and every worker agrees on a batch and its sizes.
    """

    def __init__(self, ratios: Sequence[float], seed: int, global_batch: int, origin: int = 0):
        self.cumulative = list(itertools.accumulate(float(r) for r in ratios))
        self.seed, self.global_batch, self.origin = seed, global_batch, origin

    def batch_start(self, position: int) -> int:
        """The first sample position of the global batch that `position` belongs to."""
        return self.origin + (position - self.origin) // self.global_batch * self.global_batch

    def index_of_batch(self, batch_start: int) -> int:
        """The size tuple of the global batch that starts at `batch_start`."""
        if len(self.cumulative) == 1:
            return 0
        draw = random.Random(mix_seed(self.seed, batch_start, _RESOLUTION_SALT)).random() * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, draw), len(self.cumulative) - 1)

    def index_at(self, position: int) -> int:
        """The size tuple of the sample at `position`."""
        return self.index_of_batch(self.batch_start(position))


def nominal_global_size(size: int | Sequence[int]) -> int:
    """The model's `img_size` for `crops.global_crops_size`: the size itself, or the first of a high-res stage's
    list (a RoPE backbone takes every size as it is; a learned position embedding is interpolated to the others)."""
    return int(size[0]) if isinstance(size, Sequence) and not isinstance(size, str) else int(size)
