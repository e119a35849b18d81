"""FSDP2 sharding of the student and teacher: per transformer block, then per model root.

Parameters stay fp32 (the optimizer's master copy); `compute_precision.dtype` sets the dtype they
are gathered in for compute; gradients are reduced in fp32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Our modules return slices (CLS token, patch tokens) and no caller modifies them in place, which is
# the only case this FSDP2 warning is about; it would otherwise print on every run.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU (where bf16 matmuls are slower than fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def shard_module(module: nn.Module, dtype: torch.dtype, reshard_after_forward: bool = True,
                 activation_checkpointing: bool = False, compile_blocks: bool = False) -> nn.Module:
    """fully_shard each transformer block (if any) and then the module itself."""
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in getattr(module, "blocks", []):
        block.checkpointing = activation_checkpointing
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return module


def reshard(module: nn.Module) -> None:
    """Free gathered parameters left after a no-grad forward (a root FSDP module keeps them)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


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


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of one module (sharded grads included); returns the total norm."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
