"""The in-job stop request of a SLURM job (USR2 for preemption / time limit, SIGINT): see `launch/job.py`.

Apart from `job.py` because it imports torch: submitit unpickles `SlurmRun` (importing `job.py`) before it installs
its USR2 handler, and until then a USR2 kills the task (SLURM may signal a job with a short time limit, or one
preempted at once, during its start-up); `job.py` stays light so that window is a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import submitit

from dinotrain.train.stop import StopSignals, signal_name

log = logging.getLogger("dinotrain.launch")


def _preemption_signal() -> int:
    return submitit.JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise


class StopRequest(StopSignals):
    """In a SLURM job: the preemption / time-limit signal (USR2) besides SIGINT (`train/stop.py`).

    USR2 inside the loop raises the flag like SIGINT but keeps its handler (SLURM may signal again; a requeue,
    not an exit, follows); before the loop it goes to submitit at once; after the loop it is ignored. SIGTERM is
    left to submitit, which ignores it: SLURM's preemption sends SIGTERM before the job's USR2 (what
    `submitit.SlurmJob._interrupt` reproduces), and acting on the SIGTERM would end the job instead of requeueing it.
    """

    def __init__(self, grace_s: float | None = None, resume_hint=lambda: "") -> None:
        self.signum = _preemption_signal()
        super().__init__((self.signum, signal.SIGINT), grace_s, resume_hint)
        self._finished = False
        self._submitit_handler = signal.getsignal(self.signum)  # installed by submitit before our code runs
        signal.signal(self.signum, self._outside_the_loop)

    def _on_signal(self, signum, frame) -> None:
        if signum != self.signum:
            super()._on_signal(signum, frame)
            return
        if not self.received:
            log.warning("got %s: checkpointing at the end of this iteration, then requeueing", signal_name(signum))
            self.received, self.received_at = int(signum), time.time()
            self._start_grace_timer()

    def _outside_the_loop(self, signum, frame) -> None:
        if self._finished:  # the training loop has ended: the job ends in seconds, nothing to requeue
            log.warning("got %s after the training loop ended: finishing the job instead of requeueing",
                        signal_name(signum))
            return
        # nothing newer than the last checkpoint to save: let submitit requeue now
        log.warning("got %s before the training loop: requeueing without a new checkpoint", signal_name(signum))
        self._call_submitit(signum, frame)

    def _call_submitit(self, signum, frame) -> None:
        handler = self._submitit_handler
        if callable(handler):
            handler(signum, frame)

    @contextlib.contextmanager
    def armed(self):
        """For the training loop: while inside, a signal waits for the end of the iteration; after it (the
        loop ended, stopped early or not) a signal no longer requeues: `hand_over` does when it must."""
        with super().armed():
            try:
                yield
            finally:
                self._finished = True  # before the handlers are given back: no moment in which a USR2 requeues

    @property
    def requeues(self) -> bool:
        """The ranks stopped on SLURM's signal (requeue), not on SIGINT (exit, SLURM decides what follows)."""
        return self.agreed_signum == self.signum

    def ignore_from_now(self) -> None:
        """At the end of the job's work: the signal is ignored by the process itself (SIG_IGN), not by a
        Python handler, which the interpreter resets to the default action while it shuts down: a signal
        in those last moments would kill a finished job with USR2 and SLURM would record it as failed."""
        signal.signal(self.signum, signal.SIG_IGN)

    def hand_over(self) -> None:
        """After the checkpoint: rank 0 lets submitit call `checkpoint()` and requeue (it exits the process)."""
        self._call_submitit(self.signum, None)
