"""A rank killed (SIGKILL) under `torchrun --nproc_per_node=2`: the survivor says in one line which rank was lost
and where the run resumes; with `--max-restarts=1` torchrun restarts the processes, they resume from the newest
checkpoint and the run ends bitwise equal to one never disturbed (fp32, gloo, the FAST settings cut to 6
iterations, a checkpoint every 2)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainruns import REPO, env, free_port, kill_tree, teacher, train, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN = ["train.max_iterations=6", "checkpoint.period_iterations=2"]
LOST = re.compile(r"^dinotrain train: error: rank 1 of 2 was lost after iteration (\d+) \(its process \d+ ended "
                  r"without an error of its own: killed, e\.g\. by SIGKILL or the out-of-memory killer\); (.*)$", re.M)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run under torchrun, never disturbed."""
    run = tmp_path_factory.mktemp("undisturbed") / "run"
    train(run, RUN, nproc=2)
    return run


def _torchrun(run: Path, max_restarts: int) -> tuple[subprocess.Popen, Path]:
    out = Path(str(run) + ".out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={max_restarts}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dinotrain", *train_args(run, RUN)]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=out.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, out


def _worker(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (the workers are children of the torchrun process)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker with RANK={rank}")


def _kill_rank_1_after(proc: subprocess.Popen, run: Path, iteration: int) -> float:
    """SIGKILL rank 1 once rank 0 has logged `iteration` (rank 1 is then inside the next one); returns when."""
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, "the run ended before rank 1 could be killed"
        assert time.time() < deadline, f"iteration {iteration} was not reached"
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if lines and json.loads(lines[-1])["iteration"] >= iteration:
            os.kill(_worker(proc, 1), 9)
            return time.time()
        time.sleep(0.02)


def _wait(proc: subprocess.Popen, timeout: int) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise AssertionError(f"torchrun did not end within {timeout} s")


def test_torchrun_restarts_a_killed_rank_and_the_run_ends_bitwise_equal(reference, tmp_path):
    run = tmp_path / "run"
    proc, out = _torchrun(run, max_restarts=1)
    _kill_rank_1_after(proc, run, 3)  # checkpoint 2 is complete: it was saved before iteration 3 began
    rc = _wait(proc, 240)
    log = out.read_text()
    assert rc == 0, log[-5000:]
    lines = LOST.findall(log)
    assert len(lines) == 1, log[-5000:]  # the survivor's one line, no traceback of ours
    after, resume = int(lines[0][0]), lines[0][1]
    checkpoint = re.fullmatch(r"torchrun restarts the processes \(1 restart\(s\) left\), which resume from "
                              r"checkpoint (\S+) \(iteration (\d+)\)", resume)
    assert checkpoint and after >= 3, resume
    assert f"resumed from {checkpoint[1]} " in log  # the restarted group formed and resumed by itself
    assert "Traceback" not in log.split("dinotrain train: error:")[0], log[-5000:]
    assert "got SIGTERM" not in log  # torchrun's SIGTERM to a survivor is not taken for a stop request
    ref, got = teacher(reference), teacher(run)
    assert all((ref[k] == got[k]).all() for k in ref), "the restarted run's teacher differs from the undisturbed one"


def test_with_no_restart_left_the_survivor_names_the_lost_rank_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc, out = _torchrun(run, max_restarts=0)
    killed_at = _kill_rank_1_after(proc, run, 3)
    rc = _wait(proc, 120)
    took = time.time() - killed_at
    log = out.read_text()
    assert rc != 0, log[-5000:]
    lines = LOST.findall(log)
    assert len(lines) == 1, log[-5000:]
    assert lines[0][1] == f"run the same command to resume from checkpoint {run / 'checkpoints' / '00000002'} (iteration 2)"
    assert not re.search(r'File ".*dinotrain/', log), log[-5000:]  # torchrun's own report only, none of ours
    assert "exitcode  : 2 " in log  # the survivor ended on its error, not on torchrun's SIGTERM (-15)
    assert "got SIGTERM" not in log  # torchrun's SIGTERM to a survivor is not taken for a stop request
    assert took < 20, f"{took:.0f} s from the kill to the end of torchrun"
