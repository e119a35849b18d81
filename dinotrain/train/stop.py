"""Stop signals (SIGTERM, SIGINT, a SLURM job's USR2) turned into a checkpoint that every rank saves together.

What a cluster does to a run first is a signal: Kubernetes, systemd, `docker stop` and spot reclaim send
SIGTERM, a terminal sends SIGINT, SLURM's `--signal` sends USR2 (`launch/job.py`). While the
training loop runs (`armed`), a signal only raises a flag; at the end of the iteration the ranks agree (one
all-reduce of the largest signal number any rank got), save a checkpoint together and stop. A signal handler
cannot save a sharded checkpoint itself: the other ranks are elsewhere in the step.

After the first signal the signal's default action is back, so a second one ends the process at once, by the
kernel, even while it waits inside a collective or a write; the checkpoints already complete are untouched (a
checkpoint appears by an atomic rename, `distributed/checkpoint.py`). `checkpoint.stop_grace_s` bounds the time
from the first signal to the exit: past it the process exits with the same code and says what it resumes from.
Outside the loop (start-up, the final export) signals keep their usual effect: there is nothing new to save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from dinotrain.distributed.peers import peer_ended_here

log = logging.getLogger("dinotrain.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def resume_hint(run_dir) -> str:
    """What the same command resumes from: the newest complete checkpoint of `run_dir`."""
    from dinotrain.distributed.checkpoint import resume_point

    point = resume_point(run_dir)
    return f"the same command resumes from {point}" if point else "no checkpoint yet: the same command starts over"


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; the CLI prints the message and exits `code`."""

    def __init__(self, message: str, signum: int, is_main: bool = True):
        super().__init__(message)
        self.signum = signum
        self.code = exit_code(signum)
        self.is_main = is_main


class StopSignals:
    """The flag the training loop checks at the end of each iteration (`agreed`), raised by `signums`.

    `grace_s`: at most this many seconds from the first signal to the exit (None: as long as the save takes).
    `resume_hint()` says, when the grace runs out, what the run will resume from.
    """

    def __init__(self, signums=STOP_SIGNALS, grace_s: float | None = None, resume_hint=lambda: ""):
        self.signums = tuple(int(s) for s in signums)
        self.grace_s = grace_s
        self.resume_hint = resume_hint
        self.received: int = 0  # the first signal this process got while armed (0: none)
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._warned_cost = False
        self.agreed_signum = 0  # what `agreed` returned last

    def _on_signal(self, signum, frame) -> None:
        if self.received:
            return  # the default action is installed again below; a signal raced the re-install
        if signum == signal.SIGTERM and peer_ended_here():
            return  # torchrun stopping the survivors of a lost rank: no checkpoint is possible (distributed/peers.py)
        self.received, self.received_at = int(signum), time.time()
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        grace = f" (within checkpoint.stop_grace_s={self.grace_s:g} s)" if self.grace_s is not None else ""
        log.warning("got %s: saving a checkpoint at the end of this iteration%s, then stopping; "
                    "a second %s stops at once", signal_name(signum), grace, signal_name(signum))
        self._start_grace_timer()

    def _start_grace_timer(self) -> None:
        if self.grace_s is not None and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._grace_over)
            self._timer.daemon = True
            self._timer.start()

    def note_stop_cost(self, seconds: float) -> None:
        """Called by the loop after a checkpoint with what a stop would take (an iteration + a save): warns once
        when that exceeds the grace, so the platform's kill delay can be raised before it matters."""
        if self.grace_s is not None and seconds > self.grace_s and not self._warned_cost:
            self._warned_cost = True
            log.warning("a stop takes ~%.0f s here (the rest of an iteration + a checkpoint), more than "
                        "checkpoint.stop_grace_s=%g s: a stop signal would end the run without a new checkpoint. "
                        "Raise the platform's kill delay (Kubernetes terminationGracePeriodSeconds, torchrun "
                        "--shutdown-timeout) and checkpoint.stop_grace_s with it", seconds, self.grace_s)

    def _grace_over(self) -> None:
        hint = self.resume_hint()
        print(f"dinotrain: no checkpoint saved within checkpoint.stop_grace_s={self.grace_s:g} s of "
              f"{signal_name(self.received)}: exiting now{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
        os._exit(exit_code(self.received))

    @contextlib.contextmanager
    def armed(self):
        """While inside (the training loop), the signals only raise the flag; the previous handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed by the main thread (e.g. a test running a loop in a thread)
            return
        for signum in self.signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for signum, handler in self._previous.items():
                if signal.getsignal(signum) != signal.SIG_DFL:  # one received keeps its default action: a second
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)  # one still ends it
            self._previous.clear()

    def agreed(self, device: torch.device) -> int:
        """The signal any rank got (the largest number if several; 0: none). Every rank calls this at the same
        iteration, so all of them stop together."""
        signum = self.received
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        self.agreed_signum = signum
        return signum
