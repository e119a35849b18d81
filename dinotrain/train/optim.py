"""Parameter groups of the official recipe: layer-wise lr decay, patch-embed lr multiplier,
no weight decay on biases, norms and LayerScale, and a separately scheduled prototype layer."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

_EMBEDDING_PARAMS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens", "storage_tokens")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for block i, num_layers+1 for everything after the blocks (norm, heads)."""
    if name.startswith("backbone."):
        local = name[len("backbone."):]
        if local.split(".")[0] in _EMBEDDING_PARAMS:
            return 0
        if local.startswith("blocks."):
            return int(local.split(".")[1]) + 1
    return num_layers + 1


def param_multipliers(name: str, num_layers: int, layerwise_decay: float, patch_embed_lr_mult: float) -> dict:
    lr_mult = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
    if ".patch_embed." in f".{name}":
        lr_mult *= patch_embed_lr_mult
    no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name  # official: tokens/pos_embed do decay
    return {"lr_multiplier": lr_mult, "wd_multiplier": 0.0 if no_wd else 1.0, "is_last_layer": "last_layer" in name}


def build_param_groups(student: nn.ModuleDict, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """Groups of parameters sharing (lr multiplier, wd multiplier, is-last-layer), as official."""
    num_layers = len(student["backbone"].blocks)
    groups: dict[tuple, dict] = defaultdict(lambda: {"params": [], "names": []})
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        mult = param_multipliers(name, num_layers, layerwise_decay, patch_embed_lr_mult)
        key = (mult["lr_multiplier"], mult["wd_multiplier"], mult["is_last_layer"])
        group = groups[key]
        group.update(mult)
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(student: nn.ModuleDict, cfg) -> torch.optim.AdamW:
    groups = build_param_groups(student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr and weight decay for this iteration."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
