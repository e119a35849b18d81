"""`dinotrain train`: DINOv2 / DINOv3 self-supervised pretraining as an objective of the one loop.

One learner: the student and its EMA teacher (`train/ssl.py`; a DINOv3 backbone with `student.pos_embed_type:
rope`), from scratch or from pretrained weights (`student.pretrained_weights`; backbone-only weights get their
heads from the head warm-up first). With `gram.use_loss` (DINOv3's Gram anchoring) the meta-architecture also holds
the Gram teacher; at each iteration `gram_at` (`train/gram_schedule.py`, a pure function of config and iteration)
says whether it takes the EMA teacher's weights before the forward, whether the Gram loss counts and its weight,
so a resumed run does exactly what the uninterrupted one did. A checkpoint holds the meta-architecture (Gram
teacher included), the optimizer and the grad scaler; the run leaves the teacher backbone in the official hub
layout (`RunDir.teacher_backbone`).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from dinotrain.config import ConfigError
from dinotrain.distributed.checkpoint import Parts, resume_point
from dinotrain.distributed.env import DistEnv, all_ranks
from dinotrain.models.any_student import is_any_student
from dinotrain.train.gram_schedule import gram_at
from dinotrain.train.learner import build_learner
from dinotrain.train.rundir import RunDir
from dinotrain.train.schedules import build_schedules, scaled_lr
from dinotrain.train.ssl import SSLMetaArch, ssl_log_line, ssl_losses

log = logging.getLogger("dinotrain.train")


class Pretraining:
    """The student + EMA teacher of self-supervised pretraining."""

    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, newest_extra: dict | None,
                 allow_config_change: bool = False):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        if is_any_student(cfg.student.arch):  # its exports, k-NN, resume are checked for distillation only
            raise ConfigError(f"config key 'student.arch' = {cfg.student.arch}: students of other architectures are "
                              "trained by `dinotrain distill` from a frozen teacher; `dinotrain train` pretrains ViTs")

    def build(self, dataset, dtype: torch.dtype, global_batch: int, resuming: bool) -> None:
        """The networks (from pretrained weights with heads, unless resuming: the checkpoint has everything)."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        model = SSLMetaArch(cfg, with_gram=bool(cfg.gram.use_loss))
        if cfg.student.pretrained_weights and not resuming:
            from dinotrain.train.head_warmup import pretrained_with_heads

            model.load_student_backbone(pretrained_with_heads(cfg, self.run_dir, self.env, dataset))
        if cfg.student.resume_from_teacher_chkpt and not resuming:  # a continuation stage (DINOv3 high-res)
            from dinotrain.train.head_warmup import first_stage

            model.load_student_backbone(first_stage(cfg), key="student.resume_from_teacher_chkpt")
        if model.gram_teacher is not None and cfg.gram.ckpt and not resuming:
            from dinotrain.weights.resolve import open_weights

            model.load_gram_teacher(open_weights(cfg.gram.ckpt), cfg.gram.ckpt)
        schedules = build_schedules(cfg, scaled_lr(cfg, global_batch))
        self.learners = [build_learner(model, cfg, schedules, dtype, self.env.device)]

    def losses(self, batch: dict, it: int, micro: int):
        gram = gram_at(self.cfg, it) if self.cfg.gram.use_loss else None
        if gram is not None and gram.refresh and micro == 0:
            self.learners[0].model.refresh_gram_teacher()
            log.info("the Gram teacher takes the EMA teacher's weights before iteration %d (counted from 0)", it)
        return ssl_losses(self.learners[0], batch, gram)

    def parts(self) -> Parts:
        return {"": (self.learners[0].model, self.learners[0].optimizer)}

    def state(self) -> dict:
        scaler = self.learners[0].scaler
        return {"grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}

    def load_state(self, extra: dict) -> None:
        scaler = self.learners[0].scaler
        if scaler.is_enabled() and extra.get("grad_scaler"):
            scaler.load_state_dict(extra["grad_scaler"])

    def log_line(self, last: dict) -> str:
        return ssl_log_line(last)

    def finish(self) -> None:
        # a failed write on rank 0 (disk full) stops every rank instead of leaving them in the next collective
        all_ranks(partial(self.learners[0].write_ema_backbone, RunDir(self.run_dir).teacher_backbone,
                          "teacher backbone", self.env.is_main, partial(resume_point, self.run_dir)), self.env)
