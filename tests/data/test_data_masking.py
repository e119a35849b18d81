"""MaskingGenerator: block masks with the requested size, reproducible from a seeded generator."""

import math
import pickle
import random

import numpy as np
import pytest
import torch

from dinotrain.data import MaskingGenerator
from dinotrain.data.masking import default_rng


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_mean_masked_count_close_to_request_and_never_above(fraction):
    generator = MaskingGenerator(14)
    requested = int(196 * fraction)
    rng = random.Random(0)
    counts = np.array([generator(requested, rng=rng).sum() for _ in range(2000)])
    assert counts.max() <= requested
    assert abs(counts.mean() / requested - 1) < 0.03
    assert (counts == 0).sum() == 0


def test_small_request_still_mostly_filled():
    rng = random.Random(1)
    counts = np.array([MaskingGenerator(14)(20, rng=rng).sum() for _ in range(1000)])
    assert counts.max() <= 20 and counts.mean() > 0.9 * 20


def _reference_mask(height, width, target, rng, min_block=4, max_block=None, min_aspect=0.3):
    """Loop reference of the official block-masking algorithm, written from its description.

    While fewer than `target` patches are masked: the block budget is the smaller of what is left
    and `max_block`; up to 10 tries draw an area uniformly between `min_block` and the budget, an
    aspect ratio log-uniformly in [min_aspect, 1 / min_aspect], round the sides, keep only blocks
    strictly smaller than the grid on both sides, place them uniformly, and accept the first one
    whose newly masked patches number between 1 and the budget. Stop when a block adds nothing.
    """
    max_block = 0.5 * height * width if max_block is None else max_block
    grid = [[False] * width for _ in range(height)]
    count = 0
    while count < target:
        budget = min(target - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < height and w < width):
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
            new = [c for c in cells if not grid[c[0]][c[1]]]
            if 0 < len(new) <= budget:
                for i, j in new:
                    grid[i][j] = True
                added = len(new)
                break
        if added == 0:
            break
        count += added
    return count


def _collate_targets(n_tokens, n, seed):
    """Per-mask targets as the official collate draws them: int(N * U(lo, hi)) over equal-width
    bins of [0.1, 0.5] (the bins together cover the range uniformly)."""
    rng = random.Random(seed)
    edges = np.linspace(0.1, 0.5, n + 1)
    return [int(n_tokens * rng.uniform(edges[i], edges[i + 1])) for i in range(n)]


def test_masks_fill_their_budget_like_the_official_algorithm():
    """16x16 grid (224 / 14), targets drawn like the collate, block cap 0.5 * N as in train.py."""
    generator = MaskingGenerator(16, max_num_patches=128)
    targets = _collate_targets(256, 2000, seed=3)
    rng = random.Random(0)
    counts = np.array([generator(t, rng=rng).sum() for t in targets])
    targets = np.array(targets)
    assert (counts <= targets).all()
    hits = (counts == targets).mean()
    ref_rng = random.Random(1)
    ref_hits = np.mean([_reference_mask(16, 16, t, ref_rng) == t for t in targets])
    sigma = math.sqrt(2 * ref_hits * (1 - ref_hits) / len(targets))
    assert hits >= 0.85  # the official generator hits its target exactly in ~93 % of masks
    assert abs(hits - ref_hits) < 4 * sigma, (hits, ref_hits)


class _PlacementRecorder(random.Random):
    """A random.Random that records the upper end of every randint: the placement draws are
    top in [0, H - h] and left in [0, W - w], so an upper end of 0 means a block spans a full side."""

    def __init__(self, seed):
        super().__init__(seed)
        self.highs = []

    def randint(self, a, b):
        self.highs.append(b)
        return super().randint(a, b)


def test_no_block_spans_a_full_side_of_a_normal_grid():
    generator = MaskingGenerator(16, max_num_patches=128)
    assert not generator.allow_full_side
    rng = _PlacementRecorder(4)
    for t in _collate_targets(256, 500, seed=5):
        generator(t, rng=rng)
    assert len(rng.highs) > 1000 and min(rng.highs) >= 1
    # and directly: single blocks on an empty grid, budgets up to the cap, stay inside by a patch
    budgets_rng = random.Random(6)
    for _ in range(2000):
        mask = np.zeros((16, 16), dtype=bool)
        budget = budgets_rng.randint(1, 128)
        added = generator._add_block(mask, budget, budgets_rng)
        if added:
            rows, cols = np.nonzero(mask)
            assert added <= budget and mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
            assert np.ptp(rows) + 1 < 16 and np.ptp(cols) + 1 < 16


def test_single_block_is_one_rectangle_within_budget():
    generator = MaskingGenerator(14, min_num_patches=4, max_num_patches=12)
    rng = random.Random(2)
    sizes = []
    for _ in range(300):
        mask = np.zeros((14, 14), dtype=bool)
        added = generator._add_block(mask, 12, rng)
        rows, cols = np.nonzero(mask)
        assert 1 <= added <= 12 and added == mask.sum()
        assert mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one filled rectangle
        sizes.append(added)
    # the target area is uniform on [4, 12]; only rounding the sides makes a block smaller than 4
    assert min(sizes) >= 3 and np.mean(sizes) > 6


def test_block_shorter_than_min_fills_a_small_remainder():
    rng = random.Random(8)
    counts = np.array([MaskingGenerator(14)(t, rng=rng).sum() for t in (1, 2, 3) for _ in range(300)])
    assert (counts <= np.repeat([1, 2, 3], 300)).all()
    assert (counts == np.repeat([1, 2, 3], 300)).mean() > 0.7


@pytest.mark.parametrize("target", range(4, 9))
def test_small_grid_can_be_masked(target):
    """4x4 (32-px crops, 8-px patches: the smoke recipe; 16 / 4 in tests) keeps the strict bound:
    3x3 blocks fit, so masks reach their targets; an empty mask stays rare (all 10 tries fail)."""
    generator = MaskingGenerator(4, max_num_patches=8)
    assert not generator.allow_full_side
    rng = random.Random(target)
    counts = np.array([generator(target, rng=rng).sum() for _ in range(500)])
    assert counts.max() <= target
    assert (counts == 0).mean() < 0.01 and (counts == target).mean() > 0.9


@pytest.mark.parametrize("size, min_patches, max_patches", [((2, 2), 2, 2), ((1, 8), 2, 4), ((2, 3), 3, 3)])
def test_full_side_blocks_only_where_strict_bound_leaves_no_room(size, min_patches, max_patches):
    generator = MaskingGenerator(size, min_num_patches=min_patches, max_num_patches=max_patches)
    assert generator.allow_full_side  # (H - 1) * (W - 1) < min_num_patches
    rng = random.Random(9)
    counts = np.array([generator(max_patches, rng=rng).sum() for _ in range(200)])
    assert counts.max() <= max_patches and (counts > 0).mean() > 0.95


@pytest.mark.parametrize("make_rng", [lambda: random.Random(7), lambda: np.random.default_rng(7)])
def test_seeded_generator_is_reproducible(make_rng):
    generator = MaskingGenerator(14)
    first = [generator(50, rng=r) for r in [make_rng()] for _ in range(5)]
    second = [generator(50, rng=r) for r in [make_rng()] for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(first[0], m) for m in first[1:])


def test_constructor_rng_is_used_and_generator_pickles():
    generator = MaskingGenerator(14, rng=random.Random(5))
    clone = pickle.loads(pickle.dumps(generator))
    assert np.array_equal(generator(40), clone(40))


def test_default_rng_is_reseeded_when_torch_seed_changes():
    torch.manual_seed(11)
    first = MaskingGenerator(14)(40)
    torch.manual_seed(12)
    other = MaskingGenerator(14)(40)
    torch.manual_seed(11)
    assert np.array_equal(first, MaskingGenerator(14)(40))
    assert not np.array_equal(first, other)
    assert default_rng() is default_rng()


def test_defaults_match_official():
    generator = MaskingGenerator(16)
    assert generator.max_num_patches == 128 and generator.min_num_patches == 4
    assert np.allclose(np.exp(generator.log_aspect_ratio), (0.3, 1 / 0.3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": 0}, "input_size"),
        ({"input_size": 2}, "min_num_patches"),
        ({"input_size": 8, "min_num_patches": 0}, "min_num_patches"),
        ({"input_size": 8, "min_aspect": 0}, "min_aspect"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskingGenerator(**kwargs)


def test_bad_rng_type_raises():
    with pytest.raises(TypeError, match="rng"):
        MaskingGenerator(4)(4, rng=np.random.RandomState(0))
