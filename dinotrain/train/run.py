"""A training run from its config: checks, the objective, resume, the data loader, then the one loop.

The same for every objective (`train.objectives.OBJECTIVES`: `dinotrain train` pretrains, `dinotrain distill`
distils), for the CLI and for SLURM jobs. Everything a user can get wrong is checked, on every rank, before any
model is built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dinotrain.config import load_config, save_config
from dinotrain.distributed import peers
from dinotrain.distributed.checkpoint import (Checkpointer, CheckpointError, complete_checkpoints, read_extra,
                                              resume_point)
from dinotrain.distributed.env import DistEnv, all_ranks, destroy_distributed, init_distributed, main_first
from dinotrain.distributed.fsdp import compute_dtype, use_tf32
from dinotrain.data.loader import build_train_dataset, first_sample, train_batches
from dinotrain.train.loop import Phase, run_loop, total_iterations
from dinotrain.train.objectives import objective_class
from dinotrain.train.resume import check_resume, config_changes, log_changes, record_history
from dinotrain.train.rundir import RunDir, move_aside, prepare_run_dir, rewind_metrics, setup_logging
from dinotrain.train.schedules import scaled_lr
from dinotrain.train.stop import StopSignals, Stopped, resume_hint, signal_name

log = logging.getLogger("dinotrain.train")


class TrainingRun:
    """Everything a run needs, built from the config; `run()` trains until the last iteration."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, command: str = "train", resume: bool = True,
                 env: DistEnv | None = None, allow_config_change: bool = False):
        self.env = env or init_distributed()
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        prepare_run_dir(self.run_dir)
        setup_logging(self.run_dir, self.env.is_main)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        candidates = complete_checkpoints(self.run_dir) if resume else []
        newest = _newest_readable(candidates)
        if newest is not None:
            check_resume(newest[1].get("config", {}), cfg, newest[0], allow_config_change)
        self.objective = objective_class(command)(cfg, self.run_dir, self.env, newest[1] if newest else None,
                                                      allow_config_change)
        self.dataset = main_first(lambda: build_train_dataset(cfg, index_cache_dir=self.run_dir), self.env)
        position = newest[1].get("sample_position", 0) if newest else 0
        all_ranks(lambda: first_sample(cfg, self.dataset, self.env.rank, self.env.world_size, position), self.env)
        if self.env.is_main:
            if not resume:
                move_aside(self.run_dir)  # starting over never deletes the previous run
            save_config(cfg, RunDir(self.run_dir).config)
        if dist.is_initialized():
            dist.barrier()

        accum = cfg.train.grad_accum_steps
        global_batch = cfg.train.batch_size_per_gpu * self.env.world_size * accum
        self.max_iter = total_iterations(cfg)
        dtype = compute_dtype(cfg.compute_precision.dtype, self.env.device)
        use_tf32(dtype, self.env.device, cfg.compute_precision.tf32)
        self.objective.build(self.dataset, dtype, global_batch, resuming=bool(candidates))

        # Resume: the newest checkpoint that loads; if there are checkpoints and none loads, stop.
        self.start_iter, position, skipped = 0, 0, 0
        extra = self.checkpointer.load_latest_parts(self.objective.parts(), candidates) if resume else None
        if extra is not None:
            self.start_iter, position = extra["iteration"], extra["sample_position"]
            skipped = int(extra.get("skipped_images", 0)) if self.env.is_main else 0
            self.objective.load_state(extra)
            if position != self.start_iter * global_batch:
                log.info("global batch changed since the checkpoint: the sample stream continues at %d", position)
            if self.env.is_main:
                changes = config_changes(extra.get("config", {}), cfg)
                log_changes(changes, self.start_iter)
                ckpt = RunDir(self.run_dir).checkpoint(self.start_iter)
                record_history(self.run_dir, ckpt, self.start_iter, self.env.world_size, changes)
        if self.env.is_main:
            rewind_metrics(RunDir(self.run_dir).metrics, self.start_iter)
        self.batches, n_images = train_batches(cfg, self.env.rank, self.env.world_size, position, dataset=self.dataset)
        period = cfg.checkpoint.period_iterations or cfg.train.saveckp_freq * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.phase = Phase(
            start=self.start_iter, end=self.max_iter, accum=accum, global_batch=global_batch, seed=cfg.train.seed,
            log_every=cfg.train.log_every, metrics=RunDir(self.run_dir).metrics, nan_tolerance=cfg.train.nan_tolerance,
            diverged_hint=f"train.nan_tolerance={cfg.train.nan_tolerance}: lower optim.base_lr, raise teacher warmup, "
                          "or resume from the last checkpoint with changes.",
            checkpointer=self.checkpointer, checkpoint_period=period,
            config=OmegaConf.to_container(cfg, resolve=True), sample_position=position, skipped_before=skipped)
        log.info("world size %d, device %s, compute dtype %s; %d training images; global batch %d; lr %.3g; "
                 "%d iterations (from %d); checkpoint every %d iterations", self.env.world_size, self.env.device,
                 dtype, n_images, global_batch, scaled_lr(cfg, global_batch), self.max_iter, self.start_iter, period)

    def run(self, stop: StopSignals | None = None) -> dict[str, float]:
        """Train to the last iteration; returns the last logged metrics. SIGTERM / SIGINT (or `stop`'s signals,
        e.g. a SLURM job's) make every rank save a checkpoint at the end of the iteration and return early:
        `stopped_at` is then that iteration (else None)."""
        if stop is None:
            stop = StopSignals(grace_s=self.cfg.checkpoint.stop_grace_s, resume_hint=lambda: resume_hint(self.run_dir))
        self.stop = stop
        with stop.armed():
            last, self.stopped_at = run_loop(self.objective, self.batches, self.phase, self.env, stop)
        return last


def run_command(command: str, config: str | None, overrides: list[str], output_dir: str | None = None,
                resume: bool = True, allow_config_change: bool = False) -> None:
    """`dinotrain train|distill` in this process (or each torchrun process): the config file plus `key=value`
    overrides (`output_dir` as `train.output_dir`), run to the end; the process group is closed after. Raises
    `Stopped` when a signal stopped it (the CLI exits 128 + the signal's number)."""
    overrides = list(overrides)
    if output_dir:
        overrides.append(f"train.output_dir={output_dir}")
    cfg = load_config(config, overrides)
    run = None
    try:
        with peers.reported(lambda: f"after iteration {run.phase.done}" if run else "",
                            lambda: _resumes_from(cfg.train.output_dir)):
            run = TrainingRun(cfg, cfg.train.output_dir, command=command, resume=resume,
                              allow_config_change=allow_config_change)
            run.run()
    finally:
        destroy_distributed()
    if run.stopped_at is not None:
        signum = run.stop.agreed_signum
        raise Stopped(f"stopped by {signal_name(signum)} at iteration {run.stopped_at}: checkpoint "
                      f"{RunDir(run.run_dir).checkpoint(run.stopped_at)} saved; run the same command to resume from it",
                      signum, run.env.is_main)


def _resumes_from(run_dir) -> str:
    """Where the run goes on after a rank was lost: torchrun's next restart, if it has one left, or the user's."""
    point = resume_point(run_dir)
    where = f"checkpoint {point}" if point else "the start (no checkpoint yet)"
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if left > 0:
        return f"torchrun restarts the processes ({left} restart(s) left), which resume from {where}"
    return f"run the same command to resume from {where}"


def _newest_readable(candidates: list[Path]) -> tuple[Path, dict] | None:
    """(checkpoint, its extra state) of the newest checkpoint whose extra state reads; the config check uses it."""
    for ckpt in reversed(candidates):
        try:
            return ckpt, read_extra(ckpt)
        except CheckpointError:
            continue  # reported by load_latest_parts, which skips it the same way
    return None
