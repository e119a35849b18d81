"""Pictures: the PCA foreground follows an object and not noise, the attention weights are the ones the block
uses, curves are drawn from metrics.jsonl, and the commands write their PNG files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinotrain.cli import main
from dinotrain.models.vision_transformer import ViTSpec, vit_from_spec
from dinotrain.viz.features import cls_attention, cls_attention_weights, pca_maps
from dinotrain.viz.render import save_curves


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vit_from_spec(ViTSpec(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                 num_register_tokens=2)).eval()


def _square_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 3:7] = True  # 4x4 patches, off centre
    return mask


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_pca_foreground_follows_an_object_and_not_noise(model):
    g = torch.Generator().manual_seed(1)
    structured = torch.full((3, 64, 64), -1.0) + 0.05 * torch.randn(3, 64, 64, generator=g)  # dark, slightly grainy
    structured[:, 16:48, 24:56] = 1.5  # a bright object on whole patches
    noise = torch.randn(3, 64, 64, generator=g)
    square = _square_mask()
    maps = pca_maps(model, structured[None])
    assert _iou(maps.foreground[0], square) > 0.9, maps.foreground[0].int()
    assert maps.rgb[0][~maps.foreground[0]].abs().max() == 0, "the background is black"
    assert maps.rgb[0][maps.foreground[0]].std() > 0.05, "the foreground is coloured by its own PCA"
    noisy = pca_maps(model, noise[None])
    assert _iou(noisy.foreground[0], square) < 0.5, "noise has no object for the first component to find"


def test_attention_weights_are_those_the_block_applies(model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    weights, v = cls_attention_weights(model, images)
    assert weights.shape == (2, 4, 1 + 2 + 64)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    # what SDPA computes for the CLS query must be the weighted sum of the values with these weights
    captured = {}
    hook = model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.__setitem__("x", out))
    with torch.inference_mode():
        model.forward_features(images)
    hook.remove()
    x = captured["x"]
    with torch.inference_mode():
        q, k, v2 = model.blocks[-1].attn.qkv(x).reshape(2, x.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close((weights[:, :, None] @ v)[:, :, 0], F.scaled_dot_product_attention(q, k, v2)[:, :, 0],
                               rtol=1e-4, atol=1e-5)
    maps = cls_attention(model, images)
    assert maps.shape == (2, 4, 8, 8) and torch.equal(maps.flatten(2), weights[:, :, 3:])


def test_curves_from_metrics(tmp_path):
    lines = [json.dumps({"iteration": i, "total_loss": 10 - i, "dino_global_crops_loss": 5.0, "ibot_loss": 1.0,
                         "koleo_loss": 0.1, "lr": 1e-3 * i, "wd": 0.04, "mom": 0.99, "teacher_temp": 0.04,
                         "images_per_s": 50.0}) for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 6, "total_lo')  # killed mid-line
    written = save_curves(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in written] == ["losses.png", "schedules.png", "throughput.png"]
    assert all(Image.open(p).size[0] > 300 for p in written)
    distill = tmp_path / "d"
    distill.mkdir()
    (distill / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "s/total_loss": 3.0, "b/total_loss": 4.0}))
    assert [p.name for p in save_curves(distill / "metrics.jsonl", distill / "plots")] == ["losses.png"]


def test_visualize_and_plot_commands(tmp_path, capsys):
    for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        img = Image.new("RGB", (96, 80), (10, 10, 10))
        img.paste(Image.new("RGB", (40, 30), colour), (30, 25))
        img.save(tmp_path / f"{i}.png")
    out = tmp_path / "viz"
    assert main(["visualize", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--model", "dino_vits16",
                 "--image-size", "64", "--output", str(out)]) == 0
    assert (out / "pca.png").is_file() and (out / "attention.png").is_file()
    assert "foreground" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "no-run")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_dinov3_attention_weights_include_the_rope_rotation_the_block_applies(tmp_path, capsys):
    """DINOv3 (RoPE, storage tokens, masked key bias): the recomputed CLS attention is what the block's SDPA uses,
    and `dinotrain visualize --model dinov3_vits16` draws both pictures."""
    from dinotrain.models.dinov3 import build_dinov3
    from dinotrain.models.rope import apply_rope

    torch.manual_seed(0)
    model = build_dinov3("dinov3_vits16", embed_dim=64, num_heads=2, depth=2).eval()
    with torch.no_grad():
        for block in model.blocks:  # LayerScale ~1 and positions that matter: RoPE then changes the weights a lot
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    weights, v = cls_attention_weights(model, images)
    assert weights.shape == (2, 2, 1 + 4 + 12)
    captured = {}
    hook = model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.__setitem__("x", out))
    with torch.inference_mode():
        model.forward_features(images)
        hook.remove()
        x = captured["x"]
        q, k, v2 = model.blocks[-1].attn.qkv(x).reshape(2, x.shape[1], 3, 2, 32).permute(2, 0, 3, 1, 4)
        applied = F.scaled_dot_product_attention(*apply_rope(q, k, model.rope_embed(4, 3)), v2)[:, :, 0]
        unrotated = F.scaled_dot_product_attention(q, k, v2)[:, :, 0]
    torch.testing.assert_close((weights[:, :, None] @ v)[:, :, 0], applied, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(applied, unrotated, atol=1e-3), "the rotation must matter for this check to mean much"
    assert cls_attention(model, images).shape == (2, 2, 4, 3)  # storage tokens left out of the map
    Image.new("RGB", (80, 64), (200, 30, 30)).save(tmp_path / "a.png")
    out = tmp_path / "viz"
    assert main(["visualize", str(tmp_path / "a.png"), "--model", "dinov3_vits16", "--image-size", "64",
                 "--output", str(out)]) == 0
    assert (out / "pca.png").is_file() and (out / "attention.png").is_file()
