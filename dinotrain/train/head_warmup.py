"""Head warm-up: DINO/iBOT heads trained on a frozen pretrained backbone, before training or distilling.

Released backbones (official hub `.pth`, Hugging Face) come without their DINO/iBOT heads. Continuing
pretraining with random heads wrecks the features in the first iterations (dinov2 #204: k-NN 80 % ->
10 %), and a distillation teacher needs heads to give targets. The warm-up runs the DINO recipe with
the backbone frozen (student and teacher backbones identical): only the student heads learn, the
teacher heads are their EMA. The result, backbone + teacher heads + config, is written as a full
export (`dinotrain export --to full` layout) at `RunDir.warmup_full`, reused whenever the same backbone
and warm-up settings come back (a restart, `--no-resume`), and usable as `student.pretrained_weights` or
`distillation.teacher` elsewhere. It is not resumed mid-way: a run killed during the warm-up repeats it
(it is short by design).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dinotrain.distributed.checkpoint import full_state_dict
from dinotrain.distributed.env import DistEnv, all_ranks, from_main
from dinotrain.distributed.fsdp import compute_dtype
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.storage import no_checkpoint
from dinotrain.data.loader import train_batches
from dinotrain.train.learner import Learner, build_learner
from dinotrain.train.loop import Phase, run_loop
from dinotrain.train.rundir import RunDir
from dinotrain.train.schedules import CosineScheduler, Schedules, WarmupThenConstant, scaled_lr
from dinotrain.train.ssl import SSLMetaArch, ssl_log_line, ssl_losses
from dinotrain.weights.full import config_of_full
from dinotrain.weights.resolve import open_weights
from dinotrain.weights.state_dict import Weights, WeightsError

log = logging.getLogger("dinotrain.head_warmup")


def warmup_schedules(cfg: DictConfig, iterations: int, lr: float) -> Schedules:
    """lr: linear warmup over the first 10 % then cosine to `optim.min_lr`; weight decay `optim.weight_decay`;
    teacher momentum cosine `teacher.momentum_teacher` -> `final_momentum_teacher`; teacher temperature
    `teacher.teacher_temp` throughout (the backbone is trained already: no temperature warmup)."""
    lr_sched = CosineScheduler(lr, cfg.optim.min_lr, iterations, warmup_iters=max(1, iterations // 10))
    wd = cfg.optim.weight_decay
    return Schedules(lr=lr_sched, last_layer_lr=lr_sched, wd=CosineScheduler(wd, wd, iterations),
                     momentum=CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher,
                                              iterations),
                     teacher_temp=WarmupThenConstant(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, 0),
                     total_iters=iterations)


# What the warmed-up heads depend on besides the backbone: a saved warm-up is reused only if these match.
_SETTINGS = ("dino", "ibot", "crops", "teacher", "optim", "train.dataset_path", "train.seed", "train.centering",
             "train.batch_size_per_gpu", "train.grad_accum_steps", "train.head_warmup_iterations",
             "compute_precision.dtype")


def warmup_settings(cfg: DictConfig) -> str:
    """sha256 of the config values the warm-up's result depends on (the schedule length of the main run aside)."""
    values = {key: OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
              for key in _SETTINGS for node in [OmegaConf.select(cfg, key)]}
    values["optim"] = {k: v for k, v in values["optim"].items() if k not in ("epochs", "warmup_epochs", "lr")}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def reusable(out: Path, cfg: DictConfig, backbone_fingerprint: str) -> bool:
    """`out` holds heads warmed up on these backbone weights with these settings (reads only its header)."""
    if not out.is_file():
        return False
    try:
        info = config_of_full(out).get("head_warmup", {})
    except Exception as exc:  # a damaged file is redone, never trusted
        log.warning("head warm-up file %s is unreadable (%s); it will be redone", out, exc)
        return False
    return info.get("backbone_fingerprint") == backbone_fingerprint and info.get("settings") == warmup_settings(cfg)


class HeadWarmup:
    """The objective of the warm-up: the DINOv2 losses, one learner whose backbone is frozen; no checkpoints
    (a run killed during the warm-up repeats it); at the end, backbone + teacher heads as a full export."""

    def __init__(self, learner: Learner, finish):
        self.learners = [learner]
        self.finish = finish

    def losses(self, batch: dict, it: int, micro: int):
        return ssl_losses(self.learners[0], batch)

    def parts(self) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, extra: dict) -> None:
        pass

    def log_line(self, last: dict) -> str:
        return ssl_log_line(last)


def warm_up_heads(cfg: DictConfig, backbone: dict, spec: ViTSpec, run: RunDir, env: DistEnv, dataset,
                  source: str, build_student_arch: bool = False, backbone_fingerprint: str | None = None) -> Path:
    """Warm up heads on `backbone` (frozen) for `train.head_warmup_iterations`; write the full export
    `run.warmup_full` (returned).

    The model has the backbone's shapes (`spec`, e.g. a distillation teacher), or with `build_student_arch`
    the config's student (continued pretraining; the weights must fit it). Reuses that file when it was made
    from the same weights and length. It runs in the one training loop, as a phase of its own.
    """
    from dinotrain.train.teacher import fingerprint
    from dinotrain.weights.full import FullExport, write_full

    out = run.warmup_full
    iterations = cfg.train.head_warmup_iterations
    backbone_fp = backbone_fingerprint or fingerprint(backbone)
    if from_main(reusable(out, cfg, backbone_fp)):
        log.info("head warm-up: reusing %s (made from the same backbone and settings, %d iterations)", out, iterations)
        return out
    wcfg = OmegaConf.merge(cfg, {"student": {"drop_path_rate": 0.0, "pretrained_weights": ""}})
    torch.manual_seed(cfg.train.seed)
    model = SSLMetaArch(wcfg, spec=None if build_student_arch else spec)
    model.load_student_backbone(backbone, source=str(source), spec=spec)
    model.student["backbone"].requires_grad_(False)  # the optimizer gets the heads only
    accum = cfg.train.grad_accum_steps
    global_batch = cfg.train.batch_size_per_gpu * env.world_size * accum
    learner = build_learner(model, wcfg, warmup_schedules(cfg, iterations, scaled_lr(cfg, global_batch)),
                            compute_dtype(cfg.compute_precision.dtype, env.device), env.device, heads_only=True)
    batches, _ = train_batches(cfg, env.rank, env.world_size, 0, dataset=dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = run.warmup_metrics
    if env.is_main:
        metrics.unlink(missing_ok=True)
    log.info("head warm-up: %d iterations on the frozen backbone of %s (heads trained, teacher heads = EMA)",
             iterations, source)
    t0 = time.perf_counter()

    def write() -> None:
        heads = {name: full_state_dict(model.teacher[name]) for name in model.teacher if name != "backbone"}
        config = OmegaConf.to_container(wcfg, resolve=True)
        config["head_warmup"] = {"iterations": iterations, "backbone_fingerprint": backbone_fp, "source": str(source),
                                 "settings": warmup_settings(cfg), "seconds": round(time.perf_counter() - t0, 1)}
        # written by rank 0; a failure there (disk full) stops every rank instead of leaving them in a barrier
        all_ranks(lambda: write_full(out, FullExport(backbone={k: v.detach().cpu() for k, v in backbone.items()},
                                                     spec=spec, heads=heads, config=config), no_checkpoint)
                  if env.is_main else None, env)

    # heads that would be saved and reused are never NaN: the first non-finite step stops the warm-up
    phase = Phase(start=0, end=iterations, accum=accum, global_batch=global_batch, seed=cfg.train.seed + 1,
                  log_every=cfg.train.log_every, metrics=metrics, nan_tolerance=0, label="head warm-up ",
                  diverged_hint="Lower optim.base_lr or train.head_warmup_iterations' lr warmup share.")
    run_loop(HeadWarmup(learner, write), batches, phase, env)
    log.info("head warm-up done in %.0f s: backbone + warmed-up heads written to %s", time.perf_counter() - t0, out)
    return out


def open_pretrained(path: str, key: str = "student.pretrained_weights") -> Weights:
    """What `student.pretrained_weights` (or another config `key`) names, read by the weights resolver with the
    heads it holds (a full export, a run or checkpoint directory); errors name the config key."""
    where = f"config key '{key}' = {path}"
    try:
        return open_weights(path, heads=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{where}: {exc}") from exc
    except WeightsError as exc:
        raise WeightsError(f"{where}: {exc}") from exc


def pretrained_with_heads(cfg: DictConfig, run_dir: Path, env: DistEnv, dataset) -> Weights:
    """What `dinotrain train` loads from `student.pretrained_weights`: weights with heads (a full export, a run) as
    they are; backbone-only weights through the head warm-up when `train.head_warmup_iterations` > 0 (else with
    random heads, warned)."""
    path = cfg.student.pretrained_weights
    weights = open_pretrained(path)
    if weights.heads is not None:
        return weights
    if cfg.train.head_warmup_iterations <= 0:
        log.warning("student.pretrained_weights holds a backbone without DINO/iBOT heads: the heads start random, "
                    "which can wreck the pretrained features early on; set train.head_warmup_iterations (e.g. 500) "
                    "to warm them up on the frozen backbone first")
        return weights
    out = warm_up_heads(cfg, weights.backbone, weights.spec, RunDir(run_dir), env, dataset, source=str(path),
                        build_student_arch=True)
    # errors name what the user gave (the warm-up may be a reused one, never checked against this config)
    return dataclasses.replace(open_pretrained(str(out)), source=f"{path} (heads from its warm-up {out})")


def first_stage(cfg: DictConfig) -> Weights:
    """What a continuation stage (DINOv3's high-res adaptation) starts from: `student.resume_from_teacher_chkpt`,
    the teacher of a first-stage run with its heads (its run directory, a checkpoint or a full export), loaded into
    student and teacher as official `resume_from_teacher_chkpt` does."""
    key = "student.resume_from_teacher_chkpt"
    weights = open_pretrained(cfg.student.resume_from_teacher_chkpt, key=key)
    if weights.heads is None:
        raise WeightsError(f"config key '{key}' = {cfg.student.resume_from_teacher_chkpt} holds a backbone without "
                           "DINO/iBOT heads: a continuation stage continues a first-stage run (its run directory, a "
                           "checkpoint or a full export); start from backbone-only weights with "
                           "student.pretrained_weights and the head warm-up instead")
    return weights
