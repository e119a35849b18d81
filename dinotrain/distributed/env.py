"""Who am I in the job: rank, world size and device from torchrun, SLURM, or a plain single process.

Every run initialises a process group, also a single process on a laptop, so the training code has
one path (FSDP2 and collectives work with a world of 1).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinotrain.distributed.peers import PeerFailed, start_heartbeat, stop_heartbeat

log = logging.getLogger("dinotrain.distributed")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _from_slurm() -> None:
    """Export torchrun-style variables from SLURM's (srun / submitit), if this is a SLURM task."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Initialise (or join an existing) default process group and return this process's place in it."""
    _from_slurm()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # a lone process needs no rendezvous: an in-memory store is enough
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            store = attempt_store(rank, world_size, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
            start_heartbeat(store, rank, world_size)
    else:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


ATTEMPT_KEY = "dinotrain/attempt"


def attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The job's store (`MASTER_ADDR:MASTER_PORT`), seen through a namespace that only this start of the
    processes shares.

    torchrun's agent serves that store and keeps it across its restarts (`--max-restarts`, static and c10d
    rendezvous alike), and torch keys the process group's entries by group name only: a restarted group read
    the addresses the killed processes had published, and gloo failed with `connectFullMesh ... Connection
    refused`. `TORCHELASTIC_RESTART_COUNT` cannot name the start either: each node's agent counts its own
    restarts, and nodes restarted for a peer's failure do not count. So rank 0 draws a new name for each start
    and every other rank proves it read this start's name, not one left by an earlier start: it posts a nonce
    under the name and waits for rank 0 to echo it back.
    """
    base, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    base.set_timeout(timeout)
    if rank == 0:
        name = uuid.uuid4().hex
        base.set(ATTEMPT_KEY, name)
        for r in range(1, world_size):
            hello = f"{ATTEMPT_KEY}/{name}/{r}"
            base.wait([hello])
            base.set(hello + "/echo", base.get(hello))
    else:
        nonce, deadline = uuid.uuid4().hex.encode(), time.monotonic() + timeout.total_seconds()
        while True:
            name = base.get(ATTEMPT_KEY).decode()  # waits for the first start's rank 0; may be an earlier start's
            hello = f"{ATTEMPT_KEY}/{name}/{rank}"
            base.set(hello, nonce)
            try:
                base.wait([hello + "/echo"], datetime.timedelta(seconds=1))
                if base.get(hello + "/echo") == nonce:
                    break
            except dist.DistStoreError:
                pass  # no echo yet: rank 0 of this start has not come, or the name was an earlier start's
            if time.monotonic() > deadline:
                where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}"
                raise dist.DistStoreError(f"rank 0 did not answer within {timeout} ({where})")
            time.sleep(0.05)
    return dist.PrefixStore(f"{ATTEMPT_KEY}/{name}/", base)


def destroy_distributed() -> None:
    """Destroy the process groups and free them now, while the interpreter is fully alive.

    `destroy_process_group` only forgets the groups: FSDP2's device meshes (cached by DTensor) and sharded
    modules left in reference cycles keep their own references, so a gloo group and its worker threads
    would live until interpreter shutdown. A worker thread that frees the last collective's tensor then
    needs the GIL of a finalising interpreter, and the process aborts after a run that succeeded
    ("terminate called without an active exception", SIGABRT: 19 of 40 such exits on a loaded machine
    in a stress test, now and then in CI). Freeing the groups here joins their threads before the exit.
    """
    stop_heartbeat()
    if dist.is_initialized():
        dist.destroy_process_group()
        _release_mesh_process_groups()


def _release_mesh_process_groups() -> None:
    import gc

    from torch.distributed.device_mesh import DeviceMesh

    gc.collect()  # sharded modules left in reference cycles by the run hold meshes and groups too
    for obj in gc.get_objects():
        # issubclass(type(...)), not isinstance: DeviceMesh's metaclass reads `obj.__class__`, which warns
        # on deprecated module proxies such as `torch.distributed.reduce_op` (noise on a clean exit's stderr)
        registry = getattr(obj, "_pg_registry", None) if issubclass(type(obj), DeviceMesh) else None
        if isinstance(registry, dict):
            registry.clear()
    for _ in range(3):  # a collection can free objects whose finalisers release more
        if not gc.collect():
            break


def all_reduce_mean(values: dict[str, float], device: torch.device, sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for all of them); `sum_keys` are summed instead."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        divisor = torch.tensor([1.0 if k in sum_keys else float(dist.get_world_size()) for k in keys],
                               dtype=torch.float64, device=device)
        t /= divisor
    return dict(zip(keys, t.tolist()))


def main_first(fn, env: DistEnv):
    """`fn()` on rank 0 first (e.g. to write a cache), then on the other ranks.

    An error on rank 0 stops every rank (rank 0 raises it, the others raise PeerFailed) instead of
    leaving them waiting in a collective.
    """
    result = all_ranks(fn if env.is_main else lambda: None, env)
    return result if env.is_main else fn()


def all_ranks(fn, env: DistEnv):
    """`fn()` on every rank; if it fails on any, every rank stops (no rank left waiting in a collective)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the other ranks heard of it
        error = exc
    ok = torch.tensor([0 if error else 1], dtype=torch.long, device=env.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if not int(ok.item()):
        raise PeerFailed("another rank failed a step all ranks take together; see its error")
    return result


def from_main(value):
    """Rank 0's value (any picklable object) on every rank: a decision that must not differ between ranks."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def gathered(value) -> list:
    """Every rank's value (any picklable object), on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]
