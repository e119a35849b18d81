"""Weights made at one image size load into a backbone of another: the stored position table is resampled
(bicubic, the forward's own convention), logged, left alone at equal sizes, and refused in strict mode."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from dinotrain.models.presets import build_preset
from dinotrain.train.head_warmup import open_pretrained
from dinotrain.weights.convert import load_backbone, save_backbone
from dinotrain.weights.state_dict import WeightsError, fit_pos_embed, load_backbone_weights

REPO = str(Path(__file__).resolve().parents[2])
ONE_BLOCK = dict(depth=1)


def _reference(pos_embed: torch.Tensor, grid: int, registers: bool = False) -> torch.Tensor:
    """Independent reference: CLS kept, the patch grid resized with F.interpolate as the official forward does."""
    side = round((pos_embed.shape[1] - 1) ** 0.5)
    grid_img = pos_embed[0, 1:].T.reshape(1, -1, side, side)  # (1, D, side, side)
    if registers:  # official register models: exact output size, antialiased
        out = F.interpolate(grid_img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    else:  # official DINOv2 / DINO v1: scale factor (new + 0.1) / old, no antialias
        s = (grid + 0.1) / side
        out = F.interpolate(grid_img, scale_factor=(s, s), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[0, :1], out[0].reshape(pos_embed.shape[-1], -1).T])[None]


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return build_preset("dinov2_vits14", **ONE_BLOCK).eval()  # 518 px: a 37x37 table


def test_37x37_table_loads_into_a_224px_model_as_the_reference_resample(official, caplog):
    model = build_preset("dinov2_vits14", img_size=224, **ONE_BLOCK).eval()
    with caplog.at_level(logging.WARNING, logger="dinotrain.weights"):
        load_backbone_weights(model, official.state_dict())
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 384)
    assert torch.allclose(model.pos_embed, _reference(official.pos_embed.detach(), 16), atol=1e-6, rtol=0)
    assert torch.equal(model.pos_embed[:, 0], official.pos_embed[:, 0])
    assert torch.equal(model.blocks[0].attn.qkv.weight, official.blocks[0].attn.qkv.weight)
    (line,) = [r.getMessage() for r in caplog.records if "position embeddings" in r.getMessage()]
    assert "37x37" in line and "16x16" in line and "518" in line and "224" in line
    # the forward's own method: the 224-px model gives exactly the 518-px model's features at 224 px
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x), official(x))


def test_register_models_resample_to_the_exact_size_with_antialias():
    torch.manual_seed(1)
    reg518 = build_preset("dinov2_vits14_reg", **ONE_BLOCK).eval()
    reg224 = load_backbone_weights(build_preset("dinov2_vits14_reg", img_size=224, **ONE_BLOCK), reg518.state_dict())
    assert torch.allclose(reg224.pos_embed, _reference(reg518.pos_embed.detach(), 16, registers=True), atol=1e-6, rtol=0)
    assert torch.equal(reg224.register_tokens, reg518.register_tokens)  # registers have no position
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(reg224.eval()(x), reg518(x))


def test_small_table_upsamples_to_the_official_grid():
    torch.manual_seed(2)
    small = build_preset("dinov2_vits14", img_size=224, **ONE_BLOCK)
    big = load_backbone_weights(build_preset("dinov2_vits14", **ONE_BLOCK), small.state_dict())
    assert torch.allclose(big.pos_embed, _reference(small.pos_embed.detach(), 37), atol=1e-6, rtol=0)


def test_a_table_of_the_same_size_is_untouched(official, caplog):
    state = official.state_dict()
    assert fit_pos_embed(state, official.spec)["pos_embed"] is state["pos_embed"]
    model = build_preset("dinov2_vits14", **ONE_BLOCK)
    with caplog.at_level(logging.INFO, logger="dinotrain.weights"):
        load_backbone_weights(model, state, strict_pos_embed=True)
    assert torch.equal(model.pos_embed, official.pos_embed)
    assert not caplog.records
    half = {k: v.half() for k, v in state.items()}  # dtype kept either way
    assert fit_pos_embed(half, model.spec)["pos_embed"].dtype == torch.float16
    model224 = build_preset("dinov2_vits14", img_size=224, **ONE_BLOCK)
    assert fit_pos_embed(half, model224.spec)["pos_embed"].dtype == torch.float16


def test_strict_mode_refuses_with_a_clear_message(official):
    model = build_preset("dinov2_vits14", img_size=224, **ONE_BLOCK)
    before = model.pos_embed.detach().clone()
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(model, official.state_dict(), strict_pos_embed=True)
    msg = str(err.value)
    assert "37x37" in msg and "16x16" in msg and "img_size 518" in msg and "strict" in msg and "img_size=518" in msg
    assert torch.equal(model.pos_embed, before)


def test_other_mismatches_are_still_errors(official):
    with pytest.raises(WeightsError, match="patch_size"):
        load_backbone_weights(build_preset("dino_vits16", **ONE_BLOCK), official.state_dict())
    with pytest.raises(WeightsError, match="depth"):
        load_backbone_weights(build_preset("dinov2_vits14", img_size=224, depth=2), official.state_dict())


def test_load_backbone_with_another_img_size(official, tmp_path):
    path = save_backbone(official, tmp_path / "w.pth", "hub")
    model = load_backbone(path, img_size=224)
    assert model.spec.img_size == 224
    assert torch.allclose(model.pos_embed, _reference(official.pos_embed.detach(), 16), atol=1e-6, rtol=0)
    assert load_backbone(path).spec.img_size == 518
    with pytest.raises(WeightsError, match=r"w\.pth.*37x37.*16x16"):
        load_backbone(path, img_size=224, strict_pos_embed=True)
    with pytest.raises(WeightsError, match="multiple of the patch size"):
        load_backbone(path, img_size=225)


def _hub(name, **kwargs):
    return torch.hub.load(REPO, name, source="local", trust_repo=True, **kwargs)


def test_hub_loads_224px_weights_without_img_size(tmp_path, caplog):
    torch.manual_seed(3)
    made = build_preset("dinov2_vits14", img_size=224, **ONE_BLOCK).eval()
    path = save_backbone(made, tmp_path / "w224.pth", "hub")
    with caplog.at_level(logging.WARNING, logger="dinotrain.weights"):
        hub = _hub("dinov2_vits14", weights=str(path), **ONE_BLOCK).eval()
    assert not caplog.records  # built at the weights' own size: nothing resampled
    explicit = _hub("dinov2_vits14", weights=str(path), img_size=224, **ONE_BLOCK).eval()
    assert hub.spec == explicit.spec and hub.spec.img_size == 224
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(hub(x), explicit(x))
        assert torch.equal(hub(x), made(x))
    with caplog.at_level(logging.WARNING, logger="dinotrain.weights"):
        at518 = _hub("dinov2_vits14", weights=str(path), img_size=518, **ONE_BLOCK)
    assert at518.spec.img_size == 518 and any("16x16" in r.getMessage() for r in caplog.records)
    with pytest.raises(WeightsError, match="strict"):
        _hub("dinov2_vits14", weights=str(path), img_size=518, strict_pos_embed=True, **ONE_BLOCK)


def _ssl(overrides=()):
    from dinotrain.config import load_config
    from dinotrain.train.ssl import SSLMetaArch

    cfg = load_config("smoke/cpu_tiny", ["dino.head_n_prototypes=64", "dino.head_hidden_dim=32",
                                         "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=64", *overrides])
    return SSLMetaArch(cfg)


def test_training_start_resamples_and_errors_name_the_config_key(tmp_path):
    torch.manual_seed(4)
    src = build_preset("dino_vits8", img_size=64)  # wrong width for vit_tiny, and an 8x8 table
    meta = _ssl()  # vit_tiny, patch 8, 32-px crops: a 4x4 grid
    with pytest.raises(WeightsError, match="student.pretrained_weights.*embed_dim"):
        meta.load_student_backbone(src.state_dict())
    with pytest.raises(FileNotFoundError, match="student.pretrained_weights.*nope.pth"):
        meta.load_student_backbone(open_pretrained(str(tmp_path / "nope.pth")))

    tiny64 = _ssl(["crops.global_crops_size=64"]).student["backbone"]
    path = save_backbone(tiny64, tmp_path / "tiny64.pth", "hub")
    meta.load_student_backbone(open_pretrained(str(path)))
    expected = _reference(tiny64.pos_embed.detach(), 4)
    for nets in (meta.student, meta.teacher):
        assert torch.allclose(nets["backbone"].pos_embed, expected, atol=1e-6, rtol=0)
        assert torch.equal(nets["backbone"].patch_embed.proj.weight, tiny64.patch_embed.proj.weight)

    cfg = meta.cfg
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        cfg.student.pretrained_strict = True
    with pytest.raises(WeightsError, match=r"student.pretrained_weights.*8x8.*4x4.*pretrained_strict=false"):
        meta.load_student_backbone(open_pretrained(str(path)))
