"""Reading backbone weights: infer the architecture from a state dict and load it safely.

Loading never unpickles arbitrary objects (`torch.load(weights_only=True)` or safetensors), so a
downloaded checkpoint cannot run code on the user's machine.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from dinotrain.models.layers import swiglu_hidden_features
from dinotrain.models.vision_transformer import DinoVisionTransformer, ViTSpec, vit_from_spec

# Prefixes under which backbones sit in training checkpoints (official DINOv2, DDP, ours).
_PREFIXES = ("teacher.backbone.", "student.backbone.", "model.backbone.", "backbone.", "module.", "model.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
HEAD_DIM = 64


class WeightsError(ValueError):
    """A weights file that is not (or not the expected) ViT backbone."""


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


def check_compatible(expected: ViTSpec, found: ViTSpec, what: str = "weights") -> None:
    """Raise a clear error listing every architecture field where `found` differs from `expected`."""
    diffs = [f"{f}: model has {getattr(expected, f)!r}, {what} have {getattr(found, f)!r}"
             for f in _SHAPE_FIELDS if getattr(expected, f) != getattr(found, f)]
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


def load_backbone_weights(model: DinoVisionTransformer, state_dict: dict[str, Tensor]) -> DinoVisionTransformer:
    """Load official-layout weights into `model`, failing with the list of architecture mismatches."""
    state_dict = strip_to_backbone(state_dict)
    check_compatible(model.spec, infer_spec(state_dict))
    model.load_state_dict(state_dict, strict=True)
    return model


def backbone_from_state_dict(state_dict: dict[str, Tensor], **kwargs) -> DinoVisionTransformer:
    """A backbone of the architecture the weights describe, with the weights loaded."""
    state_dict = strip_to_backbone(state_dict)
    model = vit_from_spec(infer_spec(state_dict), **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model
