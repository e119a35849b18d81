"""Named backbones: the official torch.hub entry points of DINOv2 and DINO v1, with their exact settings.

`PRESETS` holds the DINOv2 / DINO v1 ones (`DinoVisionTransformer`); the DINOv3 ones (`Dinov3VisionTransformer`,
RoPE) are `DINOV3_PRESETS` in `dinov3.py`. `build_preset` builds either by name, `backbone_from_spec` by spec.
"""

from __future__ import annotations

from dinotrain.models.any_student import AnySpec, AnyStudent
from dinotrain.models.dinov3 import DINOV3_PRESETS, Dinov3Spec, Dinov3VisionTransformer, build_dinov3, dinov3_from_spec
from dinotrain.models.vision_transformer import ARCH_SIZES, DinoVisionTransformer, ViTSpec, build_vit, vit_from_spec

_V2 = dict(img_size=518, init_values=1.0, interpolate_offset=0.1, interpolate_antialias=False)
_V2_REG = dict(img_size=518, init_values=1.0, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
_V1 = dict(img_size=224, init_values=None, use_mask_token=False, interpolate_offset=0.1, interpolate_antialias=False)

PRESETS: dict[str, dict] = {
    "dinov2_vits14": dict(arch="vit_small", patch_size=14, **_V2),
    "dinov2_vitb14": dict(arch="vit_base", patch_size=14, **_V2),
    "dinov2_vitl14": dict(arch="vit_large", patch_size=14, **_V2),
    "dinov2_vitg14": dict(arch="vit_giant2", patch_size=14, **_V2),
    "dinov2_vits14_reg": dict(arch="vit_small", patch_size=14, **_V2_REG),
    "dinov2_vitb14_reg": dict(arch="vit_base", patch_size=14, **_V2_REG),
    "dinov2_vitl14_reg": dict(arch="vit_large", patch_size=14, **_V2_REG),
    "dinov2_vitg14_reg": dict(arch="vit_giant2", patch_size=14, **_V2_REG),
    "dino_vits16": dict(arch="vit_small", patch_size=16, **_V1),
    "dino_vits8": dict(arch="vit_small", patch_size=8, **_V1),
    "dino_vitb16": dict(arch="vit_base", patch_size=16, **_V1),
    "dino_vitb8": dict(arch="vit_base", patch_size=8, **_V1),
}


def build_preset(name: str, **overrides) -> DinoVisionTransformer | Dinov3VisionTransformer:
    """Backbone by official entry-point name; keyword overrides (e.g. `depth=2` for tests) win."""
    if name in DINOV3_PRESETS:
        return build_dinov3(name, **overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS) + sorted(DINOV3_PRESETS)}")
    kwargs = dict(PRESETS[name])
    arch = kwargs.pop("arch")
    assert arch in ARCH_SIZES
    kwargs.update(overrides)
    return build_vit(arch, **kwargs)


def backbone_from_spec(spec: ViTSpec | Dinov3Spec, **kwargs) -> DinoVisionTransformer | Dinov3VisionTransformer:
    """A backbone of either family with exactly the architecture `spec` describes, at random init; `kwargs` are
    constructor-only settings (`drop_path_rate`, ...)."""
    if isinstance(spec, AnySpec):  # a timm / torchvision student (random init, as its library makes it)
        return AnyStudent(spec.arch, spec.patch_size).eval()
    if isinstance(spec, Dinov3Spec):
        return dinov3_from_spec(spec, **kwargs)
    return vit_from_spec(spec, **kwargs)
