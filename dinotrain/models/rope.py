"""Axial 2-D rotary position encoding of DINOv3: sin/cos tables for any patch grid, and their application.

Follows `dinov3/layers/rope_position_encoding.py` and `dinov3/layers/attention.py` of the official code
(facebookresearch/dinov3) operation for operation, so tables computed here equal the official ones bitwise:

- patch centres `(i + 0.5) / n` per axis ("separate"; or divided by min/max(H, W)), mapped to [-1, 1];
- in training mode only, one draw per call of torch's RNG (on the periods' device, in their dtype), in the
  official order: a shift of each axis, uniform in [-shift, shift]; a log-uniform per-axis scale in
  [1/jitter, jitter]; one log-uniform scale of both axes in [1/rescale, rescale];
- angles `2 pi * coord / period` for `head_dim / 4` periods per axis (`base ** (4k / head_dim)`, or spread
  log-uniformly between `min_period` and `max_period`), the two axes side by side, then tiled twice
  ("rotate half" layout: channel c pairs with channel c + head_dim / 2).

The periods are a persistent buffer (`rope_embed.periods` in official checkpoints), in the table dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NORMALIZE_COORDS = ("separate", "min", "max")


def rope_periods(head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """The `head_dim // 4` periods, computed exactly as the official `_init_weights` does in `dtype`."""
    n = head_dim // 4
    if base is not None:
        return base ** (2 * torch.arange(n, device=device, dtype=dtype) / (head_dim // 2))
    ratio = max_period / min_period
    exponents = torch.linspace(0, 1, n, device=device, dtype=dtype)
    return ratio ** exponents / ratio * max_period


def rope_rotate_half(x: Tensor) -> Tensor:
    """[x0 .. x(k-1), xk .. x(2k-1)] -> [-xk .. -x(2k-1), x0 .. x(k-1)]."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Rotate the patch tokens of q and k (B, heads, N, head_dim) by `rope` = (sin, cos), each (HW, head_dim).

    The first N - HW tokens (CLS and storage tokens) are left as they are. The rotation is computed in the
    tables' dtype and cast back, as the official code does (fp32 tables under bf16 autocast).
    """
    sin, cos = rope
    prefix = q.shape[-2] - sin.shape[-2]
    if prefix < 0:
        raise ValueError(f"RoPE tables for {sin.shape[-2]} patches, but only {q.shape[-2]} tokens")

    def rotate(t: Tensor) -> Tensor:
        t32 = t.to(sin.dtype)
        patches = t32[:, :, prefix:]
        rotated = patches * cos + rope_rotate_half(patches) * sin
        return torch.cat((t32[:, :, :prefix], rotated), dim=-2).to(t.dtype)

    return rotate(q), rotate(k)


class RopePositionEmbedding(nn.Module):
    """(sin, cos) tables, each (H*W, head_dim), for an H x W patch grid; no learnable weights."""

    def __init__(self, embed_dim: int, num_heads: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, normalize_coords: str = "separate",
                 shift_coords: float | None = None, jitter_coords: float | None = None,
                 rescale_coords: float | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs embed_dim ({embed_dim}) divisible by 4 * num_heads ({4 * num_heads})")
        both_periods = min_period is not None and max_period is not None
        if (base is None) != both_periods:
            raise ValueError("RoPE takes either `base` or both `min_period` and `max_period`")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords must be one of {NORMALIZE_COORDS}, got {normalize_coords!r}")
        for name, value in (("jitter_coords", jitter_coords), ("rescale_coords", rescale_coords)):
            if value is not None and value < 1:
                raise ValueError(f"{name} is a factor >= 1 (log-uniform in [1/f, f]), got {value}")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = dtype
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=dtype), persistent=True)
        self.reset_parameters()

    @property
    def augments(self) -> bool:
        """Whether training-mode calls draw random coordinate augmentations (so tables differ per call)."""
        return any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.periods.copy_(rope_periods(self.head_dim, self.base, self.min_period, self.max_period,
                                            self.dtype, self.periods.device))

    def coords(self, h: int, w: int) -> Tensor:
        """Patch centres (H*W, 2) as (row, column) in [-1, 1], augmented in training mode."""
        dd = dict(device=self.periods.device, dtype=self.dtype)
        if self.normalize_coords == "separate":
            den_h, den_w = h, w
        else:
            den_h = den_w = max(h, w) if self.normalize_coords == "max" else min(h, w)
        rows = torch.arange(0.5, h, **dd) / den_h
        cols = torch.arange(0.5, w, **dd) / den_w
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training:
            if self.shift_coords is not None:
                coords += torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)[None, :]
            if self.jitter_coords is not None:
                log_j = math.log(self.jitter_coords)
                coords *= torch.empty(2, **dd).uniform_(-log_j, log_j).exp()[None, :]
            if self.rescale_coords is not None:
                log_r = math.log(self.rescale_coords)
                coords *= torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        coords = self.coords(h, w)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (HW, 2, head_dim / 4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, head_dim)
        return torch.sin(angles), torch.cos(angles)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base}, normalize={self.normalize_coords}, "
                f"shift={self.shift_coords}, jitter={self.jitter_coords}, rescale={self.rescale_coords}, "
                f"dtype={self.dtype}")
