"""ViT backbones (DINOv2 S/B/L/g, DINO v1 S/B), the DINO head, and weight loading."""

from dinotrain.models.presets import PRESETS, build_preset
from dinotrain.models.vision_transformer import (
    ARCH_SIZES,
    DinoVisionTransformer,
    ViTSpec,
    build_vit,
    vit_base,
    vit_from_spec,
    vit_giant2,
    vit_large,
    vit_small,
)

__all__ = [
    "ARCH_SIZES", "DinoVisionTransformer", "PRESETS", "ViTSpec", "build_preset", "build_vit",
    "vit_base", "vit_from_spec", "vit_giant2", "vit_large", "vit_small",
]
