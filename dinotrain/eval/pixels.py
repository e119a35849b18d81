"""Raw pixels as features: the honest reference a self-supervised backbone must beat on small data.

On a small, clean dataset (the built-in digits) nearest neighbours in pixel space are already strong;
a backbone that loses to them has not learned anything useful yet. The pixels are those of the exact
evaluation view the backbone gets (same resize, centre crop and split), mapped back from the normalised
tensor to RGB in [0, 1] and flattened, so the k-NN compares like with like.
"""

from __future__ import annotations

import torch
from torch import nn

from dinotrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD


class PixelFeatures(nn.Module):
    """(B, 3, H, W) normalised images -> (B, 3*H*W) RGB values in [0, 1]; `centered` removes each image's mean
    (brightness), which k-NN on cosine similarity otherwise mistakes for content."""

    def __init__(self, centered: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.centered = centered
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images * self.std + self.mean).flatten(1)
        return rgb - rgb.mean(dim=1, keepdim=True) if self.centered else rgb
