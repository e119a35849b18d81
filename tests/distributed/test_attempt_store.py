"""Each start of the processes works in its own namespace of the job's store (`distributed/env.py` `attempt_store`).

torchrun's agent serves the store and keeps it across `--max-restarts` restarts; torch keys the process group's
entries by group name only, so before this a restarted group read the addresses of the processes that had died."""

import datetime
import os
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from dinotrain.distributed.env import ATTEMPT_KEY, attempt_store
from trainruns import REPO, free_port


def test_attempt_store_is_not_fooled_by_an_earlier_starts_keys(monkeypatch):
    """torchrun keeps its store across restarts: a restarted rank 1 may read the name an earlier start left."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # both ranks are clients of the agent's store
    stale = "0123456789abcdef"
    server.set(ATTEMPT_KEY, stale)
    server.set(f"{ATTEMPT_KEY}/{stale}/1/echo", "an earlier rank 1's nonce")
    server.set(f"{ATTEMPT_KEY}/{stale}/rank_0_address", "a port nobody listens on any more")
    timeout = datetime.timedelta(seconds=30)
    stores = {}

    def join(rank, delay_s):
        time.sleep(delay_s)
        stores[rank] = attempt_store(rank, 2, timeout)

    threads = [threading.Thread(target=join, args=(1, 0.0)), threading.Thread(target=join, args=(0, 1.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(stores) == {0, 1}
    assert server.get(ATTEMPT_KEY).decode() != stale
    stores[0].set("rank_0_address", "this start's")
    assert stores[1].get("rank_0_address") == b"this start's"  # rank 1 waited for this start's name


GROUP = """
import sys, time
import torch, torch.distributed as dist
from dinotrain.distributed.env import destroy_distributed, init_distributed
time.sleep(float(sys.argv[1]))
init_distributed()
t = torch.ones(1)
dist.all_reduce(t)
print("all_reduce", t.item(), flush=True)
destroy_distributed()
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_a_restarted_group_forms_on_the_store_an_earlier_start_left():
    """As under `torchrun --max-restarts`: the agent's store outlives a first start of the processes; the second
    start's rank 1 comes late, so rank 0 reads its keys before rank 1 could write them again. With the keys of
    the first start in the way, gloo connected to the dead processes' ports: "connectFullMesh failed ...
    Connection refused"."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the agent's, kept throughout
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for start, rank_1_late_s in enumerate((0.0, 3.0)):
        procs = [subprocess.Popen([sys.executable, "-c", GROUP, str(delay)], env=dict(base, RANK=str(rank)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank, delay in ((0, 0.0), (1, rank_1_late_s))]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=90)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0] + "\n(timed out)")
        for rank, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0 and "all_reduce 2.0" in out, f"start {start}, rank {rank}:\n{out[-3000:]}"
    del server
