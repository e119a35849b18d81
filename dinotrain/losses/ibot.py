"""iBOT masked-patch loss: the student predicts, for each patch masked in its input, the teacher's
centred prototype distribution of the same (unmasked) patch (DINOv2 semantics)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinotrain.losses.centering import ema_center_update, sinkhorn_knopp, softmax_center
from dinotrain.losses.cross_entropy import soft_cross_entropy

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(nn.Module):  # noqa: N801 - official name
    """iBOT patch loss with its teacher-centering state (the `center` buffer is checkpointed).

    Works on the flat list of masked tokens of all global crops, (M, K), as the official
    `forward_masked` does, so unmasked patches cost nothing in the head or the loss.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if int(patch_out_dim) != patch_out_dim or patch_out_dim < 1:
            raise ValueError(f"patch_out_dim must be a positive integer, got {patch_out_dim}")
        if not float(student_temp) > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= float(center_momentum) <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.patch_out_dim = int(patch_out_dim)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, 1, self.patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """Centred teacher probabilities; keeps the input's shape ((M, K) or (B, N, K))."""
        return softmax_center(teacher_patch_tokens, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_masked_patches_tensor: Tensor, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp over the masked tokens of all ranks.

        `teacher_output` is this rank's (M, K) masked-token logits and `n_masked_patches_tensor` a
        1-element tensor holding M (not read on the host, so no device sync); it is all-reduced to
        the global count inside, without modifying the caller's tensor.
        """
        if not isinstance(n_masked_patches_tensor, Tensor):
            n_masked_patches_tensor = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device)
        return sinkhorn_knopp(
            teacher_output, teacher_temp, n_iterations=n_iterations, n_samples=n_masked_patches_tensor
        )

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """EMA of the mean teacher token logits ((..., K), any leading shape) over all ranks.

        The mean is over every token of the global batch. For (B, N, K) inputs with the same N on
        each rank this is exactly the official value (mean over tokens, then over images and ranks).
        """
        ema_center_update(self.center, teacher_patch_tokens, self.center_momentum)

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """`-sum_m w_m * sum_k t_mk log_softmax(s_m / temp)_k / N_images`.

        Rows of the (M, K) inputs are the masked tokens in row-major order of `student_masks_flat`
        ((N_images, n_tokens) bool). The default weight of a token is 1 / (masked tokens in its
        image), so every image counts the same however much of it is masked; dividing by all
        N_images (unmasked crops included) is the official normalisation. With `n_masked_patches`
        only the first that many rows are used (the rest is padding of a fixed-size buffer).
        """
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        if s.ndim != 2 or s.shape != t.shape:
            raise ValueError(
                "student and teacher masked tokens must both be (M, K) with the same shape, got "
                f"{tuple(s.shape)} and {tuple(t.shape)}"
            )
        ce = soft_cross_entropy(s, t, self.student_temp)  # float32 for half-precision inputs, as the official code
        return self.weighted_sum(ce, student_masks_flat, n_masked_patches, masks_weight)

    def head_rows_ce(self, logits: Tensor, teacher_patch_probs: Tensor) -> Tensor:
        """The masked patches' cross-entropies (M,) from a separate iBOT head's output (M, K), for
        `weighted_sum`. The logits are read by this loss alone: its backward writes their gradient into
        their memory (no new (M, K) tensor)."""
        return soft_cross_entropy(logits, teacher_patch_probs, self.student_temp, grad_in_logits=True)

    def weighted_sum(self, ce: Tensor, student_masks_flat: Tensor, n_masked_patches: int | None = None,
                     masks_weight: Tensor | None = None) -> Tensor:
        """The loss from the masked tokens' cross-entropies (M,) (computed at this loss's student
        temperature): `forward_masked`'s weighting and normalisation, for callers that scored the
        tokens together with other rows (`soft_cross_entropy` with target segments)."""
        if student_masks_flat.ndim != 2 or student_masks_flat.dtype != torch.bool:
            raise ValueError(
                "student_masks_flat must be an (N_images, n_tokens) bool tensor, got "
                f"shape {tuple(student_masks_flat.shape)} dtype {student_masks_flat.dtype}"
            )
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(dim=-1).clamp(min=1).to(ce.dtype)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            if int(n_masked_patches) != n_masked_patches or n_masked_patches < 0:
                raise ValueError(f"n_masked_patches must be a non-negative integer, got {n_masked_patches}")
            ce = ce[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        if masks_weight.shape != ce.shape:
            raise ValueError(
                f"{ce.shape[0]} masked-token rows but {masks_weight.numel()} mask weights; the token rows must "
                "be the masked positions of student_masks_flat (or pass n_masked_patches / masks_weight)"
            )
        n_images = student_masks_flat.shape[0]
        if n_images == 0:
            raise ValueError("student_masks_flat holds no images")
        return (ce * masks_weight.to(device=ce.device, dtype=ce.dtype)).sum() / n_images

    def extra_repr(self) -> str:
        return (
            f"patch_out_dim={self.patch_out_dim}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}"
        )
