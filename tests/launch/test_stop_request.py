"""The in-job stop signal: inside the training loop it only raises a flag that all ranks act on together at the
end of an iteration; before the loop it goes straight to submitit's handler (requeue at once); after the loop
it is ignored (the job ends in seconds, a requeue would start the finished run again)."""

import os
import signal

import pytest
import torch

from dinotrain.launch.job import StopRequest


@pytest.fixture
def submitit_calls():
    """A stand-in for submitit's USR2 handler (installed before StopRequest, as in a job); records its calls."""
    previous = signal.getsignal(signal.SIGUSR2)
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_signal_in_the_loop_waits_for_the_end_of_the_iteration(submitit_calls):
    stop = StopRequest()
    assert not stop.agreed(torch.device("cpu"))
    with stop.armed():
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received_at is not None and submitit_calls == [], "inside the loop: a flag, not submitit's requeue"
        assert stop.agreed(torch.device("cpu"))
    stop.hand_over()  # after the checkpoint: submitit requeues
    assert submitit_calls == [signal.SIGUSR2]


def test_signal_before_the_loop_goes_to_submitit_at_once(submitit_calls):
    stop = StopRequest()
    os.kill(os.getpid(), signal.SIGUSR2)  # nothing new to save: submitit requeues now
    assert submitit_calls == [signal.SIGUSR2] and stop.received_at is None


def test_signal_after_the_loop_ended_does_not_requeue(submitit_calls):
    stop = StopRequest()
    with stop.armed():
        pass  # the loop ran to its end
    os.kill(os.getpid(), signal.SIGUSR2)  # during the export or the result file: the job is about to end
    assert submitit_calls == [] and stop.received_at is None
