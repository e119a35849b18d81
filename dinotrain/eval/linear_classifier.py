"""A linear-probe head with its backbone in dinotrain's own format, for backbones transformers has no classifier
class for: DINOv3 (transformers 5.x has `DINOv3ViTModel` and `DINOv3ViTBackbone`, no `*ForImageClassification`).

A directory holding `backbone.safetensors` (what `open_weights` / `--weights` read, spec in the metadata) and
`linear_head.safetensors` (`weight` (C, Din), `bias` (C); metadata: the head variant, class names, the evaluation
transform). The head reads what `eval linear` trained it on: the class tokens of the last `n_blocks` blocks after
the final norm (oldest first), then, with `avgpool`, the mean patch token of the last block; for a timm /
torchvision backbone (head `pooled`, also written for them: transformers' classifiers cannot hold a timm model),
its pooled features, and `backbone.safetensors` is in its library's layout (`weights/any_student.py`). Any variant is
exported (4-block heads too), since nothing outside dinotrain has to run it: `read_linear_classifier` and
`LinearClassifier.logits` do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from dinotrain.eval.linear import HeadConfig, LinearFeatures, TrainedHeads, best_head
from dinotrain.weights.state_dict import WeightsError

BACKBONE_FILE, HEAD_FILE = "backbone.safetensors", "linear_head.safetensors"
HEAD_FORMAT = "dinotrain-linear-head"


@dataclass
class LinearClassifier:
    """A trained head and what it needs to run: its variant, class names and the evaluation transform."""

    config: HeadConfig
    weight: Tensor  # (C, Din)
    bias: Tensor  # (C,)
    classes: list[str]
    resize: int
    crop: int

    @torch.inference_mode()
    def logits(self, backbone, images: Tensor) -> Tensor:
        """(B, C) logits of `images` (already transformed: resize, centre crop, normalise) through `backbone`."""
        if self.config.pooled:  # a timm / torchvision backbone: its pooled features
            return backbone(images) @ self.weight.T + self.bias
        outputs = backbone.get_intermediate_layers(images, n=self.config.n_blocks, return_class_token=True, norm=True)
        feats = LinearFeatures(torch.stack([c for _, c in outputs], dim=1), outputs[-1][0].mean(dim=1),
                               torch.empty(0))
        return self.config.inputs(feats) @ self.weight.T + self.bias


def export_linear_classifier(model, heads: Sequence[TrainedHeads], val: LinearFeatures, class_names: Sequence[str],
                             dst: str | Path, resize_size: int,
                             crop_size: int) -> tuple[Path, TrainedHeads, int, float]:
    """The best head of the sweep (any variant) with the backbone, as this module's directory at `dst`.
    Returns (path, heads, lr index, val accuracy), as `linear.export_best_classifier`."""
    from safetensors.torch import save_file

    from dinotrain.models.any_student import AnySpec, export_state_dict
    from dinotrain.weights.any_student import write_any_student
    from dinotrain.weights.convert import save_backbone

    config, index, acc = best_head(heads, val)
    trained = next(h for h in heads if h.config == config)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if isinstance(model.spec, AnySpec):  # its library's layout, as `dinotrain export --to timm` writes it
        write_any_student(export_state_dict(model.state_dict()), model.spec, dst / BACKBONE_FILE)
    else:
        save_backbone(model, dst / BACKBONE_FILE, "safetensors")
    tensors = {"weight": trained.weight[index].detach().float().cpu().contiguous(),
               "bias": trained.bias[index].detach().float().cpu().contiguous()}
    metadata = {"format": HEAD_FORMAT, "n_blocks": str(config.n_blocks), "avgpool": json.dumps(config.avgpool),
                "pooled": json.dumps(config.pooled),
                "classes": json.dumps(list(class_names)), "resize": str(resize_size), "crop": str(crop_size)}
    save_file(tensors, str(dst / HEAD_FILE), metadata=metadata)
    return dst, trained, index, acc


def read_linear_classifier(src: str | Path) -> LinearClassifier:
    """The head of an `export_linear_classifier` directory (its backbone: `open_weights(src / BACKBONE_FILE)`)."""
    from safetensors import safe_open

    path = Path(src) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no {HEAD_FILE} (written by `dinotrain eval linear --export-hf` for "
                                "DINOv3 backbones)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    if meta.get("format") != HEAD_FORMAT:
        raise WeightsError(f"{path} is not a dinotrain linear head (metadata format {meta.get('format')!r})")
    config = HeadConfig(int(meta["n_blocks"]), bool(json.loads(meta["avgpool"])),
                        bool(json.loads(meta.get("pooled", "false"))))
    return LinearClassifier(config, weight, bias, json.loads(meta["classes"]), int(meta["resize"]), int(meta["crop"]))
