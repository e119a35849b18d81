"""The DINOv3 ViT family (patch 16, RoPE, storage tokens), with the official parameter names and forward API.

Parameter and buffer names are those of the official `.pth` files (`cls_token`, `storage_tokens`,
`mask_token`, `rope_embed.periods`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.qkv.bias_mask,
attn.proj, ls1.gamma, norm2, mlp.fc1|fc2 or mlp.w1|w2|w3, ls2.gamma}`, `norm`, `cls_norm`, `local_cls_norm`),
so released weights load with `load_state_dict(strict=True)`; constructor arguments carry the official
names too (those of `student.*` in the official configs). The forward API is that of our DINOv2 backbones
(`forward_features` dicts, `get_intermediate_layers`, `forward(is_training=...)`), with the storage tokens
under both `x_norm_regtokens` (ours) and `x_storage_tokens` (official).

Presets: the official torch.hub entry points, `dinov3/hub/backbones.py` of facebookresearch/dinov3. All are
patch 16, img_size 224, LayerScale 1e-5, LayerNorm eps 1e-5 (`layernormbf16`), 4 storage tokens, masked key
bias, RoPE base 100 with "separate" coordinates, training-time rescale 2 (no shift, no jitter), fp32 tables.

| preset              | embed | depth | heads | ffn (ratio)      | FFN hidden | qkv bias | untied norms                 |
|---------------------|-------|-------|-------|------------------|------------|----------|------------------------------|
| `dinov3_vits16`     |   384 |    12 |     6 | mlp (4)          |       1536 | yes      | -                            |
| `dinov3_vits16plus` |   384 |    12 |     6 | swiglu (6)       |       1536 | yes      | -                            |
| `dinov3_vitb16`     |   768 |    12 |    12 | mlp (4)          |       3072 | yes      | -                            |
| `dinov3_vitl16`     |  1024 |    24 |    16 | mlp (4)          |       4096 | yes      | - (SAT-493M weights: local*) |
| `dinov3_vitl16plus` |  1024 |    24 |    16 | swiglu (6)       |       4096 | yes      | -                            |
| `dinov3_vith16plus` |  1280 |    32 |    20 | swiglu (6)       |       5120 | yes      | -                            |
| `dinov3_vit7b16`    |  4096 |    40 |    32 | swiglu64 (3)     |       8192 | no       | local* (training only)       |

local*: `untie_global_and_local_cls_norm=True`, a `local_cls_norm` for the CLS/storage tokens of the local
crops (list entry 1) in training mode; pass it as an override for the ViT-L SAT-493M weights. SwiGLU width:
`int(dim * ratio)`, two thirds of that, rounded up to 8 (`swiglu`) or 64 (`swiglu64`).

RoPE coordinate augmentations are active in training mode only. As in the official forward, the tables are
recomputed before every block (each block draws its own shift/jitter/rescale); in eval mode they are
computed once per forward (the same values). Stochastic depth uses the same rate in every block (official).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
from torch import Tensor, nn

from dinotrain.models.dinov3_layers import NORM_EPS, Dinov3Block, MaskedKBiasLinear, ffn_hidden_features
from dinotrain.models.layers import LayerScale, PatchEmbed
from dinotrain.models.rope import RopePositionEmbedding

ROPE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Dinov3Spec:
    """Everything that fixes a DINOv3 backbone's parameter shapes and numerics.

    Names and defaults are those of the official `DinoVisionTransformer` constructor (whose defaults are not the
    released models' settings: those are the presets, `DINOV3_PRESETS`).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = False
    layerscale_init: float | None = None
    norm_layer: str = "layernorm"
    n_storage_tokens: int = 0
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    pos_embed_rope_base: float | None = 100.0
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = None
    pos_embed_rope_dtype: str = "bf16"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return ffn_hidden_features(self.embed_dim, self.ffn_ratio, self.ffn_layer)

    def to_dict(self) -> dict:
        return asdict(self)


_SPEC_FIELDS = {f.name for f in fields(Dinov3Spec)}

_COMMON = dict(patch_size=16, img_size=224, qkv_bias=True, proj_bias=True, ffn_bias=True, mask_k_bias=True,
               layerscale_init=1e-5, norm_layer="layernormbf16", n_storage_tokens=4, pos_embed_rope_base=100.0,
               pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2.0,
               pos_embed_rope_dtype="fp32")
DINOV3_PRESETS: dict[str, dict] = {
    "dinov3_vits16": dict(_COMMON, embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vits16plus": dict(_COMMON, embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vitb16": dict(_COMMON, embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vitl16": dict(_COMMON, embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vitl16plus": dict(_COMMON, embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vith16plus": dict(_COMMON, embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vit7b16": dict(_COMMON, embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3.0, ffn_layer="swiglu64",
                           qkv_bias=False, untie_global_and_local_cls_norm=True),
}


# Sizes by the official `student.arch` names (`dinov3/models/vision_transformer.py`: vit_small ... vit_7b), as
# (embed_dim, depth, num_heads, ffn_ratio); `vit_tiny` (DeiT-Tiny) is ours, for smoke runs and tests. Training
# builds a DINOv3 backbone from these and the `student.*` keys (`train/ssl.py`), like the official `build_model`.
DINOV3_ARCH_SIZES: dict[str, tuple[int, int, int, float]] = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_so400m": (1152, 27, 18, 3.777777778),
    "vit_huge2": (1280, 32, 20, 4.0),
    "vit_giant2": (1536, 40, 24, 4.0),
    "vit_7b": (4096, 40, 32, 3.0),
}


class Dinov3VisionTransformer(nn.Module):
    """DINOv3 ViT returning the CLS token, storage tokens and patch tokens; RoPE, so any image size."""

    def __init__(self, *, drop_path_rate: float = 0.0, **spec_kwargs):
        """Keyword arguments: the `Dinov3Spec` fields (official names and defaults) and `drop_path_rate`."""
        super().__init__()
        unknown = sorted(set(spec_kwargs) - _SPEC_FIELDS)
        if unknown:
            raise ValueError(f"unknown DINOv3 backbone argument(s) {unknown}; known: {sorted(_SPEC_FIELDS)}")
        spec = Dinov3Spec(**spec_kwargs)
        embed_dim, depth, num_heads = spec.embed_dim, spec.depth, spec.num_heads
        if spec.norm_layer not in NORM_EPS:
            raise ValueError(f"unknown norm_layer {spec.norm_layer!r}; choose one of {sorted(NORM_EPS)}")
        if spec.pos_embed_rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"unknown pos_embed_rope_dtype {spec.pos_embed_rope_dtype!r}; choose one of "
                             f"{sorted(ROPE_DTYPES)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.spec = spec
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = spec.patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.n_storage_tokens = spec.n_storage_tokens
        self.untie_cls_and_patch_norms = spec.untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = spec.untie_global_and_local_cls_norm
        eps = NORM_EPS[spec.norm_layer]

        self.patch_embed = PatchEmbed(spec.patch_size, spec.in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        if spec.n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.empty(1, spec.n_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim))
        self.rope_embed = RopePositionEmbedding(
            embed_dim, num_heads, base=spec.pos_embed_rope_base, min_period=spec.pos_embed_rope_min_period,
            max_period=spec.pos_embed_rope_max_period, normalize_coords=spec.pos_embed_rope_normalize_coords,
            shift_coords=spec.pos_embed_rope_shift_coords, jitter_coords=spec.pos_embed_rope_jitter_coords,
            rescale_coords=spec.pos_embed_rope_rescale_coords, dtype=ROPE_DTYPES[spec.pos_embed_rope_dtype])
        self.blocks = nn.ModuleList(
            Dinov3Block(embed_dim, num_heads, spec.ffn_hidden, spec.ffn_layer, qkv_bias=spec.qkv_bias,
                        proj_bias=spec.proj_bias, ffn_bias=spec.ffn_bias, mask_k_bias=spec.mask_k_bias,
                        drop_path=drop_path_rate, layerscale_init=spec.layerscale_init, norm_eps=eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)  # everything; when untied, the patch and mask tokens
        self.cls_norm = nn.LayerNorm(embed_dim, eps=eps) if spec.untie_cls_and_patch_norms else None
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=eps) if spec.untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.init_weights()

    @property
    def num_register_tokens(self) -> int:
        """Our DINOv2 name for the storage tokens."""
        return self.n_storage_tokens

    def init_weights(self) -> None:
        """Official init: tokens N(0, 0.02), mask token 0, linears trunc-normal 0.02 with zero biases, the patch
        convolution uniform +-1/sqrt(fan_in), norms 1/0, LayerScale at its init value, RoPE periods."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, MaskedKBiasLinear):
                    m.reset_mask()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, self.spec.layerscale_init)
        bound = (self.spec.in_chans * self.patch_size ** 2) ** -0.5
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        nn.init.uniform_(self.patch_embed.proj.bias, -bound, bound)

    # ---- tokens -------------------------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patchify (cropping to whole patches), replace masked patches by the mask token, prepend CLS and
        storage tokens. Returns the tokens and the (H, W) patch grid."""
        tokens = self.patch_embed(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if masks is not None:
            masks = masks.reshape(tokens.shape[0], -1)
            if masks.shape[1] != tokens.shape[1]:
                raise ValueError(f"masks have {masks.shape[1]} entries per image, the image has {tokens.shape[1]} patches")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
            cls = self.cls_token
        else:
            cls = self.cls_token + 0 * self.mask_token  # keeps the mask token in the graph, as official
        prefix = [cls.expand(tokens.shape[0], -1, -1)]
        if self.n_storage_tokens:
            prefix.append(self.storage_tokens.expand(tokens.shape[0], -1, -1))
        # no cast: under autocast the bf16 patch tokens are promoted and the residual stream is fp32, as official
        return torch.cat(prefix + [tokens], dim=1), grid

    def _rope_tables(self, grids: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        return [self.rope_embed(h, w) for h, w in grids]

    def _run_blocks(self, xs: list[Tensor], grids: Sequence[tuple[int, int]], keep: set[int] | None = None):
        """Every block on every crop group; with `keep`, also the outputs of those block indices."""
        fresh_per_block = self.training and self.rope_embed.augments
        ropes = None if fresh_per_block else self._rope_tables(grids)
        kept = []
        for i, blk in enumerate(self.blocks):
            xs = blk(xs, self._rope_tables(grids) if fresh_per_block else ropes)
            if keep is not None and i in keep:
                kept.append(xs)
        return xs, kept

    def _norm_prefix(self, prefix: Tensor, local: bool) -> Tensor:
        if local and self.local_cls_norm is not None and self.training:
            return self.local_cls_norm(prefix)
        if self.cls_norm is not None:
            return self.cls_norm(prefix)
        return self.norm(prefix)

    def _split_output(self, x: Tensor, masks: Tensor | None, local: bool = False) -> dict:
        n_prefix = self.n_storage_tokens + 1
        if self.cls_norm is None and self.local_cls_norm is None:
            x_norm = self.norm(x)
            prefix, patches = x_norm[:, :n_prefix], x_norm[:, n_prefix:]
        else:
            prefix, patches = self._norm_prefix(x[:, :n_prefix], local), self.norm(x[:, n_prefix:])
        return {
            "x_norm_clstoken": prefix[:, 0],
            "x_norm_regtokens": prefix[:, 1:],
            "x_storage_tokens": prefix[:, 1:],
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    # ---- forward API ----------------------------------------------------------------------------
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]) -> list[dict]:
        """Several crop sizes in one pass: each block runs on every crop group before the next block. In training,
        entry 1 is taken to be the local crops (their CLS/storage tokens use `local_cls_norm` when untied)."""
        if len(masks_list) != len(x_list):
            raise ValueError(f"{len(x_list)} crop groups but {len(masks_list)} masks")
        prepared = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        xs, _ = self._run_blocks([t for t, _ in prepared], [g for _, g in prepared])
        return [self._split_output(x, m, local=i == 1) for i, (x, m) in enumerate(zip(xs, masks_list))]

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence | None = None):
        """Dict with `x_norm_clstoken`, `x_norm_regtokens` (= `x_storage_tokens`), `x_norm_patchtokens`,
        `x_prenorm`, `masks`; a list of such dicts when given a list of crops."""
        if isinstance(x, (list, tuple)):
            masks_list = list(masks) if masks is not None else [None] * len(x)
            return self.forward_features_list(x, masks_list)
        return self.forward_features_list([x], [masks])[0]

    def forward(self, x: Tensor, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(x, *args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    def _intermediate_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        total = len(self.blocks)
        wanted = set(range(total - n, total)) if isinstance(n, int) else set(n)
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise ValueError(f"layer indices {sorted(bad)} out of range for a {total}-block backbone")
        tokens, grid = self.prepare_tokens_with_masks(x)
        _, kept = self._run_blocks([tokens], [grid], keep=wanted)
        return [out[0] for out in kept]

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True) -> tuple:
        """Outputs of the last `n` blocks (or the blocks with the given indices), official semantics: patch
        tokens, then (if asked) the CLS token, then (if asked) the storage tokens."""
        outputs = self._intermediate_outputs(x, n)
        n_prefix = self.n_storage_tokens + 1
        if norm:
            outputs = [torch.cat((self._norm_prefix(o[:, :n_prefix], local=False), self.norm(o[:, n_prefix:])), dim=1)
                       if self.cls_norm is not None else self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1:n_prefix] for o in outputs]
        patch_tokens = [o[:, n_prefix:] for o in outputs]
        if reshape:
            b = x.shape[0]
            gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patch_tokens = [p.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patch_tokens]
        parts = [patch_tokens]
        if return_class_token:
            parts.append(class_tokens)
        if return_extra_tokens:
            parts.append(extra_tokens)
        return tuple(zip(*parts)) if len(parts) > 1 else tuple(patch_tokens)


def build_dinov3(name: str, **overrides) -> Dinov3VisionTransformer:
    """Backbone by official entry-point name (`dinov3_vits16`, ...); keyword overrides (e.g. `depth=2`) win."""
    if name not in DINOV3_PRESETS:
        raise ValueError(f"unknown DINOv3 model {name!r}; choose one of {sorted(DINOV3_PRESETS)}")
    return Dinov3VisionTransformer(**{**DINOV3_PRESETS[name], **overrides})


def dinov3_arch(arch: str, **kwargs) -> Dinov3VisionTransformer:
    """Backbone by official `student.arch` name (`vit_large`, ...; see `DINOV3_ARCH_SIZES`); `kwargs` (Dinov3Spec
    fields, `drop_path_rate`) win over the arch's sizes, e.g. `depth` or `ffn_ratio`."""
    if arch not in DINOV3_ARCH_SIZES:
        raise ValueError(f"unknown DINOv3 arch {arch!r}; choose one of {sorted(DINOV3_ARCH_SIZES)}")
    embed_dim, depth, num_heads, ffn_ratio = DINOV3_ARCH_SIZES[arch]
    sizes = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn_ratio=ffn_ratio)
    return Dinov3VisionTransformer(**{**sizes, **kwargs})


def dinov3_from_spec(spec: Dinov3Spec, **kwargs) -> Dinov3VisionTransformer:
    """A backbone whose parameters have exactly the shapes `spec` describes (for loading weights); `kwargs`
    are constructor-only settings (`drop_path_rate`)."""
    return Dinov3VisionTransformer(**spec.to_dict(), **kwargs)
