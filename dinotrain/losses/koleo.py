"""KoLeo regulariser (Sablayrolles et al., 2018), as used by DINOv2 on the student [CLS] features:
`-mean_i log(d(x_i, nearest neighbour of x_i))` on L2-normalised features, which spreads the batch
uniformly over the sphere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator turned into a loss (lower = more spread out).

    Computed per rank on the local batch, without autocast and in at least float32: the log of
    small distances is too coarse in half precision.
    """

    def forward(self, student_output: Tensor, eps: float = 1e-8, pool: Tensor | None = None, offset: int = 0) -> Tensor:
        """Mean KoLeo term of the rows of `student_output`.

        Neighbours are searched among the rows themselves, or among `pool` (e.g. the features of all
        ranks, gathered with autograd) in which `student_output` sits at rows `offset ...`.
        """
        x = student_output
        if not isinstance(x, Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"KoLeoLoss expects features of shape (B, D), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"KoLeoLoss expects floating-point features, got dtype {x.dtype}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0 (it keeps identical rows finite), got {eps}")
        if pool is None:
            pool, offset = x, 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            x, pool = x.to(dtype), pool.to(dtype)
            if pool.shape[0] < 2:  # no neighbour to measure; zero, but still connected to the graph
                return x.sum() * 0.0
            x = F.normalize(x, p=2, dim=-1, eps=eps)
            pool = F.normalize(pool, p=2, dim=-1, eps=eps)
            nn_idx = self._nearest_neighbours(x, pool, offset)
            dist = F.pairwise_distance(x, pool[nn_idx], p=2, eps=eps)
            return -torch.log(dist + eps).mean()

    @staticmethod
    @torch.no_grad()
    def _nearest_neighbours(x: Tensor, pool: Tensor, offset: int) -> Tensor:
        """Index in `pool` of each row's most similar *other* row (max dot product, self excluded)."""
        dots = x @ pool.t()
        # -inf rather than the official -1: with -1 a row whose only neighbours are antipodal
        # (dot = -1) could tie with, and pick, itself.
        rows = torch.arange(x.shape[0], device=x.device)
        dots[rows, rows + offset] = float("-inf")
        return dots.argmax(dim=1)
