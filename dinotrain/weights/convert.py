"""Move backbone weights between the three formats we support, and load a backbone from any of them.

- `hub`: the official torch.hub `.pth`, a `torch.save`d plain dict of official-named tensors. It has
  no room for settings outside the weights: on load, interpolation follows `infer_spec`'s defaults.
- `safetensors`: the same tensors in a `.safetensors` file whose metadata records the `ViTSpec` as
  JSON (so settings that are not in the weights, like position-embedding interpolation, survive).
- `hf`: a `transformers` directory (`config.json` + `model.safetensors`), see `dinotrain.weights.hf`.

The architecture is always inferred from the weights, so no separate config has to travel along. What a
path holds (any format, a full export, a run or checkpoint directory) is decided by `resolve.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from dinotrain.models.vision_transformer import DinoVisionTransformer, ViTSpec, vit_from_spec
from dinotrain.storage import replacing
from dinotrain.weights.hf import save_hf, spec_to_metadata
from dinotrain.weights.resolve import open_weights, read_weights
from dinotrain.weights.state_dict import Weights, WeightsError, fit_pos_embed

FORMATS = ("hub", "hf", "safetensors")


def write_weights(state_dict: dict[str, Tensor], spec: ViTSpec, dst: str | Path, to: str) -> Path:
    """Write official-named backbone tensors as `to` (one of FORMATS) at `dst`."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose one of {FORMATS}")
    dst = Path(dst)
    if to == "hf":
        return save_hf(state_dict, spec, dst)
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


def save_backbone(model: DinoVisionTransformer, dst: str | Path, to: str) -> Path:
    """Write a backbone's weights (and its spec where the format can hold it) as `to`."""
    return write_weights(model.state_dict(), model.spec, dst, to)


def load_backbone(path: str | Path, strict_pos_embed: bool = False, **kwargs) -> DinoVisionTransformer:
    """A backbone with the weights of any path `open_weights` takes, in eval mode (see `backbone_from_weights`)."""
    return backbone_from_weights(open_weights(path), strict_pos_embed, **kwargs)


def backbone_from_weights(weights: Weights, strict_pos_embed: bool = False, **kwargs) -> DinoVisionTransformer:
    """A backbone built as `weights` say, with their tensors, in eval mode (call `.train()` to fine-tune).

    `kwargs` override settings that are not fixed by the weights, either ViTSpec fields
    (`interpolate_offset`, `interpolate_antialias`, `num_heads`, `img_size`) or constructor-only ones
    (`attn_impl`, `drop_path_rate`); overriding a shape (e.g. `depth`) must agree with the weights.
    An `img_size` other than the weights' resamples their position embeddings to the new grid
    (logged), unless `strict_pos_embed=True`, which refuses instead.
    """
    spec_fields = {f.name for f in dataclasses.fields(ViTSpec)}
    wanted = dataclasses.replace(weights.spec, **{k: kwargs.pop(k) for k in list(kwargs) if k in spec_fields})
    try:
        state_dict = fit_pos_embed(weights.backbone, wanted, strict=strict_pos_embed)
    except WeightsError as exc:
        raise WeightsError(f"{weights.source}: {exc}") from exc
    model = vit_from_spec(wanted, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
