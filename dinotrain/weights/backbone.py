"""The backbone a command runs: weights from any path the resolver takes, or a named preset at random init.

What `--weights PATH` / `--model NAME` of `eval`, `embed`, `visualize` and `serve` mean, in one place.
"""

from __future__ import annotations

import logging

import torch

from dinotrain.models.presets import build_preset
from dinotrain.weights.convert import backbone_from_weights
from dinotrain.weights.resolve import CHECKPOINT, open_weights


def open_backbone(weights: str | None, model: str | None, seed: int = 0):
    """The backbone of `weights` (a weights file or directory, a full export, a run or checkpoint directory,
    finished or not: `open_weights`), else the preset `model` at random init (seeded by `seed`)."""
    if weights:
        found = open_weights(weights)
        if found.kind == CHECKPOINT:
            logging.getLogger("dinotrain").info("using the %s backbone of %s (iteration %s)", found.label,
                                                found.source, found.iteration)
        return backbone_from_weights(found)
    if not model:
        raise ValueError("give --weights PATH (a .pth, .safetensors, HF directory or run directory) or --model NAME")
    torch.manual_seed(seed)
    return build_preset(model)
