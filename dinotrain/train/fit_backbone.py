"""Pretrained backbone weights made to fit the run's student (`student.pretrained_weights`, a continuation stage).

DINOv2 weights get their position table resampled to the run's grid. DINOv3 weights (RoPE: any image size) must
have the architecture the config's `student.*` builds: a mismatch is one line naming each difference and the
overrides that fit (released models differ from the official recipes, e.g. in storage tokens). What the tensors do
not fix but the features depend on (the LayerNorm eps, the RoPE periods against `student.pos_embed_rope_*`) is
warned: a bare `.pth` does not record its norm, so a refusal there could be wrong.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from dinotrain.models.dinov3 import DINOV3_ARCH_SIZES, Dinov3Spec
from dinotrain.models.dinov3_layers import NORM_EPS
from dinotrain.models.rope import rope_periods
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.weights.dinov3_layouts import infer_dinov3_spec
from dinotrain.weights.state_dict import WeightsError, check_compatible, fit_pos_embed

log = logging.getLogger("dinotrain.train")


def fit_backbone(state_dict: dict, target: ViTSpec | Dinov3Spec, strict: bool, what: str,
                 found: ViTSpec | Dinov3Spec | None = None) -> dict:
    """Pretrained backbone weights made to fit the run's backbone: a DINOv2 position table resampled to its grid
    (`fit_pos_embed`); a DINOv3 backbone (RoPE: no table, any image size) checked, and what the tensors do not
    fix compared with `found` (the weights' spec as their files say, e.g. a transformers config.json)."""
    if isinstance(target, Dinov3Spec):
        inferred = infer_dinov3_spec(state_dict)
        try:
            check_compatible(target, dataclasses.replace(inferred, img_size=target.img_size), what)
        except WeightsError as exc:
            weights = found if isinstance(found, Dinov3Spec) else inferred
            raise WeightsError(f"{exc}; to continue from these weights set "
                               + " ".join(fitting_student_keys(weights, target))) from exc
        _warn_dinov3_numerics(state_dict, target, found, what)
        return state_dict
    return fit_pos_embed(state_dict, target, strict=strict, what=what)


def _student_keys(spec: Dinov3Spec) -> dict:
    """The `student.*` values that build a DINOv3 backbone of `spec`'s architecture (as `build_backbone` reads them)."""
    arch = next((name for name, (dim, _, heads, _) in DINOV3_ARCH_SIZES.items()
                 if dim == spec.embed_dim and heads == spec.num_heads),
                f"<none: {spec.embed_dim} wide, {spec.num_heads} heads>")
    keys = {"arch": arch, "depth": spec.depth, "patch_size": spec.patch_size, "ffn_layer": spec.ffn_layer,
            "ffn_ratio": spec.ffn_ratio, "layerscale": spec.layerscale_init or 0, "norm_layer": spec.norm_layer}
    keys.update({k: getattr(spec, k) for k in ("qkv_bias", "proj_bias", "ffn_bias", "mask_k_bias", "n_storage_tokens",
                                               "untie_cls_and_patch_norms", "untie_global_and_local_cls_norm")})
    return keys


def fitting_student_keys(weights: Dinov3Spec, target: Dinov3Spec) -> list[str]:
    """The `student.*` overrides that make a config building `target` build the weights' DINOv3 architecture."""
    want, have = _student_keys(weights), _student_keys(target)
    if weights.ffn_hidden == target.ffn_hidden and (weights.ffn_layer == "mlp") == (target.ffn_layer == "mlp"):
        want["ffn_layer"], want["ffn_ratio"] = have["ffn_layer"], have["ffn_ratio"]  # the same tensors already
    if (weights.layerscale_init is None) == (target.layerscale_init is None):
        want["layerscale"] = have["layerscale"]  # only the init differs: the weights overwrite it
    return [f"student.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in want.items() if v != have[k]]


def _warn_dinov3_numerics(state_dict: dict, target: Dinov3Spec, found: ViTSpec | Dinov3Spec | None, what: str) -> None:
    """The settings a DINOv3 state dict does not fix, but its features depend on, where `student.*` differs: the
    LayerNorm eps (`norm_layer`: the config's is used) and the RoPE periods (the weights' are loaded, whatever
    `pos_embed_rope_base` says). Warned, not refused: a bare `.pth` does not record its norm (the released
    models' is assumed), so a difference there may be the assumption's."""
    if isinstance(found, Dinov3Spec) and found.norm_layer != target.norm_layer:
        log.warning("the %s have norm_layer %s (LayerNorm eps %g) but student.norm_layer is %s (eps %g): the config's "
                    "is used, so their features differ a little from the released model's; set "
                    "student.norm_layer=%s to keep them", what, found.norm_layer, NORM_EPS[found.norm_layer],
                    target.norm_layer, NORM_EPS[target.norm_layer], found.norm_layer)
    periods = state_dict.get("rope_embed.periods")
    expected = rope_periods(target.head_dim, target.pos_embed_rope_base, target.pos_embed_rope_min_period,
                            target.pos_embed_rope_max_period)
    if periods is not None and not torch.allclose(periods.float(), expected, rtol=1e-2):
        log.warning("the RoPE periods of the %s (%s) are not those of student.pos_embed_rope_base / _min_period / "
                    "_max_period (%s): the weights' periods are loaded and used", what,
                    _ends(periods), _ends(expected))


def _ends(periods: torch.Tensor) -> list[float]:
    return [round(v, 3) for v in periods.float()[[0, -1]].tolist()]
