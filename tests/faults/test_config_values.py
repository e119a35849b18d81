"""Config values that make no sense stop at load time naming the key; recipes do not waste runs."""

import pytest

from dinotrain.config import ConfigError, load_config


@pytest.mark.parametrize("override,needle", [
    ("optim.base_lr=0", "optim.base_lr"),
    ("optim.base_lr=-1e-3", "optim.base_lr"),
    ("optim.epochs=0", "optim.epochs"),
    ("teacher.teacher_temp=0", "teacher.teacher_temp"),
    ("teacher.warmup_teacher_temp=-0.04", "teacher.warmup_teacher_temp"),
    ("student.drop_path_rate=1.0", "student.drop_path_rate"),
    ("student.drop_path_rate=-0.1", "student.drop_path_rate"),
    ("teacher.momentum_teacher=1.5", "teacher.momentum_teacher"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("train.seed=null", "train.seed"),
    ("optim.base_lr=null", "optim.base_lr"),
    ("student.arch=null", "student.arch"),
    ("train.dataset_path=null", "train.dataset_path"),
])
def test_nonsense_values_are_rejected_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke/cpu_tiny", [override])


@pytest.mark.parametrize("recipe", ["train/vitl14", "train/vitg14"])
def test_full_scale_recipes_require_a_dataset(recipe):
    with pytest.raises(ConfigError, match=r"train\.dataset_path.*required"):
        load_config(recipe)


def test_nullable_keys_stay_nullable():
    cfg = load_config("smoke/cpu_tiny", ["train.max_iterations=null", "checkpoint.period_iterations=null"])
    assert cfg.train.max_iterations is None


def test_default_checkpoint_period_is_three_official_epochs():
    cfg = load_config(None)
    assert cfg.checkpoint.period_iterations is None
    assert cfg.train.saveckp_freq * cfg.train.OFFICIAL_EPOCH_LENGTH == 3 * 1250
