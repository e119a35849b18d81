"""Which other ranks of the job are gone, said in one line instead of a collective's traceback.

A rank killed outright (SIGKILL, the out-of-memory killer, a lost node) says nothing: its peers only see their
next collective fail (gloo: "Connection closed by peer") and, under torchrun, a SIGTERM from the agent that
would end them before they could say why. So each rank of a multi-process run posts where it runs (host, pid)
in the job's store and counts up a key of its own there from a thread (`Heartbeat`); a rank that stops on an
error of its own writes the error there first. When a rank fails inside `reported()`, it asks which peers are
gone: one on this machine whose process has ended is lost at once; one elsewhere whose count stands still for
`window_s` is lost too; one that wrote an error is named with it. Then the rank stops with `PeerLost`, one
line, and attempts nothing more (no checkpoint can be saved without every rank). Inside `reported()` a SIGTERM
while a peer on this machine has ended (torchrun's agent stopping the survivors) is ignored: the failing
collective ends this rank, with its line, and torchrun restarts the group if it may.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

KEY = "dinotrain/peers"


class PeerFailed(RuntimeError):
    """Another rank failed a step all ranks take together; its own error says why."""


class PeerLost(PeerFailed):
    """Another rank is gone (its process ended, or it stopped answering): the message names it."""


def _machine() -> str:
    """`host pid-namespace`: processes that share both see each other's pid."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()} {namespace}"


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has ended, its parent not yet told
    except (OSError, IndexError):
        return True


class Heartbeat:
    """This rank's place and count in the store (the count every `interval_s`, from a daemon thread), and what
    it reads there of the others."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, interval_s: float = 0.5):
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.others = [r for r in range(world_size) if r != rank]
        self._places: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        store.set(f"{KEY}/place/{rank}", f"{_machine()} {os.getpid()}")
        store.add(f"{KEY}/beat/{rank}", 1)
        self._thread = threading.Thread(target=self._run, name="dinotrain-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"{KEY}/beat/{self.rank}", 1)
                if len(self._places) < len(self.others):
                    self.read_places()
            except Exception:  # the store is gone (torchrun's agent or rank 0 ended): nobody left to tell
                return
        with contextlib.suppress(Exception):
            self.store.set(f"{KEY}/done/{self.rank}", "1")

    def stop(self) -> None:
        """At the end of a run: the thread stops, and the peers learn this rank is done, not lost. Store calls
        happen on that thread only: a store that stopped answering holds it, never the caller."""
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s)

    def note_error(self, exc: BaseException) -> None:
        """Tell the peers this rank stops on an error of its own (so they do not report it as lost)."""
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        self.store.set(f"{KEY}/error/{self.rank}", f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    def read_places(self) -> dict[int, tuple[str, int]]:
        """{rank: (machine, pid)} of the peers that have posted theirs, read once each (the thread reads them
        soon after the start, so that `ended_here` needs no store call)."""
        for r in self.others:
            key = f"{KEY}/place/{r}"
            if r not in self._places and self.store.check([key]):
                machine, pid = self.store.get(key).decode().rsplit(" ", 1)
                self._places[r] = (machine, int(pid))
        return dict(self._places)

    def ended_here(self) -> list[int]:
        """The peers on this machine whose process has ended (from the places read so far; no store call, so a
        signal handler may ask)."""
        here = _machine()
        return [r for r, (machine, pid) in list(self._places.items()) if machine == here and _ended(pid)]

    def _said(self, what: str) -> dict[int, str]:
        keys = {r: f"{KEY}/{what}/{r}" for r in self.others}
        return {r: self.store.get(k).decode() for r, k in keys.items() if self.store.check([k])}

    def _counts(self) -> dict[int, int]:
        return {r: self.store.add(f"{KEY}/beat/{r}", 0) for r in self.others}

    def gone(self, window_s: float = 3.0) -> tuple[dict[int, str], dict[int, str]]:
        """({rank: why} of the lost peers, {rank: its error} of the peers that stopped on an error of their own).

        A peer is lost when its process (on this machine) has ended, or when its count stands still for
        `window_s`; waits only as long as some peer is neither of these nor seen alive nor accounted for (each
        look reads every peer's keys: a failure costs O(world size) store reads per rank, only then)."""
        self.read_places()
        before, deadline = self._counts(), time.monotonic() + window_s
        while True:
            accounted = set(self._said("error")) | set(self._said("done"))
            ended = set(self.ended_here()) - accounted
            silent = {r for r, n in self._counts().items() if n == before[r]} - accounted - ended
            if not silent or time.monotonic() >= deadline:
                break
            time.sleep(self.interval_s)
        errors, places, here = self._said("error"), self.read_places(), _machine()
        lost = {r: f"its process {places[r][1]} ended without an error of its own: killed, e.g. by SIGKILL or the "
                   "out-of-memory killer" for r in ended}
        for r in silent:
            machine, pid = places.get(r, ("its host", 0))
            lost[r] = (f"its process {pid} is alive but gave no sign of life for {window_s:g} s" if machine == here
                       else f"no sign of life for {window_s:g} s from {machine.split()[0]}: its process ended or its "
                       "host is unreachable")
        return dict(sorted(lost.items())), errors


_heartbeat: Heartbeat | None = None


def start_heartbeat(store: dist.Store, rank: int, world_size: int) -> None:
    """Called once the process group is up (only multi-process runs have peers to lose)."""
    global _heartbeat
    stop_heartbeat()
    if world_size > 1:
        _heartbeat = Heartbeat(store, rank, world_size)


def stop_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def peer_ended_here() -> bool:
    """Whether a peer on this machine has ended: a SIGTERM now is torchrun's agent stopping the survivors."""
    try:
        return bool(_heartbeat and _heartbeat.ended_here())
    except Exception:
        return False


@contextlib.contextmanager
def reported(progress=lambda: "", resume=lambda: ""):
    """Inside, an error that a gone peer caused (a failed collective, a failed checkpoint write) becomes one
    `PeerLost` naming the peer, with `progress()` ("after iteration 12") and `resume()` (where the run goes on).
    Any other error stays what it is, and the peers learn that this rank stopped on an error of its own."""
    global _lost
    _lost = False
    previous = _install_sigterm_handler()
    try:
        yield
    except PeerLost:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
        beat = _heartbeat
        if beat is None:
            raise
        lost, errors = _ask(beat, exc)
        if lost == {} and not (errors and isinstance(exc, (dist.DistError, CheckpointException))):
            raise  # no peer is gone, or this rank's error is its own
        _lost = True  # from now on a SIGTERM is ignored: this rank is ending, with its line
        raise PeerLost(_message(beat.world_size, lost, errors, progress(), resume())) from exc
    finally:
        if previous is not None and not _lost and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, previous)


def _ask(beat: Heartbeat, exc: BaseException, window_s: float = 3.0, answer_s: float = 10.0):
    """`beat.note_error(exc)`, then `beat.gone(window_s)`, on a thread of their own: a store that no longer answers
    (its host gone without closing the connection) holds that thread, not this rank. (None, {}) if it did not
    answer within `window_s + answer_s` s or failed: the store went with whoever served it."""
    answer: dict = {}

    def ask() -> None:
        with contextlib.suppress(Exception):
            beat.note_error(exc)
            answer["gone"] = beat.gone(window_s)

    thread = threading.Thread(target=ask, name="dinotrain-peers", daemon=True)
    thread.start()
    thread.join(window_s + answer_s)
    return answer.get("gone", (None, {}))


_lost = False
_sigterm_before = signal.SIG_DFL


def _install_sigterm_handler():
    """`_on_sigterm` as SIGTERM's handler (main thread only); returns the handler it replaces, or None."""
    global _sigterm_before
    if threading.current_thread() is not threading.main_thread():
        return None
    _sigterm_before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return _sigterm_before


def _on_sigterm(signum, frame) -> None:
    global _lost
    if _lost or peer_ended_here():
        _lost = True  # torchrun stops the survivors of a lost rank: the failing collective ends this one, with its line
        return
    handler = _sigterm_before
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # the default action: end the process by this signal
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _message(world_size: int, lost: dict[int, str] | None, errors: dict[int, str], progress: str, resume: str) -> str:
    when = f" {progress}" if progress else ""
    if lost is None:
        said = (f"the job's store no longer answers{when}: torchrun's agent or rank 0, which serves it, is gone "
                f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')})")
    elif lost:
        said = "; ".join(f"rank {r} of {world_size} was lost{when} ({why})" for r, why in lost.items())
    else:
        said = "; ".join(f"rank {r} of {world_size} stopped{when} on an error of its own ({e}; its output says more)"
                         for r, e in errors.items())
    return f"{said}; {resume}" if resume else said
