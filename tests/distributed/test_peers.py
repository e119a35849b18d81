"""Which peers are gone (`distributed/peers.py`), in one process: the store is real, the peers are heartbeats of this
process or keys written as a process that has died would have left them."""

import datetime
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch.distributed as dist

from dinotrain.distributed import peers
from trainruns import free_port


@pytest.fixture
def store():
    return dist.HashStore()


@pytest.fixture(autouse=True)
def _no_heartbeat_left():
    before = signal.getsignal(signal.SIGTERM)
    yield
    peers.stop_heartbeat()
    signal.signal(signal.SIGTERM, before)


def _ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _as_if_started(store, rank: int, place: str) -> None:
    """What rank `rank` posts when it starts, without a thread that keeps beating (as if it were gone since)."""
    store.set(f"{peers.KEY}/place/{rank}", place)
    store.add(f"{peers.KEY}/beat/{rank}", 1)


def test_a_peer_on_this_machine_whose_process_ended_is_lost_at_once(store):
    beat = peers.Heartbeat(store, 0, 3)
    peers.Heartbeat(store, 2, 3)  # alive, beating
    pid = _ended_pid()
    _as_if_started(store, 1, f"{peers._machine()} {pid}")
    t = time.monotonic()
    lost, errors = beat.gone()
    assert time.monotonic() - t < 1.5  # the live peer beat once; the ended one needs no waiting
    assert list(lost) == [1] and f"its process {pid} ended" in lost[1] and errors == {}


def test_live_peers_and_peers_with_an_error_of_their_own_are_not_lost(store):
    beat, other = peers.Heartbeat(store, 0, 2), peers.Heartbeat(store, 1, 2)
    assert beat.gone() == ({}, {})
    other.note_error(ValueError("bad value\nmore lines"))
    assert beat.gone() == ({}, {1: "ValueError: bad value"})


def test_a_silent_peer_elsewhere_is_lost_after_the_window(store):
    beat = peers.Heartbeat(store, 1, 2)
    _as_if_started(store, 0, "gpu-node-7 4026531836 1234")
    t = time.monotonic()
    lost, _ = beat.gone(window_s=1.0)
    assert 1.0 <= time.monotonic() - t < 2.5
    assert lost == {0: "no sign of life for 1 s from gpu-node-7: its process ended or its host is unreachable"}


def test_a_peer_done_with_its_run_is_not_lost(store):
    beat, other = peers.Heartbeat(store, 0, 2), peers.Heartbeat(store, 1, 2)
    other.stop()
    assert beat.gone(window_s=1.0) == ({}, {})


def test_reported_turns_the_error_a_lost_peer_caused_into_one_line(store):
    peers._heartbeat = peers.Heartbeat(store, 0, 2)
    pid = _ended_pid()
    _as_if_started(store, 1, f"{peers._machine()} {pid}")
    with pytest.raises(peers.PeerLost) as caught:
        with peers.reported(lambda: "after iteration 12", lambda: "run the same command to resume from checkpoint X"):
            raise dist.DistBackendError("[../gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    assert str(caught.value) == (
        f"rank 1 of 2 was lost after iteration 12 (its process {pid} ended without an error of its own: killed, e.g. "
        "by SIGKILL or the out-of-memory killer); run the same command to resume from checkpoint X")
    assert isinstance(caught.value, peers.PeerFailed)  # the CLI prints it as one line (exit 2)
    assert store.get(f"{peers.KEY}/error/0").decode().startswith("DistBackendError: ")  # the peers hear of it too


def test_reported_lets_an_error_of_this_rank_through_when_no_peer_is_gone(store):
    peers._heartbeat = peers.Heartbeat(store, 0, 2)
    peers.Heartbeat(store, 1, 2)
    with pytest.raises(ValueError, match="a bad config value"):
        with peers.reported():
            raise ValueError("a bad config value")


def test_a_sigterm_while_a_peer_here_has_ended_does_not_end_this_rank(store):
    """torchrun's agent SIGTERMs the survivors as soon as one rank died: they must live to say which."""
    peers._heartbeat = peers.Heartbeat(store, 0, 2)
    _as_if_started(store, 1, f"{peers._machine()} {_ended_pid()}")
    peers._heartbeat.read_places()  # what its thread does within a beat of the start: the handler reads no store
    with pytest.raises(peers.PeerLost):
        with peers.reported():
            os.kill(os.getpid(), signal.SIGTERM)  # with the default action this test process would end here
            time.sleep(0.1)
            raise dist.DistBackendError("Connection closed by peer")


def test_a_store_that_no_longer_answers_holds_no_rank():
    """The store's host gone without closing the connection (here: its process stopped): the question goes
    unanswered, the rank still stops, with a line that says the store is gone."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d; s = d.TCPStore("
                               f"'127.0.0.1', {port}, is_master=True, wait_for_workers=False); time.sleep(120)"])
    try:
        client = None
        for _ in range(100):
            try:
                client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
                break
            except Exception:
                time.sleep(0.1)
        peers._heartbeat = peers.Heartbeat(client, 0, 2)
        os.kill(server.pid, signal.SIGSTOP)
        t = time.monotonic()
        assert peers._ask(peers._heartbeat, RuntimeError("Connection reset"), window_s=0.5, answer_s=1.0) == (None, {})
        assert time.monotonic() - t < 2.5
        ask = peers._ask
        with mock.patch.object(peers, "_ask", lambda beat, exc: ask(beat, exc, 0.5, 1.0)):
            with pytest.raises(peers.PeerLost, match="^the job's store no longer answers after iteration 3: "
                                                      "torchrun's agent or rank 0, which serves it, is gone"):
                with peers.reported(lambda: "after iteration 3"):
                    raise RuntimeError("Connection reset by peer")
    finally:
        server.kill()  # a stopped process ends on SIGKILL too; the blocked store calls then fail and their threads end
        server.wait()
