"""Building blocks of the DINOv3 ViT, with the official parameter names (`attn.qkv`, `attn.qkv.bias_mask`,
`attn.proj`, `ls1.gamma`, `mlp.fc1|fc2`, `mlp.w1|w2|w3`), so official `.pth` files load into them unchanged.

What differs from the DINOv2 blocks (`layers.py`): attention rotates q and k of the patch tokens by RoPE
tables (`rope.py`); the key bias can be masked to zero (`mask_k_bias`, all released models); SwiGLU keeps
gate and value projections apart (`w1`, `w2`) with the hidden width rounded up to 8/32/64/128; stochastic
depth always runs the residual branches on a random subset of the batch (the official training path).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinotrain.models.layers import LayerScale, Mlp, add_residual_on_subset
from dinotrain.models.rope import apply_rope

# Official `norm_layer` names -> LayerNorm eps ("layernormbf16" is the eps of every released model).
NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}
# Official `ffn_layer` names -> SwiGLU hidden-width alignment (None: the plain GELU MLP).
FFN_ALIGN = {"mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def ffn_hidden_features(embed_dim: int, ffn_ratio: float, ffn_layer: str) -> int:
    """The FFN's hidden width: `int(dim * ratio)`; for SwiGLU two thirds of it, rounded up to the alignment."""
    if ffn_layer not in FFN_ALIGN:
        raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {sorted(FFN_ALIGN)}")
    hidden = int(embed_dim * ffn_ratio)
    align = FFN_ALIGN[ffn_layer]
    if align is None:
        return hidden
    d = int(hidden * 2 / 3)
    return d + (-d % align)


class MaskedKBiasLinear(nn.Linear):
    """The qkv projection whose key bias is multiplied by 0: `bias_mask` (a buffer, as official) is 1 on the
    query and value thirds and 0 on the key third, so the key bias never acts (nor learns)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"a qkv projection has 3 equal parts, got {out_features} outputs")
        if bias:
            self.register_buffer("bias_mask", torch.empty_like(self.bias))
            self.reset_mask()

    def reset_mask(self) -> None:
        if self.bias is not None:
            o = self.out_features
            with torch.no_grad():
                self.bias_mask.fill_(1)
                self.bias_mask[o // 3 : 2 * o // 3] = 0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class RopeAttention(nn.Module):
    """Multi-head self-attention (SDPA) with RoPE on the patch tokens' queries and keys."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        qkv_class = MaskedKBiasLinear if mask_k_bias else nn.Linear
        self.qkv = qkv_class(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """`w3(silu(w1 x) * w2 x)`, the official DINOv3 SwiGLU (S+, L+, H+, 7B)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w2 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Dinov3Block(nn.Module):
    """Pre-norm block with RoPE attention. Takes one tensor, or a list of them (multi-crop: one per crop size)
    with one RoPE table pair per entry."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, ffn_layer: str = "mlp", qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, mask_k_bias: bool = False, drop_path: float = 0.0,
                 layerscale_init: float | None = None, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RopeAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        ffn_class = Mlp if FFN_ALIGN[ffn_layer] is None else SwiGLU
        self.mlp = ffn_class(dim, ffn_hidden, bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path
        self.checkpointing = False  # recompute activations in backward (set by the FSDP wrapper, as DINOv2 blocks)

    def _attn_branch(self, rope: tuple[Tensor, Tensor] | None) -> Callable[[Tensor], Tensor]:
        return lambda x: self.ls1(self.attn(self.norm1(x), rope))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward_list(self, xs: Sequence[Tensor], ropes: Sequence) -> list[Tensor]:
        rate = self.drop_path_rate
        if self.training and rate > 0:
            # Official order of the RNG draws: the attention subsets of every crop group, then the FFN subsets.
            xs = [add_residual_on_subset(x, self._attn_branch(rope), rate) for x, rope in zip(xs, ropes)]
            return [add_residual_on_subset(x, self._ffn_branch, rate) for x in xs]
        out = []
        for x, rope in zip(xs, ropes):
            x = x + self._attn_branch(rope)(x)
            out.append(x + self._ffn_branch(x))
        return out

    def forward(self, x: Tensor | Sequence[Tensor], rope=None) -> Tensor | list[Tensor]:
        """(B, N, D) -> (B, N, D) with `rope` = (sin, cos); or lists of both, element by element."""
        if isinstance(x, Tensor):
            return self._forward_list([x], [rope])[0]
        ropes = list(rope) if rope is not None else [None] * len(x)
        if len(ropes) != len(x):
            raise ValueError(f"{len(x)} token tensors but {len(ropes)} RoPE tables")
        if self.checkpointing and torch.is_grad_enabled():  # RNG state kept, so drop path redraws the same subsets
            return checkpoint(self._forward_list, x, ropes, use_reentrant=False)
        return self._forward_list(x, ropes)
