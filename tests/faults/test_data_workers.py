"""A DataLoader worker that dies (the out-of-memory killer, a signal) costs a restart of the loader at the same
position of the sample stream, not the run (data/loader.py `Batches`); deaths again and again stop it with one
line naming the likely cause."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dinotrain.data.loader import Batches, DataWorkersDied, worker_died
from trainruns import LONG, children, max_abs_diff, start, teacher, wait_for_iteration


def _dies_after(n_items: int, position: int, message: str):
    """An iterator like a DataLoader's whose worker dies after `n_items` batches."""
    for k in range(n_items):
        yield position + k
    raise RuntimeError(message)


KILLED = "DataLoader worker (pid 4242) is killed by signal: Killed. "
EXITED = "DataLoader worker (pid(s) 4242) exited unexpectedly"


def test_the_loader_restarts_at_the_position_of_the_step_being_fetched():
    started = []

    def make(position):
        started.append(position)
        return _dies_after(3, position, KILLED) if len(started) == 1 else iter(range(position, position + 100))

    batches = Batches(make, position=10)
    assert batches.next_step(2, 10) == [10, 11]
    # the worker dies during the second micro-batch of the step at 12: the whole step is fetched again from 12
    assert batches.next_step(2, 12) == [12, 13]
    assert started == [10, 12]


def test_repeated_deaths_stop_with_the_likely_cause():
    batches = Batches(lambda position: _dies_after(0, position, EXITED), position=0, num_workers=10, max_deaths=3)
    with pytest.raises(DataWorkersDied) as err:
        batches.next_step(1, 0)
    text = str(err.value)
    assert "died 3 times" in text and "out of memory" in text and "train.num_workers (now 10)" in text, text


def test_other_errors_are_not_taken_for_a_worker_death():
    assert worker_died(RuntimeError(KILLED)) and worker_died(RuntimeError(EXITED))
    batches = Batches(lambda position: _dies_after(0, position, "CUDA out of memory"), position=0)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        batches.next_step(1, 0)


def _workers(pid: int) -> list[int]:
    """The DataLoader workers of a training process: its forked children (same command line)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == cmdline:
                found.append(child)
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_a_restart_and_the_run_ends_bitwise_equal(undisturbed, tmp_path):
    run = tmp_path / "run"
    proc = start(run, [*LONG, "train.num_workers=2"])
    wait_for_iteration(run, 6, proc)
    deadline = time.time() + 30
    while len(_workers(proc.pid)) < 2:
        assert time.time() < deadline, "no DataLoader workers found"
        time.sleep(0.05)
    os.kill(_workers(proc.pid)[0], signal.SIGKILL)  # as the out-of-memory killer does
    assert proc.wait(timeout=180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (run / "log.txt").read_text()
    assert "killed by signal" in log or "exited unexpectedly" in log
    assert "restarting the data loader at sample" in log
    assert max_abs_diff(teacher(run), teacher(undisturbed)) == 0.0
