"""`launch/job.py`, what a SLURM task unpickles: light to import (until submitit installs its USR2 handler, a USR2
kills the task), and why a job was signalled, as its log says: the time limit when the signal falls within SLURM's
60-s slack of `signal_delay_s` before the limit, otherwise preemption (or a signal sent by hand)."""

import subprocess
import sys

import pytest

from dinotrain.launch import job


@pytest.mark.parametrize("left, expected", [
    (25.0, "the time limit (25 s left)"),
    (90.0, "the time limit (90 s left)"),  # signal_delay_s 30 + SLURM's slack of up to 60 s
    (91.0, "preemption or a signal sent to the job (91 s before the time limit)"),
    (3600.0, "preemption or a signal sent to the job (3600 s before the time limit)"),
    (None, "SLURM's stop signal (preemption or time limit)"),
])
def test_stop_reason_tells_the_time_limit_from_preemption(monkeypatch, left, expected):
    monkeypatch.setattr(job, "_time_left_s", lambda: left)
    assert job.stop_reason(30) == expected


def test_squeue_durations_parse():
    assert job.parse_slurm_duration("1-02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert job.parse_slurm_duration("0:45") == 45
    assert job.parse_slurm_duration("UNLIMITED") is None
    assert job.parse_slurm_duration("INVALID") is None


def test_the_job_module_imports_without_torch():
    """A task unpickles `SlurmRun` before submitit handles USR2: with torch imported there (~3 s, more on a busy node)
    a time-limit or preemption signal during start-up killed the job (exit 140) instead of requeueing it."""
    code = "import sys, dinotrain.launch.job; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"dinotrain.launch.job imports {out}"
