"""The one training loop: SSL pretraining on 1 CPU process up to many GPUs, with exact resume.

Run directory: `config.yaml` (resolved config), `metrics.jsonl` (one JSON object per logged
iteration), `log.txt`, `checkpoints/<iteration>/` (sharded, last N kept) and, at the end,
`teacher_backbone.pth` (the official hub layout, ready for `dinotrain convert` and evaluation; a
distillation writes `students/<name>.pth` instead).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dinotrain.config import save_config
from dinotrain.distributed.checkpoint import (Checkpointer, CheckpointError, Parts, complete_checkpoints,
                                              full_state_dict, read_extra)
from dinotrain.distributed.env import DistEnv, all_reduce_mean, init_distributed, all_ranks, main_first
from dinotrain.distributed.fsdp import clip_grad_norm, compute_dtype, set_gradient_sync, use_tf32
from dinotrain.data.loader import (UnreadableDatasetError, build_train_dataset, build_train_loader, first_sample,
                                   to_device)
from dinotrain.data.seeds import seed_step
from dinotrain.train.resume import check_resume, config_changes, log_changes, record_history
from dinotrain.train.rundir import move_aside, prepare_run_dir, rewind_metrics, setup_logging
from dinotrain.train.optim import apply_schedules, build_optimizer
from dinotrain.train.schedules import Schedules, build_schedules, scaled_lr
from dinotrain.train.ssl import OFFICIAL_LOGGED_LOSSES, SSLMetaArch

log = logging.getLogger("dinotrain.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf more often in a row than `train.nan_tolerance` allows."""


def total_iterations(cfg: DictConfig) -> int:
    full = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    return min(full, cfg.train.max_iterations) if cfg.train.max_iterations else full


def finite_everywhere(flags: list[torch.Tensor]) -> torch.Tensor:
    """1-element float tensor: 1 when every flag is true on every rank, else 0 (no host sync)."""
    flag = torch.stack(flags).all().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Learner:
    """One trained network set: its meta-architecture (student + EMA), optimizer, schedules, fp16 grad
    scaler, and the prefix of its metrics ("" in pretraining, "<student name>/" in distillation)."""

    model: SSLMetaArch
    cfg: DictConfig
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    scaler: object | None
    prefix: str = ""


class Trainer:
    """Builds everything a run needs from the config, then `run()` trains until the last iteration.

    The loop (data, sample-stream position, logging, divergence guard, checkpoints, resume) is shared
    with distillation (`train/distill.py`), which overrides how learners are built, what one micro-step
    computes, what a checkpoint holds and what the run leaves behind.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume: bool = True, env: DistEnv | None = None,
                 allow_config_change: bool = False):
        self.env = env or init_distributed()
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        # 1. Everything a user can get wrong is checked before any model is built, on every rank.
        prepare_run_dir(self.run_dir)
        setup_logging(self.run_dir, self.env.is_main)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self.candidates = complete_checkpoints(self.run_dir) if resume else []
        newest = self._newest_readable_checkpoint() if resume else None
        if newest is not None:
            check_resume(newest[1].get("config", {}), cfg, newest[0], allow_config_change)
        self._check_before_start(newest[1] if newest else None)
        self.dataset = main_first(lambda: build_train_dataset(cfg, index_cache_dir=self.run_dir), self.env)
        position = newest[1].get("sample_position", 0) if newest else 0
        all_ranks(lambda: first_sample(cfg, self.dataset, self.env.rank, self.env.world_size, position), self.env)
        if self.env.is_main:
            if not resume:
                move_aside(self.run_dir)  # starting over never deletes the previous run
            save_config(cfg, self.run_dir / "config.yaml")
        if dist.is_initialized():
            dist.barrier()

        # 2. The models, sharded, and their optimizers.
        self.accum = cfg.train.grad_accum_steps
        self.batch = cfg.train.batch_size_per_gpu
        self.global_batch = self.batch * self.env.world_size * self.accum
        self.schedules = build_schedules(cfg, scaled_lr(cfg, self.global_batch))
        self.max_iter = total_iterations(cfg)
        self.dtype = compute_dtype(cfg.compute_precision.dtype, self.env.device)
        use_tf32(self.dtype, self.env.device, cfg.compute_precision.tf32)
        self.learners = self._build_learners(resuming=bool(self.candidates))

        # 3. Resume: the newest checkpoint that loads; if there are checkpoints and none loads, stop.
        self.start_iter, self.sample_position, self.skipped_before = 0, 0, 0
        extra = self.checkpointer.load_latest_parts(self._checkpoint_parts(), self.candidates) if resume else None
        if extra is not None:
            self.start_iter, self.sample_position = extra["iteration"], extra["sample_position"]
            self.skipped_before = int(extra.get("skipped_images", 0)) if self.env.is_main else 0
            self._restore_extra(extra)
            if self.sample_position != self.start_iter * self.global_batch:
                log.info("global batch changed since the checkpoint: the sample stream continues at %d",
                         self.sample_position)
            if self.env.is_main:
                changes = config_changes(extra.get("config", {}), cfg)
                log_changes(changes, self.start_iter)
                ckpt = self.run_dir / "checkpoints" / f"{self.start_iter:08d}"
                record_history(self.run_dir, ckpt, self.start_iter, self.env.world_size, changes)
        if self.env.is_main:
            rewind_metrics(self.run_dir / "metrics.jsonl", self.start_iter)
        self.loader, n_images = build_train_loader(
            cfg, self.env.rank, self.env.world_size, self.sample_position, dataset=self.dataset)
        period = cfg.checkpoint.period_iterations or cfg.train.saveckp_freq * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.checkpoint_period = period
        log.info("world size %d, device %s, compute dtype %s; %d training images; global batch %d; lr %.3g; "
                 "%d iterations (from %d); checkpoint every %d iterations", self.env.world_size, self.env.device,
                 self.dtype, n_images, self.global_batch, scaled_lr(cfg, self.global_batch),
                 self.max_iter, self.start_iter, period)

    # ---- what differs between pretraining and distillation ------------------------------------------
    def _check_before_start(self, newest_extra: dict | None) -> None:
        """More checks of user input before the dataset and the models are built (distillation's teacher)."""

    def _build_learners(self, resuming: bool) -> list[Learner]:
        """The student + EMA teacher of pretraining, from pretrained weights (heads warmed up) if configured."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        model = SSLMetaArch(cfg)
        if cfg.student.pretrained_weights and not resuming:  # a resumed run takes everything from its checkpoint
            from dinotrain.train.head_warmup import pretrained_with_heads

            model.load_student_backbone(pretrained_with_heads(cfg, self.run_dir, self.env, self.dataset))
        return [self._learner(model, cfg, self.schedules)]

    def _learner(self, model: SSLMetaArch, cfg: DictConfig, schedules: Schedules, prefix: str = "") -> Learner:
        model.to(self.env.device)
        model.shard(self.dtype)
        scaler = None
        if self.dtype == torch.float16 and cfg.compute_precision.grad_scaler:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device=self.env.device.type)
        return Learner(model, cfg, build_optimizer(model.student, cfg), schedules, scaler, prefix)

    def _checkpoint_parts(self) -> Parts:
        return {"": (self.model, self.optimizer)}

    def _save_extra(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def _restore_extra(self, extra: dict) -> None:
        if self.scaler is not None and extra.get("grad_scaler"):
            self.scaler.load_state_dict(extra["grad_scaler"])

    def _forward_backward(self, batch: dict, it: int, micro: int) -> dict[str, tuple[torch.Tensor, dict]]:
        """One micro-batch: each learner's (backpropagated loss, logged terms), after its backward."""
        sched = self.schedules.at(it)
        total, terms = self.model.compute_losses(batch, sched["teacher_temp"])
        self._backward(self.learners[0], total)
        return {"": (total, terms)}

    def _log_line(self, last: dict) -> str:
        return (f"loss {last['total_loss']:.4f} (dino g {last.get('dino_global_crops_loss', 0):.4f} "
                f"l {last.get('dino_local_crops_loss', 0):.4f}, ibot {last.get('ibot_loss', 0):.4f}, "
                f"koleo {last.get('koleo_loss', 0):.4f})  lr {last['lr']:.2e}")

    def export_final(self) -> None:
        self.export_teacher()

    # ---- the single learner of pretraining (tests and tools use these names) -------------------------
    @property
    def model(self) -> SSLMetaArch:
        return self.learners[0].model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learners[0].optimizer

    @property
    def scaler(self):
        return self.learners[0].scaler

    def _newest_readable_checkpoint(self) -> tuple[Path, dict] | None:
        """(checkpoint, its extra.json) of the newest checkpoint whose extra.json reads; the config check uses it."""
        for ckpt in reversed(self.candidates):
            try:
                return ckpt, read_extra(ckpt)
            except CheckpointError:
                continue  # reported by load_latest, which skips it the same way
        return None

    # ---- one iteration -------------------------------------------------------------------------
    def _backward(self, learner: Learner, total: torch.Tensor) -> None:
        scaled = total / self.accum
        (learner.scaler.scale(scaled) if learner.scaler else scaled).backward()

    def _step(self, it: int, batches) -> dict[str, float]:
        scheds = {}
        for learner in self.learners:
            scheds[learner.prefix] = sched = learner.schedules.at(it)
            apply_schedules(learner.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
            learner.optimizer.zero_grad(set_to_none=True)
        # Loss terms stay on the device until the end of the step: one host sync per step (the NaN guard and
        # every logged value come back together), not one per term and micro-batch.
        sums: dict[str, torch.Tensor] = {}
        finite = []
        n_skipped = 0
        for micro, batch in enumerate(batches):
            n_skipped += batch["n_skipped"]
            batch = to_device(batch, self.env.device)
            for learner in self.learners:  # gradients are reduced across ranks once, after the last micro-batch
                set_gradient_sync(learner.model.student, micro == len(batches) - 1)
            for prefix, (total, terms) in self._forward_backward(batch, it, micro).items():
                finite.append(torch.isfinite(total.detach()))
                for k, v in {"backprop_loss": total, **terms}.items():
                    sums[prefix + k] = sums.get(prefix + k, 0.0) + v.detach().float() / self.accum
        finite, sums = self._to_host(finite, sums)
        for prefix in scheds:  # official convention: the displayed total is the sum of the displayed terms
            sums[prefix + "total_loss"] = sum(sums[prefix + k] for k in OFFICIAL_LOGGED_LOSSES if prefix + k in sums)
        if not finite:
            for learner in self.learners:
                learner.optimizer.zero_grad(set_to_none=True)
            return {**sums, "finite": 0.0, "n_skipped": n_skipped}
        out = {**sums}
        for learner in self.learners:
            out.update(self._optimizer_step(learner, scheds[learner.prefix]))
            out.update({learner.prefix + k: v for k, v in scheds[learner.prefix].items()})
        return {**out, "finite": 1.0, "n_skipped": n_skipped}

    def _to_host(self, finite: list[torch.Tensor], sums: dict[str, torch.Tensor]) -> tuple[bool, dict[str, float]]:
        """(finite on every rank, the logged sums as floats) with a single device-to-host copy."""
        keys = list(sums)
        values = torch.cat([finite_everywhere(finite), torch.stack([sums[k].reshape(()) for k in keys])]).tolist()
        return bool(values[0]), dict(zip(keys, values[1:]))

    def _optimizer_step(self, learner: Learner, sched: dict[str, float]) -> dict[str, float]:
        """Unscale, clip each network on its own (official), step, EMA; returns what to log."""
        logged = {}
        if learner.scaler is not None:
            learner.scaler.unscale_(learner.optimizer)
        if learner.cfg.optim.clip_grad:
            for module in learner.model.student.values():
                clip_grad_norm(module, learner.cfg.optim.clip_grad)
        if learner.scaler is not None:
            learner.scaler.step(learner.optimizer)
            learner.scaler.update()
            logged[learner.prefix + "grad_scale"] = float(learner.scaler.get_scale())
        else:
            learner.optimizer.step()
        learner.model.update_teacher(sched["mom"])
        return logged

    def _save(self, it: int, skipped_images: int) -> None:
        self.checkpointer.save_parts(it, self._checkpoint_parts(), {
            "sample_position": self.sample_position,
            "world_size": self.env.world_size,
            "skipped_images": self._sum_over_ranks(skipped_images),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            **self._save_extra(),
        })

    def _sum_over_ranks(self, value: int) -> int:
        return int(round(all_reduce_mean({"n": float(value)}, self.env.device, sum_keys=("n",))["n"]))

    def _next_batches(self, data) -> list[dict]:
        try:
            return [next(data) for _ in range(self.accum)]
        except UnreadableDatasetError as exc:  # from a DataLoader worker the message carries its traceback
            raise UnreadableDatasetError(str(exc).strip().splitlines()[-1].split("UnreadableDatasetError: ")[-1]) from exc

    def run(self, stop=None) -> dict[str, float]:
        """Train from the current iteration to the last; returns the last logged metrics.

        `stop` (a `launch.job.StopRequest`, in SLURM jobs): after each iteration all ranks agree whether
        any of them got the preemption / time-limit signal; if so they save a checkpoint together and
        return early with `self.stopped_at` set to the iteration reached (no final export).
        """
        self.stopped_at = None
        if stop is None:
            return self._run()
        with stop.armed():
            return self._run(stop)

    def _run(self, stop=None) -> dict[str, float]:
        data = iter(self.loader)
        metrics_path = self.run_dir / "metrics.jsonl"
        bad_in_a_row, skipped_images = 0, self.skipped_before
        last: dict[str, float] = {}
        t_log, it_log = time.perf_counter(), self.start_iter
        t_start = t_log
        for it in range(self.start_iter, self.max_iter):
            seed_step(self.cfg.train.seed, it, self.env.rank)
            batches = self._next_batches(data)
            out = self._step(it, batches)
            self.sample_position += self.global_batch
            skipped_images += int(out.pop("n_skipped"))
            if not out.pop("finite"):
                bad_in_a_row += 1
                losses = ", ".join(("" if k == "backprop_loss" else k.split("/")[0] + " ") + str(v)
                                   for k, v in out.items() if k.endswith("backprop_loss"))
                log.warning("iteration %d: non-finite loss %s (step skipped, %d in a row)", it, losses, bad_in_a_row)
                if bad_in_a_row > self.cfg.train.nan_tolerance:
                    raise TrainingDiverged(
                        f"training diverged: the loss is {losses} at iteration {it} "
                        f"({bad_in_a_row} non-finite in a row, train.nan_tolerance={self.cfg.train.nan_tolerance}). "
                        "Lower optim.base_lr, raise teacher warmup, or resume from the last checkpoint with changes.")
                continue
            bad_in_a_row = 0
            done = it + 1
            if done % self.cfg.train.log_every == 0 or done == self.max_iter:
                now = time.perf_counter()
                imgs_per_s = (done - it_log) * self.global_batch / max(now - t_log, 1e-9)
                reduced = all_reduce_mean({**out, "skipped_images": float(skipped_images)}, self.env.device,
                                          sum_keys=("skipped_images",))
                reduced["skipped_images"] = int(round(reduced["skipped_images"]))
                last = {"iteration": done, **reduced, "images_per_s": imgs_per_s}
                if self.env.is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                    eta = (now - t_start) / max(done - self.start_iter, 1) * (self.max_iter - done)
                    log.info("it %d/%d  %s  %.1f img/s  eta %s%s", done, self.max_iter, self._log_line(last),
                             imgs_per_s, _format_eta(eta), f"  ({last['skipped_images']} unreadable images replaced "
                             "so far)" if last["skipped_images"] else "")
                t_log, it_log = now, done
            if done % self.checkpoint_period == 0 and done != self.max_iter:
                self._save(done, skipped_images)
            if stop is not None and done != self.max_iter and stop.agreed(self.env.device):
                if done % self.checkpoint_period != 0:
                    self._save(done, skipped_images)
                self.stopped_at = done
                return last
        if self.max_iter > self.start_iter:
            self._save(self.max_iter, skipped_images)
        self.export_final()
        total_skipped = self._sum_over_ranks(skipped_images)
        if total_skipped:
            log.warning("%d unreadable images were replaced by others during training (the log names each)",
                        total_skipped)
        return last

    def export_teacher(self) -> Path:
        """Write the teacher backbone as an official hub state dict (the artifact later steps use)."""
        return self._write_ema_backbone(self.learners[0], self.run_dir / "teacher_backbone.pth", "teacher backbone")

    def _write_ema_backbone(self, learner: Learner, path: Path, what: str) -> Path:
        """A learner's EMA backbone, gathered from every rank, written atomically by rank 0 (hub layout)."""
        state = full_state_dict(learner.model.teacher["backbone"])
        if self.env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)
            log.info("%s written to %s", what, path)
        return path


def train(cfg: DictConfig, run_dir: str | Path, resume: bool = True, allow_config_change: bool = False) -> dict[str, float]:
    return Trainer(cfg, run_dir, resume=resume, allow_config_change=allow_config_change).run()

