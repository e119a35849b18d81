"""The backbone a command runs: weights from any path the resolver takes, or a named preset at random init.

What `--weights PATH` / `--model NAME` of `eval`, `embed`, `visualize` and `serve` mean, in one place.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from dinotrain.models.presets import build_preset
from dinotrain.weights.convert import backbone_from_weights
from dinotrain.weights.resolve import CHECKPOINT, open_weights
from dinotrain.weights.state_dict import Weights, WeightsError, check_compatible


def _check_model(found: Weights, model: str) -> None:
    """With both --weights and --model: the weights must be that model's family and shapes (not its image size,
    which a DINOv2 table is resampled to and DINOv3's RoPE does not have)."""
    with torch.device("meta"):
        spec = build_preset(model).spec
    try:
        check_compatible(dataclasses.replace(spec, img_size=found.spec.img_size), found.spec)
    except WeightsError as exc:
        raise WeightsError(f"--weights {found.source} do not fit --model {model}: {exc}") from exc


def open_backbone(weights: str | None, model: str | None, seed: int = 0):
    """The backbone of `weights` (a weights file or directory, a full export, a run or checkpoint directory,
    finished or not: `open_weights`; of either family), else the preset `model` at random init (seeded by `seed`).
    Given both, the weights must fit the model."""
    if weights:
        found = open_weights(weights)
        if found.kind == CHECKPOINT:
            logging.getLogger("dinotrain").info("using the %s backbone of %s (iteration %s)", found.label,
                                                found.source, found.iteration)
        if model:
            _check_model(found, model)
        return backbone_from_weights(found)
    if not model:
        raise ValueError("give --weights PATH (a .pth, .safetensors, HF directory or run directory) or --model NAME")
    torch.manual_seed(seed)
    return build_preset(model)
