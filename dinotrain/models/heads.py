"""The DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> cosine prototypes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "PrototypeLinear"]


class PrototypeLinear(nn.Module):
    """Bias-free linear layer whose weight rows (the prototypes) are L2-normalised in `forward`.

    Equivalent to the official `weight_norm(nn.Linear(...))` with the gain frozen at 1, but a single
    plain `weight` parameter: no parametrization to trip FSDP2 sharding or plain state dicts.
    Official checkpoints (`weight_g`/`weight_v`) are converted on load.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Same init as the official layer (nn.Linear's default); only the row directions matter.
        self.weight = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.register_load_state_dict_pre_hook(self._load_weight_norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, p=2, dim=1))

    @staticmethod
    def _load_weight_norm(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        g, v = state_dict.get(prefix + "weight_g"), state_dict.get(prefix + "weight_v")
        if g is not None and v is not None and prefix + "weight" not in state_dict:
            state_dict.pop(prefix + "weight_g")
            state_dict.pop(prefix + "weight_v")
            state_dict[prefix + "weight"] = g * v / v.norm(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows L2-normalised"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head shared by the DINO ([CLS]) and iBOT (patch) losses.

    The L2-normalised bottleneck and normalised prototypes make the logits cosine similarities in
    [-1, 1], which is what lets the losses use small temperatures without blowing up.
    Parameter names (`mlp.*`, `last_layer.weight`) follow the official head.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if int(value) != value or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive integer, got {value}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.mlp = _build_mlp(int(nlayers), self.in_dim, int(bottleneck_dim), int(hidden_dim), use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = PrototypeLinear(int(bottleneck_dim), self.out_dim)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim), or (B, N, in_dim) -> (B, N, out_dim)."""
        if x.ndim < 2 or x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects inputs of shape (..., {self.in_dim}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = self.mlp(x.reshape(-1, self.in_dim))  # 2-D so BatchNorm1d normalises features, not tokens
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows to 0 in fp16
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x).reshape(*lead, self.out_dim)
