"""The planner against real steps (tools/bench/plan_vs_real.py): its peak within 5 % of the same step's tracked peak
on real tensors, in 1 process (fp32, no FSDP) and 2 processes (FSDP2 over gloo, bf16). The issue asks for 15 %;
measured: 1.000 and 0.999 (docs/planning.md). The process's own memory growth is reported beside it."""

import json
import subprocess
import sys

import pytest

from trainruns import REPO, env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SMALL = ["student.depth=2", "train.batch_size_per_gpu=16"]


def _compare(nproc: int, dtype: str) -> dict:
    tool = [str(REPO / "tools" / "bench" / "plan_vs_real.py"), "--config", "smoke/cpu_tiny", *SMALL,
            f"compute_precision.dtype={dtype}"]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                                                  f"--master_port={free_port()}"]
    proc = subprocess.run([*launch, *tool], env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nproc, dtype", [(1, "fp32"), (2, "bf16")], ids=["1-process-fp32", "2-processes-bf16"])
def test_planned_peak_is_the_real_peak(nproc, dtype):
    row = _compare(nproc, dtype)
    print(json.dumps(row))
    assert row["planned_over_real"] == pytest.approx(1.0, abs=0.05)
    # what the process really took from the system covers what the tracker counted
    assert row["rss_growth"] >= 0.9 * row["real_peak"]
