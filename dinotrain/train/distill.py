"""`dinotrain distill`: students learn from a frozen teacher (backbone + DINO/iBOT heads), as in DINOv2.

The paper's recipe (Sec. 5): "the same training loop with a few exceptions: we use a larger model as a
frozen teacher, keep a spare EMA of the student that we use as our final model, remove the masking and
stochastic depth, and apply the iBOT loss on the two global crops". Here, per step: the teacher runs
once, in eval mode, on the global crops (its targets centered by Sinkhorn-Knopp or softmax centering);
then every student sees the global crops unmasked and the local crops, and learns DINO (cross-view,
local -> global), iBOT at the sampled mask positions (as dinov3's distillation) and KoLeo. Each student
has its own optimizer, schedules, fp16 scaler, EMA (what is exported), metrics prefix and checkpoint
part (`RunDir.student_part(name)` of each checkpoint, the training layout: `dinotrain export` reads it).

Students share the processes, each sharded over all ranks. The teacher is never stored in checkpoints:
the checkpoint's extra state records its resolved source and a fingerprint, and a resume with other weights is
refused.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dinotrain.config import ConfigError, student_configs
from dinotrain.data.seeds import mix_seed
from dinotrain.distributed.checkpoint import Parts, resume_point
from dinotrain.distributed.env import DistEnv, all_ranks, from_main, gathered
from dinotrain.models.any_student import AnySpec, AnyStudent
from dinotrain.train.head_warmup import open_pretrained, reusable, warm_up_heads
from dinotrain.train.learner import build_learner
from dinotrain.train.resume import check_resume
from dinotrain.train.rundir import RunDir
from dinotrain.train.schedules import build_schedules, scaled_lr
from dinotrain.train.ssl import SSLMetaArch
from dinotrain.train.teacher import (KEY, FrozenTeacher, all_tensors, check_student_fits, fingerprint, read_teacher,
                                     resolve_source)
from dinotrain.weights.state_dict import Weights

log = logging.getLogger("dinotrain.distill")


def _name_seed(seed: int, name: str, *more: int) -> int:
    """Seed of one student's randomness: independent of the other students (multi = single student)."""
    return mix_seed(seed, zlib.crc32(name.encode()), *more)


class Distillation:
    """The frozen teacher and one learner per student; the teacher runs once per micro-batch for all."""

    def __init__(self, cfg, run_dir: Path, env: DistEnv, newest_extra: dict | None, allow_config_change: bool = False):
        """Checks of the students and the teacher, before the dataset and the models are built."""
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        if cfg.gram.use_loss:
            raise ConfigError("config key 'gram.use_loss' is true: Gram anchoring is a part of pretraining (dinotrain "
                              "train); distillation does not use it (official), set gram.use_loss=false")
        self.allow_config_change = allow_config_change
        self.student_cfgs = student_configs(cfg)
        self._check_students(newest_extra)
        given = cfg.distillation.teacher
        recorded = (newest_extra or {}).get("teacher")
        if recorded and recorded.get("given") == given and Path(recorded.get("source", "")).exists():
            pinned = recorded["source"]  # the checkpoint it resolved to, even if the teacher run went on since
        else:  # rank 0 resolves (a run's newest checkpoint may change meanwhile): every rank reads the same one
            pinned = from_main(all_ranks(lambda: resolve_source(given) if self.env.is_main else None, self.env))
        tw = self.teacher_weights = all_ranks(lambda: read_teacher(pinned), self.env)
        self.backbone_fingerprint = fingerprint(tw.backbone)
        if len(set(gathered(self.backbone_fingerprint))) > 1:
            raise ConfigError(f"the processes read different teacher weights from {pinned} (was it being written?); "
                              "start again once the teacher is complete")
        if recorded and recorded.get("backbone_fingerprint") != self.backbone_fingerprint:
            raise ConfigError(
                f"the teacher changed since the checkpoint: {KEY} = {given} now has other weights than the "
                f"ones this run was distilled from ({recorded.get('source')}, fingerprint "
                f"{str(recorded.get('backbone_fingerprint'))[:12]}..., now {self.backbone_fingerprint[:12]}...). "
                "Restore that teacher, or start a new run (another --output-dir, or --no-resume).")
        if tw.heads is None and cfg.train.head_warmup_iterations <= 0:
            raise ConfigError(f"{KEY} = {given} is a backbone without DINO/iBOT heads: set "
                              "train.head_warmup_iterations (e.g. 1000) to warm heads up on it first, or give a run "
                              "directory or a full export (`dinotrain export RUN OUT.safetensors --to full`)")
        warm = RunDir(self.run_dir).warmup_full
        if recorded and tw.heads is None and not reusable(warm, cfg, self.backbone_fingerprint):
            raise ConfigError(f"this run's teacher heads came from its head warm-up, but {warm} is missing or was made "
                              "with other settings (dino/ibot/crops/teacher/optim/train keys it depends on): a new "
                              "warm-up would give other heads. Restore it and those settings, or start a new run.")
        for name, scfg in self.student_cfgs.items():
            check_student_fits(tw, name, scfg)
        shape = (f"{tw.spec.arch}, patch grid {tw.spec.patch_size}" if isinstance(tw.spec, AnySpec) else
                 f"ViT dim {tw.spec.embed_dim}, depth {tw.spec.depth}, patch {tw.spec.patch_size}")
        log.info("teacher: %s (%s; %s%s); students: %s", tw.source, tw.kind, shape,
                 "; heads from the head warm-up" if tw.heads is None else "", ", ".join(self.student_cfgs))

    @classmethod
    def with_teacher(cls, cfg, env: DistEnv, teacher: Weights) -> "Distillation":
        """A distillation from a teacher given as weights, with no run directory to resume or write (`dinotrain
        plan` gives fake weights of the teacher's shapes): the same students, teacher forward and losses."""
        self = cls.__new__(cls)
        self.cfg, self.run_dir, self.env, self.allow_config_change = cfg, None, env, False
        self.student_cfgs = student_configs(cfg)
        self._check_students(None)
        self.teacher_weights, self.backbone_fingerprint = teacher, None
        for name, scfg in self.student_cfgs.items():
            check_student_fits(teacher, name, scfg)
        return self

    def _check_students(self, newest_extra: dict | None) -> None:
        """Students that can share one run, and a resume that keeps them as they were."""
        for name, scfg in self.student_cfgs.items():
            if scfg.optim.epochs != self.cfg.optim.epochs:
                raise ConfigError(f"student {name!r} sets optim.epochs={scfg.optim.epochs} but the run lasts "
                                  f"optim.epochs={self.cfg.optim.epochs}: all students train for the run's length "
                                  "(their lr warmup and lr may differ)")
            if scfg.student.drop_path_rate > 0:
                log.warning("student %s: student.drop_path_rate=%s; the distillation recipe uses no stochastic depth "
                            "(set it to 0)", name, scfg.student.drop_path_rate)
        saved = (newest_extra or {}).get("students")
        if saved is None:
            return
        if set(saved) != set(self.student_cfgs):
            raise ConfigError(f"the checkpoint has students {', '.join(saved)} but the config has "
                              f"{', '.join(self.student_cfgs)}: a resumed distillation keeps its students (use another "
                              "--output-dir for other ones)")
        for name, scfg in self.student_cfgs.items():
            check_resume(saved[name].get("config", {}), scfg, Path(f"the checkpoint of student {name!r}"),
                         self.allow_config_change)

    def _teacher_with_heads(self) -> Weights:
        """The teacher's weights with heads: its own, or those of the head warm-up on its backbone."""
        tw = self.teacher_weights
        if tw.heads is not None:
            return tw
        from dinotrain.weights.resolve import open_weights

        out = warm_up_heads(self.cfg, tw.backbone, tw.spec, RunDir(self.run_dir), self.env,
                            self.dataset, source=tw.source, backbone_fingerprint=self.backbone_fingerprint)
        full = open_weights(out, heads=True)
        warmed = Weights(source=tw.source, kind="backbone+warm-up", backbone=full.backbone, spec=tw.spec,
                         heads=full.heads, config=full.config)
        for name, scfg in self.student_cfgs.items():
            check_student_fits(warmed, name, scfg)
        return warmed

    def build(self, dataset, dtype: torch.dtype, global_batch: int, resuming: bool) -> None:
        cfg = self.cfg
        self.dataset = dataset
        self.teacher_weights = self._teacher_with_heads()
        # (a teacher given without a run, as `with_teacher`, has nothing to check a resume against)
        self.teacher_fingerprint = fingerprint(all_tensors(self.teacher_weights)) if self.backbone_fingerprint else None
        do_ibot = any(scfg.ibot.loss_weight > 0 for scfg in self.student_cfgs.values())
        self.teacher = FrozenTeacher(self.teacher_weights, cfg, do_ibot=do_ibot)
        # the tensors now live in the (sharded) teacher: keep only where they came from
        self.teacher_weights = dataclasses.replace(self.teacher_weights, backbone={}, heads={})
        self.teacher.to(self.env.device)
        self.teacher.shard(dtype, reshard_after_forward=cfg.fsdp.reshard_after_forward,
                           compile_blocks=cfg.fsdp.compile)
        self.schedules = build_schedules(cfg, scaled_lr(cfg, global_batch))  # the teacher's temperature
        self.learners = []
        for name, scfg in self.student_cfgs.items():
            torch.manual_seed(_name_seed(cfg.train.seed, name))  # same init on every rank, whoever else is there
            model = SSLMetaArch(scfg)
            if scfg.student.pretrained_weights and not resuming:
                if isinstance(model.student["backbone"], AnyStudent):  # the model's own file, its library's names
                    model.load_any_student(scfg.student.pretrained_weights)
                else:
                    model.load_student_backbone(open_pretrained(scfg.student.pretrained_weights))
            # No masking in distillation: the mask token is never used, so it is not trained (and has no
            # optimizer state that a checkpoint would miss).
            if model.student["backbone"].mask_token is not None:
                model.student["backbone"].mask_token.requires_grad_(False)
            schedules = build_schedules(scfg, scaled_lr(scfg, global_batch))
            self.learners.append(build_learner(model, scfg, schedules, dtype, self.env.device, prefix=f"{name}/"))
            n_params = sum(p.numel() for p in model.student["backbone"].parameters())
            backbone = model.student["backbone"]
            if isinstance(backbone, AnyStudent):
                log.info("student %s: %s, %d stages, features %d-d, last map (stride %d) resampled to the patch-%d "
                         "grid, %.1fM backbone parameters", name, backbone.arch, len(backbone.blocks),
                         backbone.embed_dim, backbone.stride, backbone.patch_size, n_params / 1e6)
            else:
                log.info("student %s: %s/%d, depth %d, %.1fM backbone parameters", name, scfg.student.arch,
                         scfg.student.patch_size, len(backbone.blocks), n_params / 1e6)

    @property
    def names(self) -> list[str]:
        return list(self.student_cfgs)

    def parts(self) -> Parts:
        parts: Parts = {"": (self.teacher.centers, None)}
        for name, learner in zip(self.names, self.learners):
            parts[RunDir.student_part(name)] = (learner.model, learner.optimizer)
        return parts

    def state(self) -> dict:
        tw = self.teacher_weights
        return {
            "teacher": {"given": self.cfg.distillation.teacher, "source": tw.source, "kind": tw.kind,
                        "backbone_fingerprint": self.backbone_fingerprint, "fingerprint": self.teacher_fingerprint,
                        "spec": tw.spec.to_dict()},
            "students": {name: {"config": OmegaConf.to_container(scfg, resolve=True)}
                         for name, scfg in self.student_cfgs.items()},
            "grad_scalers": {name: learner.scaler.state_dict() for name, learner in zip(self.names, self.learners)
                             if learner.scaler.is_enabled()},
        }

    def load_state(self, extra: dict) -> None:
        recorded = extra.get("teacher", {}).get("fingerprint")
        if recorded and recorded != self.teacher_fingerprint:  # e.g. the warm-up file was changed
            raise ConfigError(f"the teacher's weights (backbone + heads) differ from the ones this run was distilled "
                              f"from (fingerprint {recorded[:12]}..., now {self.teacher_fingerprint[:12]}...); restore "
                              "them, or start a new run (another --output-dir, or --no-resume)")
        scalers = extra.get("grad_scalers") or {}
        for name, learner in zip(self.names, self.learners):
            if learner.scaler.is_enabled() and scalers.get(name):
                learner.scaler.load_state_dict(scalers[name])

    def losses(self, batch: dict, it: int, micro: int):
        """One teacher forward, then each student's losses against its targets (the loop backpropagates
        each before the next student's forward)."""
        teacher_cls, teacher_patch = self.teacher.targets(batch, self.schedules.at(it)["teacher_temp"])
        for name, learner in zip(self.names, self.learners):
            torch.manual_seed(_name_seed(self.cfg.train.seed, name, it, self.env.rank, micro))
            yield (learner, *learner.model.student_losses(batch, teacher_cls, teacher_patch, mask_inputs=False))

    def log_line(self, last: dict) -> str:
        return "  ".join(f"{name} loss {last[f'{name}/total_loss']:.4f} (dino g {last.get(f'{name}/dino_global_crops_loss', 0):.3f} "
                         f"l {last.get(f'{name}/dino_local_crops_loss', 0):.3f}, ibot {last.get(f'{name}/ibot_loss', 0):.3f}) "
                         f"lr {last[f'{name}/lr']:.2e}" for name in self.names)

    def finish(self) -> None:
        """Each student's EMA backbone as an official hub state dict, or a timm / torchvision student's in its
        library's layout (`weights/any_student.py`): `RunDir.student(name)`."""
        resume, run = partial(resume_point, self.run_dir), RunDir(self.run_dir)
        for name, learner in zip(self.names, self.learners):  # a failed write on rank 0 stops every rank
            path = run.student_export(name, isinstance(learner.model.student["backbone"], AnyStudent))
            all_ranks(partial(learner.write_ema_backbone, path,
                              f"student {name} (EMA backbone)", self.env.is_main, resume), self.env)
