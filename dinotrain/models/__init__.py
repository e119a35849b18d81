"""ViT backbones (DINOv2 S/B/L/g, DINO v1 S/B, DINOv3 S/S+/B/L/L+/H+/7B), the DINO head, and weight loading."""

from dinotrain.models.dinov3 import DINOV3_PRESETS, Dinov3Spec, Dinov3VisionTransformer, build_dinov3, dinov3_from_spec
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
    "ARCH_SIZES", "DINOV3_PRESETS", "DinoVisionTransformer", "Dinov3Spec", "Dinov3VisionTransformer", "PRESETS",
    "ViTSpec", "build_dinov3", "build_preset", "build_vit", "dinov3_from_spec",
    "vit_base", "vit_from_spec", "vit_giant2", "vit_large", "vit_small",
]
