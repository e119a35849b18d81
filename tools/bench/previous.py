"""Previous implementations of pieces dinotrain has since made faster, for the harness's before/after cases.

Not used by dinotrain itself: each context manager swaps one current implementation for the one it replaced,
so a case can time both on the same model and batch in one process (same values: the tests check the
current ones against independent references).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor


def _effective_weight_separate_ops(self) -> Tensor:
    """PrototypeLinear's weight norm before: g * v / ||v|| as separate ops (three new (out, in) tensors)."""
    return self.weight_v * (self.weight_g / self.weight_v.norm(p=2, dim=1, keepdim=True))


def _lse_and_dot_with_logsumexp(logits: Tensor, targets: Tensor, temperature: float, block: Tensor):
    """The cross-entropy's row statistics before: torch.logsumexp, which allocates its own `s - max`."""
    torch.div(logits.to(block.dtype), temperature, out=block)
    lse = torch.logsumexp(block, dim=-1)
    return lse, block.mul_(targets).sum(dim=-1)


def separate_op_weight_norm_and_logsumexp() -> contextlib.ExitStack:
    """The DINO head's prototype weight norm and the cross-entropies' log-sum-exp as they were before."""
    from dinotrain.losses import cross_entropy
    from dinotrain.models.heads import PrototypeLinear

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(PrototypeLinear, "effective_weight", _effective_weight_separate_ops))
    stack.enter_context(mock.patch.object(cross_entropy, "_lse_and_dot", _lse_and_dot_with_logsumexp))
    return stack


def cross_entropy_gradient_in_a_new_tensor():
    """The cross-entropy's backward writing its (M, K) gradient into a new tensor, as before `grad_in_logits`."""
    from dinotrain.losses import cross_entropy

    return mock.patch.object(cross_entropy, "_gradient_buffer", lambda logits, reuse: torch.empty_like(logits))


def every_token_and_split_logits():
    """The SSL step before its two fast paths: every token through the last block, each head's output split into
    its parts, one cross-entropy per loss: the tests' reference step (tests/reference_ssl_step.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from reference_ssl_step import reference_compute_losses

    from dinotrain.train.ssl import SSLMetaArch

    return mock.patch.object(SSLMetaArch, "compute_losses", reference_compute_losses)
