"""`fsdp.compile`: torch.compile (inductor) on each transformer block, and its failures as one user error.

Blocks are compiled one by one, before FSDP2 wraps them (the pattern of torchtitan and DINOv3): every block of a
backbone runs the same code, so dynamo compiles a handful of graphs and every block reuses them (parameters are
graph inputs, not constants). `nn.Module.compile` compiles the block in place: parameter names, state dicts,
checkpoints and exports are the same with and without compilation, so a run may resume with it toggled.

What makes dynamo compile another graph, and how many (docs/training.md, "Compiling the blocks"): grad mode
(student vs teacher), the last block's selected rows (their count varies per step, so it is marked dynamic),
activation checkpointing on or off, and each distinct stochastic-depth rate (one graph per block with the
linear `student.drop_path_uniform=false`): `recompile_limit` is raised to fit them, since past it dynamo would
silently run the remaining blocks uncompiled.
"""

from __future__ import annotations

import os

import torch
import torch._dynamo
from torch import nn

# Room for the graphs of one kind of block (`block_kind`): all crops or the selected rows, with or without grad
# (student, teacher), train or eval mode (distillation's frozen teacher), frozen or not (head warm-up). Measured: 4 in
# a pretraining, 6 in a distillation with two student widths, 8 in a head warm-up then distillation (one kind).
GRAPHS_PER_BLOCK_KIND = 16

_block_kinds: set[tuple] = set()


class CompileError(RuntimeError):
    """torch.compile failed (no C++ compiler, an unsupported operation, ...): a user error, fixed by turning it off."""


def compile_blocks(module: nn.Module) -> None:
    """Compile each block of `module` (if it has `blocks`) in place, and make room for its graphs."""
    blocks = list(getattr(module, "blocks", []))
    for block in blocks:
        block.compile()
        _block_kinds.add(block_kind(block))
    if blocks:
        needed = GRAPHS_PER_BLOCK_KIND * len(_block_kinds)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        # A block's stochastic-depth rate is a constant of its graph: it picks the code path and the kept-sample
        # count. Left to dynamo (torch 2.14), the second rate it meets (the teacher's 0 after the student's) turns
        # the float symbolic, which fails inside activation checkpointing ("lift_tracked_freevar_to_input should
        # not be called on root SubgraphTracer").
        torch._dynamo.config.specialize_float = True


def is_compile_failure(exc: BaseException) -> bool:
    """Whether torch.compile failed: one of dynamo's errors (inductor's, a missing C++ compiler included, arrive
    wrapped in them, also from the backward compiled on first use), or an error raised while dynamo compiled a
    frame (its own bugs surface as plain AssertionErrors there). Not an error of running compiled code."""
    if isinstance(exc, torch._dynamo.exc.TorchDynamoException):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("torch", "_dynamo", "convert_frame.py")):
            return True
        tb = tb.tb_next
    return False


def block_kind(block: nn.Module) -> tuple:
    """What sets a block's graphs apart: its class, parameter shapes (another width, another MLP) and the stochastic
    depth rate that it bakes into its graph as a constant."""
    shapes = tuple((name, tuple(p.shape)) for name, p in block.named_parameters())
    return type(block).__name__, shapes, getattr(getattr(block, "drop_path", None), "drop_prob", None)


def compile_error(exc: BaseException) -> CompileError:
    """The one-line user error for a failure of torch.compile (`is_compile_failure`)."""
    inner = getattr(exc, "inner_exception", None) or exc  # what the backend raised, not dynamo's wrapper
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    cause = lines[0] if lines else type(inner).__name__
    if not cause.startswith(type(inner).__name__):
        cause = f"{type(inner).__name__}: {cause}"
    if len(cause) > 300:
        cause = cause[:297] + "..."
    return CompileError(f"torch.compile failed ({cause}); set fsdp.compile=false to train without it "
                        "(--debug shows the traceback)")
