"""A real single-node SLURM for the tests in this folder (slurm/local/): started here if it is installed and
not running (and stopped at the end), used as it is if it runs; without it the tests are skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from trainruns import REPO


def _node_idle() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "idle" in out.stdout.split()


def _slurmd_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "slurmd"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _set_nice(pids: list[int], nice: int) -> None:
    for pid in pids:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError:  # not root, or the process is gone: the jobs just share the CPU evenly
            pass


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM (partition `debug`, profile `local`); skips with the reason where it cannot run."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed: run `bash slurm/local/install.sh` (root, Debian) to run these tests")
    started = False
    if not _node_idle():
        if os.geteuid() != 0:
            pytest.skip("a local SLURM is installed but not running, and starting it needs root (slurm/local/start.sh)")
        subprocess.run(["bash", str(REPO / "slurm/local/stop.sh")], capture_output=True, timeout=120)
        start = subprocess.run(["bash", str(REPO / "slurm/local/start.sh")], capture_output=True, text=True, timeout=180)
        if start.returncode != 0:
            pytest.skip(f"the local SLURM did not start: {start.stderr.strip() or start.stdout.strip()}")
        started = True
    # Beside another xdist worker the jobs must not starve: a run of the job under a 1-minute limit that spends its
    # time before the signal importing torch requeues without a step. slurmd at nice -5 (root:
    # CI and the local SLURM run as root): the job steps it starts weigh 3x a test process in the kernel's CPU share.
    slurmd = _slurmd_pids()
    before = [os.getpriority(os.PRIO_PROCESS, pid) for pid in slurmd]
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        _set_nice(slurmd, -5)
    yield "local"
    for pid, nice in zip(slurmd, before):
        _set_nice([pid], nice)
    if started:
        subprocess.run(["bash", str(REPO / "slurm/local/stop.sh")], capture_output=True, timeout=180)
