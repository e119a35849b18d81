"""MaskingGenerator: block masks with the requested size, reproducible from a seeded generator."""

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


def test_blocks_respect_minimum_size(connected_components):
    generator = MaskingGenerator((8, 12), min_num_patches=6)
    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = generator(30, rng=rng)
        assert mask.shape == (8, 12) and mask.dtype == bool
        assert all(size >= 6 for size in connected_components(mask))


def test_single_block_respects_min_and_max_size(connected_components):
    generator = MaskingGenerator(14, min_num_patches=4, max_num_patches=12)
    rng = random.Random(2)
    for _ in range(300):
        mask = np.zeros((14, 14), dtype=bool)
        added = generator._add_block(mask, 12, rng)
        rows, cols = np.nonzero(mask)
        assert 4 <= added <= 12 and added == mask.sum()
        assert mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one filled rectangle


def test_zero_request_gives_empty_mask():
    assert not MaskingGenerator(4)(0).any()
    assert not MaskingGenerator(4)().any()


def test_small_grid_can_be_masked():
    counts = [MaskingGenerator(4)(8, rng=random.Random(i)).sum() for i in range(50)]
    assert min(counts) >= 4


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
