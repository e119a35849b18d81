"""Teacher centering shared by the DINO and iBOT losses: softmax centering (with an EMA centre)
and Sinkhorn-Knopp, both aware of `torch.distributed` so every rank sees the global batch.

Centering is what keeps the teacher from collapsing onto one prototype: either subtract a running
mean of its logits before the softmax (DINO), or force equal prototype usage over the batch
(Sinkhorn-Knopp, DINOv2's default). Both need statistics over the *global* batch, hence the
all-reduces; without an initialised process group (or with one rank) they are skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["all_reduce_sum", "distributed_world_size", "ema_center_update", "sinkhorn_knopp", "softmax_center"]


def distributed_world_size() -> int:
    """Number of ranks when a process group is up, else 1 (so single-process code needs no setup)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum across ranks; a no-op for a single process. Returns `x` for chaining."""
    if distributed_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _all_reduce_max(x: Tensor) -> Tensor:
    if distributed_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def _check_logits(x: Tensor, name: str, ndim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of logits, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims (samples, prototypes), got shape {tuple(x.shape)}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (prototype) dimension, got shape {tuple(x.shape)}")


def _check_temp(temp: float, name: str = "teacher_temp") -> None:
    if not float(temp) > 0:
        raise ValueError(f"{name} must be > 0, got {temp}")


def softmax_center(teacher_output: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """`softmax((t - center) / temp)` over the last dim, for logits of any leading shape.

    `center` may carry extra leading singleton dims (the buffers are (1, K) and (1, 1, K)); it is
    flattened to (K,) first so the output keeps the shape of `teacher_output`.
    """
    _check_logits(teacher_output, "teacher_output")
    _check_temp(teacher_temp)
    k = teacher_output.shape[-1]
    if center.numel() != k:
        raise ValueError(f"center has {center.numel()} entries but the teacher outputs have {k} prototypes")
    c = center.reshape(k).to(teacher_output.device)
    return F.softmax((teacher_output - c) / teacher_temp, dim=-1)


@torch.no_grad()
def ema_center_update(center: Tensor, teacher_output: Tensor, momentum: float) -> Tensor:
    """`center <- center * m + global_mean * (1 - m)`, in place; returns `center`.

    The mean is over every leading position (samples, or images x tokens) of every rank: per-rank
    sums and counts are all-reduced together, so ranks with unequal batch sizes are weighted
    correctly. Statistics are accumulated in float32 even for bf16/fp16 logits.
    """
    _check_logits(teacher_output, "teacher_output")
    k = teacher_output.shape[-1]
    if center.numel() != k:
        raise ValueError(f"center has {center.numel()} entries but the teacher outputs have {k} prototypes")
    flat = teacher_output.detach().reshape(-1, k)
    acc_dtype = torch.promote_types(flat.dtype, torch.float32)
    stats = torch.empty(k + 1, dtype=acc_dtype, device=flat.device)
    stats[:k] = flat.sum(dim=0, dtype=acc_dtype)
    stats[k] = flat.shape[0]
    all_reduce_sum(stats)  # one collective for the sums and the count
    batch_mean = (stats[:k] / stats[k].clamp(min=1)).to(device=center.device, dtype=center.dtype)
    updated = center * momentum + batch_mean.view_as(center) * (1.0 - momentum)
    # An all-empty global batch has no mean to move towards; `where` keeps the centre without a host sync.
    center.copy_(torch.where(stats[k].to(center.device) > 0, updated, center))
    return center


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: Tensor | int | None = None,
) -> Tensor:
    """Sinkhorn-Knopp assignment of the global batch to K prototypes, as in DINOv2.

    `teacher_output` is this rank's (B_local, K) logits. `n_samples` is this rank's sample count
    (defaults to B_local; iBOT passes its masked-patch count); it is all-reduced to the global B.
    Returns (B_local, K) float probabilities, each row summing to 1, with the prototype marginals
    pushed towards B/K over the global batch.

    Differences from the official code that do not change the result: the logits are shifted by
    their global max before `exp` (the first normalisation divides the factor out, but it stops
    float32 overflowing once logits/temp > 88), and the global B is all-reduced rather than assumed
    to be `B_local * world_size`. The caller's `n_samples` tensor is never modified.
    """
    _check_logits(teacher_output, "teacher_output", ndim=2)
    _check_temp(teacher_temp)
    if int(n_iterations) != n_iterations or n_iterations < 0:
        raise ValueError(f"n_iterations must be a non-negative integer, got {n_iterations}")
    dtype = torch.promote_types(teacher_output.dtype, torch.float32)
    # One (B, K) buffer, updated in place: at 2048 x 131,072 each extra copy is 1 GiB. The arithmetic is
    # the out-of-place sequence's, op for op, so the result is bitwise the same.
    q = teacher_output.detach().to(dtype, copy=True).div_(teacher_temp)
    device = q.device
    k = q.shape[1]

    shift = q.max() if q.numel() else torch.tensor(float("-inf"), dtype=dtype, device=device)
    shift = _all_reduce_max(shift.clone())
    q = q.sub_(shift).exp_().t()  # Q is K x B for consistency with the paper's notation

    if n_samples is None:
        n_samples = q.shape[1]
    count = torch.as_tensor(n_samples, device=device).detach().to(dtype).reshape(-1)
    if count.numel() != 1:
        raise ValueError(f"n_samples must be a scalar or a 1-element tensor, got shape {tuple(count.shape)}")
    stats = all_reduce_sum(torch.stack([q.sum(), count[0]]))  # total mass and global B in one call
    total, b = stats[0], stats[1]

    q.div_(total)
    for _ in range(int(n_iterations)):
        row_sums = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q.div_(row_sums).div_(k)  # each prototype gets 1/K of the mass
        q.div_(q.sum(dim=0, keepdim=True)).div_(b)  # each sample gets 1/B of the mass
    q.mul_(b)  # columns sum to 1: an assignment per sample
    return q.t()


@torch.no_grad()
def teacher_targets(centering: str, dino_loss, ibot_loss, cls_logits: Tensor, patch_logits: Tensor | None,
                    teacher_temp: float) -> tuple[Tensor, Tensor | None]:
    """Teacher logits -> target probabilities of a step: softmax centering with the losses' EMA centres (updated
    here, after use, as official) or Sinkhorn-Knopp. `dino_loss` / `ibot_loss` are the `DINOLoss` /
    `iBOTPatchLoss` holding the centres; `patch_logits` (masked patches, (M, K)) may be None (no iBOT)."""
    if centering == "centering":
        cls_probs = dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
        dino_loss.update_center(cls_logits)
        patch_probs = None
        if patch_logits is not None:
            patch_probs = ibot_loss.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp).squeeze(0)
            ibot_loss.update_center(patch_logits.unsqueeze(0))
        return cls_probs, patch_probs
    cls_probs = dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
    patch_probs = None
    if patch_logits is not None:
        n_masked = torch.tensor([patch_logits.shape[0]], device=patch_logits.device, dtype=torch.long)
        patch_probs = ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, n_masked)
    return cls_probs, patch_probs
