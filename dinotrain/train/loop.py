"""The one training loop: SSL pretraining on 1 CPU process up to many GPUs, with exact resume.

Run directory: `config.yaml` (resolved config), `metrics.jsonl` (one JSON object per logged
iteration), `log.txt`, `checkpoints/<iteration>/` (sharded, last N kept) and, at the end,
`teacher_backbone.pth` (the official hub layout, ready for `dinotrain convert` and evaluation).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dinotrain.config import ConfigError, save_config
from dinotrain.distributed.checkpoint import Checkpointer, complete_checkpoints, full_state_dict, read_extra
from dinotrain.distributed.env import DistEnv, all_reduce_mean, init_distributed
from dinotrain.distributed.fsdp import clip_grad_norm, compute_dtype
from dinotrain.train.batches import build_train_loader, seed_step, to_device
from dinotrain.train.optim import apply_schedules, build_optimizer
from dinotrain.train.schedules import build_schedules, scaled_lr
from dinotrain.train.ssl import SSLMetaArch

log = logging.getLogger("dinotrain.train")

# Keys that fix parameter shapes: a resumed run must agree on them with its checkpoint.
ARCH_KEYS = ("student.arch", "student.patch_size", "student.ffn_layer", "student.num_register_tokens",
             "student.layerscale", "student.qkv_bias", "student.proj_bias", "student.ffn_bias",
             "crops.global_crops_size", "dino.head_n_prototypes", "dino.head_bottleneck_dim", "dino.head_nlayers",
             "dino.head_hidden_dim", "ibot.separate_head", "ibot.head_n_prototypes", "ibot.head_bottleneck_dim",
             "ibot.head_nlayers", "ibot.head_hidden_dim")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf more often in a row than `train.nan_tolerance` allows."""


def setup_logging(run_dir: Path, is_main: bool) -> None:
    root = logging.getLogger("dinotrain")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    if not is_main:
        root.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def check_resume_compatible(cfg: DictConfig, saved: dict, where: Path) -> None:
    """Resuming with another architecture would load garbage: name every differing key."""
    saved_cfg = OmegaConf.create(saved)
    diffs = [f"{k}: checkpoint has {OmegaConf.select(saved_cfg, k)!r}, config has {OmegaConf.select(cfg, k)!r}"
             for k in ARCH_KEYS if OmegaConf.select(saved_cfg, k) != OmegaConf.select(cfg, k)]
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: the architecture differs — " + "; ".join(diffs)
            + ". Use another --output-dir, or --no-resume to start over in this one."
        )


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

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume: bool = True, env: DistEnv | None = None):
        self.env = env or init_distributed()
        self.run_dir = Path(run_dir)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        setup_logging(self.run_dir, self.env.is_main)
        self.cfg = cfg
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        if resume:
            for ckpt in complete_checkpoints(self.run_dir)[-1:]:
                check_resume_compatible(cfg, read_extra(ckpt).get("config", {}), ckpt)
        elif self.env.is_main and complete_checkpoints(self.run_dir):
            # starting over must not leave old checkpoints that a later resume would pick up
            aside = self.run_dir / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}"
            (self.run_dir / "checkpoints").rename(aside)
            log.info("--no-resume: previous checkpoints moved to %s", aside)
        if self.env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

        torch.manual_seed(cfg.train.seed)  # same init on every rank
        self.accum = cfg.train.grad_accum_steps
        self.batch = cfg.train.batch_size_per_gpu
        self.global_batch = self.batch * self.env.world_size * self.accum
        lr = scaled_lr(cfg, self.global_batch)
        self.schedules = build_schedules(cfg, lr)
        self.max_iter = total_iterations(cfg)

        self.model = SSLMetaArch(cfg)
        if cfg.student.pretrained_weights:
            from dinotrain.export.convert import read_weights

            self.model.load_student_backbone(read_weights(cfg.student.pretrained_weights)[0])
        self.model.to(self.env.device)
        self.dtype = compute_dtype(cfg.compute_precision.dtype, self.env.device)
        self.model.shard(self.dtype)
        self.optimizer = build_optimizer(self.model.student, cfg)
        self.scaler = None
        if self.dtype == torch.float16 and cfg.compute_precision.grad_scaler:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=self.env.device.type)
        self.start_iter, self.sample_position = 0, 0
        extra = self.checkpointer.load_latest(self.model, self.optimizer) if resume else None
        if extra is not None:
            self.start_iter, self.sample_position = extra["iteration"], extra["sample_position"]
            if self.scaler is not None and extra.get("grad_scaler"):
                self.scaler.load_state_dict(extra["grad_scaler"])
            if self.sample_position != self.start_iter * self.global_batch:
                log.info("global batch changed since the checkpoint: the sample stream continues at %d",
                         self.sample_position)
        self.loader, n_images = build_train_loader(
            cfg, self.env.rank, self.env.world_size, self.sample_position)
        period = cfg.checkpoint.period_iterations or cfg.train.saveckp_freq * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.checkpoint_period = period
        log.info("world size %d, device %s, compute dtype %s; %d training images; global batch %d; lr %.3g; "
                 "%d iterations (from %d)", self.env.world_size, self.env.device, self.dtype, n_images,
                 self.global_batch, lr, self.max_iter, self.start_iter)

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
            for k, v in {"total_loss": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / self.accum
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

    def _save(self, it: int) -> None:
        self.checkpointer.save(it, self.model, self.optimizer, {
            "sample_position": self.sample_position,
            "world_size": self.env.world_size,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        })

    def _rewind_metrics(self, path: Path) -> None:
        """After a resume, drop records of iterations that the crashed run did past its checkpoint."""
        if not self.env.is_main or not path.is_file():
            return
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["iteration"] <= self.start_iter]
        path.write_text("".join(ln + "\n" for ln in kept))

    def run(self) -> dict[str, float]:
        """Train from the current iteration to the last; returns the last logged metrics."""
        data = iter(self.loader)
        metrics_path = self.run_dir / "metrics.jsonl"
        self._rewind_metrics(metrics_path)
        bad_in_a_row, skipped_images = 0, 0
        last: dict[str, float] = {}
        t_log, it_log = time.perf_counter(), self.start_iter
        t_start = t_log
        for it in range(self.start_iter, self.max_iter):
            seed_step(self.cfg.train.seed, it, self.env.rank)
            batches = [next(data) for _ in range(self.accum)]
            if any(b.get("empty") for b in batches):
                raise RuntimeError(f"iteration {it}: every image of a batch was unreadable; check the dataset")
            out = self._step(it, batches)
            self.sample_position += self.global_batch
            skipped_images += int(out.pop("n_skipped"))
            if not out.pop("finite"):
                bad_in_a_row += 1
                log.warning("iteration %d: non-finite loss %s (step skipped, %d in a row)", it, out.get("total_loss"), bad_in_a_row)
                if bad_in_a_row > self.cfg.train.nan_tolerance:
                    raise TrainingDiverged(
                        f"training diverged: the loss is {out.get('total_loss')} at iteration {it} "
                        f"({bad_in_a_row} non-finite in a row, train.nan_tolerance={self.cfg.train.nan_tolerance}). "
                        "Lower optim.base_lr, raise teacher warmup, or resume from the last checkpoint with changes.")
                continue
            bad_in_a_row = 0
            done = it + 1
            if done % self.cfg.train.log_every == 0 or done == self.max_iter:
                now = time.perf_counter()
                imgs_per_s = (done - it_log) * self.global_batch / max(now - t_log, 1e-9)
                reduced = all_reduce_mean({k: v for k, v in out.items()}, self.env.device)
                last = {"iteration": done, **reduced, "images_per_s": imgs_per_s, "skipped_images": skipped_images}
                if self.env.is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                    eta = (now - t_start) / max(done - self.start_iter, 1) * (self.max_iter - done)
                    log.info("it %d/%d  loss %.4f (dino g %.4f l %.4f, ibot %.4f, koleo %.4f)  lr %.2e  "
                             "%.1f img/s  eta %s", done, self.max_iter, last["total_loss"],
                             last.get("dino_global_crops_loss", 0), last.get("dino_local_crops_loss", 0),
                             last.get("ibot_loss", 0), last.get("koleo_loss", 0), last["lr"], imgs_per_s,
                             _format_eta(eta))
                t_log, it_log = now, done
            if done % self.checkpoint_period == 0 and done != self.max_iter:
                self._save(done)
        if self.max_iter > self.start_iter:
            self._save(self.max_iter)
        self.export_teacher()
        if skipped_images:
            log.warning("%d unreadable images were skipped during training", skipped_images)
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


def train(cfg: DictConfig, run_dir: str | Path, resume: bool = True) -> dict[str, float]:
    return Trainer(cfg, run_dir, resume=resume).run()

