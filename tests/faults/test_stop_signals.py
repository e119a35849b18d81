"""SIGTERM / SIGINT in any launch mode (train/stop.py): every rank saves a checkpoint at the end of the iteration,
the process exits 143 / 130 with one line saying where the run resumes, and the same command then ends bitwise
equal to a run never stopped. A second signal ends the process at once and leaves the previous checkpoint intact;
`checkpoint.stop_grace_s` bounds the time to the exit."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dinotrain.distributed.checkpoint import complete_checkpoints, read_extra
from dinotrain.distributed.checkpoint_files import validate_checkpoint
from dinotrain.train.stop import StopSignals
from trainruns import LONG, REPO, env, max_abs_diff, start, teacher, train, train_command, wait_for_iteration

STOPPED = re.compile(r"stopped by (SIG\w+) at iteration (\d+): checkpoint (\S+) saved; run the same command to "
                     r"resume from it")


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_in_the_loop_raises_the_flag_and_a_second_one_ends_the_process(restore_handlers, signum):
    other = signal.SIGINT if signum == signal.SIGTERM else signal.SIGTERM
    previous_other = signal.getsignal(other)
    stop = StopSignals()
    with stop.armed():
        assert stop.agreed(torch.device("cpu")) == 0
        os.kill(os.getpid(), signum)
        assert stop.received == signum and stop.agreed(torch.device("cpu")) == signum
        assert signal.getsignal(signum) == signal.SIG_DFL, "a second signal must take its default action (exit now)"
    assert signal.getsignal(signum) == signal.SIG_DFL, "still after the loop: the run is on its way out"
    assert signal.getsignal(other) == previous_other, "the handler of the signal not received is given back"


def test_outside_the_loop_signals_keep_their_handlers(restore_handlers):
    calls = []
    signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    stop = StopSignals()
    with stop.armed():
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM] and stop.received == 0


def test_the_grace_runs_out_with_one_line_and_the_signals_exit_code(tmp_path):
    script = ("import os, signal, time\nfrom dinotrain.train.stop import StopSignals\n"
              "stop = StopSignals(grace_s=0.5, resume_hint=lambda: 'the same command resumes from X')\n"
              "with stop.armed():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 143 and time.time() - t0 < 20
    assert proc.stderr.strip().splitlines()[-1] == ("dinotrain: no checkpoint saved within checkpoint.stop_grace_s=0.5 s "
                                                    "of SIGTERM: exiting now; the same command resumes from X")


def _stop_at_random_iteration(run, proc, first: int = 3, last: int = 15) -> int:
    """SIGTERM once the run reached an iteration drawn at random; returns the iteration it was sent at."""
    target = random.randint(first, last)
    print(f"SIGTERM at iteration {target}")
    return wait_for_iteration(run, target, proc)


def _check_stopped(run, output: str, sent_at: int) -> int:
    stops = STOPPED.findall(output)
    assert len(stops) == 1, f"one line from rank 0 saying where the run resumes:\n{output[-3000:]}"
    name, iteration, ckpt = stops[0]
    iteration = int(iteration)
    assert name == "SIGTERM" and iteration >= sent_at
    assert complete_checkpoints(run)[-1].name == f"{iteration:08d}" and str(complete_checkpoints(run)[-1]) == ckpt
    assert read_extra(complete_checkpoints(run)[-1])["iteration"] == iteration
    return iteration


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_ends_bitwise_equal(undisturbed, tmp_path):
    run = tmp_path / "run"
    proc = start(run, LONG)
    sent_at = _stop_at_random_iteration(run, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    output = (tmp_path / "run.log").read_text()
    _check_stopped(run, output, sent_at)
    assert output.strip().splitlines()[-1].startswith("dinotrain train: stopped by SIGTERM"), "the last line says it"
    assert "Traceback" not in output
    train(run, LONG)  # the same command
    assert max_abs_diff(teacher(run), teacher(undisturbed)) == 0.0


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_torchrun_stops_both_ranks_at_one_checkpoint(undisturbed_two_processes, tmp_path):
    """torchrun forwards SIGTERM to its workers (and SIGKILLs them after --shutdown-timeout, 30 s by default): both
    save at the same iteration and exit 143; torchrun itself then exits 1 (its own SignalException)."""
    run = tmp_path / "run"
    proc = start(run, LONG, nproc=2)
    sent_at = _stop_at_random_iteration(run, proc)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    output = (tmp_path / "run.log").read_text()
    print(f"torchrun exited {code}")
    assert code != 0
    _check_stopped(run, output, sent_at)
    assert "RuntimeError" not in output, "the workers stop cleanly"
    train(run, LONG, nproc=2)
    assert max_abs_diff(teacher(run), teacher(undisturbed_two_processes)) == 0.0


@pytest.mark.slow
def test_a_second_sigterm_during_the_save_exits_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    # a head of 32 x 65536 prototypes makes each save take long enough to be hit while it runs
    run = tmp_path / "run"
    cmd = train_command(run, [*LONG, "dino.head_n_prototypes=65536", "checkpoint.period_iterations=4"])
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_iteration(run, 6, proc)  # checkpoint 4 is complete
    previous = complete_checkpoints(run)[-1]
    proc.send_signal(signal.SIGTERM)
    while not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir()):
        assert proc.poll() is None, "the run ended before its stop checkpoint was being written"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    code = proc.wait(timeout=60)
    assert code == -signal.SIGTERM and time.time() - t0 < 5, "the second signal ends the process at once"
    assert complete_checkpoints(run)[-1] == previous, "the interrupted save left no checkpoint that looks complete"
    validate_checkpoint(previous)
    rerun = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {previous}" in (run / "log.txt").read_text()
