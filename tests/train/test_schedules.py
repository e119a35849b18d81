"""Schedules against the closed-form official formulas."""

import math

import pytest

from dinotrain.config import load_config
from dinotrain.train.schedules import CosineScheduler, WarmupThenConstant, build_schedules, scaled_lr


def test_cosine_scheduler_matches_formula():
    s = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.0, freeze_iters=2)
    assert s[0] == s[1] == 0.0  # frozen
    assert s[2] == 0.0 and s[6] == pytest.approx(1.0)  # warmup reaches the base value on its last step
    for i in range(13):
        expected = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * i / 13))
        assert s[7 + i] == pytest.approx(expected)
    assert s[20] == s[1000] == 0.1


def test_teacher_temp_warmup():
    t = WarmupThenConstant(0.04, 0.07, 10)
    assert t[0] == pytest.approx(0.04) and t[9] == pytest.approx(0.07) and t[500] == 0.07


def test_scaling_rules():
    cfg = load_config(None, ["optim.base_lr=0.004"])
    assert scaled_lr(cfg, 256) == pytest.approx(0.004 * 0.5)
    cfg = load_config(None, ["optim.scaling_rule=linear_wrt_1024"])
    assert scaled_lr(cfg, 256) == pytest.approx(0.001)


def test_build_schedules_official_shapes():
    cfg = load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=5", "optim.warmup_epochs=1",
                             "optim.freeze_last_layer_epochs=2", "teacher.warmup_teacher_temp_epochs=1"])
    s = build_schedules(cfg, lr=1.0)
    assert s.total_iters == 50
    assert s.last_layer_lr[19] == 0.0 and s.last_layer_lr[20] == pytest.approx(s.lr[20])
    assert s.lr[9] == pytest.approx(1.0)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[50] == 1.0
    assert s.wd[0] == pytest.approx(0.04) and s.wd[49] == pytest.approx(0.4, rel=1e-2)
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[10] == pytest.approx(0.07)
