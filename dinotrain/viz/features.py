"""The pictures people know from the DINO papers, computed from a backbone: PCA of patch features mapped to RGB with
the background removed (DINOv2, Fig. 1), and the CLS token's self-attention per head in the last block (DINO).

Only the numbers live here (arrays in [0, 1] on the patch grid); `viz/render.py` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinotrain.models.rope import apply_rope


@dataclass
class PcaMaps:
    """Per image: foreground mask (gh, gw) and RGB (gh, gw, 3) of the foreground's first three components."""

    foreground: torch.Tensor  # (B, gh, gw) bool
    rgb: torch.Tensor  # (B, gh, gw, 3) in [0, 1], black on the background
    first_component: torch.Tensor  # (B, gh, gw), the values that were thresholded


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Projections of the rows of `x` on its first `k` principal components (centred, by SVD)."""
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:k].T


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(dim=0, keepdim=True).values, x.max(dim=0, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


@torch.inference_mode()
def pca_maps(model, images: torch.Tensor, threshold: float = 0.5) -> PcaMaps:
    """The DINOv2 figure's recipe: a PCA over the patches of all images; patches whose first component (scaled to
    [0, 1]) is above `threshold` are the foreground, with the sign chosen so that the border of the images is
    mostly background; a second PCA over the foreground patches only, its three components as RGB."""
    out = model.forward_features(images)
    patches = out["x_norm_patchtokens"].float()  # (B, P, D)
    b, p, d = patches.shape
    gh, gw = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    first = _minmax(_pca(patches.reshape(-1, d), 1))[:, 0].reshape(b, gh, gw)
    border = torch.zeros(gh, gw, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    if (first[:, border] > threshold).float().mean() > 0.5:  # the border is the background: flip the sign
        first = 1.0 - first
    foreground = first > threshold
    rgb = torch.zeros(b, gh, gw, 3)
    fg = patches.reshape(b, gh, gw, d)[foreground]
    if len(fg) >= 3:
        rgb[foreground] = _minmax(_pca(fg, 3))
    return PcaMaps(foreground, rgb, first)


@torch.inference_mode()
def cls_attention_weights(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (B, H, N), values (B, H, N, hd)) of the CLS query in the last block: its softmax over all N tokens
    (CLS, registers, patches), recomputed from the block's own qkv projection (SDPA does not return weights);
    for DINOv3 backbones with the RoPE rotation of the patch keys that the block applies."""
    captured = {}
    last = model.blocks[-1]
    hook = last.norm1.register_forward_hook(lambda _m, _i, out: captured.__setitem__("x", out))
    try:
        model.forward_features(images)
    finally:
        hook.remove()
    x = captured["x"]
    bsz, n, dim = x.shape
    heads = last.attn.num_heads
    q, k, v = last.attn.qkv(x).reshape(bsz, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    rope = getattr(model, "rope_embed", None)
    if rope is not None:  # DINOv3: in eval mode (as pictures are made) the tables the forward just used
        q, k = apply_rope(q, k, rope(images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size))
    weights = F.softmax((q[:, :, 0:1] @ k.transpose(-2, -1)).float() * (dim // heads) ** -0.5, dim=-1)
    return weights[:, :, 0], v


def cls_attention(model, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, gh, gw): the CLS token's attention to each patch in the last block, per head (the DINO figure;
    the weights on CLS itself and on registers are left out of the map)."""
    weights, _ = cls_attention_weights(model, images)
    gh, gw = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return weights[:, :, 1 + model.num_register_tokens:].reshape(len(images), -1, gh, gw)
