"""Sharded checkpoints with torch.distributed.checkpoint (DCP): exact resume, on any world size.

Layout: `<run>/checkpoints/<iteration:08d>/` holds the DCP shards of the model (student, teacher,
loss centers) and optimizer, plus `extra.json` (iteration, sample-stream position, grad-scaler
state, world size, config). It is written as `.tmp-<iteration>` and renamed only when every rank
has finished, so an interrupted save never looks complete. RNG states need no saving: every step
reseeds from (seed, iteration, rank) and every sample from its stream position.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

log = logging.getLogger("dinotrain.checkpoint")
EXTRA = "extra.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary, partial ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / EXTRA).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def read_extra(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / EXTRA).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable {EXTRA}: {exc}") from exc


class Checkpointer:
    """Save/load a training state; keeps the last `keep_last` complete checkpoints."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        final = self.root / f"{iteration:08d}"
        tmp = self.root / f".tmp-{iteration:08d}"
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        _barrier()
        if _is_main():
            (tmp / EXTRA).write_text(json.dumps({**extra, "iteration": iteration}, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)  # atomic on one filesystem: the checkpoint appears complete or not at all
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root.parent)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load one checkpoint into the (sharded) model and optimizer; returns its extra state."""
        extra = read_extra(ckpt)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(ckpt))
        except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
            raise CheckpointError(f"checkpoint {ckpt} could not be read: {type(exc).__name__}: {exc}") from exc
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return extra

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Newest checkpoint that loads; a corrupted one is reported and the previous one used."""
        for ckpt in reversed(complete_checkpoints(self.root.parent)):
            try:
                extra = self.load(ckpt, model, optimizer)
            except CheckpointError as exc:
                log.error("%s; trying the previous checkpoint", exc)
                continue
            log.info("resumed from %s (iteration %d)", ckpt, extra["iteration"])
            return extra
        return None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of a (sharded) module; every rank must call it, rank 0 gets the tensors."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidate_teacher_backbone(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Official-layout teacher backbone state dict from a sharded checkpoint, in one process, no GPU."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import tempfile

    ckpt = Path(ckpt)
    if not (ckpt / ".metadata").is_file():
        raise CheckpointError(f"{ckpt} is not a dinotrain checkpoint directory (no .metadata)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt), str(out))
        full = torch.load(out, map_location="cpu", weights_only=True)
    prefix = "teacher.backbone."
    model = full["model"]
    state = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{ckpt} holds no teacher backbone")
    return state
