"""`torch.hub.load(<repo>, name, source="local")` builds every official entry point, loads local weights
in any format, and never downloads."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dinotrain.models import DINOV3_PRESETS, PRESETS
from dinotrain.weights.convert import save_backbone
from dinotrain.weights.state_dict import WeightsError

REPO = str(Path(__file__).resolve().parents[1])
ENTRY_POINTS = sorted(PRESETS)
DINOV3_ENTRY_POINTS = sorted(DINOV3_PRESETS)
TINY = dict(depth=1)  # full width, one block: quick, and the weights below are saved from the same override


def hub_load(name, **kwargs):
    return torch.hub.load(REPO, name, source="local", trust_repo=True, **kwargs)


def test_hubconf_exposes_exactly_the_official_entry_points():
    """torch.hub.list's rule (public callables of hubconf.py); hub.list itself only takes GitHub repos.
    Besides the official DINOv2 / DINO v1 / DINOv3 names, only `dinotrain_vit` (any architecture, built from
    its weights)."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert public == sorted([*ENTRY_POINTS, *DINOV3_ENTRY_POINTS, "dinotrain_vit"])
    assert hubconf.dependencies == ["torch"]
    assert "weights" in hubconf.dinov2_vitb14.__doc__ and hubconf.dinov2_vitb14.__name__ == "dinov2_vitb14"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_with_and_without_weights(name, tmp_path):
    size = PRESETS[name]["patch_size"] * 4
    random_init = hub_load(name, img_size=size, **TINY)
    assert random_init.spec.img_size == size and random_init.n_blocks == 1
    with torch.no_grad():
        for p in random_init.parameters():
            p.normal_()
    weights = save_backbone(random_init, tmp_path / "w.pth", "hub")
    loaded = hub_load(name, weights=str(weights), img_size=size, **TINY)
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in random_init.state_dict().items())
    again = hub_load(name, pretrained=True, weights=weights, img_size=size, **TINY)
    assert torch.equal(again.cls_token, random_init.cls_token)


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_weights_in_other_formats(fmt, tmp_path):
    model = hub_load("dinov2_vits14_reg", img_size=56, **TINY)
    dst = save_backbone(model, tmp_path / ("w.safetensors" if fmt == "safetensors" else "hf"), fmt)
    loaded = hub_load("dinov2_vits14_reg", weights=dst, img_size=56, **TINY)
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_pretrained_without_weights_says_no_download():
    with pytest.raises(ValueError, match="never.*weights=PATH"):
        hub_load("dinov2_vitb14", pretrained=True, **TINY)


def test_weights_of_another_architecture_name_the_mismatch(tmp_path):
    small = save_backbone(hub_load("dinov2_vits14", img_size=56, **TINY), tmp_path / "s.pth", "hub")
    with pytest.raises(WeightsError, match=r"dinov2_vitb14.*embed_dim: model has 768, weights have 384"):
        hub_load("dinov2_vitb14", weights=small, img_size=56, **TINY)
    with pytest.raises(WeightsError, match="depth: model has 12, weights have 1"):
        hub_load("dinov2_vits14", weights=small, img_size=56)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        hub_load("dino_vits16", weights=tmp_path / "nothing.pth", **TINY)


# ---- DINOv3 ------------------------------------------------------------------------------------------
V3_TINY = dict(embed_dim=64, num_heads=1, depth=2)  # every preset's layout (MLP / SwiGLU / 7B's) at a tiny width


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus", "dinov3_vit7b16"])
def test_dinov3_entry_points_random_init_and_weights_in_each_layout(name, tmp_path):
    random_init = hub_load(name, **V3_TINY)
    assert type(random_init).__name__ == "Dinov3VisionTransformer" and random_init.spec.patch_size == 16
    assert random_init.spec.n_storage_tokens == 4
    with torch.no_grad():
        for p in random_init.parameters():
            p.normal_()
    x = torch.randn(1, 3, 48, 32)
    formats = {"hub": "w.pth", "safetensors": "w.safetensors", "timm": "t.safetensors", "hf": "hf"}
    for fmt, file in formats.items():
        weights = save_backbone(random_init, tmp_path / file, fmt)
        loaded = hub_load(name, weights=str(weights), **V3_TINY)
        assert torch.equal(loaded.eval()(x), random_init.eval()(x)), fmt


def test_weights_of_the_other_family_are_one_line_naming_both(tmp_path):
    v2 = save_backbone(hub_load("dinov2_vits14", img_size=56, **TINY), tmp_path / "v2.pth", "hub")
    v3 = save_backbone(hub_load("dinov3_vits16", **V3_TINY), tmp_path / "v3.pth", "hub")
    for name, weights, found, expected in (("dinov3_vits16", v2, "DINOv2/DINO v1", "DINOv3"),
                                           ("dinov2_vits14", v3, "DINOv3", "DINOv2/DINO v1")):
        with pytest.raises(WeightsError) as err:
            hub_load(name, weights=weights, **(V3_TINY if "v3" in name else TINY))
        assert "\n" not in str(err.value) and str(weights) in str(err.value)
        assert f"{found} backbone weights" in str(err.value) and f"where a {expected} backbone" in str(err.value)
