"""The largest batch that fits: each phase's peak as a line through two measured batch sizes."""

import pytest

from dinotrain.plan.planner import Budget, GiB, MemoryLine
from dinotrain.plan.step import StepProfile


def _profile(batch: int, forward: int, optimizer: int) -> StepProfile:
    return StepProfile(batch_size=batch, activation_checkpointing=False, peak=max(forward, optimizer),
                       peak_phase="forward", phases={"forward": forward, "optimizer step": optimizer}, parameters=0,
                       gradients=0, optimizer=0, activations=0, temporaries=0, flops=1, seconds=0.0)


def test_the_line_through_two_points_predicts_every_batch_and_the_largest_that_fits():
    # 3 GiB held at any batch, 0.25 GiB per image in the forward; the optimizer step peaks at 5 GiB
    line = MemoryLine.through(_profile(8, 5 * GiB, 5 * GiB), _profile(16, 7 * GiB, 5 * GiB))
    assert line.peak(32) == pytest.approx(11 * GiB)
    assert line.peak(4) == pytest.approx(5 * GiB)  # the optimizer step's peak dominates small batches
    usable = int(20.1 * GiB)
    largest = line.largest_batch(usable)
    assert largest == max(b for b in range(1, 1000) if line.peak(b) <= usable) == 68
    assert line.largest_batch(4 * GiB) == 0


def test_budget_keeps_a_margin_and_a_reserve():
    budget = Budget(80, margin=0.1, reserve_gb=2)
    assert budget.usable == int(70 * GiB)
    assert budget.needed(budget.usable) == pytest.approx(80)
