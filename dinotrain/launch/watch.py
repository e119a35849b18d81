"""Follow a submitted job until it ends and say how it ended: result, error text, cancelled, time limit.

submitit reads job states from `sacct`, which fails on clusters without accounting: a job that died
without writing its result would look pending forever. The state here comes from `scontrol show job`
(the controller's own view, also of jobs that ended within `MinJobAge`) and falls back to `sacct` for
jobs the controller has forgotten; the outcome from the tasks' result files and, when a task wrote none
(killed, crashed hard), from the tail of its stderr.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from submitit.core.utils import pickle_load

from dinotrain.distributed.checkpoint import complete_checkpoints
from dinotrain.train.rundir import RunDir

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


class JobFailed(RuntimeError):
    """The job ended without completing; the message holds SLURM's state and the job's own error text."""


@dataclass
class JobState:
    state: str  # SLURM's JobState (RUNNING, PENDING, COMPLETED, ...), UNKNOWN if nobody knows the job
    reason: str = ""
    restarts: int = 0
    exit_code: str = ""
    fields: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o` output (one line of `Key=Value`) as a dict."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def query_state(job_id: str) -> JobState:
    """The job's state from scontrol, else sacct, else UNKNOWN."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and "JobState=" in out.stdout:
            f = parse_scontrol(out.stdout.splitlines()[0])
            return JobState(f.get("JobState", "UNKNOWN").split("+")[0], f.get("Reason", ""),
                            int(f.get("Restarts", "0") or 0), f.get("ExitCode", ""), f)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
                             capture_output=True, text=True, timeout=60)
        line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        if line:
            state, _, code = line.partition("|")
            return JobState(state.split()[0], exit_code=code)
    except (OSError, subprocess.SubprocessError):
        pass
    return JobState("UNKNOWN")


def task_outcome(job, task: int) -> tuple[str, object] | None:
    """("success", result) or ("error", traceback text) of one task, None if it wrote no result file."""
    path = job.task(task).paths.result_pickle
    if not path.exists():
        return None
    try:
        return pickle_load(path)
    except Exception as exc:  # a half-written file of a task killed while writing it
        return ("error", f"unreadable result file {path}: {exc}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _srun_task_errors(job) -> list[str]:
    """srun's own lines about tasks that ended badly (`srun: error: node: task 1: Killed`), from the job's stderr."""
    found = []
    for line in _tail(job.paths.stderr.with_name(job.paths.stderr.name.replace("%t", "0")), 200).splitlines():
        m = re.search(r"srun: error: \S+: (tasks? [\d,\-]+: .+)$", line.strip())
        if m and m.group(1) not in found:
            found.append(m.group(1))
    return found


def _error_summary(trace: str) -> str:
    """The last line of a traceback: the exception and its message."""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else trace.strip()


def failure_message(job, state: JobState, run_dir: Path) -> str:
    """Why the job ended without completing, in the job's own words where it left any."""
    head = f"job {job.job_id} ended {state.state}" + (f" (exit code {state.exit_code})" if state.exit_code else "")
    if state.state == "CANCELLED":
        head = f"job {job.job_id} was cancelled (scancel or an administrator)"
    elif state.state == "TIMEOUT":
        head = f"job {job.job_id} reached its time limit without checkpointing and requeueing"
    details = []
    for task in range(job.num_tasks):
        outcome = task_outcome(job, task)
        if outcome is not None and outcome[0] == "error":
            details.append(f"task {task}: {_error_summary(str(outcome[1]))}")
    causes = [d for d in details if "PeerFailed" not in d]  # ranks that only stopped because another one failed
    details = causes or details
    srun_says = _srun_task_errors(job)  # how srun saw each task end: "task 1: Killed" when no result was written
    if srun_says:
        details.insert(0, "srun: " + "; ".join(srun_says))
    if not details and state.state != "CANCELLED":
        for task in range(job.num_tasks):  # no task wrote an error: show what they printed last
            tail = _tail(job.task(task).paths.stderr)
            if tail:
                details.append(f"task {task} stderr ends with:\n{tail}")
    text = head + (":\n" + "\n".join(details) if details else "")
    resume = (f"\nIts newest complete checkpoint ({ckpts[-1].name}) is kept: submit the same command again to continue."
              if (ckpts := complete_checkpoints(run_dir)) else "")
    return text + resume + f"\nLogs: {job.paths.folder}/{job.job_id}_<task>_log.err|out and {RunDir(run_dir).log}"


def _last_progress_line(run_dir: Path) -> str:
    for line in reversed(_tail(RunDir(run_dir).log, 30).splitlines()):
        if " it " in line or "stopping at iteration" in line or "resuming from iteration" in line:
            return line
    return ""


def follow(job, run_dir: Path, print_fn=print, poll_s: float = 2.0, max_poll_s: float = 30.0,
           progress_every_s: float = 20.0, unknown_grace_s: float = 120.0):
    """Wait until the job ends, printing its state changes and training progress; return its result.

    Raises JobFailed (with the job's error text) when it ends in any other way than completing.
    """
    last_state, last_progress, last_progress_t = None, "", 0.0
    unknown_since = None
    started = time.time()
    while True:
        state = query_state(job.job_id)
        described = state.state + (f" ({state.reason})" if state.reason and state.reason != "None" else "")
        if state.restarts:
            described += f", requeued {state.restarts} time(s)"
        if described != last_state:
            print_fn(f"job {job.job_id}: {described}")
            last_state = described
        if state.state == "RUNNING" and time.time() - last_progress_t >= progress_every_s:
            line = _last_progress_line(run_dir)
            if line and line != last_progress:
                print_fn(f"job {job.job_id}: {line}")
                last_progress, last_progress_t = line, time.time()
        if state.state == "UNKNOWN":
            if task_outcome(job, 0) is not None:
                state = JobState("COMPLETED" if task_outcome(job, 0)[0] == "success" else "FAILED")
            else:
                unknown_since = unknown_since or time.time()
                if time.time() - unknown_since > unknown_grace_s:
                    raise JobFailed(f"job {job.job_id}: neither `scontrol show job` nor `sacct` knows it any more and "
                                    f"it wrote no result; see the logs in {job.paths.folder}")
        else:
            unknown_since = None
        if state.done:
            break
        elapsed = time.time() - started
        time.sleep(poll_s if elapsed < 120 else min(max_poll_s, poll_s * 5))
    outcome = task_outcome(job, 0)
    if state.state == "COMPLETED" and outcome is not None and outcome[0] == "success":
        return outcome[1]
    raise JobFailed(failure_message(job, state, run_dir))
