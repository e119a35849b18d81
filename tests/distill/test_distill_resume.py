"""Distillation with real processes: exact resume after SIGKILL, resume onto another world size, and a
resume whose teacher has other weights than the ones the run was distilled from is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinotrain.distributed.checkpoint import complete_checkpoints
from trainruns import FAST, REPO, env, free_port, max_abs_diff, metrics, run_cli, train, wait_for

pytestmark = pytest.mark.slow

K = 6  # iterations of the reference; FAST checkpoints every 3, so at K/2 and K
# As the training tests' SAME_STEPS: KoLeo over the global batch, no drop path (the distillation recipe
# already has none) and LayerScale 0.1, so a step does not depend on how the global batch is split.
SAME_STEPS = ["dino.koleo_global=true", "student.layerscale=0.1"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A few-second pretraining: its run directory is the frozen teacher."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(run, ["train.max_iterations=4"])
    return run


def distill_args(run: Path, teacher: Path, overrides=()) -> list[str]:
    return ["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(run), *FAST,
            f"distillation.teacher={teacher}", "student.depth=2", "student.drop_path_rate=0.0", *overrides]


def distill(run: Path, teacher: Path, overrides=(), nproc: int = 1) -> subprocess.CompletedProcess:
    """Distil in the foreground; fails the test (with the output) unless it exits with 0."""
    proc = run_cli(distill_args(run, teacher, overrides), nproc=nproc)
    assert proc.returncode == 0, f"distillation failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def start_distill(run: Path, teacher: Path, overrides=(), nproc: int = 1) -> subprocess.Popen:
    """Distil in the background, in a new session (kill it with os.killpg); output goes to run.log."""
    args = distill_args(run, teacher, overrides)
    if nproc == 1:
        cmd = [sys.executable, "-m", "dinotrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "dinotrain", *args]
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(str(run) + ".log", "w") as log:
        return subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def student(run: Path, name: str = "student") -> dict:
    return torch.load(run / "students" / f"{name}.pth", weights_only=True)


def _without_speed(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]



@pytest.fixture(scope="module")
def reference(teacher_run, tmp_path_factory):
    """An uninterrupted 1-process distillation of K iterations (checkpoints at K/2 and K)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    distill(run, teacher_run, [f"train.max_iterations={K}", *SAME_STEPS])
    return run


def test_exact_resume_after_sigkill(teacher_run, reference, tmp_path):
    run = tmp_path / "run"
    proc = start_distill(run, teacher_run, ["train.max_iterations=1000", *SAME_STEPS])  # killed mid-way
    try:
        wait_for(run / "checkpoints" / f"{K // 2:08d}" / "extra.json", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [int(c.name) for c in complete_checkpoints(run)] == [K // 2]
    assert not (run / "students" / "student.pth").exists()
    resumed = distill(run, teacher_run, [f"train.max_iterations={K}", *SAME_STEPS])
    out = resumed.stdout + resumed.stderr
    assert "resumed from" in out and f"(iteration {K // 2})" in out, out[-3000:]
    got = metrics(run)
    assert [r["iteration"] for r in got] == list(range(1, K + 1))
    assert _without_speed(got) == _without_speed(metrics(reference))  # bitwise-equal losses
    ref_s, run_s = student(reference), student(run)
    assert ref_s.keys() == run_s.keys()
    assert all(torch.equal(ref_s[k], run_s[k]) for k in ref_s), "student weights differ after resume"


@pytest.mark.distributed
def test_resume_two_to_one_processes(teacher_run, reference, tmp_path):
    """K/2 iterations on 2 processes (batch 4 each), then on to K on 1 process (batch 8): the same global
    batch, so every `student/total_loss` is the reference's within abs/rel 1e-5 and the final student
    (EMA backbone) within a max abs diff of 1e-5 (float reductions in another order, nothing more)."""
    run = tmp_path / "run"
    distill(run, teacher_run, [f"train.max_iterations={K // 2}", "train.batch_size_per_gpu=4", *SAME_STEPS], nproc=2)
    assert [int(c.name) for c in complete_checkpoints(run)] == [K // 2]
    distill(run, teacher_run, [f"train.max_iterations={K}", "train.batch_size_per_gpu=8", *SAME_STEPS])
    ref, got = metrics(reference), metrics(run)
    assert [r["iteration"] for r in got] == list(range(1, K + 1))
    for a, b in zip(ref, got):
        assert b["student/total_loss"] == pytest.approx(a["student/total_loss"], abs=1e-5, rel=1e-5), a["iteration"]
    assert max_abs_diff(student(reference), student(run)) < 1e-5


def test_changed_teacher_on_resume_is_refused(teacher_run, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    run = tmp_path / "run"
    distill(run, teacher, [f"train.max_iterations={K // 2}"])
    # Another teacher at the same path, with the same checkpoints (so the recorded one still exists).
    shutil.rmtree(teacher)
    train(teacher, ["train.max_iterations=4", "train.seed=1"])
    proc = run_cli(distill_args(run, teacher, [f"train.max_iterations={K}"]))
    assert proc.returncode == 2, f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "teacher changed" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [int(c.name) for c in complete_checkpoints(run)] == [K // 2]  # nothing was trained further
