"""Shared pytest set-up: deterministic, single-threaded-friendly defaults for CPU tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def undisturbed(tmp_path_factory):
    """The few-second run (FAST + LONG: 20 iterations, a checkpoint every 5) never disturbed, 1 process: what runs
    that are stopped, killed or lose a data worker on the way must end equal to."""
    from trainruns import LONG, train

    run = tmp_path_factory.mktemp("undisturbed") / "run"
    train(run, LONG)
    return run


@pytest.fixture(scope="session")
def undisturbed_two_processes(tmp_path_factory):
    """The same under torchrun with 2 processes (its sums reduce in another order: not bitwise the 1-process run)."""
    from trainruns import LONG, train

    run = tmp_path_factory.mktemp("undisturbed2") / "run"
    train(run, LONG, nproc=2)
    return run
