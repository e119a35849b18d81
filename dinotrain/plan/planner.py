"""`dinotrain plan`: per-GPU memory, FLOPs and predicted throughput of a run on N GPUs, from any machine.

Each figure comes from the run's own step on fake tensors (`plan/step.py`). Memory is linear in the batch
(activations and temporaries grow with it; parameters, gradients and optimizer state do not), so two batch
sizes per setting give each phase's line, and the largest batch that fits follows from it; the configured batch
is always one of the measured points. Throughput is the counted FLOPs at a peak rate and an MFU the user gives.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from omegaconf import DictConfig

from dinotrain.config import ConfigError
from dinotrain.plan.step import GPU, StepProfile, profile_step

log = logging.getLogger("dinotrain.plan")

GiB = 2**30
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense BF16 tensor core


@dataclass
class Budget:
    """What of a GPU's memory the step may use: the rest is kept for what the planner cannot see."""

    gpu_memory_gb: float
    margin: float = 0.10  # allocator fragmentation (the caching allocator's blocks, split and rounded)
    reserve_gb: float = 2.0  # CUDA context, NCCL buffers, cuBLAS / flash-attention workspaces

    @property
    def usable(self) -> int:
        return int(self.gpu_memory_gb * GiB * (1 - self.margin) - self.reserve_gb * GiB)

    def needed(self, peak: int) -> float:
        """GPU memory (GB) at which a step with this tracked peak fits."""
        return (peak / GiB + self.reserve_gb) / (1 - self.margin)


@dataclass
class MemoryLine:
    """Peak bytes of each phase of a step as a line in the batch size (two measured points)."""

    phases: dict[str, tuple[float, float]]  # phase -> (bytes at batch 0, bytes per image)

    @classmethod
    def through(cls, a: StepProfile, b: StepProfile) -> "MemoryLine":
        db = b.batch_size - a.batch_size
        lines = {}
        for phase in a.phases.keys() & b.phases.keys():
            slope = (b.phases[phase] - a.phases[phase]) / db if db else 0.0
            lines[phase] = (a.phases[phase] - slope * a.batch_size, max(slope, 0.0))
        return cls(lines)

    def peak(self, batch: int) -> float:
        return max(c + s * batch for c, s in self.phases.values())

    def largest_batch(self, usable: int, limit: int = 1 << 20) -> int:
        """The largest batch whose predicted peak is within `usable` (0: not even one image)."""
        if self.peak(1) > usable:
            return 0
        lo, hi = 1, 2
        while hi < limit and self.peak(hi) <= usable:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid) <= usable else (lo, mid)
        return lo


@dataclass
class Plan:
    config: str
    command: str
    gpus: int
    budget: Budget
    compute_dtype: str
    profile: StepProfile  # the configured batch and activation checkpointing
    largest: dict[str, int]  # "without" / "with" activation checkpointing -> largest batch_size_per_gpu ({}: not searched)
    peak_tflops: float
    mfus: list[float]
    cuda_trace: str = ""
    measured: list[StepProfile] = field(default_factory=list)

    def images_per_s(self, mfu: float) -> float:
        """Predicted images/s per GPU at the configured batch."""
        return self.profile.batch_size * self.peak_tflops * 1e12 * mfu / self.profile.flops

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["budget"]["usable_bytes"] = self.budget.usable
        out["images_per_s_per_gpu"] = {str(m): self.images_per_s(m) for m in self.mfus}
        return out


def make_plan(cfg: DictConfig, command: str, gpus: int, budget: Budget, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
              mfus: tuple[float, ...] = (0.4, 0.5), teacher: str | None = None, config_name: str = "",
              trace_cuda: bool = True, search: bool = True) -> Plan:
    """Profile the run's step at its batch and at half of it, with and without activation checkpointing (with
    `search` False: only the configured batch and setting, and no largest batch)."""
    from dinotrain.distributed.fsdp import compute_dtype

    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1 (got {gpus})")
    if budget.gpu_memory_gb <= 0 or budget.usable <= 0:
        raise ConfigError(f"--gpu-memory-gb {budget.gpu_memory_gb:g} leaves nothing for training after the "
                          f"{budget.margin:.0%} margin and the {budget.reserve_gb:g} GB reserve")
    if peak_tflops <= 0 or not all(0 < m <= 1 for m in mfus):
        raise ConfigError("--peak-tflops must be positive and each --mfu in (0, 1]")
    if command == "distill" and teacher:
        from dinotrain.plan.step import teacher_spec

        teacher = teacher_spec(teacher)
    batch = int(cfg.train.batch_size_per_gpu)
    other = max(batch // 2, 1) if batch > 1 else 2
    configured_ac = bool(cfg.fsdp.activation_checkpointing)
    measured, lines = [], {}
    for ac in ((False, True) if search else (configured_ac,)):
        pair = []
        for b in ((batch, other) if search else (batch,)):
            log.info("planning a step at batch %d per GPU, activation checkpointing %s", b, "on" if ac else "off")
            pair.append(profile_step(cfg, command, gpus, b, ac, teacher=teacher))
        measured += pair
        if search:
            lines["with" if ac else "without"] = MemoryLine.through(*pair)
    largest = {k: line.largest_batch(budget.usable) for k, line in lines.items()}
    if search and not any(largest.values()):
        need = budget.needed(lines["with"].peak(1))
        raise ConfigError(f"{config_name or 'this config'} does not fit {gpus} GPU(s) of {budget.gpu_memory_gb:g} GB "
                          f"even at train.batch_size_per_gpu=1 with activation checkpointing: it needs "
                          f"{need:.3g} GB per GPU (or more GPUs to shard over)")
    profile = next(p for p in measured if p.batch_size == batch and p.activation_checkpointing == configured_ac)
    plan = Plan(config=config_name, command=command, gpus=gpus, budget=budget,
                compute_dtype=str(compute_dtype(cfg.compute_precision.dtype, GPU)).replace("torch.", ""),
                profile=profile, largest=largest, peak_tflops=peak_tflops, mfus=list(mfus), measured=measured)
    if trace_cuda:
        from dinotrain.plan.cuda_trace import GpuPathError, trace_on_cuda

        try:
            plan.cuda_trace = trace_on_cuda(cfg, command, gpus, teacher)
        except GpuPathError as exc:  # the plan stands; the GPU path has a bug to fix
            log.error("%s", exc)
            plan.cuda_trace = f"{exc} -- a bug of dinotrain's GPU path, please report it"
    return plan


def _flop(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


def format_plan(plan: Plan) -> str:
    """The plan as a user reads it."""
    p, b = plan.profile, plan.budget
    what = "distillation" if plan.command == "distill" else "pretraining"
    g = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
    rows = [
        f"{plan.config} ({what}) on {plan.gpus} GPU(s) of {b.gpu_memory_gb:g} GB: FSDP2 over {plan.gpus} rank(s), "
        f"compute {plan.compute_dtype}",
        f"per-GPU memory of one steady-state step at train.batch_size_per_gpu={p.batch_size} "
        f"(activation checkpointing {'on' if p.activation_checkpointing else 'off'}):",
        f"  parameters      {g(p.parameters)}   this GPU's fp32 shards of every network (+ buffers)",
        f"  gradients       {g(p.gradients)}" + ("   (made in the backward: not yet alive at this peak)"
                                                   if p.peak_phase == "forward" else ""),
        f"  optimizer state {g(p.optimizer)}   AdamW moments",
        f"  activations     {g(p.activations)}   kept from the forward for the backward",
        f"  temporaries     {g(p.temporaries)}   gathered parameters, gradients in flight, workspaces",
        f"  peak            {g(p.peak)}   (during the {p.peak_phase})",
        f"usable per GPU: {b.gpu_memory_gb:g} GB less {b.margin:.0%} for fragmentation and {b.reserve_gb:g} GB for "
        f"the CUDA context, NCCL and workspaces = {b.usable / GiB:.1f} GiB: "
        + ("fits" if p.peak <= b.usable else f"DOES NOT FIT (needs {b.needed(p.peak):.1f} GB)"),
        (f"largest train.batch_size_per_gpu that fits: {plan.largest['without']} without activation checkpointing, "
         f"{plan.largest['with']} with (fsdp.activation_checkpointing=true)") if plan.largest else
        "largest train.batch_size_per_gpu: not searched (--no-search)",
        f"compute: {_flop(p.flops)} per step per GPU, {_flop(p.flops / p.batch_size)} per image "
        "(forward + backward, teacher forward included)",
    ]
    for mfu in plan.mfus:
        ips = plan.images_per_s(mfu)
        rows.append(f"predicted at {mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s: {ips:.1f} images/s per GPU, "
                    f"{ips * plan.gpus:.0f} images/s in all, {p.batch_size / ips:.2f} s per step")
    if plan.cuda_trace:
        rows.append(plan.cuda_trace)
    return "\n".join(rows)
