"""`dinotrain submit` against a real local SLURM: a job runs like torchrun, survives preemption and its time
limit by checkpointing and requeueing itself, and every way a job can fail reaches the submitting command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from trainruns import FAST, REPO, env, kill_tree, max_abs_diff, metrics, run_cli, teacher

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# 32 iterations of the few-second smoke run on 2 processes (~11 s of steps alone): preempted, killed or cancelled a
# few iterations in, with ~25 iterations left for the signal to arrive. Checkpoints only when stopped and at the end.
RUN = [*FAST, "optim.epochs=8", "checkpoint.period_iterations=1000"]
# The same run made endless (4000 iterations), on 1 process: what the 1-minute time limit stops, whatever the load.
ENDLESS = [*FAST, "optim.epochs=1000", "checkpoint.period_iterations=100000"]
# 32 iterations distilling a ViT student and a timm CNN (timm's 0.4M-parameter test ResNet, with BatchNorm) at once:
# 32-px crops, a ResNet's total stride; batches of 4 per process keep the job about as long as the ViT alone's at 16 px
DISTILL = [*FAST, "student.depth=2", "optim.epochs=8", "checkpoint.period_iterations=1000",
           "crops.global_crops_size=32", "crops.local_crops_size=32", "train.batch_size_per_gpu=4",
           "distillation.students={vit: {student: {arch: vit_tiny}}, cnn: {student: {arch: timm/test_resnet}}}"]


class Submission:
    """`dinotrain submit ...` running in the background; its job is cancelled if the test leaves it behind."""

    def __init__(self, args: list[str], out: Path):
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-m", "dinotrain", "submit", *args], env=env(), cwd=REPO,
                                     stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.job_id = None

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, pattern: str, what: str, timeout: float) -> re.Match:
        """Until the submitter, still following its job, has printed `pattern` (`what`, for the failure)."""
        deadline = time.time() + timeout
        while not (m := re.search(pattern, self.text())):
            assert self.proc.poll() is None, f"submit ended before {what}:\n{self.text()}"
            assert time.time() < deadline, f"no {what} after {timeout} s:\n{self.text()}"
            time.sleep(0.2)
        return m

    def wait_job_id(self, timeout: float = 60) -> str:
        if self.job_id is None:
            self.job_id = self.wait_for(r"submitted job (\d+)", "job id", timeout)[1]
        return self.job_id

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            pytest.fail(f"`dinotrain submit` still waiting after {timeout} s (a hang):\n{self.text()}")
        return rc, self.text()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        if self.job_id:
            subprocess.run(["scancel", self.job_id], capture_output=True)
            for _ in range(120):  # the next test's job must not queue behind this one
                if not subprocess.run(["squeue", "-h", "-j", self.job_id], capture_output=True, text=True).stdout.strip():
                    break
                time.sleep(0.5)


@pytest.fixture
def submissions():
    started: list[Submission] = []

    def start(args, out):
        started.append(Submission(args, out))
        return started[-1]

    yield start
    for s in started:
        s.cleanup()


def submit_args(kind: str, run_dir: Path, overrides, *flags) -> list[str]:
    config = "smoke/cpu_tiny" if kind == "train" else "smoke/distill_cpu_tiny"
    return [kind, "--cluster", "local", "--config", config, "--output-dir", str(run_dir), *flags, *overrides]


def wait_for_iteration(run_dir: Path, iteration: int, sub: Submission, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        done = metrics(run_dir)[-1]["iteration"] if (run_dir / "metrics.jsonl").is_file() and metrics(run_dir) else 0
        if done >= iteration:
            return
        assert sub.proc.poll() is None, f"submit ended before iteration {iteration}:\n{sub.text()}"
        assert time.time() < deadline, f"iteration {iteration} not reached in {timeout} s:\n{sub.text()}"
        time.sleep(0.2)


def wait_for_stops(run_dir: Path, count: int, sub: Submission, timeout: float = 300) -> None:
    """Until the run's log shows `count` checkpointed stops (each run of the job appends to one log.txt)."""
    deadline = time.time() + timeout
    log = run_dir / "log.txt"
    while len(re.findall(r"stopping at iteration \d+: ", log.read_text() if log.is_file() else "")) < count:
        assert sub.proc.poll() is None, f"submit ended before {count} stops:\n{sub.text()}"
        assert time.time() < deadline, f"not {count} stops in {timeout} s:\n{sub.text()}"
        time.sleep(0.5)


def task_pid(job_id: str, rank: int) -> int:
    """The process of one task of a job (the submitit runner with SLURM_PROCID=rank)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"submitit.core._submit" in cmdline and f"SLURM_JOB_ID={job_id}".encode() in environ
                and f"SLURM_PROCID={rank}".encode() in environ):
            return int(proc.name)
    raise AssertionError(f"no process for task {rank} of job {job_id}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run under `torchrun --nproc_per_node=2`, never interrupted."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    proc = run_cli(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run), *RUN], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def distill_reference(reference, tmp_path_factory):
    pytest.importorskip("timm")  # the CNN student
    run = tmp_path_factory.mktemp("torchrun-distill") / "run"
    proc = run_cli(["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(run), *DISTILL,
                    f"distillation.teacher={reference}"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_preempted_job_requeues_and_ends_as_torchrun(slurm_cluster, reference, submissions, tmp_path):
    """Preempted early in its first run (the signal SLURM sends before preemption), a 2-task job checkpoints,
    requeues, and its second run ends where the uninterrupted torchrun run does: same world, same metrics, same
    teacher bit for bit."""
    run = tmp_path / "run"
    sub = submissions(submit_args("train", run, RUN), tmp_path / "submit.out")
    job_id = sub.wait_job_id()
    wait_for_iteration(run, 3, sub)
    submitit.SlurmJob(run / "slurm", job_id, tasks=[0, 1])._interrupt()  # what SLURM sends before preemption
    rc, out = sub.wait()
    assert rc == 0, out
    assert re.search(r"job \d+ completed: iteration 32", out), out
    assert "2 CPU process(es)" in out
    log = (run / "log.txt").read_text()
    assert "world size 2" in log
    stops = [int(i) for i in re.findall(r"stopping at iteration (\d+): preemption", log)]
    assert len(stops) == 1 and 3 <= stops[0] < 32, log
    assert re.search(rf"requeued 1 time\(s\)\): resuming from iteration {stops[0]}\n", log), log
    ours, theirs = metrics(run), metrics(reference)
    assert [m["iteration"] for m in ours] == [m["iteration"] for m in theirs]
    for key in ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "backprop_loss"):
        assert ours[-1][key] == pytest.approx(theirs[-1][key], abs=1e-6), key
    assert max_abs_diff(teacher(run), teacher(reference)) == 0.0, "the requeued job must end where torchrun's does"
    assert sorted(p.name for p in (run / "slurm").glob("*_log.out")), "the job's stdout belongs in the run directory"


def test_time_limited_job_checkpoints_requeues_and_goes_on(slurm_cluster, submissions, tmp_path):
    """SLURM's real time limit (1 minute, its signal 10 s before) stops an endless job: it checkpoints, requeues
    itself, and its next run resumes from that checkpoint and trains on; the submitter follows it. (That a
    requeued job ends as torchrun's is the preemption test's: the stop, the checkpoint and the resume are the same
    code.) One task, so that the minute it waits for costs one core; SLURM may signal a run before its loop
    starts (up to 60 s early), which requeues without a checkpoint: wait for the first checkpointed stop."""
    run = tmp_path / "run"
    sub = submissions(submit_args("train", run, ENDLESS, "--tasks-per-node", "1", "--time", "1",
                                  "--signal-delay-s", "10"), tmp_path / "submit.out")
    sub.wait_job_id()
    wait_for_stops(run, 1, sub)
    log = (run / "log.txt").read_text()
    # the reason reads "the time limit (N s left)"; "SLURM's stop signal" where squeue could not say the time left
    stopped = int(re.search(r"stopping at iteration (\d+): (the time limit \(\d+ s left\)|SLURM's stop signal)"
                            r"[^;]*; checkpoint saved, requeueing", log)[1])
    assert stopped > 0, log
    wait_for_iteration(run, stopped + 1, sub)  # the next run resumed from the checkpoint and took a step
    log = (run / "log.txt").read_text()
    assert re.search(rf"requeued \d+ time\(s\)\): resuming from iteration {stopped}\n", log), log
    sub.wait_for(r"RUNNING, requeued \d+ time\(s\)", "requeue shown", timeout=60)  # it polls the job's state
    iterations = [m["iteration"] for m in metrics(run)]
    assert iterations == list(range(1, len(iterations) + 1)), "the resumed run goes on from the checkpoint"


def test_preempted_distillation_resumes(slurm_cluster, reference, distill_reference, submissions, tmp_path):
    """A distillation of a ViT and a timm CNN student, preempted mid-way, requeues and ends as under torchrun."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    sub = submissions(submit_args("distill", run, [*DISTILL, f"distillation.teacher={reference}"]),
                      tmp_path / "submit.out")
    job_id = sub.wait_job_id()
    wait_for_iteration(run, 4, sub)
    submitit.SlurmJob(run / "slurm", job_id, tasks=[0, 1])._interrupt()
    rc, out = sub.wait()
    assert rc == 0, out
    log = (run / "log.txt").read_text()
    assert re.search(r"stopping at iteration \d+: preemption", log) and "requeued 1 time(s)): resuming" in log, log
    done = re.search(r"completed: iteration 32(.*); run directory", out)
    assert done and re.search(r"cnn/total_loss [\d.]+", done[1]) and re.search(r"vit/total_loss [\d.]+", done[1]), out
    # both students (the CNN's export: its EMA with its BatchNorm statistics) end as torchrun's, bit for bit
    ours = torch.load(run / "students" / "vit.pth", weights_only=True)
    theirs = torch.load(distill_reference / "students" / "vit.pth", weights_only=True)
    assert max_abs_diff(ours, theirs) == 0.0
    ours, theirs = (load_file(str(r / "students" / "cnn.safetensors")) for r in (run, distill_reference))
    assert "bn1.running_var" in ours and max_abs_diff(ours, theirs) == 0.0


def test_error_inside_the_job_reaches_the_submitter(slurm_cluster, submissions, tmp_path):
    rc, out = submissions(submit_args("train", tmp_path / "run", [*FAST, "train.dataset_path=/no/such/images"]),
                          tmp_path / "submit.out").wait(timeout=120)
    assert rc == 1, out
    assert "FAILED" in out and "dataset folder does not exist: /no/such/images" in out, out
    assert "PeerFailed" not in out, "the cause, not its echo on the other rank"


def test_crash_of_one_rank_ends_the_job_and_is_reported(slurm_cluster, submissions, tmp_path):
    run = tmp_path / "run"
    sub = submissions(submit_args("train", run, RUN), tmp_path / "submit.out")
    job_id = sub.wait_job_id()
    wait_for_iteration(run, 3, sub)
    os.kill(task_pid(job_id, 1), 9)  # as the OOM killer would
    t0 = time.time()
    rc, out = sub.wait(timeout=120)
    assert rc == 1, out
    assert f"job {job_id} ended FAILED" in out and "task 1: Killed" in out, out
    assert time.time() - t0 < 60, "the other rank must not wait for the dead one until a collective times out"


def test_cancelled_job_is_reported_as_cancelled(slurm_cluster, submissions, tmp_path):
    run = tmp_path / "run"
    sub = submissions(submit_args("train", run, RUN), tmp_path / "submit.out")
    job_id = sub.wait_job_id()
    wait_for_iteration(run, 1, sub)
    subprocess.run(["scancel", job_id], check=True)
    rc, out = sub.wait(timeout=120)
    assert rc == 1, out
    assert f"job {job_id} was cancelled" in out, out


def test_slurm_refusals_are_shown(slurm_cluster, tmp_path):
    bad_partition = run_cli(["submit", *submit_args("train", tmp_path / "a", FAST, "--partition", "nosuch")], timeout=60)
    assert bad_partition.returncode == 2
    assert "sbatch refused the job" in bad_partition.stderr and "invalid partition" in bad_partition.stderr.lower()
    gpus = run_cli(["submit", *submit_args("train", tmp_path / "b", FAST, "--gpus-per-node", "1")], timeout=60)
    assert gpus.returncode == 2
    assert "partition 'debug' have no GPUs" in gpus.stderr, gpus.stderr
    assert "Traceback" not in bad_partition.stderr + gpus.stderr
