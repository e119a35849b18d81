"""The one training loop: SSL pretraining on 1 CPU process up to many GPUs, with exact resume.

Run directory: `config.yaml` (resolved config), `metrics.jsonl` (one JSON object per logged
iteration), `log.txt`, `checkpoints/<iteration>/` (sharded, last N kept) and, at the end,
`teacher_backbone.pth` (the official hub layout, ready for `dinotrain convert` and evaluation).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dinotrain.config import save_config
from dinotrain.distributed.checkpoint import (Checkpointer, CheckpointError, complete_checkpoints, full_state_dict,
                                              read_extra)
from dinotrain.distributed.env import DistEnv, all_reduce_mean, init_distributed, all_ranks, main_first
from dinotrain.distributed.fsdp import clip_grad_norm, compute_dtype
from dinotrain.train.batches import (UnreadableDatasetError, build_train_dataset, build_train_loader, first_sample,
                                     seed_step, to_device)
from dinotrain.train.resume import check_resume, config_changes, log_changes, record_history
from dinotrain.train.rundir import move_aside, prepare_run_dir, rewind_metrics, setup_logging
from dinotrain.train.optim import apply_schedules, build_optimizer
from dinotrain.train.schedules import build_schedules, scaled_lr
from dinotrain.train.ssl import OFFICIAL_LOGGED_LOSSES, SSLMetaArch

log = logging.getLogger("dinotrain.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf more often in a row than `train.nan_tolerance` allows."""


def total_iterations(cfg: DictConfig) -> int:
    full = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    return min(full, cfg.train.max_iterations) if cfg.train.max_iterations else full


def _finite_everywhere(loss: torch.Tensor) -> bool:
    flag = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Builds everything a run needs from the config, then `run()` trains until the last iteration."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume: bool = True, env: DistEnv | None = None,
                 allow_config_change: bool = False):
        self.env = env or init_distributed()
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        # 1. Everything a user can get wrong is checked before any model is built, on every rank.
        prepare_run_dir(self.run_dir)
        setup_logging(self.run_dir, self.env.is_main)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self.candidates = complete_checkpoints(self.run_dir) if resume else []
        newest = self._newest_readable_checkpoint() if resume else None
        if newest is not None:
            check_resume(newest[1].get("config", {}), cfg, newest[0], allow_config_change)
        self.dataset = main_first(lambda: build_train_dataset(cfg, index_cache_dir=self.run_dir), self.env)
        position = newest[1].get("sample_position", 0) if newest else 0
        all_ranks(lambda: first_sample(cfg, self.dataset, self.env.rank, self.env.world_size, position), self.env)
        if self.env.is_main:
            if not resume:
                move_aside(self.run_dir)  # starting over never deletes the previous run
            save_config(cfg, self.run_dir / "config.yaml")
        if dist.is_initialized():
            dist.barrier()

        # 2. The model, sharded, and its optimizer.
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        self.accum = cfg.train.grad_accum_steps
        self.batch = cfg.train.batch_size_per_gpu
        self.global_batch = self.batch * self.env.world_size * self.accum
        lr = scaled_lr(cfg, self.global_batch)
        self.schedules = build_schedules(cfg, lr)
        self.max_iter = total_iterations(cfg)

        self.model = SSLMetaArch(cfg)
        if cfg.student.pretrained_weights:
            self.model.load_student_backbone(cfg.student.pretrained_weights)
        self.model.to(self.env.device)
        self.dtype = compute_dtype(cfg.compute_precision.dtype, self.env.device)
        self.model.shard(self.dtype)
        self.optimizer = build_optimizer(self.model.student, cfg)
        self.scaler = None
        if self.dtype == torch.float16 and cfg.compute_precision.grad_scaler:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=self.env.device.type)

        # 3. Resume: the newest checkpoint that loads; if there are checkpoints and none loads, stop.
        self.start_iter, self.sample_position, self.skipped_before = 0, 0, 0
        extra = self.checkpointer.load_latest(self.model, self.optimizer, self.candidates) if resume else None
        if extra is not None:
            self.start_iter, self.sample_position = extra["iteration"], extra["sample_position"]
            self.skipped_before = int(extra.get("skipped_images", 0)) if self.env.is_main else 0
            if self.scaler is not None and extra.get("grad_scaler"):
                self.scaler.load_state_dict(extra["grad_scaler"])
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
                 self.dtype, n_images, self.global_batch, lr, self.max_iter, self.start_iter, period)

    def _newest_readable_checkpoint(self) -> tuple[Path, dict] | None:
        """(checkpoint, its extra.json) of the newest checkpoint whose extra.json reads; the config check uses it."""
        for ckpt in reversed(self.candidates):
            try:
                return ckpt, read_extra(ckpt)
            except CheckpointError:
                continue  # reported by load_latest, which skips it the same way
        return None

    # ---- one iteration -------------------------------------------------------------------------
    def _step(self, it: int, batches) -> dict[str, float]:
        sched = self.schedules.at(it)
        apply_schedules(self.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        n_skipped = 0
        for batch in batches:
            n_skipped += batch["n_skipped"]
            batch = to_device(batch, self.env.device)
            total, terms = self.model.compute_losses(batch, sched["teacher_temp"])
            finite = finite and _finite_everywhere(total.detach())
            scaled = total / self.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for k, v in {"backprop_loss": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / self.accum
        # official convention: the displayed total is the sum of the displayed terms
        sums["total_loss"] = sum(sums[k] for k in OFFICIAL_LOGGED_LOSSES if k in sums)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return {**sums, "finite": 0.0, "n_skipped": n_skipped}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad:
            for module in self.model.student.values():  # official: each network clipped on its own
                clip_grad_norm(module, self.cfg.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            sums["grad_scale"] = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        self.model.update_teacher(sched["mom"])
        return {**sums, **sched, "finite": 1.0, "n_skipped": n_skipped}

    def _save(self, it: int, skipped_images: int) -> None:
        self.checkpointer.save(it, self.model, self.optimizer, {
            "sample_position": self.sample_position,
            "world_size": self.env.world_size,
            "skipped_images": self._sum_over_ranks(skipped_images),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        })

    def _sum_over_ranks(self, value: int) -> int:
        return int(round(all_reduce_mean({"n": float(value)}, self.env.device, sum_keys=("n",))["n"]))

    def _next_batches(self, data) -> list[dict]:
        try:
            return [next(data) for _ in range(self.accum)]
        except UnreadableDatasetError as exc:  # from a DataLoader worker the message carries its traceback
            raise UnreadableDatasetError(str(exc).strip().splitlines()[-1].split("UnreadableDatasetError: ")[-1]) from exc

    def run(self) -> dict[str, float]:
        """Train from the current iteration to the last; returns the last logged metrics."""
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
                log.warning("iteration %d: non-finite loss %s (step skipped, %d in a row)", it, out.get("backprop_loss"),
                            bad_in_a_row)
                if bad_in_a_row > self.cfg.train.nan_tolerance:
                    raise TrainingDiverged(
                        f"training diverged: the loss is {out.get('backprop_loss')} at iteration {it} "
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
                    log.info("it %d/%d  loss %.4f (dino g %.4f l %.4f, ibot %.4f, koleo %.4f)  lr %.2e  "
                             "%.1f img/s  eta %s%s", done, self.max_iter, last["total_loss"],
                             last.get("dino_global_crops_loss", 0), last.get("dino_local_crops_loss", 0),
                             last.get("ibot_loss", 0), last.get("koleo_loss", 0), last["lr"], imgs_per_s,
                             _format_eta(eta), f"  ({last['skipped_images']} unreadable images replaced so far)"
                             if last["skipped_images"] else "")
                t_log, it_log = now, done
            if done % self.checkpoint_period == 0 and done != self.max_iter:
                self._save(done, skipped_images)
        if self.max_iter > self.start_iter:
            self._save(self.max_iter, skipped_images)
        self.export_teacher()
        total_skipped = self._sum_over_ranks(skipped_images)
        if total_skipped:
            log.warning("%d unreadable images were replaced by others during training (the log names each)",
                        total_skipped)
        return last

    def export_teacher(self) -> Path:
        """Write the teacher backbone as an official hub state dict (the artifact later steps use)."""
        state = full_state_dict(self.model.teacher["backbone"])
        path = self.run_dir / "teacher_backbone.pth"
        if self.env.is_main:
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)
            log.info("teacher backbone written to %s", path)
        return path


def train(cfg: DictConfig, run_dir: str | Path, resume: bool = True, allow_config_change: bool = False) -> dict[str, float]:
    return Trainer(cfg, run_dir, resume=resume, allow_config_change=allow_config_change).run()

