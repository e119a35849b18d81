"""The GPU code path, run on a CPU machine: the run built and stepped on fake CUDA tensors.

What runs there is the run's own code with `device = cuda`: the compute dtype `auto` resolves to, parameter
placement, FSDP2's mixed-precision policy and its CUDA streams, the batch moved and normalised on the device, the
attention call as it is made on CUDA, the teacher and student forward, gradient clipping, the optimizer step
and the EMA. What cannot run without a driver is backward: the autograd engine starts a thread per CUDA device
and asks the driver for it (the step's memory and FLOPs are therefore measured on fake CPU tensors, with the
dtypes of the GPU run). The checks here are what a GPU would enforce: every tensor on the device, the compute
dtype where it belongs, fp32 losses and master weights.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dinotrain.distributed.fsdp import compute_dtype
from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.plan.fake_world import FakeWorld
from dinotrain.plan.step import GPU, build_objective, planned_config, synthetic_batch


class GpuPathError(RuntimeError):
    """The run's code, placed on a (fake) CUDA device, failed or put a tensor where it does not belong."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise GpuPathError(what)


def trace_on_cuda(cfg: DictConfig, command: str, world_size: int, teacher: ViTSpec | Dinov3Spec | None = None) -> str:
    """One line: what of the GPU path was traced, or what failed there (a bug of the GPU path)."""
    cfg = planned_config(cfg, 2, bool(cfg.fsdp.activation_checkpointing))  # shapes, not sizes, are checked here
    dtype = compute_dtype(cfg.compute_precision.dtype, GPU)
    real_batch = synthetic_batch(cfg, 2, world_size)
    try:
        with FakeWorld(world_size, "cuda") as world:
            objective = build_objective(cfg, command, world.env, teacher)
            learners = objective.learners
            for learner in learners:
                params = list(learner.model.parameters())
                _check(all(p.device.type == "cuda" for p in params), "a parameter is not on the GPU")
                _check(all(p.dtype == torch.float32 for p in params), "master weights are not fp32")
            batch = world.batch(real_batch)
            for learner in learners:
                learner.begin(0)
            dtypes = set()
            hooks = [block.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype if torch.is_tensor(o) else
                                                                             o[0].dtype))
                     for lr in learners for block in lr.model.student["backbone"].blocks]
            for learner, loss, _ in objective.losses(batch, 0, 0):
                _check(loss.device.type == "cuda" and loss.dtype == torch.float32,
                       f"the loss is {loss.dtype} on {loss.device}")
                for p in learner.model.student.parameters():  # backward cannot run without a driver: its result
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            for h in hooks:
                h.remove()
            _check(dtypes == {dtype}, f"the blocks computed in {sorted(map(str, dtypes))}, not {dtype}")
            for learner in learners:
                learner.finish()
    except GpuPathError as exc:
        raise GpuPathError(f"GPU path (fake CUDA tensors): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever broke is the finding
        raise GpuPathError(f"GPU path (fake CUDA tensors) failed: {type(exc).__name__}: {exc}") from exc
    return ("GPU code path: traced on a fake CUDA device (set-up, FSDP2 placement and mixed precision, forward in "
            f"{str(dtype).replace('torch.', '')}, fp32 losses, clipping, optimizer step, EMA); backward not traced "
            "there (the autograd engine needs a CUDA driver): measured on fake CPU tensors")
