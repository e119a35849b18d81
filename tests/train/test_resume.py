"""What a resume may change: shapes never, the experiment only with a flag, the rest logged."""

import pytest
from omegaconf import OmegaConf

from dinotrain.config import ConfigError, load_config
from dinotrain.train.resume import check_resume, config_changes


def _saved(*overrides):
    return OmegaConf.to_container(load_config("smoke/cpu_tiny", list(overrides)), resolve=True)


def test_resume_check_names_every_differing_key():
    cfg = load_config("smoke/cpu_tiny")
    saved = _saved("student.arch=vit_small", "dino.head_n_prototypes=64")
    with pytest.raises(ConfigError, match=r"student\.arch.*dino\.head_n_prototypes|dino\.head_n_prototypes.*student\.arch"):
        check_resume(saved, cfg, "ckpt")
    assert check_resume(_saved(), cfg, "ckpt") == {}  # same config: nothing to report


def test_layerscale_value_is_an_init_detail_but_on_off_is_a_shape():
    cfg = load_config("smoke/cpu_tiny", ["student.layerscale=0.1"])
    assert check_resume(_saved("student.layerscale=1e-5"), cfg, "ckpt") == {"student.layerscale": (1e-5, 0.1)}
    with pytest.raises(ConfigError, match="student.layerscale"):
        check_resume(_saved("student.layerscale=0"), cfg, "ckpt")


@pytest.mark.parametrize("override", ["train.dataset_path=/data/other", "train.centering=centering"])
def test_experiment_changes_need_the_flag(override):
    cfg = load_config("smoke/cpu_tiny", [override])
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}.*--allow-config-change"):
        check_resume(_saved(), cfg, "ckpt")
    assert key in check_resume(_saved(), cfg, "ckpt", allow_change=True)


def test_config_changes_lists_every_leaf_including_new_and_removed_keys():
    saved = _saved("optim.base_lr=0.001")
    saved["train"]["retired_key"] = 1
    del saved["crops"]["blur_kernel_size"]
    changes = config_changes(saved, load_config("smoke/cpu_tiny"))
    assert changes == {"optim.base_lr": (0.001, 0.004), "train.retired_key": (1, None), "crops.blur_kernel_size": (None, 3)}


def test_a_checkpoint_of_an_older_version_resumes_without_the_keys_added_since():
    """Keys added after a checkpoint was written (the DINOv3 `student.*` keys, `gram.*`) are not architecture
    changes: their defaults are what the older code did. A changed value of a key the checkpoint has still is."""
    saved = _saved()
    for section, key in (("student", "pos_embed_type"), ("student", "n_storage_tokens"), ("gram", "use_loss"),
                         ("gram", "ema_teacher")):
        del saved[section][key]
    cfg = load_config("smoke/cpu_tiny")
    changes = check_resume(saved, cfg, "ckpt")
    assert changes["student.pos_embed_type"] == (None, "learned") and changes["gram.use_loss"] == (None, False)
    with pytest.raises(ConfigError, match="gram.use_loss"):
        check_resume(_saved(), load_config("smoke/cpu_tiny", ["gram.use_loss=true"]), "ckpt")
