"""Config: defaults + file + overrides, and clear errors naming the key."""

from pathlib import Path

import pytest
import yaml

from dinotrain.config import ConfigError, configs_dir, load_config, resolve_config_path


def test_defaults_hold_official_keys():
    cfg = load_config()
    assert cfg.student.arch == "vit_large"
    assert cfg.crops.local_crops_number == 8
    assert list(cfg.ibot.mask_ratio_min_max) == [0.1, 0.5]
    assert cfg.optim.base_lr == 0.004
    assert cfg.teacher.momentum_teacher == 0.992


def test_every_default_key_is_documented():
    lines = (configs_dir() / "default.yaml").read_text().splitlines()
    leaf_lines = [ln for ln in lines if ":" in ln and not ln.strip().startswith("#") and not ln.rstrip().endswith(":")]
    undocumented = [ln for ln in leaf_lines if "#" not in ln]
    assert not undocumented, undocumented


def test_file_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"student": {"arch": "vit_small", "patch_size": 16}, "optim": {"base_lr": 0.1}}))
    cfg = load_config(f, ["optim.base_lr=1e-3", "crops.global_crops_scale=[0.5,1.0]"])
    assert cfg.student.arch == "vit_small"
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert list(cfg.crops.global_crops_scale) == [0.5, 1.0]


def test_shipped_configs_load():
    load_config("smoke/cpu_tiny")
    for name in ("train/vitl14", "train/vitg14"):
        assert load_config(name, ["train.dataset_path=/data/imagenet/train"]).train.dataset_path == "/data/imagenet/train"
    assert resolve_config_path("smoke/cpu_tiny").name == "cpu_tiny.yaml"


@pytest.mark.parametrize("override,needle", [
    ("optim.base_lrr=1", "optim.base_lrr"),
    ("studnet.arch=vit_small", "studnet"),
    ("optim.base_lr=abc", "optim.base_lr"),
    ("train.batch_size_per_gpu=1.5", "train.batch_size_per_gpu"),
    ("student.arch=vit_huge", "student.arch"),
    ("crops.global_crops_scale=[0.5]", "crops.global_crops_scale"),
    ("train.centering=other", "train.centering"),
    ("crops.global_crops_size=225", "crops.global_crops_size"),
    ("ibot.mask_ratio_min_max=[0.6,0.1]", "ibot.mask_ratio_min_max"),
    ("optim=3", "optim"),
    ("noequals", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_in_file_is_an_error(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("student:\n  arc: vit_small\n")
    with pytest.raises(ConfigError, match=r"student\.arc.*did you mean student\.arch"):
        load_config(f)


def test_missing_config_file_lists_shipped():
    with pytest.raises(ConfigError, match="smoke/cpu_tiny"):
        load_config("no/such/config")
