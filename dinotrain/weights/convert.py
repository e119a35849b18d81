"""Move backbone weights between the formats we support, and load a backbone from any of them.

- `hub`: the official torch.hub `.pth`, a `torch.save`d plain dict of official-named tensors (for DINOv3: the
  official dinov3 `.pth` layout). It has no room for settings outside the weights: on load, they follow
  `infer_spec`'s (`infer_dinov3_spec`'s) defaults.
- `safetensors`: the same tensors in a `.safetensors` file whose metadata records the spec as JSON (so settings
  that are not in the weights, like position-embedding interpolation, survive).
- `hf`: a `transformers` directory (`config.json` + `model.safetensors`): `Dinov2Model` & co. (`hf.py`), or
  `DINOv3ViTModel` (`dinov3_files.py`).
- `timm` (DINOv3 only): timm's dinov3 `Eva` state dict, a `.safetensors` (spec in the metadata) or `.pth` file.

Both families go through the same calls: DINOv2 / DINO v1 (`ViTSpec`) and DINOv3 (`Dinov3Spec`). The architecture
is always inferred from the weights, so no separate config has to travel along. What a path holds (any format, a
full export, a run or checkpoint directory) is decided by `resolve.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from dinotrain.models.any_student import AnySpec, AnyStudent
from dinotrain.models.dinov3 import Dinov3Spec, Dinov3VisionTransformer, dinov3_from_spec
from dinotrain.models.vision_transformer import DinoVisionTransformer, ViTSpec, vit_from_spec
from dinotrain.storage import replacing
from dinotrain.weights.dinov3_files import save_timm, save_transformers, warn_unrecorded_settings
from dinotrain.weights.hf import save_hf, spec_to_metadata
from dinotrain.weights.resolve import open_weights, read_weights
from dinotrain.weights.state_dict import (DINOV2, DINOV3, Weights, WeightsError, check_compatible, family_mismatch,
                                          fit_pos_embed, load_backbone_weights, spec_family)

FORMATS = ("hub", "hf", "safetensors", "timm")
Backbone = DinoVisionTransformer | Dinov3VisionTransformer


def write_weights(state_dict: dict[str, Tensor], spec: ViTSpec | Dinov3Spec, dst: str | Path, to: str) -> Path:
    """Write official-named backbone tensors as `to` (one of FORMATS) at `dst`."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose one of {FORMATS}")
    dst = Path(dst)
    dinov3 = isinstance(spec, Dinov3Spec)
    if dinov3 and to in ("hub", "timm"):
        warn_unrecorded_settings(state_dict, spec, dst, to)
    if to == "timm":
        if not dinov3:
            raise ValueError("the timm format is written for DINOv3 backbones (timm's dinov3 Eva); timm loads "
                             "DINOv2 backbones from the hub .pth: use --to hub")
        return save_timm(state_dict, spec, dst)
    if to == "hf":
        return save_transformers(state_dict, spec, dst) if dinov3 else save_hf(state_dict, spec, dst)
    if to == "safetensors" and dst.suffix != ".safetensors":
        raise ValueError(f"safetensors output {dst} must end in .safetensors (that is how it is recognised on load)")
    if to == "hub" and (dst.suffix == ".safetensors" or dst.is_dir()):
        raise ValueError(f"hub output {dst} must be a file path such as 'backbone.pth'")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with replacing(dst, f"the {to} weights") as tmp:  # complete or absent; a full disk is one StorageError
        if to == "hub":
            torch.save(tensors, tmp)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=spec_to_metadata(spec))
    return dst


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Convert backbone weights at `src` (any supported format) to format `to` at `dst`."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose one of {FORMATS}")
    state_dict, spec = read_weights(src)
    return write_weights(state_dict, spec, dst, to)


def save_backbone(model: Backbone, dst: str | Path, to: str) -> Path:
    """Write a backbone's weights (and its spec where the format can hold it) as `to`."""
    return write_weights(model.state_dict(), model.spec, dst, to)


def load_backbone(path: str | Path, strict_pos_embed: bool = False, **kwargs) -> Backbone:
    """A backbone with the weights of any path `open_weights` takes, in eval mode (see `backbone_from_weights`)."""
    return backbone_from_weights(open_weights(path), strict_pos_embed, **kwargs)


def backbone_from_weights(weights: Weights, strict_pos_embed: bool = False, **kwargs) -> Backbone:
    """A backbone built as `weights` say, with their tensors, in eval mode (call `.train()` to fine-tune).

    `kwargs` override settings that are not fixed by the weights, either spec fields (DINOv2:
    `interpolate_offset`, `interpolate_antialias`, `num_heads`, `img_size`; DINOv3: e.g. the RoPE training
    augmentations) or constructor-only ones (`attn_impl`, `drop_path_rate`); overriding a shape (e.g. `depth`)
    must agree with the weights. For DINOv2, an `img_size` other than the weights' resamples their position
    embeddings to the new grid (logged), unless `strict_pos_embed=True`, which refuses instead (DINOv3's RoPE
    takes any size as it is).
    """
    if isinstance(weights.spec, AnySpec):  # a timm / torchvision student: its library builds it
        model = AnyStudent(weights.spec.arch, weights.spec.patch_size)
        model.load_weights(weights.backbone, weights.source)
        return model.eval()
    spec_class = type(weights.spec)
    spec_fields = {f.name for f in dataclasses.fields(spec_class)}
    wanted = dataclasses.replace(weights.spec, **{k: kwargs.pop(k) for k in list(kwargs) if k in spec_fields})
    try:
        if spec_class is Dinov3Spec:
            check_compatible(wanted, weights.spec)
            state_dict = weights.backbone
        else:
            state_dict = fit_pos_embed(weights.backbone, wanted, strict=strict_pos_embed)
    except WeightsError as exc:
        raise WeightsError(f"{weights.source}: {exc}") from exc
    model = dinov3_from_spec(wanted, **kwargs) if spec_class is Dinov3Spec else vit_from_spec(wanted, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_weights_into(model: Backbone, weights: Weights, strict_pos_embed: bool = False) -> Backbone:
    """`weights` (as `open_weights` read them) loaded into an existing `model` of either family: the family and
    every shape must agree (one-line WeightsError naming what differs); a DINOv2 position table made at another
    image size is resampled to the model's grid (see `load_backbone_weights`)."""
    expected = DINOV3 if isinstance(model, Dinov3VisionTransformer) else DINOV2
    if spec_family(weights.spec) != expected:
        raise family_mismatch(spec_family(weights.spec), expected, weights.source)
    if expected == DINOV2:
        return load_backbone_weights(model, weights.backbone, strict_pos_embed=strict_pos_embed)
    check_compatible(model.spec, weights.spec)
    model.load_state_dict(weights.backbone, strict=True)
    return model
