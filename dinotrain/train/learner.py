"""One trained network set and what it does around a step: schedules, backward, clip, optimizer, EMA.

A pretraining run has one learner (student + EMA teacher), a distillation one per student, the head warm-up
one whose backbone is frozen. The loop treats them all alike: `begin` before the step's first micro-batch,
`backward` per loss, `finish` after the last one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from dinotrain.distributed.checkpoint import full_state_dict
from dinotrain.distributed.fsdp import clip_grad_norm, set_gradient_sync
from dinotrain.models.any_student import AnyStudent
from dinotrain.storage import Resume, replacing
from dinotrain.train.optim import apply_schedules, build_optimizer
from dinotrain.train.schedules import Schedules
from dinotrain.train.ssl import SSLMetaArch
from dinotrain.weights.any_student import write_any_student

log = logging.getLogger("dinotrain.train")


@dataclass
class Learner:
    """A meta-architecture (student + EMA), its optimizer, schedules and fp16 grad scaler (enabled only in
    fp16 with `compute_precision.grad_scaler`), and the prefix of its metrics ("" in pretraining,
    "<student name>/" in distillation). `heads_only`: the backbone is frozen (head warm-up): only the heads
    are clipped and followed by the EMA."""

    model: SSLMetaArch
    cfg: DictConfig
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    scaler: ShardedGradScaler
    prefix: str = ""
    heads_only: bool = False
    sched: dict[str, float] = field(default_factory=dict)

    def begin(self, it: int) -> None:
        """This iteration's lr / wd on every parameter group; gradients cleared."""
        self.sched = self.schedules.at(it)
        apply_schedules(self.optimizer, self.sched["lr"], self.sched["wd"], self.sched["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)

    def sync_gradients(self, enabled: bool) -> None:
        """Gradients are reduced across ranks once, after the last micro-batch."""
        set_gradient_sync(self.model.student, enabled)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.scaler.scale(loss / accum).backward()

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> dict[str, float]:
        """Unscale, clip each network on its own (official), step, EMA; returns what to log."""
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad:
            for name, module in self.model.student.items():
                if not (self.heads_only and name == "backbone"):
                    clip_grad_norm(module, self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.update_teacher(self.sched["mom"], heads_only=self.heads_only)
        logged = {self.prefix + k: v for k, v in self.sched.items()}
        if self.scaler.is_enabled():
            logged[self.prefix + "grad_scale"] = float(self.scaler.get_scale())
        return logged

    def write_ema_backbone(self, path: Path, what: str, is_main: bool, resume: Resume | None = None) -> Path:
        """The EMA backbone, gathered from every rank, written atomically by rank 0 (official hub layout:
        the artifact later steps use). A full disk is one StorageError naming `resume` (see `storage.py`)."""
        backbone = self.model.teacher["backbone"]
        state = full_state_dict(backbone)
        if is_main:
            with replacing(path, f"the {what}", resume) as tmp:
                if isinstance(backbone, AnyStudent):  # its library's layout, a .safetensors naming the architecture
                    write_any_student(backbone.export_state_dict(state), backbone.spec, tmp)
                else:
                    torch.save(state, tmp)
            log.info("%s written to %s", what, path)
        return path


def build_learner(model: SSLMetaArch, cfg: DictConfig, schedules: Schedules, dtype: torch.dtype,
                  device: torch.device, prefix: str = "", heads_only: bool = False) -> Learner:
    """Place and shard `model`, then its optimizer (over what requires grad) and grad scaler."""
    model.to(device)
    model.shard(dtype)
    enabled = dtype == torch.float16 and bool(cfg.compute_precision.grad_scaler)
    scaler = ShardedGradScaler(device=device.type, enabled=enabled)
    return Learner(model, cfg, build_optimizer(model.student, cfg), schedules, scaler, prefix, heads_only)
