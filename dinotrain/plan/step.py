"""One training step of a run, as rank 0 of N ranks would take it, on fake tensors: its memory and its FLOPs.

The run's own objects take the step (`Pretraining` / `Distillation.with_teacher`, their learners with FSDP2
wrapping, mixed-precision policy, optimizer and EMA), on a batch the run's own collator makes (the iBOT mask
plan of its first global batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from dinotrain.config import ConfigError
from dinotrain.data.collate import GlobalMaskCollator
from dinotrain.data.resolutions import crop_size_options
from dinotrain.distributed.env import DistEnv
from dinotrain.distributed.fsdp import compute_dtype
from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.plan.fake_world import FakeWorld
from dinotrain.plan.meter import CUDA_BLOCK, StepMeter

GPU = torch.device("cuda")  # what the plan is for: dtypes resolve as on a GPU (`compute_precision.dtype: auto`)


@dataclass
class StepProfile:
    """Memory (bytes, on rank 0) and FLOPs of one steady-state step at `batch_size` images per rank."""

    batch_size: int
    activation_checkpointing: bool
    peak: int
    peak_phase: str  # what was running at the peak: forward / backward / optimizer step
    phases: dict  # phase -> its peak (bytes, steady state)
    parameters: int  # this rank's shards of every network (fp32 master weights) and buffers
    gradients: int  # this rank's gradient shards (not alive yet at a peak in the forward)
    optimizer: int  # AdamW's two moments (+ step counts)
    activations: int  # kept from the forward for the backward (the largest learner's; freed by the optimizer step)
    temporaries: int  # the rest of the peak: gathered parameters, gradients in flight, workspaces
    flops: int  # one step on this rank: forward + backward (+ the teacher's forward), as torch counts them
    seconds: float  # how long planning this step took here


def synthetic_batch(cfg: DictConfig, batch_size: int, world_size: int) -> dict:
    """This rank's batch as the run's collator makes it: crops of the configured sizes (zeros: values do not
    matter to a plan) and the iBOT masks of the run's first global batch. With the high-res stage's size lists,
    the largest (global, local, Gram teacher) size tuple: the one that sets the peak."""
    c = cfg.crops
    options, _ = crop_size_options(OmegaConf.to_container(c))
    sizes = max(options, key=lambda o: (2 * o.global_size ** 2 + c.local_crops_number * o.local_size ** 2
                                        + 2 * (o.gram_size or 0) ** 2))
    grid = sizes.global_size // cfg.student.patch_size
    collate = GlobalMaskCollator(batch_size * world_size, grid * grid, grid, cfg.ibot.mask_ratio_min_max,
                                 cfg.ibot.mask_sample_probability, cfg.train.seed)
    g = torch.zeros(3, sizes.global_size, sizes.global_size, dtype=torch.uint8)
    loc = torch.zeros(3, sizes.local_size, sizes.local_size, dtype=torch.uint8)
    sample = {"global_crops": [g, g], "local_crops": [loc] * c.local_crops_number}
    if sizes.gram_size is not None:
        gram = torch.zeros(3, sizes.gram_size, sizes.gram_size, dtype=torch.uint8)
        sample["gram_teacher_crops"] = [gram, gram]
    return collate([(i, (sample, 0), 0) for i in range(batch_size)])


def teacher_spec(teacher: str) -> ViTSpec | Dinov3Spec:
    """The shapes of a distillation teacher: a preset name (`dinov2_vitg14`, `dinov3_vit7b16`) or any weights
    `open_weights` reads (read here, outside the fake world, once per plan)."""
    from dinotrain.models.dinov3 import DINOV3_PRESETS
    from dinotrain.models.presets import PRESETS
    from dinotrain.plan.fake_world import FakeWorld

    if teacher in PRESETS or teacher in DINOV3_PRESETS:  # built on fake tensors: a preset's shapes cost nothing
        from dinotrain.models.presets import build_preset

        with FakeWorld(1, "cpu"):
            return build_preset(teacher).spec
    from dinotrain.weights.resolve import open_weights

    return open_weights(teacher).spec


def planned_teacher(cfg: DictConfig, spec: ViTSpec | Dinov3Spec):
    """Fake weights of a teacher with `spec`'s shapes (either family) and heads of the sizes the students' config
    says it has."""
    from dinotrain.models.presets import backbone_from_spec
    from dinotrain.train.ssl import _head
    from dinotrain.weights.state_dict import Weights

    backbone = backbone_from_spec(spec)
    heads = {"dino_head": _head(cfg.dino, spec.embed_dim).state_dict()}
    if cfg.ibot.loss_weight > 0 and cfg.ibot.separate_head:
        heads["ibot_head"] = _head(cfg.ibot, spec.embed_dim).state_dict()
    return Weights(source="plan", kind="plan", backbone=backbone.state_dict(), spec=spec, heads=heads)


def build_objective(cfg: DictConfig, command: str, env: DistEnv, teacher: ViTSpec | Dinov3Spec | None):
    """The run's objective with its learners built (models, FSDP2, optimizers) in the current (fake) world."""
    dtype = compute_dtype(cfg.compute_precision.dtype, GPU)
    global_batch = cfg.train.batch_size_per_gpu * env.world_size * cfg.train.grad_accum_steps
    if command == "distill":
        from dinotrain.train.distill import Distillation

        if teacher is None:
            raise ConfigError("a distillation plan needs its teacher: set distillation.teacher=PATH (only its shapes "
                              "are used) or pass --teacher with a preset name such as dinov2_vitg14")
        from dinotrain.config import student_configs
        from dinotrain.models.any_student import is_any_student

        others = [f"{name} ({scfg.student.arch})" for name, scfg in student_configs(cfg).items()
                  if is_any_student(scfg.student.arch)]
        if others:  # timm / torchvision initialisers read values, which fake tensors do not have
            raise ConfigError(f"dinotrain plan does not size students of other architectures yet: {', '.join(others)}"
                              "; plan the ViT students alone, or measure a few steps of the run")
        objective = Distillation.with_teacher(cfg, env, planned_teacher(cfg, teacher))
    else:
        from dinotrain.train.pretrain import Pretraining

        objective = Pretraining(cfg, None, env, None)
    objective.build(None, dtype, global_batch, resuming=True)
    return objective


def planned_config(cfg: DictConfig, batch_size: int, activation_checkpointing: bool) -> DictConfig:
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    OmegaConf.update(cfg, "train.batch_size_per_gpu", batch_size)
    OmegaConf.update(cfg, "fsdp.activation_checkpointing", activation_checkpointing)
    OmegaConf.update(cfg, "fsdp.compile", False)  # compiled kernels change time, not what is held
    return cfg


def as_on_gpu(objective, device: torch.device) -> None:
    """Optimizer and scaler as a GPU run has them: AdamW's multi-tensor path (PyTorch's default on CUDA; on CPU
    it steps one parameter at a time, with other temporaries) and no fp16 scaler (it reads whether gradients are
    finite, a value fake tensors lack; it holds no memory to speak of)."""
    for learner in objective.learners:
        for group in learner.optimizer.param_groups:
            group["foreach"] = True
        learner.scaler = ShardedGradScaler(device=device.type, enabled=False)


def take_step(objective, batch: dict, meter: StepMeter, it: int) -> int:
    """One step of every learner with `meter` naming the phases; returns the largest learner's activations."""
    activations = 0
    meter.phase = "optimizer step"
    for learner in objective.learners:
        learner.begin(it)
    losses = objective.losses(batch, it, 0)
    while True:
        meter.phase, before = "forward", meter.current
        try:
            learner, loss, _ = next(losses)
        except StopIteration:
            break
        activations = max(activations, meter.current - before)
        meter.phase = "backward"
        learner.backward(loss, 1)
        del loss
    meter.phase = "optimizer step"
    for learner in objective.learners:
        learner.finish()
    return activations


def steady_state(objective, meter: StepMeter, activations: int, batch_size: int, activation_checkpointing: bool,
                 seconds: float) -> StepProfile:
    """The profile of every later step from the first one: AdamW creates its state in the first optimizer step,
    and each later forward and backward runs with that state held."""
    nets = [lr.model for lr in objective.learners] + [getattr(objective, "teacher", None)]
    params = [t for net in nets if net is not None for t in (*net.parameters(), *net.buffers())]
    grads = [p.grad for lr in objective.learners for p in lr.model.parameters() if p.grad is not None]
    state = [t for lr in objective.learners for s in lr.optimizer.state.values() for t in s.values()]
    held = {"parameters": meter.bytes_of(params), "gradients": meter.bytes_of(grads),
            "optimizer": meter.bytes_of(state), "activations": activations}
    phases = {phase: peak + (held["optimizer"] if phase in ("forward", "backward") else 0)
              for phase, peak in meter.peaks.items() if phase != "set-up"}
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    # the rest of the peak, beside what is alive then: no gradients yet in the forward (the step cleared them), no
    # activations left in the optimizer step
    alive = held["parameters"] + held["optimizer"] + (held["gradients"] if peak_phase != "forward" else 0) + \
        (held["activations"] if peak_phase != "optimizer step" else 0)
    return StepProfile(batch_size=batch_size, activation_checkpointing=activation_checkpointing, peak=peak,
                       peak_phase=peak_phase, phases=phases, **held, temporaries=max(peak - alive, 0),
                       flops=int(meter.flops), seconds=seconds)


def profile_step(cfg: DictConfig, command: str, world_size: int, batch_size: int, activation_checkpointing: bool,
                 teacher: ViTSpec | Dinov3Spec | None = None, device: str = "cpu") -> StepProfile:
    """Build the run at `batch_size` images per rank in a fake world of `world_size` ranks and take a step."""
    cfg = planned_config(cfg, batch_size, activation_checkpointing)
    start = time.perf_counter()
    real_batch = synthetic_batch(cfg, batch_size, world_size)
    with FakeWorld(world_size, device) as world:
        meter = StepMeter(granularity=CUDA_BLOCK)
        with meter:
            meter.phase = "set-up"
            objective = build_objective(cfg, command, world.env, teacher)
            as_on_gpu(objective, world.device)
            batch = world.batch(real_batch)
            meter.flops = 0
            activations = take_step(objective, batch, meter, 0)
        return steady_state(objective, meter, activations, batch_size, activation_checkpointing,
                            time.perf_counter() - start)
