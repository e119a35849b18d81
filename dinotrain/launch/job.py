"""Inside a SLURM job: run `train`/`distill` on every task, and on preemption or time limit checkpoint
with all ranks together, then requeue.

SLURM sends USR2 `signal_delay_s` before the time limit (and at preemption, with
`PreemptParameters=send_user_signal`, or `submitit`'s `job._interrupt()`). submitit's handler calls the
job's `checkpoint()` and requeues, but only on global rank 0 and right inside the signal handler: a
sharded checkpoint saved there would wait forever for ranks that are elsewhere in the step. So the
handler only raises a flag; at the end of the iteration every rank learns whether any rank got the
signal (one all-reduce), all ranks save the checkpoint together, and only then rank 0 hands over to
submitit's handler, which calls `SlurmRun.checkpoint()` (bounded by `launch.max_requeues`) and
requeues the job. The requeued job resumes from that checkpoint like `dinotrain train` does.
Before the loop runs (start-up, head warm-up) there is nothing new to save: the signal goes straight to
submitit, which requeues at once. Once the loop has run to its end, the signal is ignored: the final
checkpoint and export take seconds, and a requeue would only start the finished run again.
SIGINT checkpoints the same way (`train/stop.py`) but does not requeue: the job ends with 130. SIGTERM keeps
submitit's handling (ignored: SLURM sends it before USR2 at preemption); a cluster whose preemption sends only
SIGTERM needs `PreemptParameters=send_user_signal` for a checkpoint at preemption.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import submitit
from omegaconf import OmegaConf


log = logging.getLogger("dinotrain.launch")


class RequeueLimitReached(RuntimeError):
    """The job stopped (preempted or at its time limit) more often than `launch.max_requeues` allows."""


def _forget_stale_result() -> None:
    """A requeued run reuses the job id, hence the result file names: remove this task's file of an earlier
    run, so that nobody reads it as this run's outcome."""
    try:
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    except (OSError, RuntimeError, KeyError):
        pass


def _time_left_s() -> float | None:
    """Seconds until this job's time limit, from squeue (None if it cannot tell)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_duration(out)


def parse_slurm_duration(text: str) -> float | None:
    """`[days-]hours:minutes:seconds`, `minutes:seconds` (squeue's %L) in seconds; None if not a duration."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        if not d.isdigit():
            return None
        days = int(d)
    parts = text.split(":")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return days * 86400 + seconds


def stop_reason(signal_delay_s: int) -> str:
    """Why SLURM signalled: the time limit is near, or not (preemption, or a signal sent by hand)."""
    left = _time_left_s()
    if left is None:
        return "SLURM's stop signal (preemption or time limit)"
    if left <= signal_delay_s + 60:
        return f"the time limit ({left:.0f} s left)"
    return f"preemption or a signal sent to the job ({left:.0f} s before the time limit)"


class SlurmRun(submitit.helpers.Checkpointable):
    """What every task of a `dinotrain submit` job runs: `dinotrain train` or `distill` on the resolved config."""

    def __init__(self, command: str, config: dict, run_dir: str, signal_delay_s: int,
                 allow_config_change: bool = False):
        self.command = command
        self.config = config
        self.run_dir = run_dir
        self.signal_delay_s = signal_delay_s
        self.allow_config_change = allow_config_change

    def __call__(self) -> dict:
        from dinotrain.distributed.env import destroy_distributed
        from dinotrain.launch.stop_request import StopRequest
        from dinotrain.train.stop import exit_code, resume_hint, signal_name

        _forget_stale_result()
        cfg = OmegaConf.create(self.config)
        stop = StopRequest(OmegaConf.select(cfg, "checkpoint.stop_grace_s"), lambda: resume_hint(self.run_dir))
        OmegaConf.set_readonly(cfg, True)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        try:
            from dinotrain.train.run import TrainingRun

            trainer = TrainingRun(cfg, self.run_dir, command=self.command, resume=True,
                                  allow_config_change=self.allow_config_change)
            where = (f"resuming from iteration {trainer.start_iter}" if trainer.start_iter else "starting at iteration 0")
            log.info("SLURM job %s (%s task(s)%s): %s", os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_NTASKS"),
                     f", requeued {restarts} time(s)" if restarts else "", where)
            last = trainer.run(stop=stop)
            if trainer.stopped_at is None:
                return {"run_dir": str(Path(self.run_dir).resolve()), "iteration": trainer.max_iter, "metrics": last}
            is_main = trainer.env.is_main
            if not stop.requeues:  # SIGINT: the job ends (130); SLURM decides what follows
                if is_main:
                    log.warning("stopping at iteration %d: %s; checkpoint saved, not requeueing (SLURM decides what "
                                "follows; a requeued or resubmitted job resumes from it)", trainer.stopped_at,
                                signal_name(stop.agreed_signum))
                raise SystemExit(exit_code(stop.agreed_signum))
            if is_main:
                log.warning("stopping at iteration %d: %s; checkpoint saved, requeueing (requeue %d of at most %d)",
                            trainer.stopped_at, stop_reason(self.signal_delay_s), restarts + 1, cfg.launch.max_requeues)
        finally:
            destroy_distributed()
            stop.ignore_from_now()
        if is_main:
            stop.hand_over()  # submitit requeues and exits; raises RequeueLimitReached when the limit is reached
        # the other ranks leave without a result file: the job is not over, its requeued run writes the results
        raise SystemExit(0)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 after the checkpoint is saved: the same run again, or no more requeues."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        limit = int(self.config.get("launch", {}).get("max_requeues", 0))
        if restarts >= limit:
            raise RequeueLimitReached(
                f"the job stopped (preemption or time limit) and was already requeued {restarts} time(s), "
                f"launch.max_requeues={limit}: not requeued. Its checkpoint is saved in {self.run_dir}; submit "
                "the same command again to continue, or raise launch.max_requeues")
        return submitit.helpers.DelayedSubmission(
            SlurmRun(self.command, self.config, self.run_dir, self.signal_delay_s, self.allow_config_change))
