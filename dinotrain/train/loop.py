"""The one training loop: it runs an objective (pretraining, distillation, the head warm-up) from one
iteration to another, and does not know which.

An objective has `learners` (each: networks, optimizer, schedules, grad scaler, EMA; `train/learner.py`),
`losses(batch, it, micro)` yielding (learner, loss, logged terms) for each learner in turn (the loop
backpropagates each before the next is computed), `parts()` / `state()` / `load_state()` for checkpoints,
`log_line(metrics)` and `finish()` (the final exports). A step, as data flows: the learners' schedules ->
per micro-batch: batch to the device, losses, backward -> one host sync (NaN guard + logged values) ->
each learner's clip, optimizer step, EMA. Then metrics, the periodic checkpoint, a stop request.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dinotrain.config_schema import run_iterations
from dinotrain.data.loader import Batches, DataWorkersDied, to_device
from dinotrain.data.seeds import seed_step
from dinotrain.distributed.checkpoint import Checkpointer, Parts
from dinotrain.distributed.compile import compile_error, is_compile_failure
from dinotrain.distributed.env import DistEnv, all_reduce_mean
from dinotrain.storage import no_checkpoint, writing
from dinotrain.train.learner import Learner
from dinotrain.train.stop import StopSignals, resume_hint
from dinotrain.train.ssl import OFFICIAL_LOGGED_LOSSES

log = logging.getLogger("dinotrain.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf more often in a row than `train.nan_tolerance` allows."""


class Objective(Protocol):
    learners: list[Learner]

    def losses(self, batch: dict, it: int, micro: int): ...  # -> Iterator[(Learner, loss, logged terms)]
    def parts(self) -> Parts: ...
    def state(self) -> dict: ...
    def load_state(self, extra: dict) -> None: ...
    def log_line(self, last: dict) -> str: ...
    def finish(self) -> None: ...


@dataclass
class Phase:
    """One stretch of the loop: iterations [start, end), its randomness, logs and checkpoints."""

    start: int
    end: int
    accum: int
    global_batch: int
    seed: int  # per-step seeds come from (seed, iteration, rank)
    log_every: int
    metrics: Path  # one JSON record per logged iteration (written by rank 0)
    nan_tolerance: int = 0
    diverged_hint: str = ""
    label: str = ""  # prefix of the log lines ("head warm-up ")
    checkpointer: Checkpointer | None = None  # None: no checkpoints (the head warm-up)
    checkpoint_period: int = 0
    config: dict | None = None  # the run's resolved config, recorded in each checkpoint
    sample_position: int = 0
    skipped_before: int = 0

    def __post_init__(self) -> None:
        self._first_position = self.sample_position

    @property
    def done(self) -> int:
        """Iterations completed so far (the loop moves `sample_position` on by a global batch per iteration)."""
        return self.start + (self.sample_position - self._first_position) // self.global_batch


def total_iterations(cfg: DictConfig) -> int:
    """The run's iterations (the config checks use the same count: `config_schema.run_iterations`)."""
    return run_iterations(cfg)


def finite_everywhere(flags: list[torch.Tensor]) -> torch.Tensor:
    """1-element float tensor: 1 when every flag is true on every rank, else 0 (no host sync)."""
    flag = torch.stack(flags).all().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag


def train_step(objective: Objective, batches: list[dict], it: int, device: torch.device) -> dict[str, float]:
    """One iteration over `batches` (its micro-batches); returns the logged values, `finite` and `n_skipped`."""
    for learner in objective.learners:
        learner.begin(it)
    # Loss terms stay on the device until the end of the step: one host sync per step (the NaN guard and
    # every logged value come back together), not one per term and micro-batch.
    sums: dict[str, torch.Tensor] = {}
    finite, n_skipped, accum = [], 0, len(batches)
    for micro, batch in enumerate(batches):
        n_skipped += batch["n_skipped"]
        batch = to_device(batch, device)
        for learner in objective.learners:
            learner.sync_gradients(micro == accum - 1)
        for learner, total, terms in objective.losses(batch, it, micro):
            learner.backward(total, accum)
            finite.append(torch.isfinite(total.detach()))
            for k, v in {"backprop_loss": total, **terms}.items():
                key = learner.prefix + k
                sums[key] = sums.get(key, 0.0) + v.detach().float() / accum
    keys = list(sums)
    values = torch.cat([finite_everywhere(finite), torch.stack([sums[k].reshape(()) for k in keys])]).tolist()
    out = dict(zip(keys, values[1:]))
    for learner in objective.learners:  # official convention: the displayed total is the sum of the displayed terms
        p = learner.prefix
        out[p + "total_loss"] = sum(out[p + k] for k in OFFICIAL_LOGGED_LOSSES if p + k in out)
    if not values[0]:
        for learner in objective.learners:
            learner.skip()
        return {**out, "finite": 0.0, "n_skipped": n_skipped}
    for learner in objective.learners:
        out.update(learner.finish())
    return {**out, "finite": 1.0, "n_skipped": n_skipped}


def run_loop(objective: Objective, batches: Batches, phase: Phase, env: DistEnv,
             stop: StopSignals | None = None) -> tuple[dict, int | None]:
    """Train from `phase.start` to `phase.end`; returns (the last logged metrics, the iteration a stop
    request ended it at, or None). `stop` (`train/stop.py`): after each iteration all ranks agree
    whether any got a stop signal; if so they save a checkpoint together and return (no final export)."""
    try:
        return _run(objective, batches, phase, env, stop)
    except DataWorkersDied as exc:
        hint = resume_hint(phase.checkpointer.run.root) if phase.checkpointer else ""
        raise DataWorkersDied(f"{exc}; {hint}" if hint else str(exc)) from exc
    except Exception as exc:  # fsdp.compile: the blocks compile in the first steps (and on new shapes)
        if not is_compile_failure(exc):
            raise
        raise compile_error(exc) from exc
    finally:
        batches.close()


def _run(objective: Objective, batches: Batches, phase: Phase, env: DistEnv, stop) -> tuple[dict, int | None]:
    bad_in_a_row, skipped = 0, phase.skipped_before
    last: dict = {}
    t_start = t_log = time.perf_counter()
    it_log = phase.start
    for it in range(phase.start, phase.end):
        t_iter = time.perf_counter()
        seed_step(phase.seed, it, env.rank)
        out = train_step(objective, batches.next_step(phase.accum, phase.sample_position), it, env.device)
        phase.sample_position += phase.global_batch
        skipped += int(out.pop("n_skipped"))
        if not out.pop("finite"):
            bad_in_a_row += 1
            losses = ", ".join(("" if k == "backprop_loss" else k.split("/")[0] + " ") + str(v)
                               for k, v in out.items() if k.endswith("backprop_loss"))
            log.warning("%siteration %d: non-finite loss %s (step skipped, %d in a row)", phase.label, it, losses,
                        bad_in_a_row)
            if bad_in_a_row > phase.nan_tolerance:
                raise TrainingDiverged(f"{phase.label or 'training '}diverged: the loss is {losses} at iteration {it} "
                                       f"({bad_in_a_row} non-finite in a row). {phase.diverged_hint}")
            continue
        bad_in_a_row = 0
        done = it + 1
        if done % phase.log_every == 0 or done == phase.end:
            now = time.perf_counter()
            reduced = all_reduce_mean({**out, "skipped_images": float(skipped)}, env.device,
                                      sum_keys=("skipped_images",))
            reduced["skipped_images"] = int(round(reduced["skipped_images"]))
            imgs_per_s = (done - it_log) * phase.global_batch / max(now - t_log, 1e-9)
            last = {"iteration": done, **reduced, "images_per_s": imgs_per_s}
            if env.is_main:
                resume = phase.checkpointer.resume_point if phase.checkpointer else no_checkpoint
                with writing(phase.metrics, f"the metrics of iteration {done}", resume), phase.metrics.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                eta = (now - t_start) / max(done - phase.start, 1) * (phase.end - done)
                log.info("%sit %d/%d  %s  %.1f img/s  eta %s%s", phase.label, done, phase.end, objective.log_line(last),
                         last["images_per_s"], _format_eta(eta), f"  ({last['skipped_images']} unreadable images "
                         "replaced so far)" if last["skipped_images"] else "")
            t_log, it_log = now, done
        if phase.checkpointer and done % phase.checkpoint_period == 0 and done != phase.end:
            t_save = time.perf_counter()
            _save(objective, phase, done, skipped, env)
            if stop is not None:  # what a stop signal would need: the rest of an iteration, then a save
                stop.note_stop_cost(time.perf_counter() - t_save + (t_save - t_iter))
        if stop is not None and done != phase.end and stop.agreed(env.device):
            if phase.checkpointer and done % phase.checkpoint_period != 0:
                _save(objective, phase, done, skipped, env)
            return last, done
    if phase.checkpointer and phase.end > phase.start:
        _save(objective, phase, phase.end, skipped, env)
    objective.finish()
    total_skipped = _sum_over_ranks(skipped, env)
    if total_skipped:
        log.warning("%d unreadable images were replaced by others during training (the log names each)",
                    total_skipped)
    return last, None


def _save(objective: Objective, phase: Phase, it: int, skipped: int, env: DistEnv) -> None:
    phase.checkpointer.save_parts(it, objective.parts(), {
        "sample_position": phase.sample_position,
        "world_size": env.world_size,
        "skipped_images": _sum_over_ranks(skipped, env),
        "config": phase.config,
        **objective.state(),
    })


def _sum_over_ranks(value: int, env: DistEnv) -> int:
    return int(round(all_reduce_mean({"n": float(value)}, env.device, sum_keys=("n",))["n"]))


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
