"""Building blocks of the ViT backbones, with the official DINOv2 parameter names.

Names matter here: `patch_embed.proj`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `mlp.fc1|fc2` and
`mlp.w12|w3` are what official checkpoints hold, so they load into these modules unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D) with one strided convolution.

    Sizes that are not a multiple of the patch size are cropped down to one (bottom/right rows and
    columns dropped), as the DINOv2 model card specifies; a strided convolution does exactly that.
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images with {self.in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                "convert grayscale/RGBA images to RGB first"
            )
        h, w = x.shape[-2:]
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"image size {h}x{w} is smaller than the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (or xformers when asked)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.context(x))

    def context(self, x: Tensor) -> Tensor:
        """The heads' outputs, concatenated (B, N, D): the attention before its output projection."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        if self.attn_impl == "xformers" and x.is_cuda:
            from xformers.ops import memory_efficient_attention  # optional extra, imported only when used

            q, k, v = qkv.unbind(2)  # (B, N, H, hd), xformers' layout
            out = memory_efficient_attention(q, k, v)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return out.reshape(b, n, d)


class Mlp(nn.Module):
    """The plain two-layer GELU feed-forward of ViT-S/B/L."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int) -> int:
    """Official ViT-g sizing: two thirds of the MLP width rounded up to a multiple of 8 (6144 -> 4096)."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward of ViT-g: `w3(silu(a) * b)` where `w12(x)` = [a, b] (gate first, as official)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {"mlp": Mlp, "swiglufused": SwiGLUFFN, "swiglu": SwiGLUFFN}


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT), parameter `gamma` as in official checkpoints."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling the kept ones."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward_rows(self, rows: Tensor, sample: Tensor, batch: int) -> Tensor:
        """The same for token rows (R, D) of a batch of `batch` samples, row r belonging to sample
        `sample[r]`: one draw per sample, as `forward` on the whole batch draws."""
        if self.drop_prob == 0.0 or not self.training:
            return rows
        keep = 1.0 - self.drop_prob
        mask = rows.new_empty((batch,)).bernoulli_(keep)
        return rows * mask[sample].unsqueeze(-1) / keep


# Above this rate the residual branches run only on the kept samples (official DINOv2 training path);
# below it the saving does not pay for the gather/scatter, and whole-sample masking is used.
SUBSET_DROP_PATH_ABOVE = 0.1


def add_residual_on_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop_rate: float) -> Tensor:
    """Stochastic depth that skips the dropped samples' compute: `x + branch(x) * B / kept` on
    `kept = max(int(B * (1 - drop_rate)), 1)` random samples of the batch, `x` on the others.

    Same expectation as masking (each sample gets `branch(x)` with probability kept/B, scaled by
    B/kept), but the branch runs on kept rows only: at drop rate 0.4, 0.6x the block's FLOPs.
    """
    batch = x.shape[0]
    kept = max(int(batch * (1.0 - drop_rate)), 1)
    rows = torch.randperm(batch, device=x.device)[:kept]
    residual = branch(x[rows])
    return torch.index_add(x, 0, rows, residual.to(x.dtype), alpha=batch / kept)


class Block(nn.Module):
    """Pre-norm transformer block. Accepts a tensor or a list of tensors (multi-crop: one per crop size),
    so a sharded block is gathered once for all crop sizes."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {sorted(FFN_LAYERS)}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FFN_LAYERS[ffn_layer](dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.checkpointing = False  # recompute activations in backward (set by the FSDP wrapper)

    def _forward_one(self, x: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._residual_branches, x, use_reentrant=False)
        return self._residual_branches(x)

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _residual_branches(self, x: Tensor) -> Tensor:
        rate = self.drop_path.drop_prob
        if self.training and rate > SUBSET_DROP_PATH_ABOVE:
            x = add_residual_on_subset(x, self._attn_branch, rate)
            return add_residual_on_subset(x, self._ffn_branch, rate)
        x = x + self.drop_path(self._attn_branch(x))
        return x + self.drop_path(self._ffn_branch(x))

    def _rows_one(self, x: Tensor, rows: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._residual_branches_at, x, rows, use_reentrant=False)
        return self._residual_branches_at(x, rows)

    def _residual_branches_at(self, x: Tensor, rows: Tensor) -> Tensor:
        """The block's output at token rows `rows` (indices into the flattened (B * N) tokens) only.

        Every token still enters the attention (as keys and values), but the output projection, the
        residuals and the feed-forward run on the rows asked for. Stochastic depth draws exactly what the
        whole-batch path draws (same generator calls, same order), so the rows equal that path's output.
        """
        batch, n_tokens, _ = x.shape
        sample = torch.div(rows, n_tokens, rounding_mode="floor")
        flat = x.flatten(0, 1)
        rate = self.drop_path.drop_prob
        if self.training and rate > SUBSET_DROP_PATH_ABOVE:  # the subset path: branches on kept samples only
            kept = max(int(batch * (1.0 - rate)), 1)
            keep = torch.randperm(batch, device=x.device)[:kept]
            slot = torch.full((batch,), -1, dtype=torch.long, device=x.device)
            slot[keep] = torch.arange(kept, device=x.device)
            # rows of dropped samples read a kept sample's context and are then scaled by 0: no index of
            # data-dependent length, so no host sync on a GPU
            context = self.attn.context(self.norm1(x[keep])).flatten(0, 1)
            branch = self.ls1(self.attn.proj(context[slot[sample].clamp(min=0) * n_tokens + rows % n_tokens]))
            y = flat[rows] + branch.to(x.dtype) * self._kept_scale(slot[sample] >= 0, batch / kept, x.dtype)
            keep = torch.randperm(batch, device=x.device)[:kept]
            return y + self._ffn_branch(y).to(x.dtype) * self._kept_scale(torch.isin(sample, keep), batch / kept, x.dtype)
        context = self.attn.context(self.norm1(x)).flatten(0, 1)[rows]
        y = flat[rows] + self.drop_path.forward_rows(self.ls1(self.attn.proj(context)), sample, batch)
        return y + self.drop_path.forward_rows(self._ffn_branch(y), sample, batch)

    @staticmethod
    def _kept_scale(kept_rows: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
        return (kept_rows.to(dtype) * scale).unsqueeze(-1)

    def forward(self, x: Tensor | list[Tensor], rows: Tensor | list[Tensor] | None = None) -> Tensor | list[Tensor]:
        """(B, N, D) -> (B, N, D); with `rows` (indices into the flattened B * N tokens), only those
        rows' outputs, (len(rows), D): the last block of a training forward that needs a few tokens."""
        if rows is not None:
            if isinstance(x, (list, tuple)):
                return [self._rows_one(xi, ri) for xi, ri in zip(x, rows)]
            return self._rows_one(x, rows)
        if isinstance(x, (list, tuple)):
            return [self._forward_one(xi) for xi in x]
        return self._forward_one(x)
