"""FSDP2 sharding of the student and teacher: per transformer block, then per model root.

Parameters stay fp32 (the optimizer's master copy); `compute_precision.dtype` sets the dtype they
are gathered in for compute; gradients are reduced in fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dinotrain.distributed.compile import compile_blocks as compile_each_block

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Our modules return slices (CLS token, patch tokens) and no caller modifies them in place, which is
# the only case this FSDP2 warning is about; it would otherwise print on every run.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU: there bf16 is faster only with native bf16 instructions (AMX,
    AVX512-BF16: the ViT-S/14 step 1.5x fp32 on a 2-core EPYC with avx512_bf16) and slower without them, so a CPU
    run opts in by measurement (docs/training.md, "bf16 on a CPU")."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def use_tf32(dtype: torch.dtype, device: torch.device, enabled: bool = True) -> bool:
    """fp32 training on an NVIDIA GPU: let matmuls and convolutions use TF32 tensor cores (about 8x the fp32
    rate on A100/H100, 10-bit mantissa inputs with fp32 accumulation). Returns whether TF32 is on."""
    on = bool(enabled) and dtype == torch.float32 and device.type == "cuda"
    if on:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return on


def fsdp_needed(dtype: torch.dtype) -> bool:
    """Whether FSDP2 has work to do: shard parameters over several ranks, or cast them to a compute dtype.

    One process computing in fp32 needs neither, and FSDP2 would still copy every parameter into a fresh
    unsharded buffer at each gather (student forward and backward, teacher forward) and every gradient at
    each reduction: 5-9 % of a ViT-S/14 training step on 2 CPU cores (BENCHMARKS.md, case `alone-plain`)."""
    alone = not dist.is_initialized() or dist.get_world_size() == 1
    return not alone or dtype != torch.float32


def shard_module(module: nn.Module, dtype: torch.dtype, reshard_after_forward: bool = True,
                 activation_checkpointing: bool = False, compile_blocks: bool = False,
                 plain_if_unneeded: bool = False) -> nn.Module:
    """fully_shard each transformer block (if any) and then the module itself.

    `plain_if_unneeded`: leave the module as it is where `fsdp_needed(dtype)` is False (one process, fp32);
    checkpointing and compilation of the blocks (`distributed/compile.py`, before FSDP2 wraps them) are set up
    either way. Checkpoints do not depend on it: they are written and read through torch.distributed.checkpoint's
    state-dict API, so a run can resume on any number of processes (tests/distributed)."""
    for block in getattr(module, "blocks", []):
        block.checkpointing = activation_checkpointing
    if compile_blocks:
        compile_each_block(module)
    if plain_if_unneeded and not fsdp_needed(dtype):
        return module
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in getattr(module, "blocks", []):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return module


def reshard(module: nn.Module) -> None:
    """Free gathered parameters left after a no-grad forward (a root FSDP module keeps them)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def set_gradient_sync(nets: nn.ModuleDict, enabled: bool) -> None:
    """Turn the reduce-scatter of gradients after backward on or off for every FSDP module of `nets`.

    Off on all but the last micro-batch of gradient accumulation: gradients then accumulate locally and are
    reduced once per step instead of once per micro-batch (the same sum, a fraction of the traffic).
    """
    for module in nets.values():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, shard by shard (both sharded alike)."""
    t_params = [local(p) for p in teacher.parameters()]
    s_params = [local(p).detach() for p in student.parameters()]
    assert len(t_params) == len(s_params)
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def follow_buffers(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA of the student's floating buffers (averaged over ranks) into the teacher's, as of its parameters
    (BatchNorm running statistics: each rank's come from its own batches; the EMA model is exported and evaluated
    with them, as timm's ModelEmaV3 averages them). Copying the student's instead pairs the lagging EMA weights with
    the current student's statistics: on the smoke recipe (momentum 0.95, 40 iterations) that EMA scored chance on
    k-NN (10.9 %) where the student itself scored 18.9 %. Buffers are never sharded by FSDP2."""
    t_bufs = [b for b in teacher.buffers() if b.is_floating_point()]
    s_bufs = [b for b in student.buffers() if b.is_floating_point()]
    assert len(t_bufs) == len(s_bufs)
    if not s_bufs:
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in s_bufs:
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(dist.get_world_size())
    torch._foreach_mul_(t_bufs, momentum)
    torch._foreach_add_(t_bufs, s_bufs, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters = src's, shard by shard (both sharded alike); buffers are constants of the architecture."""
    d_params = [local(p) for p in dst.parameters()]
    s_params = [local(p).detach() for p in src.parameters()]
    assert len(d_params) == len(s_params)
    torch._foreach_copy_(d_params, s_params)


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of one module (sharded grads included); returns the total norm."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
