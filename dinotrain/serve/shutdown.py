"""Graceful shutdown on SIGTERM, built on uvicorn's own.

uvicorn already does the hard part: on SIGTERM (or SIGINT) its main loop, within 0.1 s, closes the listening
sockets (new connections are refused), closes idle keep-alive connections, lets each busy one finish its answer
with `Connection: close`, waits for them up to `timeout_graceful_shutdown` seconds, cancels what is left, then runs
the app's lifespan shutdown. What this adds:

- the moment the signal arrives, the app knows it is draining (`DrainState`): a request that still gets in before
  the sockets close is answered 503 + `Connection: close`, `/health` says "draining", `/ready` answers 503;
- it says on stderr when the drain begins and how it ended;
- it counts what the timeout cancelled, so that `dinotrain serve` exits 0 only when every accepted request was
  answered (the batcher's queue empties before the app stops: the requests that wait on it are the in-flight ones).

uvicorn re-raises the signal it caught once it is done; `serve_until_stopped` holds no-op SIGTERM / SIGINT handlers
during the run so that this re-raise does not end the process with 143 / 130 after a clean drain.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time

import uvicorn

from dinotrain.serve.observe import DrainState


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as draining on the first signal and reports how the drain ended."""

    def __init__(self, config: uvicorn.Config, drain: DrainState, on_drain=None):
        super().__init__(config)
        self.drain, self.on_drain = drain, on_drain
        self.signal_name = None
        self.unanswered = 0
        self.drain_seconds = 0.0

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: only flags here (printing could re-enter a write the main thread was doing).
        if not self.drain.draining:
            self.drain.draining = True
            self.signal_name = signal.Signals(sig).name
            if self.on_drain is not None:
                self.on_drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        started = time.monotonic()
        cancelled_before = self.drain.cancelled
        if self.drain.draining:
            print(f"dinotrain serve: {self.signal_name}: refusing new requests, answering the {self.drain.in_flight} "
                  f"in flight (drain timeout {self.config.timeout_graceful_shutdown:g} s)", file=sys.stderr, flush=True)
        await super().shutdown(sockets)
        for _ in range(100):  # let the tasks the timeout cancelled unwind through the middleware
            if self.drain.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        self.unanswered = self.drain.cancelled - cancelled_before + self.drain.in_flight
        self.drain_seconds = time.monotonic() - started


def serve_until_stopped(server: DrainingServer) -> int:
    """Run the server until a signal has drained it: 0 when every accepted request was answered, 1 otherwise."""
    main_thread = threading.current_thread() is threading.main_thread()  # signals exist only there (as in uvicorn)
    signals = (signal.SIGTERM, signal.SIGINT) if main_thread else ()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}  # see the module docstring
    try:
        server.run()
    finally:
        for sig in signals:
            signal.signal(sig, previous[sig])
    timeout = server.config.timeout_graceful_shutdown
    if server.unanswered:
        print(f"dinotrain serve: error: the drain timeout of {timeout:g} s passed with {server.unanswered} accepted "
              f"request(s) unanswered (cancelled); raise --drain-timeout-s", file=sys.stderr, flush=True)
        return 1
    if server.signal_name:
        print(f"dinotrain serve: drained in {server.drain_seconds:.1f} s, every accepted request answered; exiting",
              file=sys.stderr, flush=True)
    return 0
