"""Gram anchoring (DINOv3): keep the student's patch-feature similarity structure close to a Gram teacher's.

Over long training the DINO/iBOT objectives keep improving global features while the dense (patch) features
degrade: patch similarities become noisy and lose locality. The Gram loss anchors them to an earlier, better
teacher (an EMA snapshot, the "Gram teacher") through the Gram matrix of the patch features, i.e. the patch-to-
patch cosine similarities, not the features themselves: the student may move its features freely as long as
their similarity structure stays the teacher's. The loss is the mean squared difference of the two Gram
matrices, computed per rank on the local batch, as official `dinov3/loss/gram_loss.py` (`GramLoss`), with its
options:

- `normalized` (official `gram.normalized`, `apply_norm`): L2-normalise each patch feature first (cosine
  similarities) or use raw dot products;
- `img_level` (`gram.img_level`): one (N, N) Gram matrix per image, or one over every patch of the local batch
  (all images and crops at once, (B*N, B*N));
- `remove_neg` (`gram.remove_neg`): negative similarities of both student and teacher are set to 0;
- `remove_only_teacher_neg` (`gram.remove_only_teacher_neg`): the teacher's negative similarities are set to 0,
  the student's kept. (Official code also zeroes the student where both are negative, but it tests the teacher
  after having zeroed it, so that line never fires; this module does what the official code does.)

The teacher's features are a target: no gradient reaches them. Besides the loss: which patch tokens enter it
(`select_tokens`, official `gram.tokens_used`) and the teacher's patch grid resampled to the student's when the
Gram teacher saw larger crops (`resize_patch_grid`, official `gram.global_teacher_resize_*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GramLoss", "TOKENS_USED", "RESIZE_METHODS", "gram_matrix", "resize_patch_grid", "select_tokens"]

TOKENS_USED = ("all", "masked", "unmasked")
# F.interpolate's 2-D modes that take align_corners=False (as the official resize passes) and antialias
RESIZE_METHODS = ("bilinear", "bicubic")


def gram_matrix(features: Tensor, normalized: bool = True) -> Tensor:
    """(..., N, D) features -> (..., N, N) similarities of each pair of rows (cosine when `normalized`)."""
    if normalized:
        features = F.normalize(features, dim=-1)
    return features @ features.transpose(-1, -2)


class GramLoss(nn.Module):
    """Mean squared difference between the student's and the Gram teacher's patch Gram matrices.

    Computed without autocast in at least float32 (official: float32): similarities of normalised features
    differ from the teacher's by small amounts that half precision would round away.
    """

    def __init__(self, normalized: bool = True, img_level: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are exclusive: choose one (both remove the "
                             "teacher's negative similarities; remove_neg also the student's)")
        self.normalized = bool(normalized)
        self.img_level = bool(img_level)
        self.remove_neg = bool(remove_neg)
        self.remove_only_teacher_neg = bool(remove_only_teacher_neg)

    def extra_repr(self) -> str:
        return (f"normalized={self.normalized}, img_level={self.img_level}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}")

    def forward(self, student_patches: Tensor, teacher_patches: Tensor, img_level: bool | None = None) -> Tensor:
        """Scalar loss of (B, N, D) patch features (or (M, D) selected tokens when not image-level).

        img_level: overrides the module's setting for this call (the official statistics on masked / unmasked
        tokens are batch-level on a model whose loss is image-level).
        """
        img_level = self.img_level if img_level is None else bool(img_level)
        _check_features(student_patches, teacher_patches, img_level)
        with torch.autocast(device_type=student_patches.device.type, enabled=False):
            dtype = torch.promote_types(student_patches.dtype, torch.float32)
            student = student_patches.to(dtype)
            teacher = teacher_patches.detach().to(dtype)
            if not img_level:  # one Gram matrix over every token of the local batch
                student, teacher = student.flatten(0, -2), teacher.flatten(0, -2)
            teacher_sim = gram_matrix(teacher, self.normalized)
            student_sim = gram_matrix(student, self.normalized)
            if self.remove_neg or self.remove_only_teacher_neg:
                teacher_sim = teacher_sim.clamp(min=0)
            if self.remove_neg:
                student_sim = student_sim.clamp(min=0)  # no gradient through the zeroed pairs
            return F.mse_loss(student_sim, teacher_sim)


def _check_features(student: Tensor, teacher: Tensor, img_level: bool) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GramLoss expects floating-point {name} patch features, got {what}")
    if student.shape != teacher.shape:
        raise ValueError(f"GramLoss: student patches {tuple(student.shape)} and teacher patches "
                         f"{tuple(teacher.shape)} differ in shape (resample the teacher's grid with resize_patch_grid)")
    if img_level and student.ndim != 3:
        raise ValueError(f"GramLoss at image level expects (B, N, D) patch features, got {tuple(student.shape)}")
    if not img_level and student.ndim not in (2, 3):
        raise ValueError(f"GramLoss over the batch expects (B, N, D) or (M, D) features, got {tuple(student.shape)}")


def select_tokens(student_patches: Tensor, teacher_patches: Tensor, masks: Tensor | None,
                  tokens_used: str = "all") -> tuple[Tensor, Tensor]:
    """The patch tokens the loss compares (official `gram.tokens_used`).

    `all`: the (B, N, D) features as they are; `masked` / `unmasked`: the (M, D) tokens whose iBOT mask
    (`masks`, (B, N) bool) is set / not set, for a batch-level loss.
    """
    if tokens_used not in TOKENS_USED:
        raise ValueError(f"tokens_used must be one of {', '.join(TOKENS_USED)}; got {tokens_used!r}")
    if tokens_used == "all":
        return student_patches, teacher_patches
    if masks is None or masks.dtype != torch.bool or tuple(masks.shape) != tuple(student_patches.shape[:2]):
        got = "none" if masks is None else f"{tuple(masks.shape)} {masks.dtype}"
        raise ValueError(f"tokens_used={tokens_used!r} needs boolean masks of shape {tuple(student_patches.shape[:2])} "
                         f"(one per patch token), got {got}")
    keep = masks if tokens_used == "masked" else ~masks
    return student_patches[keep], teacher_patches[keep]


def resize_patch_grid(patches: Tensor, grid: tuple[int, int], size: tuple[int, int], method: str = "bicubic",
                      antialias: bool = False) -> Tensor:
    """(B, h*w, D) row-major patch tokens of an (h, w) grid resampled to `size` = (h', w'): (B, h'*w', D).

    For a Gram teacher that saw larger crops than the student (official: bicubic, align_corners=False, no
    antialias by default), so that its tokens line up with the student's patches.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {', '.join(RESIZE_METHODS)}; got {method!r}")
    (h, w), size = (int(grid[0]), int(grid[1])), (int(size[0]), int(size[1]))
    if patches.ndim != 3 or patches.shape[1] != h * w:
        raise ValueError(f"patches of shape {tuple(patches.shape)} are not (B, {h}*{w}, D) tokens of a {h}x{w} grid")
    if (h, w) == size:
        return patches
    maps = patches.transpose(1, 2).unflatten(-1, (h, w))  # (B, D, h, w)
    maps = F.interpolate(maps, size=size, mode=method, align_corners=False, antialias=antialias)
    return maps.flatten(-2).transpose(1, 2)
