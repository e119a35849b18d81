"""The ViT backbone family of DINOv2 (S/B/L/g at patch 14) and DINO v1 (S/B at patch 8/16).

The forward API and the state-dict layout are the official ones, so official checkpoints load
unchanged and code written against `torch.hub.load('facebookresearch/dinov2', ...)` keeps working.

Position embeddings for other input sizes are resampled bicubically, following the official
convention: with `interpolate_offset` > 0 (0.1, DINOv2 and DINO v1) the grid is resized by the
scale factor `(new + offset) / old`; with offset 0 it is resized to the exact new grid size (the
convention of the register models and of Hugging Face `transformers`). `interpolate_antialias`
switches antialiasing (official: False without registers, True with registers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotrain.models.layers import Block, PatchEmbed


@dataclass(frozen=True)
class ViTSpec:
    """Everything that fixes a backbone's parameter shapes and numerics (what checkpoints must agree on)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 518
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    layerscale: bool = True
    use_mask_token: bool = True
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# Widths and depths as the DINOv2 model card gives them; head dim 64 throughout.
ARCH_SIZES: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),  # DINO v1 / DeiT-Tiny: smoke runs and tests
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}


def resample_positions(pos_embed: Tensor, grid_h: int, grid_w: int, offset: float, antialias: bool) -> Tensor:
    """A square `(1, 1 + side*side, D)` position table resampled to a (grid_h, grid_w) patch grid, float32.

    The CLS position is kept; patch positions are resized bicubically, by `scale_factor=(grid + offset)
    / side` when `offset` > 0 (the official DINOv2 / DINO v1 convention) or to the exact size when it is 0
    (register models). Used by the forward for other input sizes and to resample stored tables on load.
    """
    pos = pos_embed.float()
    side = int(math.sqrt(pos.shape[1] - 1))
    patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        kwargs = dict(scale_factor=((grid_h + offset) / side, (grid_w + offset) / side))
    else:
        kwargs = dict(size=(grid_h, grid_w))
    patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
    assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat((pos[:, :1], patch_pos), dim=1)


class DinoVisionTransformer(nn.Module):
    """ViT returning the CLS token and patch tokens, with optional register and mask tokens."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = 1.0,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        use_mask_token: bool = True,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if attn_impl not in ("sdpa", "xformers"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'xformers', got {attn_impl!r}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.spec = ViTSpec(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size,
            mlp_ratio=mlp_ratio, ffn_layer="swiglufused" if ffn_layer == "swiglu" else ffn_layer,
            num_register_tokens=num_register_tokens, layerscale=bool(init_values), use_mask_token=use_mask_token,
            interpolate_offset=interpolate_offset, interpolate_antialias=interpolate_antialias,
        )

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None

        # Rates computed on the CPU so the model can also be built under `torch.device("meta")`.
        rates = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, rates[i], init_values, ffn_layer, attn_impl)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: trunc-normal 0.02 for linears and pos_embed, ~0 for CLS/register tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- tokens -------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """Position embeddings for a (grid_h, grid_w) patch grid (see the module docstring)."""
        n_pos = self.pos_embed.shape[1] - 1
        if grid_h * grid_w == n_pos and grid_h == grid_w:
            return self.pos_embed.to(dtype)
        return resample_positions(self.pos_embed, grid_h, grid_w, self.interpolate_offset,
                                  self.interpolate_antialias).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Patchify, replace masked patches by the mask token, add CLS + positions, insert registers."""
        tokens = self.patch_embed(x)
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this backbone was built with use_mask_token=False; it cannot take masks")
            masks = masks.reshape(tokens.shape[0], -1)
            if masks.shape[1] != tokens.shape[1]:
                raise ValueError(f"masks have {masks.shape[1]} entries per image, the image has {tokens.shape[1]} patches")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(grid_h, grid_w, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def _split_output(self, x: Tensor, masks: Tensor | None) -> dict:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def _selected_rows(self, tokens: Tensor, patches: Tensor) -> Tensor:
        """Flat token rows of every image's CLS token, then of the patches `patches` (indices into the
        flattened (B * n_patches) patch tokens, the layout of the iBOT mask indices)."""
        if patches.ndim != 1 or patches.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"selected patches must be a 1-D integer index, got {patches.dtype} of shape "
                             f"{tuple(patches.shape)}")
        batch, n_tokens, _ = tokens.shape
        first_patch = 1 + self.num_register_tokens
        n_patches = n_tokens - first_patch
        patches = patches.to(tokens.device, torch.long)  # (no range check: it would cost a host sync)
        cls_rows = torch.arange(batch, device=tokens.device) * n_tokens
        patch_rows = torch.div(patches, n_patches, rounding_mode="floor") * n_tokens + first_patch + patches % n_patches
        rows = torch.cat((cls_rows, patch_rows))
        # their count changes every step: compiled blocks (fsdp.compile) take it as a dynamic size from the start
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        return rows

    def _selected_output(self, rows: Tensor, batch: int, masks: Tensor | None) -> dict:
        x_norm = self.norm(rows)
        return {"x_norm_clstoken": x_norm[:batch], "x_norm_selected_patchtokens": x_norm[batch:], "masks": masks}

    # ---- forward API (official) ----------------------------------------------------------------
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None],
                              select_patches: Sequence[Tensor] | None = None) -> list[dict]:
        """Several crop sizes in one pass: each block runs on every crop group before the next block.

        `select_patches` (training): one index per crop group into its flattened (B * n_patches) patch
        tokens. The last block then computes only the rows a training step reads, the CLS tokens and
        these patches (the iBOT-masked ones; none for local crops), and each dict holds `x_norm_clstoken`
        and `x_norm_selected_patchtokens` (in index order). Same values as indexing the full output
        (tests/models/test_selected_rows.py); on ViT-S multi-crop ~80 % of the last block's work is saved.
        """
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        if select_patches is None:
            for blk in self.blocks:
                xs = blk(xs)
            return [self._split_output(x, m) for x, m in zip(xs, masks_list)]
        if len(select_patches) != len(xs):
            raise ValueError(f"select_patches has {len(select_patches)} entries for {len(xs)} crop groups")
        for blk in self.blocks[:-1]:
            xs = blk(xs)
        rows = [self._selected_rows(x, p) for x, p in zip(xs, select_patches)]
        if len(self.blocks):
            outs = self.blocks[-1](xs, rows=rows)
        else:
            outs = [x.flatten(0, 1)[r] for x, r in zip(xs, rows)]
        return [self._selected_output(o, x.shape[0], m) for o, x, m in zip(outs, xs, masks_list)]

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence | None = None,
                         select_patches: Tensor | Sequence[Tensor] | None = None):
        """Dict with `x_norm_clstoken`, `x_norm_regtokens`, `x_norm_patchtokens`, `x_prenorm`, `masks`;
        a list of such dicts when given a list of crops. With `select_patches` (one index, or one per crop
        group), `x_norm_clstoken` and `x_norm_selected_patchtokens` only (see `forward_features_list`)."""
        if isinstance(x, (list, tuple)):
            masks_list = list(masks) if masks is not None else [None] * len(x)
            return self.forward_features_list(x, masks_list, select_patches)
        if select_patches is not None:
            return self.forward_features_list([x], [masks], [select_patches])[0]
        x_tok = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x_tok = blk(x_tok)
        return self._split_output(x_tok, masks)

    def forward(self, x: Tensor, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(x, *args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    def _intermediate_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        x = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        wanted = set(range(total - n, total)) if isinstance(n, int) else set(n)
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise ValueError(f"layer indices {sorted(bad)} out of range for a {total}-block backbone")
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outputs.append(x)
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (or the blocks with the given indices), official semantics."""
        outputs = self._intermediate_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b = x.shape[0]
            gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patch_tokens = [out.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for out in patch_tokens]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens))
        return tuple(patch_tokens)


def build_vit(arch: str, patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """Backbone by architecture name (`vit_tiny`, `vit_small`, `vit_base`, `vit_large`, `vit_giant2`)."""
    if arch not in ARCH_SIZES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCH_SIZES)}")
    return DinoVisionTransformer(patch_size=patch_size, **{**ARCH_SIZES[arch], **kwargs})


def vit_small(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_base", patch_size, **kwargs)


def vit_large(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_large", patch_size, **kwargs)


def vit_giant2(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_giant2", patch_size, **kwargs)


def vit_from_spec(spec: ViTSpec, **kwargs) -> DinoVisionTransformer:
    """A backbone whose parameters have exactly the shapes `spec` describes (for loading weights)."""
    return DinoVisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, ffn_layer=spec.ffn_layer,
        num_register_tokens=spec.num_register_tokens, init_values=1.0 if spec.layerscale else None,
        use_mask_token=spec.use_mask_token, interpolate_offset=spec.interpolate_offset,
        interpolate_antialias=spec.interpolate_antialias, **kwargs,
    )
