"""The in-job stop signal: inside the training loop it only raises a flag that all ranks act on together at the
end of an iteration; outside the loop it goes straight to submitit's handler (requeue at once)."""

import os
import signal

import torch

from dinotrain.launch.job import StopRequest


def test_signal_in_the_loop_waits_for_the_end_of_the_iteration():
    previous = signal.getsignal(signal.SIGUSR2)
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands for submitit's handler
    try:
        stop = StopRequest()
        assert not stop.agreed(torch.device("cpu"))
        with stop.armed():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.received_at is not None and calls == [], "inside the loop: a flag, not submitit's requeue"
            assert stop.agreed(torch.device("cpu"))
        fresh = StopRequest()
        os.kill(os.getpid(), signal.SIGUSR2)  # outside the loop: nothing new to save, submitit requeues now
        assert calls == [signal.SIGUSR2] and fresh.received_at is None
        stop.hand_over()
        assert len(calls) == 2
    finally:
        signal.signal(signal.SIGUSR2, previous)
