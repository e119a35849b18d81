"""A linear-probe head with its backbone as a Hugging Face image classifier (what the DINOv2 linear-head cards ship).

`Dinov2ForImageClassification` (and its register twin) classifies `[CLS, mean of patch tokens]` of the last
block after the final norm: our head variants on 1 block map onto it exactly (a CLS-only head gets zero
weights for the mean part). `ViTForImageClassification` (DINO v1 backbones) reads the CLS token only, so it
takes CLS-only heads. Heads on the last 4 blocks have no transformers class and are not exported.
The directory also carries a `preprocessor_config.json` with the evaluation transform (bicubic resize of the
shorter side, centre crop, ImageNet mean/std), so `AutoImageProcessor` + `pipeline` work on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from dinotrain.weights.hf import (CONFIG_NAME, DINOV2, DINOV2_REG, VIT, WEIGHTS_NAME, hf_config, hf_model_type,
                                 spec_to_metadata, to_hf_state_dict, write_preprocessor_config)
from dinotrain.models.vision_transformer import ViTSpec

CLASSIFIERS = {DINOV2: "Dinov2ForImageClassification", DINOV2_REG: "Dinov2WithRegistersForImageClassification",
               VIT: "ViTForImageClassification"}
BASE_PREFIX = {DINOV2: "dinov2", DINOV2_REG: "dinov2_with_registers", VIT: "vit"}


def classifier_supports(spec: ViTSpec, n_blocks: int, avgpool: bool) -> bool:
    """Whether transformers has a classifier computing exactly this head variant on this backbone."""
    if n_blocks != 1:
        return False
    return not avgpool if hf_model_type(spec) == VIT else True


def classifier_weight(spec: ViTSpec, weight: Tensor, avgpool: bool) -> Tensor:
    """Our head's (C, Din) weight as the transformers classifier's: CLS-only heads get zeros for the mean part."""
    if hf_model_type(spec) == VIT or avgpool:
        return weight
    return torch.cat([weight, torch.zeros_like(weight)], dim=1)


def save_hf_classifier(state_dict: dict[str, Tensor], spec: ViTSpec, weight: Tensor, bias: Tensor, avgpool: bool,
                       class_names: Sequence[str], dst: str | Path, resize_size: int, crop_size: int) -> Path:
    """Write backbone + linear head as a transformers `*ForImageClassification` directory at `dst`."""
    from safetensors.torch import save_file

    if not classifier_supports(spec, 1, avgpool):
        raise ValueError("ViTForImageClassification (DINO v1 backbones) reads the class token only: export a head "
                         "without avgpool")
    model_type = hf_model_type(spec)
    prefix = BASE_PREFIX[model_type]
    tensors = {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in to_hf_state_dict(state_dict, spec).items()}
    tensors["classifier.weight"] = classifier_weight(spec, weight, avgpool).detach().float().cpu().contiguous()
    tensors["classifier.bias"] = bias.detach().float().cpu().contiguous()
    config = hf_config(spec, torch.float32)
    config["architectures"] = [CLASSIFIERS[model_type]]
    config["id2label"] = {str(i): name for i, name in enumerate(class_names)}
    config["label2id"] = {name: i for i, name in enumerate(class_names)}
    config["num_labels"] = len(class_names)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(dst / WEIGHTS_NAME), metadata=spec_to_metadata(spec))
    write_preprocessor_config(dst, resize_size, crop_size)
    return dst
