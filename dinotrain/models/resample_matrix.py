"""Bicubic resampling of a position table written as two matrix products, for graphs with a dynamic image size.

`F.interpolate` with a size or scale that depends on the input's height and width does not survive ONNX export
in a form that keeps both dynamic and equal to PyTorch's (the scale becomes a constant of the traced size, and
PyTorch's antialiased bicubic, used by the register models, has no exact ONNX Resize counterpart). Here the same
arithmetic as PyTorch's `upsample_bicubic2d` (half-pixel centres, A = -0.75, border indices clamped) and
`_upsample_bicubic2d_aa` (PIL's filter, A = -0.5, support widened by the downscale, weights renormalised at the
borders) is written as a `(new, old)` weight matrix per axis built from `arange` of the grid size, so the exported
graph computes it for whatever size comes in. Tests check it against `F.interpolate` for every mode used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at distances `x` (zero beyond 2)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_weights(new: Tensor, old: int, scale: Tensor) -> Tensor:
    """(new, old) weights of PyTorch's bicubic (no antialias): output i samples at (i + 0.5) / scale - 0.5.

    `new` is a 0-d integer tensor (or int) and `scale` the output/input ratio; as PyTorch does, the source
    position is computed with its reciprocal.
    """
    out = torch.arange(new, dtype=torch.float32).unsqueeze(1)
    src = (1.0 / scale) * (out + 0.5) - 0.5
    base = torch.floor(src)
    t = src - base
    columns = torch.arange(old, dtype=torch.float32).unsqueeze(0)
    weights = torch.zeros_like(src * columns)
    for tap, dist in ((-1, t + 1), (0, t), (1, 1 - t), (2, 2 - t)):
        index = torch.clamp(base + tap, 0, old - 1)
        weights = weights + _cubic(dist, -0.75) * (index == columns).to(torch.float32)
    return weights


def antialias_weights(new: Tensor, old: int) -> Tensor:
    """(new, old) weights of PyTorch's antialiased bicubic to exactly `new` samples (PIL's filter, A = -0.5)."""
    out = torch.arange(new, dtype=torch.float32).unsqueeze(1)
    ratio = old / new.to(torch.float32) if isinstance(new, Tensor) else torch.tensor(old / new)
    widen = torch.clamp(ratio, min=1.0)
    centre = (out + 0.5) * ratio
    columns = torch.arange(old, dtype=torch.float32).unsqueeze(0)
    raw = _cubic((columns + 0.5 - centre) / widen, -0.5)
    return raw / raw.sum(dim=1, keepdim=True)


def resample_table(table: Tensor, grid_h: Tensor, grid_w: Tensor, offset: float, antialias: bool) -> Tensor:
    """A square `(1, 1 + side*side, D)` table on a (grid_h, grid_w) grid, as `resample_positions` computes it,
    including its identity when the grid is the table's (official: no resampling then)."""
    pos = table.float()
    side = math.isqrt(int(pos.shape[1]) - 1)
    grid_h, grid_w = torch.as_tensor(grid_h), torch.as_tensor(grid_w)
    same = torch.logical_and(grid_h == side, grid_w == side)
    if antialias and not offset:
        rows, cols = antialias_weights(grid_h, side), antialias_weights(grid_w, side)
    else:
        def scale(grid: Tensor) -> Tensor:
            exact = (grid.to(torch.float32) + offset) / side if offset else grid.to(torch.float32) / side
            return torch.where(same, torch.ones_like(exact), exact)

        rows, cols = bicubic_weights(grid_h, side, scale(grid_h)), bicubic_weights(grid_w, side, scale(grid_w))
    patch = pos[0, 1:].reshape(side, side, -1)
    resampled = torch.einsum("hi,ijd,wj->hwd", rows, patch, cols).reshape(1, -1, pos.shape[-1])
    return torch.cat((pos[:, :1], resampled), dim=1)
