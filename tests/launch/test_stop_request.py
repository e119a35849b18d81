"""The in-job stop signal: inside the training loop it only raises a flag that all ranks act on together at the
end of an iteration; before the loop it goes straight to submitit's handler (requeue at once); after the loop
it is ignored (the job ends in seconds, a requeue would start the finished run again)."""

import os
import signal

import pytest
import torch

from dinotrain.launch.stop_request import StopRequest


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


def test_the_job_ends_with_the_signal_ignored_by_the_process(submitit_calls, monkeypatch, tmp_path):
    """Python resets its handlers to the default action while the interpreter shuts down; a USR2 then would
    kill the finished job (exit 140, recorded as FAILED): the job leaves the signal ignored (SIG_IGN) instead."""
    from dinotrain.launch.job import SlurmRun

    class FinishedRun:
        start_iter, max_iter, stopped_at = 0, 3, None

        def __init__(self, *args, **kwargs):
            pass

        def run(self, stop):
            with stop.armed():
                return {"loss": 1.0}

    monkeypatch.setattr("dinotrain.train.run.TrainingRun", FinishedRun)
    result = SlurmRun("train", {"launch": {"max_requeues": 3}}, str(tmp_path), signal_delay_s=30)()
    assert result["iteration"] == 3
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGUSR2)  # neither kills this process nor requeues
    assert submitit_calls == []
