"""Conversions between hub `.pth`, safetensors and HF directories are lossless, and bad input is named."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dinotrain.cli import main
from dinotrain.models import PRESETS, build_preset
from dinotrain.weights.convert import FORMATS, convert, load_backbone, save_backbone
from dinotrain.weights.resolve import read_weights
from dinotrain.weights.state_dict import WeightsError

# Small but complete variants of each family (full width; what changes between them is the mapping).
NAMES = ["dinov2_vits14", "dinov2_vitg14_reg", "dino_vitb8"]


def random_backbone(name: str, dtype=torch.float32, **overrides):
    """Preset with random values in every tensor, built on the meta device to skip the costly init."""
    kwargs = dict(depth=2, img_size=PRESETS[name]["patch_size"] * 4)
    kwargs.update(overrides)
    with torch.device("meta"):
        model = build_preset(name, **kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_().mul_(0.05)
    return model.to(dtype).eval()


def load_plain(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_hub_hf_hub_round_trip_is_bitwise(name, tmp_path):
    model = random_backbone(name)
    src = save_backbone(model, tmp_path / "a.pth", "hub")
    convert(src, tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "b.pth", "hub")
    assert_identical(load_plain(src), load_plain(tmp_path / "b.pth"))
    assert_identical(load_plain(src), model.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_hub_safetensors_hub_round_trip_is_bitwise(name, tmp_path):
    model = random_backbone(name)
    src = save_backbone(model, tmp_path / "a.pth", "hub")
    convert(src, tmp_path / "w.safetensors", "safetensors")
    convert(tmp_path / "w.safetensors", tmp_path / "b.pth", "hub")
    assert_identical(load_plain(src), load_plain(tmp_path / "b.pth"))


def test_bfloat16_survives_every_format(tmp_path):
    model = random_backbone("dinov2_vits14", dtype=torch.bfloat16)
    save_backbone(model, tmp_path / "a.safetensors", "safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    convert(tmp_path / "hf", tmp_path / "b.pth", "hub")
    assert_identical(load_plain(tmp_path / "b.pth"), model.state_dict())


def test_safetensors_records_the_spec(tmp_path):
    """Settings that are not in the weights (interpolation) survive safetensors and HF exports."""
    model = random_backbone("dinov2_vits14", interpolate_offset=0.0, interpolate_antialias=True)
    path = save_backbone(model, tmp_path / "w.safetensors", "safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["dinotrain_spec"]) == model.spec.to_dict()
    assert read_weights(path)[1] == model.spec
    convert(path, tmp_path / "hf", "hf")
    assert read_weights(tmp_path / "hf")[1] == model.spec
    convert(tmp_path / "hf", tmp_path / "w.pth", "hub")
    assert read_weights(tmp_path / "w.pth")[1].interpolate_offset == 0.1  # a .pth cannot record it


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "timm"])  # timm: DINOv3 only (test_dinov3_files.py)
def test_load_backbone_from_each_format(fmt, tmp_path):
    model = random_backbone("dinov2_vits14_reg")
    dst = {"hub": tmp_path / "w.pth", "safetensors": tmp_path / "w.safetensors", "hf": tmp_path / "hf"}[fmt]
    save_backbone(model, dst, fmt)
    loaded = load_backbone(dst)
    assert not loaded.training and loaded.spec == model.spec
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(loaded(x), model(x))
    if fmt == "hf":  # pointing at the weights file inside the directory works too
        assert torch.equal(load_backbone(dst / "model.safetensors")(x), model(x))


def test_training_checkpoint_is_stripped_to_the_backbone(tmp_path):
    model = random_backbone("dinov2_vits14")
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}
    ckpt["teacher"]["dino_head.last_layer.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "training.pth")
    convert(tmp_path / "training.pth", tmp_path / "backbone.pth", "hub")
    assert_identical(load_plain(tmp_path / "backbone.pth"), model.state_dict())


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_source_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert(tmp_path / "missing.pth", tmp_path / "out.pth", "hub")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path)  # a directory that is not an HF model


def test_non_vit_sources_are_refused(tmp_path):
    linear = torch.nn.Linear(4, 2).state_dict()
    torch.save(linear, tmp_path / "linear.pth")
    save_file(linear, str(tmp_path / "linear.safetensors"))
    for src in ("linear.pth", "linear.safetensors"):
        with pytest.raises(WeightsError, match="not a ViT backbone"):
            convert(tmp_path / src, tmp_path / "out.pth", "hub")
    (tmp_path / "noise.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(WeightsError, match="noise.safetensors"):
        load_backbone(tmp_path / "noise.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"cls_token": torch.zeros(1), "obj": object()}, tmp_path / "obj.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        convert(tmp_path / "obj.pth", tmp_path / "out.pth", "hub")


def test_bad_targets_are_value_errors(tmp_path):
    src = save_backbone(random_backbone("dino_vitb8"), tmp_path / "a.pth", "hub")
    with pytest.raises(ValueError, match="unknown target format 'onnx'"):
        convert(src, tmp_path / "out", "onnx")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert(src, tmp_path / "out.pth", "safetensors")
    with pytest.raises(ValueError, match="hub output"):
        convert(src, tmp_path / "out.safetensors", "hub")


def test_hf_named_file_without_config_is_explained(tmp_path):
    save_backbone(random_backbone("dinov2_vits14"), tmp_path / "hf", "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "lonely.safetensors")
    with pytest.raises(WeightsError, match="config.json"):
        load_backbone(tmp_path / "lonely.safetensors")


def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path):
    model = random_backbone("dinov2_vits14")
    wrong = {**model.spec.to_dict(), "depth": 5}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt", "dinotrain_spec": json.dumps(wrong)})
    with pytest.raises(WeightsError, match="depth"):
        read_weights(tmp_path / "w.safetensors")


def test_command_line(tmp_path, capsys):
    """`dinotrain convert`, and its one-line error (exit 2) for a file that is not a ViT."""
    src = save_backbone(random_backbone("dino_vitb8"), tmp_path / "a.pth", "hub")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert str(tmp_path / "hf") in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file()
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "linear.pth")
    assert main(["convert", str(tmp_path / "linear.pth"), str(tmp_path / "x.pth"), "--to", "hub"]) == 2
    assert "not a ViT" in capsys.readouterr().err


def test_load_backbone_overrides_settings_not_in_the_weights(tmp_path):
    path = save_backbone(random_backbone("dinov2_vits14"), tmp_path / "w.pth", "hub")
    model = load_backbone(path, interpolate_offset=0.0, drop_path_rate=0.1)
    assert model.spec.interpolate_offset == 0.0 and model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    with pytest.raises(WeightsError, match="depth: model has 3, weights have 2"):
        load_backbone(path, depth=3)
