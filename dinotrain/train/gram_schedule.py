"""The Gram anchoring schedule (DINOv3): when the Gram teacher takes the EMA teacher's weights, from which
iteration the Gram loss counts, and its weight, as pure functions of the config and the iteration.

Pure, so that a resumed run does at each iteration exactly what the uninterrupted run did: nothing is counted
along the way. Official `dinov3/train/train.py` does the same with two events and a counter:

- at the start of iteration `gram.it_load_ema_teacher` the EMA teacher is loaded into the Gram teacher;
- after iteration `it`, when `rep_update` and `it + 1 >= it_first_update` and `(it + 1) % update_frequency == 0`,
  at most `max_updates` times, the Gram teacher is updated from the EMA teacher.

Nothing changes the EMA teacher between the end of iteration `it` and the start of `it + 1`, so both are said
here as "refresh before the forward of iteration i". Where this departs from the official code, on purpose:

- the update count (for `max_updates`) is the uninterrupted run's; official resume recomputes its counter as
  `ceil((start + 1 - it_first_update) / update_frequency)`, which is that count only when `it_first_update` is
  a positive multiple of `update_frequency` (as in the official Gram-anchoring config);
- an update after the run's last iteration (it only changes the Gram teacher left in the final checkpoint)
  is not made;
- before `it_load_ema_teacher`, without `gram.ckpt`, the official forward stops ("Gram teacher has not been
  initialized"); here the Gram loss is simply not active yet, so one run can pretrain and then anchor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["GramIteration", "gram_at", "gram_refreshes", "gram_start", "gram_weight"]


@dataclass(frozen=True)
class GramIteration:
    """What the training loop does about Gram anchoring at one iteration."""

    refresh: bool  # copy the EMA teacher's backbone into the Gram teacher before this iteration's forward
    active: bool   # the Gram loss is part of this iteration's loss
    weight: float  # its weight at this iteration (gram.loss_weight, or gram.loss_weight_schedule)


def gram_start(cfg: Mapping[str, Any]) -> int | None:
    """First iteration whose loss has the Gram term; None when Gram anchoring is off or has no teacher ever.

    With the EMA teacher itself as Gram teacher (`gram.ema_teacher`) or a Gram teacher from `gram.ckpt`: from
    the start; else from `gram.it_load_ema_teacher`, when the EMA teacher is first copied into it.
    """
    gram = cfg["gram"]
    if not gram["use_loss"]:
        return None
    if gram["ema_teacher"] or gram["ckpt"]:
        return 0
    return gram["it_load_ema_teacher"] if gram["it_load_ema_teacher"] >= 0 else None


def gram_refreshes(cfg: Mapping[str, Any], it: int) -> bool:
    """True when the Gram teacher takes the EMA teacher's weights before iteration `it`'s forward."""
    gram = cfg["gram"]
    if not gram["use_loss"] or gram["ema_teacher"]:  # the EMA teacher itself is the Gram teacher: nothing to copy
        return False
    if it == gram["it_load_ema_teacher"]:
        return True
    freq = gram["update_frequency"]
    if not gram["rep_update"] or it < 1 or it < gram["it_first_update"] or it % freq:
        return False
    # this is the n-th update point: the multiples of update_frequency in [max(it_first_update, 1), it]
    n = it // freq - math.ceil(max(gram["it_first_update"], 1) / freq) + 1
    return gram["max_updates"] is None or n <= gram["max_updates"]


def gram_weight(cfg: Mapping[str, Any], it: int) -> float:
    """The Gram loss weight at iteration `it`: `gram.loss_weight`, or `gram.loss_weight_schedule` when it is set.

    The schedule is official `linear_warmup_cosine_decay` over optim.epochs * OFFICIAL_EPOCH_LENGTH iterations:
    linear from `start` towards `peak` over `warmup_epochs` (peak not reached), a half cosine from `peak` to
    `end` over `cosine_epochs` (null: the rest of the run; both ends reached), then `end`.
    """
    gram = cfg["gram"]
    sched = gram["loss_weight_schedule"]
    if sched["start"] is None:
        return float(gram["loss_weight"])
    epoch = cfg["train"]["OFFICIAL_EPOCH_LENGTH"]
    warmup = sched["warmup_epochs"] * epoch
    cosine = (sched["cosine_epochs"] * epoch if sched["cosine_epochs"] is not None
              else max(cfg["optim"]["epochs"] * epoch - warmup, 0))
    start, peak, end = float(sched["start"]), float(sched["peak"]), float(sched["end"])
    if it < warmup:
        return start + it * ((peak - start) / warmup)
    k = it - warmup
    if k >= cosine:
        return end
    if cosine == 1:  # numpy's linspace(0, pi, 1) is [0]: the one cosine step is `peak`
        angle = 0.0
    elif k == cosine - 1:  # linspace ends exactly at pi
        angle = math.pi
    else:
        angle = k * (math.pi / (cosine - 1))
    return (peak - end) * ((math.cos(angle) + 1) / 2) + end


def gram_at(cfg: Mapping[str, Any], it: int) -> GramIteration:
    """Refresh, active and weight at iteration `it` (0-based, as the loop counts)."""
    start = gram_start(cfg)
    return GramIteration(refresh=gram_refreshes(cfg, it), active=start is not None and it >= start,
                         weight=gram_weight(cfg, it))
