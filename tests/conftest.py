"""Shared pytest set-up: deterministic, single-threaded-friendly defaults for CPU tests, and the order in which
pytest-xdist hands test files to its workers (pytest.ini: one worker per core, whole files per worker)."""

import os

import pytest
import torch

# The files that take minutes, longest first (measured 2026-12-06 on 2 cores, BENCHMARKS.md "Test suite"). xdist
# gives each worker whole files in collection order (`--dist loadfile --no-loadscope-reorder`): started first,
# they run beside the many short files instead of alone at the end.
LONGEST_FIRST = [
    "tests/e2e/test_learns.py",
    "tests/slurm/test_submit_jobs.py",
    "tests/distributed/test_fsdp_training.py",
    "tests/faults/test_stop_signals.py",
    "tests/train/test_compiled.py",
    "tests/faults/test_resume_faults.py",
    "tests/e2e/test_train_cpu.py",
    "tests/distill/test_distill_resume.py",
    "tests/distributed/test_lost_rank.py",
    "tests/distill/test_distill.py",
    "tests/distributed/test_dinov3_resume_world_size.py",
    "tests/eval/test_supervised_reference.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    """Under xdist, the cores are shared among the workers: torch in each worker (and the runs it starts, through
    trainruns.threads()) uses its share, not every core (oversubscribed OpenMP threads spin and slow both)."""
    from trainruns import threads

    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        torch.set_num_threads(threads())


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
