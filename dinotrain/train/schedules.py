"""Per-iteration schedules of the official recipe: lr, weight decay, teacher momentum and temperature.

Each is a precomputed array indexed by iteration (the official `CosineScheduler` semantics): an
optional frozen prefix at 0, a linear warmup that reaches the base value on its last step, then a
half-cosine to the final value; past the end the final value holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig


class CosineScheduler:
    """freeze (zeros) -> linear warmup (start_warmup_value .. base_value) -> cosine (base .. final)."""

    def __init__(self, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0, freeze_iters: int = 0):
        warmup_iters = min(warmup_iters, total_iters)
        freeze_iters = min(freeze_iters, total_iters - warmup_iters)
        self.final_value = final_value
        self.total_iters = total_iters
        cosine_len = total_iters - warmup_iters - freeze_iters
        steps = np.arange(cosine_len)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(cosine_len, 1)))
        self.schedule = np.concatenate((
            np.zeros(freeze_iters),
            np.linspace(start_warmup_value, base_value, warmup_iters),
            cosine,
        ))
        assert len(self.schedule) == total_iters

    def __getitem__(self, it: int) -> float:
        return float(self.final_value if it >= self.total_iters else self.schedule[it])


class WarmupThenConstant:
    """Linear warmup then constant (the teacher temperature schedule)."""

    def __init__(self, start_value: float, value: float, warmup_iters: int):
        self.start_value, self.value, self.warmup_iters = start_value, value, warmup_iters
        self._ramp = np.linspace(start_value, value, warmup_iters)

    def __getitem__(self, it: int) -> float:
        return float(self._ramp[it]) if it < self.warmup_iters else float(self.value)


@dataclass
class Schedules:
    lr: CosineScheduler
    last_layer_lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: WarmupThenConstant
    total_iters: int

    def at(self, it: int) -> dict[str, float]:
        return {"lr": self.lr[it], "last_layer_lr": self.last_layer_lr[it], "wd": self.wd[it],
                "mom": self.momentum[it], "teacher_temp": self.teacher_temp[it]}


def scaled_lr(cfg: DictConfig, global_batch_size: int) -> float:
    """`optim.base_lr` is for a global batch of 1024; scale it to ours (official `scaling_rule`)."""
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        return cfg.optim.base_lr * (global_batch_size / 1024.0) ** 0.5
    if rule == "linear_wrt_1024":
        return cfg.optim.base_lr * global_batch_size / 1024.0
    return cfg.optim.base_lr


def build_schedules(cfg: DictConfig, lr: float) -> Schedules:
    """All schedules of a run from the config; epochs are `train.OFFICIAL_EPOCH_LENGTH` iterations."""
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch_len
    lr_kwargs = dict(base_value=lr, final_value=cfg.optim.min_lr, total_iters=total,
                     warmup_iters=cfg.optim.warmup_epochs * epoch_len, start_warmup_value=0.0)
    return Schedules(
        lr=CosineScheduler(**lr_kwargs),
        # the prototype layers are frozen for the first epochs: their lr is the lr schedule with a zero prefix
        last_layer_lr=_with_frozen_prefix(CosineScheduler(**lr_kwargs), cfg.optim.freeze_last_layer_epochs * epoch_len),
        wd=CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=WarmupThenConstant(cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp,
                                        cfg.teacher.warmup_teacher_temp_epochs * epoch_len),
        total_iters=total,
    )


def _with_frozen_prefix(sched: CosineScheduler, freeze_iters: int) -> CosineScheduler:
    sched.schedule[: min(freeze_iters, len(sched.schedule))] = 0.0
    return sched
