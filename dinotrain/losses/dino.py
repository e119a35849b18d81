"""DINO loss on the [CLS] prototypes: cross-entropy between centred teacher probabilities and
the student's temperature-softmax, summed over student/teacher view pairs (DINOv2 semantics)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dinotrain.losses.centering import ema_center_update, sinkhorn_knopp, softmax_center
from dinotrain.losses.cross_entropy import soft_cross_entropy

__all__ = ["DINOLoss", "dino_crossview_losses", "dino_crossview_targets"]


def _check_hparams(student_temp: float, center_momentum: float) -> None:
    if not float(student_temp) > 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if not 0.0 <= float(center_momentum) <= 1.0:
        raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")


def _dino_sum(students: Sequence[Tensor], teachers: Sequence[Tensor], student_temp: float) -> Tensor:
    """Sum over every (student, teacher) pair of the batch-mean cross-entropy.

    The cross-entropy is linear in the targets, so each student view meets the sum of the teacher views
    in one pass over its logits (float32, also for half-precision logits).
    """
    for t in teachers:
        for s in students:
            if t.shape != s.shape:
                raise ValueError(
                    f"student and teacher outputs must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}"
                )
    if not students or not teachers:  # no pairs: a zero on the inputs' device
        ref = [*students, *teachers]
        return torch.zeros((), device=ref[0].device if ref else None)
    targets = teachers[0] if len(teachers) == 1 else torch.stack(list(teachers)).sum(dim=0)
    total = None
    for s in students:
        term = soft_cross_entropy(s, targets, student_temp).mean()
        total = term if total is None else total + term
    return total


def dino_crossview_losses(
    student_global: Tensor,
    student_local: Tensor | None,
    teacher_probs: Tensor,
    n_global: int = 2,
    *,
    student_temp: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The official meta-arch DINO terms: returns `(global_loss, local_loss)`, both normalised.

    Layouts are view-major: `student_global` and `teacher_probs` are (n_global*B, K), all images'
    view 0, then view 1, ...; `student_local` is (n_local*B, K) or None/empty.

    Pairing: a global student view i is compared with every teacher view j != i (never with its own
    view, which would be trivial to match); local crops are compared with every teacher global view.
    Both losses are divided by the same number of terms, as in the official code:
    `n_global_terms = (n_global-1)*n_global`, `n_local_terms = max(n_local*n_global, 1)`. The
    `max(..., 1)` means that with no local crops the denominator is n_global_terms + 1 (3 for two
    global views), not n_global_terms; we keep that convention so loss values match DINOv2.
    """
    if int(n_global) != n_global or n_global < 1:
        raise ValueError(f"n_global must be a positive integer, got {n_global}")
    if not float(student_temp) > 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if student_global.ndim != 2 or teacher_probs.shape != student_global.shape:
        raise ValueError(
            "student_global and teacher_probs must both be (n_global*B, K) with the same shape, got "
            f"{tuple(student_global.shape)} and {tuple(teacher_probs.shape)}"
        )
    if student_global.shape[0] % n_global:
        raise ValueError(f"{student_global.shape[0]} global rows are not divisible by n_global={n_global}")
    b = student_global.shape[0] // n_global
    if b == 0:
        raise ValueError("the global views hold no samples")
    n_local = 0
    if student_local is not None and student_local.numel() > 0:
        if student_local.ndim != 2 or student_local.shape[1] != student_global.shape[1]:
            raise ValueError(
                f"student_local must be (n_local*B, K) with K={student_global.shape[1]}, "
                f"got {tuple(student_local.shape)}"
            )
        if student_local.shape[0] % b:
            raise ValueError(f"{student_local.shape[0]} local rows are not a multiple of the batch size B={b}")
        n_local = student_local.shape[0] // b

    local_targets, global_targets, denom = dino_crossview_targets(teacher_probs, n_global, n_local)
    s_views = student_global.chunk(n_global)
    global_loss = student_global.new_zeros((), dtype=torch.promote_types(student_global.dtype, torch.float32))
    if n_global > 1:  # the "swap": student view i against the sum of every other teacher view
        for view, targets in zip(s_views, global_targets):
            global_loss = global_loss + _dino_sum([view], [targets], student_temp)
    global_loss = global_loss / denom

    if n_local:
        local_loss = _dino_sum(student_local.chunk(n_local), local_targets[:1], student_temp) / denom
    else:
        local_loss = global_loss.new_zeros(())
    return global_loss, local_loss


def dino_crossview_targets(teacher_probs: Tensor, n_global: int, n_local: int) -> tuple[list[Tensor], list[Tensor], int]:
    """`dino_crossview_losses` as target segments: `(local, global, denom)`, the targets of each student
    local view (every teacher view, summed), then of each student global view i (the other teacher
    views, summed), and the number of terms both losses are divided by. With `soft_cross_entropy(rows,
    local + global, student_temp)` over the student's [local; global] logits, the local loss is the local
    rows' sum / (B * denom) and the global loss the global rows' sum / (B * denom): the same values
    (tests/losses/test_dino_segments.py), with one gradient for all rows."""
    if int(n_global) != n_global or n_global < 1 or int(n_local) != n_local or n_local < 0 \
            or teacher_probs.ndim != 2 or teacher_probs.shape[0] % n_global:
        raise ValueError(f"teacher_probs must be (n_global*B, K) with n_global >= 1, n_local >= 0; got "
                         f"{tuple(teacher_probs.shape)}, n_global={n_global}, n_local={n_local}")
    views = teacher_probs.chunk(n_global)
    every = views[0] if n_global == 1 else torch.stack(views).sum(dim=0)
    others = []
    for i in range(n_global):
        rest = [views[j] for j in range(n_global) if j != i]
        if not rest:  # a single global view has no pair: its rows meet zero targets and add nothing
            others.append(torch.zeros_like(views[i]))
        else:
            others.append(rest[0] if len(rest) == 1 else torch.stack(rest).sum(dim=0))
    denom = (n_global - 1) * n_global + max(n_local * n_global, 1)
    return [every] * n_local, others, denom


class DINOLoss(nn.Module):
    """DINO [CLS] loss with its teacher-centering state (the `center` buffer is checkpointed).

    Per step, as in the official training loop: `probs = softmax_center_teacher(t, temp)` (or
    `sinkhorn_knopp_teacher`), then `update_center(t)` with the same teacher logits, then the loss.
    The centre update is synchronous here (the official code overlaps its all-reduce with compute
    and applies it lazily at the next `softmax_center_teacher`; the values are the same).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if int(out_dim) != out_dim or out_dim < 1:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim}")
        _check_hparams(student_temp, center_momentum)
        self.out_dim = int(out_dim)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, self.out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities with the current centre subtracted (the centre is not updated)."""
        return softmax_center(teacher_output, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Teacher probabilities balanced over prototypes across the global batch (float32)."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the teacher logits' global-batch mean into `center` (all ranks end up equal)."""
        ema_center_update(self.center, teacher_output, self.center_momentum)

    def forward(
        self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]
    ) -> Tensor:
        """Sum over every (student, teacher) pair of the batch-mean cross-entropy, NOT averaged.

        `total = -sum_s sum_t mean_b sum_k t * log_softmax(s / student_temp)`. The caller pairs the
        views and normalises, as the official meta-arch does: for the two global views it passes
        the teacher views in reversed order ([t_B, t_A] flattened against [s_A, s_B] flattened), so
        student view A meets teacher view B and never itself, multiplies by 2 (the row-mean halves
        the two pairs) and divides by the number of pairs, `(n_global-1)*n_global +
        max(n_local*n_global, 1)`. `dino_crossview_losses` does all of that.
        """
        if isinstance(student_output_list, Tensor) or isinstance(teacher_out_softmaxed_centered_list, Tensor):
            raise ValueError("DINOLoss expects lists of tensors (wrap a single tensor as [tensor])")
        return _dino_sum(student_output_list, teacher_out_softmaxed_centered_list, self.student_temp)

    def dino_crossview_losses(
        self, student_global: Tensor, student_local: Tensor | None, teacher_probs: Tensor, n_global: int = 2
    ) -> tuple[Tensor, Tensor]:
        """`dino_crossview_losses` with this loss's student temperature."""
        return dino_crossview_losses(
            student_global, student_local, teacher_probs, n_global, student_temp=self.student_temp
        )

    def head_rows_losses(self, logits: Tensor, teacher_probs: Tensor, n_local_rows: int,
                         patch_targets: Tensor | None = None, n_global: int = 2) -> tuple[Tensor, Tensor, Tensor | None]:
        """The loss of a training step on the DINO head's output: `(global_loss, local_loss, patch_ce)`.

        `logits` are the head's rows [local CLS; global CLS; masked patches (a head shared with iBOT)], view-major,
        scored in ONE cross-entropy against their target segments (`dino_crossview_targets`, then `patch_targets`):
        one (rows, prototypes) gradient where split logits would write one per part. The values are
        `dino_crossview_losses`' (tests/train/test_fast_paths.py checks the step against it); `patch_ce` holds the
        masked patches' cross-entropies for `iBOTPatchLoss.weighted_sum` (None without patch rows). The logits
        are read by this loss alone: its backward writes their gradient into their memory.
        """
        n_g = teacher_probs.shape[0]
        b = n_g // n_global
        local_t, global_t, denom = dino_crossview_targets(teacher_probs, n_global, n_local_rows // b)
        patches = [] if patch_targets is None else [patch_targets]
        ce = soft_cross_entropy(logits, [*local_t, *global_t, *patches], self.student_temp, grad_in_logits=True)
        n_l = n_local_rows
        global_loss, local_loss = ce[n_l:n_l + n_g].sum() / (b * denom), ce[:n_l].sum() / (b * denom)
        return global_loss, local_loss, ce[n_l + n_g:] if patches else None

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, student_temp={self.student_temp}, center_momentum={self.center_momentum}"
