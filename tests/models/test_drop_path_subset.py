"""Stochastic depth above rate 0.1 runs the residual branches on the kept samples only (official path)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinotrain.models.layers import Block, add_residual_on_subset


def _branch(t):
    return 2.0 * t + 1.0


def test_exactly_kept_rows_get_the_scaled_residual():
    x = torch.randn(10, 3, 4)
    out = add_residual_on_subset(x, _branch, 0.4)
    changed = [i for i in range(10) if not torch.equal(out[i], x[i])]
    assert len(changed) == 6  # int(10 * 0.6)
    for i in changed:
        torch.testing.assert_close(out[i], x[i] + _branch(x[i]) * 10 / 6)


def test_expectation_equals_the_full_residual():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    draws = 4000
    mean = sum(add_residual_on_subset(x, _branch, 0.4) for _ in range(draws)) / draws
    # per element: residual r * (8/4) with probability 4/8 -> std of the mean = |r| * 1 / sqrt(draws)
    tolerance = 5 * _branch(x).abs() / draws ** 0.5
    assert ((mean - (x + _branch(x))).abs() <= tolerance).all()


def test_batch_of_one_keeps_its_sample():
    x = torch.randn(1, 2, 3)
    torch.testing.assert_close(add_residual_on_subset(x, _branch, 0.4), x + _branch(x))


def _train_flops(block, x):
    block.train()
    with FlopCounterMode(display=False) as counter:
        block(x)
    return counter.get_total_flops()


def test_subset_path_cuts_block_flops_to_the_kept_fraction():
    x = torch.randn(10, 17, 64)
    full = _train_flops(Block(64, 2, drop_path=0.0), x)
    subset = _train_flops(Block(64, 2, drop_path=0.4), x)
    masked = _train_flops(Block(64, 2, drop_path=0.1), x)  # at or below 0.1: masking, full compute
    assert masked == full
    assert subset / full == pytest.approx(0.6, abs=0.01)


def test_eval_mode_and_list_inputs():
    torch.manual_seed(0)
    block = Block(32, 2, drop_path=0.4).eval()
    plain = Block(32, 2, drop_path=0.0).eval()
    plain.load_state_dict(block.state_dict())
    x = torch.randn(4, 5, 32)
    torch.testing.assert_close(block(x), plain(x))
    block.train()
    outs = block([torch.randn(6, 5, 32), torch.randn(4, 3, 32)])  # each crop group gets its own subset
    assert [o.shape for o in outs] == [(6, 5, 32), (4, 3, 32)]
