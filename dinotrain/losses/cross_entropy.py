"""Cross-entropy against soft targets over many prototypes, without materialising the log-softmax.

The DINO and iBOT losses are `-sum_k t_k log_softmax(s / temp)_k` per row, over 65,536-131,072
prototypes: for the masked patch tokens of a ViT-L batch that is thousands of rows. Written with
`log_softmax`, autograd keeps the (M, K) log-probabilities for the backward and every elementwise step
(divide, log-softmax, multiply, sum and their backwards) sweeps the whole (M, K) block through memory
again. Here the same value is `lse(s / temp) * sum_k t_k - <t, s> / temp` per row, computed in row
blocks small enough to stay in cache, and the backward recomputes the softmax from `s` and the saved
row log-sum-exps: `d/ds = (softmax(s / temp) * sum_k t_k - t) / temp`. Same loss and gradient up to
float rounding (tests/losses/test_cross_entropy.py); nothing of size (M, K) is kept but the inputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["soft_cross_entropy"]

# Bytes per row block on CPU. Measured at 601 x 65,536, forward + backward on 2 cores: 1 MiB blocks 0.42 s,
# 16 MiB 0.36 s, the whole at once 0.50 s (the log-softmax expression: 0.65 s).
_BLOCK_BYTES = 1 << 24


def _row_block(rows: int, cols: int, device: torch.device) -> int:
    if device.type != "cpu":  # one launch per step on accelerators: their caches are not the point
        return max(rows, 1)
    return max(1, min(rows, _BLOCK_BYTES // (4 * max(cols, 1))))


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _SoftCrossEntropy(torch.autograd.Function):
    """Rows of `logits` against consecutive target segments (their rows, in order, cover the logits' rows):
    one call and one gradient for logits whose rows meet different targets (DINO's views, iBOT's patches)."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, grad_in_logits: bool, *targets: Tensor) -> Tensor:
        rows, cols = logits.shape
        dtype = _compute_dtype(logits)
        out = torch.empty(rows, dtype=dtype, device=logits.device)
        lse = torch.empty(rows, dtype=dtype, device=logits.device)
        target_mass = torch.empty(rows, dtype=dtype, device=logits.device)
        step = _row_block(rows, cols, logits.device)
        scaled = torch.empty(step, cols, dtype=dtype, device=logits.device)  # reused by every block
        for r0, r1, target_rows in _row_blocks(targets, step):
            t = target_rows.to(dtype)
            target_mass[r0:r1] = t.sum(dim=-1)
            lse[r0:r1], dot = _lse_and_dot(logits[r0:r1], t, temperature, scaled[: r1 - r0])
            out[r0:r1] = lse[r0:r1] * target_mass[r0:r1] - dot
        ctx.save_for_backward(logits, lse, target_mass, *targets)
        ctx.temperature = temperature
        ctx.grad_in_logits = grad_in_logits
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, target_mass, *targets = ctx.saved_tensors
        temperature = ctx.temperature
        rows, cols = logits.shape
        dtype = lse.dtype
        grad = _gradient_buffer(logits, ctx.grad_in_logits and logits.dtype == dtype)
        scale = grad_out.to(dtype) / temperature
        step = _row_block(rows, cols, logits.device)
        in_place = grad.dtype == dtype  # full-precision gradients are written straight into their rows
        buffer = None if in_place else torch.empty(step, cols, dtype=dtype, device=logits.device)
        for r0, r1, target_rows in _row_blocks(targets, step):
            probs = grad[r0:r1] if in_place else buffer[: r1 - r0]
            torch.div(logits[r0:r1].to(dtype), temperature, out=probs)
            probs.sub_(lse[r0:r1, None]).exp_().mul_(target_mass[r0:r1, None])
            probs.sub_(target_rows).mul_(scale[r0:r1, None])
            if not in_place:
                grad[r0:r1] = probs
        return (grad, None, None, *[None] * len(targets))


def _gradient_buffer(logits: Tensor, reuse: bool) -> Tensor:
    """Where the backward writes d loss / d logits: the logits' own memory when the caller allows it (each
    element is read once, just before its gradient is written there), else a new tensor."""
    return logits if reuse else torch.empty_like(logits)


def _lse_and_dot(logits: Tensor, targets: Tensor, temperature: float, block: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: logsumexp(s / temp) and <t, s / temp>, using `block` (the rows' shape, compute dtype) as scratch.

    The log-sum-exp runs in the block's own memory (torch.logsumexp would allocate its `s - max`), then the
    block is written again for the dot product: a second division costs less than a new (rows, K) tensor."""
    logits = logits.to(block.dtype)  # no copy unless half precision
    torch.div(logits, temperature, out=block)
    row_max = block.amax(dim=-1, keepdim=True)
    lse = block.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(-1))
    torch.div(logits, temperature, out=block)
    return lse, block.mul_(targets).sum(dim=-1)


def _row_blocks(segments, step: int):
    """(first row, end row, their targets) of blocks of at most `step` logit rows; a block never spans two
    target segments."""
    first = 0
    for segment in segments:
        for start in range(0, segment.shape[0], step):
            end = min(start + step, segment.shape[0])
            yield first + start, first + end, segment[start:end]
        first += segment.shape[0]


def soft_cross_entropy(logits: Tensor, targets: Tensor | Sequence[Tensor], temperature: float,
                       grad_in_logits: bool = False) -> Tensor:
    """Per-row `-sum_k targets_k * log_softmax(logits / temperature)_k` of (M, K) inputs, in float32 (float64
    for float64 logits).

    Differentiable in `logits` only (the targets are the teacher's, held fixed). Targets need not sum
    to one: the loss is linear in them, so one call against the sum of several target rows equals the
    sum of the calls against each (the DINO loss uses this to compare a student view with all teacher
    views at once). Half-precision logits are read in float32, as a sum over K prototypes needs.

    `targets` may also be a sequence of (M_i, K) segments with sum(M_i) = M, for the logits' consecutive
    rows: one call then scores rows that meet different targets (a shared head's DINO and iBOT rows)
    and writes one (M, K) gradient, where split logits would write one per part and concatenate them.
    A segment may appear several times (each local view meets the same summed teacher views).

    `grad_in_logits=True` lets the backward write the gradient into the logits' memory instead of a new (M, K)
    tensor (no allocation of the largest tensor of a step: 178 MB at ViT-S/14 batch 8, over 1 GB at ViT-L/14 batch
    32 on a GPU). Only for logits nobody reads after the backward, such as a head's float32 output used by this loss
    alone; a second backward through the same graph then fails loudly (the saved logits were modified).
    """
    if isinstance(targets, Tensor):
        if logits.ndim != 2 or targets.shape != logits.shape:
            raise ValueError(f"logits and targets must both be (M, K) with the same shape, got {tuple(logits.shape)} "
                             f"and {tuple(targets.shape)}")
        segments = [targets]
    else:
        segments = list(targets)
        if logits.ndim != 2 or any(t.ndim != 2 or t.shape[1] != logits.shape[1] for t in segments) \
                or sum(t.shape[0] for t in segments) != logits.shape[0]:
            raise ValueError(f"target segments must be (M_i, K) with sum(M_i) = M for (M, K) logits, got logits "
                             f"{tuple(logits.shape)} and segments {[tuple(t.shape) for t in segments]}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _SoftCrossEntropy.apply(logits, float(temperature), bool(grad_in_logits), *[t.detach() for t in segments])
