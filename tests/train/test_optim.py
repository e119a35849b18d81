"""Parameter groups: layer-wise decay, patch-embed multiplier, no wd on biases/norms/LayerScale."""

import pytest
import torch
from torch import nn

from dinotrain.models.vision_transformer import build_vit
from dinotrain.train.optim import apply_schedules, build_param_groups, layer_id


def _student():
    return nn.ModuleDict({"backbone": build_vit("vit_tiny", patch_size=4, img_size=16, depth=3),
                          "dino_head": nn.ModuleDict({"mlp": nn.Linear(4, 4), "last_layer": nn.Linear(4, 4, bias=False)})})


def test_layer_ids():
    assert layer_id("backbone.pos_embed", 3) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 3) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 3) == 1
    assert layer_id("backbone.blocks.2.mlp.fc1.weight", 3) == 3
    assert layer_id("backbone.norm.weight", 3) == 4
    assert layer_id("dino_head.mlp.weight", 3) == 4


def test_groups_follow_official_rules():
    student = _student()
    groups = build_param_groups(student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5 ** 3)
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** 4 * 0.2)
    assert by_name["dino_head.mlp.weight"]["lr_multiplier"] == 1.0
    for name in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.1.ls1.gamma",
                 "backbone.norm.bias"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.weight"]["is_last_layer"]
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_apply_schedules_freezes_last_layer():
    student = _student()
    opt = torch.optim.AdamW(build_param_groups(student, 1.0, 1.0))
    apply_schedules(opt, lr=0.1, wd=0.05, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else pytest.approx(0.1 * g["lr_multiplier"]))
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"])
