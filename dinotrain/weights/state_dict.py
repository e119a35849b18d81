"""Backbone state dicts: what weights hold (`Weights`), the architecture they imply, reading them safely, and
fitting them to a model (prefixes stripped, position embeddings resampled).

Loading never unpickles arbitrary objects (`torch.load(weights_only=True)` or safetensors), so a
downloaded checkpoint cannot run code on the user's machine.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.layers import swiglu_hidden_features
from dinotrain.models.vision_transformer import DinoVisionTransformer, ViTSpec, resample_positions

# Prefixes under which backbones sit in training checkpoints (official DINOv2, DDP, ours).
_PREFIXES = ("teacher.backbone.", "student.backbone.", "model.backbone.", "backbone.", "module.", "model.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
HEAD_DIM = 64

log = logging.getLogger("dinotrain.weights")


class WeightsError(ValueError):
    """A weights file that is not (or not the expected) ViT backbone."""


# The two backbone families, as messages name them, and what tells their state dicts (official names) apart.
DINOV2, DINOV3 = "dinov2", "dinov3"
_FAMILY_NAMES = {DINOV2: "DINOv2/DINO v1", DINOV3: "DINOv3"}
_FAMILY_TRAITS = {DINOV2: "a learned `pos_embed` table", DINOV3: "RoPE `rope_embed.periods`, storage tokens, patch 16"}
_FAMILY_EXAMPLE = {DINOV2: "dinov2_vits14", DINOV3: "dinov3_vits16"}


def spec_family(spec: ViTSpec | Dinov3Spec) -> str:
    return DINOV3 if isinstance(spec, Dinov3Spec) else DINOV2


def family_mismatch(found: str, expected: str, where: str = "") -> WeightsError:
    """The one-line error for a backbone of one family given where the other is expected, naming both."""
    prefix = f"{where}: " if where else ""
    return WeightsError(f"{prefix}{_FAMILY_NAMES[found]} backbone weights ({_FAMILY_TRAITS[found]}) where a "
                        f"{_FAMILY_NAMES[expected]} backbone ({_FAMILY_TRAITS[expected]}) is expected; pass "
                        f"{_FAMILY_NAMES[expected]} weights, or use a {_FAMILY_NAMES[found]} model (e.g. "
                        f"{_FAMILY_EXAMPLE[found]}) for these")


@dataclass
class Weights:
    """What a path holds, as `dinotrain.weights.resolve.open_weights` read it (CPU tensors, official names)."""

    source: str  # what was read: the file, the HF directory, or the checkpoint a run directory was pinned to
    kind: str  # "checkpoint" | "full" | "hub" | "safetensors" | "hf" | "timm" (see resolve.py)
    backbone: dict[str, Tensor]
    spec: ViTSpec | Dinov3Spec  # the family: DINOv2 / DINO v1 (ViTSpec) or DINOv3 (Dinov3Spec)
    heads: dict[str, dict[str, Tensor]] | None = None  # "dino_head" (+ "ibot_head"); None: not held or not asked
    config: dict = field(default_factory=dict)  # the recipe config of the run that made them; {} if unknown
    label: str = ""  # which network of a checkpoint, for messages: "teacher", "student 's1' (EMA)", ...
    iteration: int | None = None  # a checkpoint's iteration


def strip_to_backbone(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper prefixes, undo the official `block_chunks` nesting, and drop non-backbone keys."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "cls_token") for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    out = {}
    for key, value in state_dict.items():
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        if key.startswith("head.") or key.startswith("dino_head") or key.startswith("ibot_head"):
            continue
        out[key] = value
    return out


def infer_spec(state_dict: dict[str, Tensor]) -> ViTSpec:
    """The architecture a backbone state dict (official names) was made by.

    Heads are assumed to be 64-dimensional (true for every DINO/DINOv2 model). Position-embedding
    interpolation is not stored in weights: models with registers get the official register
    convention (offset 0, antialias), others the DINOv2 one (offset 0.1, no antialias).
    """
    if "rope_embed.periods" in state_dict:
        raise family_mismatch(DINOV3, DINOV2)
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        sample = ", ".join(sorted(state_dict)[:5]) or "(empty)"
        raise WeightsError(f"not a ViT backbone state dict: missing {missing}; its first keys are: {sample}")
    embed_dim = state_dict["cls_token"].shape[-1]
    patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise WeightsError("not a ViT backbone state dict: it has no `blocks.N.*` parameters")
    n_pos = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise WeightsError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    if "blocks.0.mlp.w12.weight" in state_dict:
        ffn_layer = "swiglufused"
        hidden = state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = next((r / 4 for r in range(1, 65) if swiglu_hidden_features(int(embed_dim * r / 4)) == hidden), None)
    else:
        ffn_layer = "mlp"
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if mlp_ratio is None:
        raise WeightsError(f"cannot infer the MLP ratio of a SwiGLU hidden size {hidden}")
    regs = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    return ViTSpec(
        embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // HEAD_DIM), patch_size=patch_size,
        img_size=side * patch_size, mlp_ratio=mlp_ratio, ffn_layer=ffn_layer, num_register_tokens=regs,
        layerscale="blocks.0.ls1.gamma" in state_dict, use_mask_token="mask_token" in state_dict,
        interpolate_offset=0.0 if regs else 0.1, interpolate_antialias=bool(regs),
    )


_SHAPE_FIELDS = ("embed_dim", "depth", "patch_size", "img_size", "mlp_ratio", "ffn_layer",
                 "num_register_tokens", "layerscale", "use_mask_token")


_DINOV3_SHAPE_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "swiglu", "ffn_hidden",
                        "qkv_bias", "proj_bias", "ffn_bias", "mask_k_bias", "layerscale", "n_storage_tokens",
                        "untie_cls_and_patch_norms", "untie_global_and_local_cls_norm")


def _shape_facts(spec: ViTSpec | Dinov3Spec) -> dict:
    """What fixes the tensors' names and shapes (not the image size: RoPE or a resampled table covers it). For
    DINOv3, what the weights cannot tell apart is one fact: SwiGLU alignments giving the same width, a masked key
    bias without any qkv bias."""
    if not isinstance(spec, Dinov3Spec):
        return {f: getattr(spec, f) for f in _SHAPE_FIELDS}
    derived = {"swiglu": spec.ffn_layer != "mlp", "layerscale": spec.layerscale_init is not None,
               "mask_k_bias": spec.qkv_bias and spec.mask_k_bias}
    return {f: derived[f] if f in derived else getattr(spec, f) for f in _DINOV3_SHAPE_FIELDS}


def check_compatible(expected: ViTSpec | Dinov3Spec, found: ViTSpec | Dinov3Spec, what: str = "weights") -> None:
    """Raise a clear error listing every architecture field where `found` differs from `expected` (a DINOv3 spec
    against a DINOv2 one: the one-line family error)."""
    if spec_family(expected) != spec_family(found):
        raise family_mismatch(spec_family(found), spec_family(expected))
    want, got = _shape_facts(expected), _shape_facts(found)
    diffs = [f"{f}: model has {want[f]!r}, {what} have {got[f]!r}" for f in want if want[f] != got[f]]
    if diffs:
        raise WeightsError(f"{what} do not fit this architecture: " + "; ".join(diffs))


def unpickling_refusal(exc: BaseException) -> str:
    """One line saying why `torch.load(weights_only=True)` refused a file, without torch's advice.

    torch's message suggests re-running with `weights_only=False` or allow-listing the global: both
    would let an untrusted file run code, so neither is passed on to the user.
    """
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        for advice in ("Please use `torch.serialization", "Check the documentation"):
            text = text.split(advice, 1)[0]
        return f"not plain tensor data (corrupted, or it references code): {' '.join(text.split())}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a `.pth`/`.pt` (weights only, never arbitrary pickles) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise WeightsError(f"{path} is not a valid safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors name internals; say what the user can act on
        raise WeightsError(f"{path} is not a weights-only torch checkpoint ({unpickling_refusal(exc)})") from exc
    for key in ("teacher", "model", "state_dict"):  # common wrappers of a state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and "cls_token" not in obj:
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def resample_pos_embed(pos_embed: Tensor, grid: int, offset: float = 0.1, antialias: bool = False) -> Tensor:
    """A stored `(1, 1 + side*side, D)` position table resampled to a `grid` x `grid` patch grid.

    The method is exactly the one the backbone's forward uses when it meets another input size
    (`DinoVisionTransformer.interpolate_pos_encoding`, after the official DINOv2 code): the CLS
    position is kept, the patch positions are resized bicubically (`align_corners=False`) in float32,
    with `scale_factor=(grid + offset) / side` when `offset` > 0 (the official 0.1 convention of
    DINOv2 / DINO v1) or to the exact size `(grid, grid)` when `offset` == 0 (register models), with
    `antialias` as given. So a model holding the resampled table computes, at its own size, the same
    features as the original table gives at that input size. The result has the input's dtype.
    """
    n_pos = pos_embed.shape[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise WeightsError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    if side == grid:
        return pos_embed
    return resample_positions(pos_embed, grid, grid, offset, antialias).to(pos_embed.dtype)


def fit_pos_embed(state_dict: dict[str, Tensor], target: ViTSpec, strict: bool = False,
                  what: str = "weights") -> dict[str, Tensor]:
    """`state_dict` (official names, wrappers stripped) made to fit `target`'s position grid.

    Every other architecture field must agree (a clear WeightsError lists those that do not). When
    only the image size differs, the `pos_embed` table is resampled to the target grid with
    :func:`resample_pos_embed` using the target's interpolation settings, and a warning names both
    grids; with `strict=True` that case is refused instead. A table at the target size is returned
    untouched (the same tensor object).
    """
    found = infer_spec(state_dict)
    if target.img_size % target.patch_size:
        raise WeightsError(f"img_size {target.img_size} is not a multiple of the patch size {target.patch_size}")
    check_compatible(target, dataclasses.replace(found, img_size=target.img_size), what)
    if found.img_size == target.img_size:
        return state_dict
    old, new = found.img_size // found.patch_size, target.img_size // target.patch_size
    if strict:
        raise WeightsError(
            f"{what} have a {old}x{old} position-embedding grid (img_size {found.img_size} at patch "
            f"{found.patch_size}), the model has {new}x{new} (img_size {target.img_size}); strict loading refuses "
            f"to resample it: build the model with img_size={found.img_size}, or allow resampling")
    how = (f"scale factor ({new}+{target.interpolate_offset:g})/{old}" if target.interpolate_offset
           else f"exact size {new}x{new}")
    log.warning("resampling position embeddings of the %s from a %dx%d grid (img_size %d) to %dx%d (img_size %d): "
                "bicubic, %s, antialias=%s", what, old, old, found.img_size, new, new, target.img_size, how,
                target.interpolate_antialias)
    out = dict(state_dict)
    out["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], new, target.interpolate_offset,
                                          target.interpolate_antialias)
    return out


def load_backbone_weights(model: DinoVisionTransformer, state_dict: dict[str, Tensor],
                          strict_pos_embed: bool = False) -> DinoVisionTransformer:
    """Load official-layout weights into `model`, failing with the list of architecture mismatches.

    Weights made at another image size (e.g. the official 518-px tables in a 224-px model) have
    their position embeddings resampled to the model's grid (logged; see :func:`fit_pos_embed`);
    `strict_pos_embed=True` refuses them instead.
    """
    state_dict = fit_pos_embed(strip_to_backbone(state_dict), model.spec, strict=strict_pos_embed)
    model.load_state_dict(state_dict, strict=True)
    return model
