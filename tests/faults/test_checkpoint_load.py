"""Checkpointer.load_parts is all or nothing, and matches optimizer state to parameters by name (in-process)."""

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.distributed import checkpoint as ck
from dinotrain.distributed.checkpoint import Checkpointer, CheckpointError
from dinotrain.distributed.env import destroy_distributed, init_distributed
from dinotrain.train.optim import build_optimizer
from dinotrain.train.ssl import SSLMetaArch
from trainruns import FAST


@pytest.fixture
def dist_env():
    env = init_distributed()
    yield env
    destroy_distributed()


def _model_and_optimizer(overrides=(), seed=0):
    cfg = load_config("smoke/cpu_tiny", FAST + list(overrides))
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    model.shard(torch.float32)
    return model, build_optimizer(model.student, cfg)


def _fake_step(model, optimizer):
    for p in model.student.parameters():
        p.grad = torch.ones_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    optimizer.step()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def test_optimizer_state_survives_a_new_param_group_layout(dist_env, tmp_path):
    model, opt = _model_and_optimizer(["optim.layerwise_decay=1.0"])
    _fake_step(model, opt)
    saved = {n: _local(opt.state[p]["exp_avg"]).clone() for n, p in model.student.named_parameters()}
    Checkpointer(tmp_path).save_parts(1, {"": (model, opt)}, {"sample_position": 0})

    model2, opt2 = _model_and_optimizer(["optim.layerwise_decay=0.9"], seed=1)
    assert len(opt2.param_groups) > len(opt.param_groups)  # another layout
    extra = Checkpointer(tmp_path).load_parts(tmp_path / "checkpoints" / "00000001", {"": (model2, opt2)})
    assert extra["iteration"] == 1
    for n, p in model2.student.named_parameters():
        assert torch.equal(_local(opt2.state[p]["exp_avg"]), saved[n]), n
    # the groups are this run's (layer-wise decay 0.9), not the checkpoint's
    assert min(g["lr_multiplier"] for g in opt2.param_groups) < 1.0


def test_failed_read_leaves_the_live_model_untouched(dist_env, tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    _fake_step(model, opt)
    Checkpointer(tmp_path).save_parts(1, {"": (model, opt)}, {"sample_position": 0})

    fresh, fresh_opt = _model_and_optimizer(seed=1)
    before = {k: _local(v).clone() for k, v in fresh.state_dict().items()}
    real_load = ck.dcp.load

    def load_then_fail(state, **kwargs):
        real_load(state, **kwargs)  # every buffer filled ...
        raise OSError("disk vanished mid-read")  # ... then the read fails

    monkeypatch.setattr(ck.dcp, "load", load_then_fail)
    with pytest.raises(CheckpointError, match="disk vanished"):
        Checkpointer(tmp_path).load_parts(tmp_path / "checkpoints" / "00000001", {"": (fresh, fresh_opt)})
    after = fresh.state_dict()
    assert all(torch.equal(before[k], _local(after[k])) for k in before)


def test_all_checkpoints_failing_raises_instead_of_starting_over(dist_env, tmp_path):
    model, opt = _model_and_optimizer()
    for it in (1, 2):
        Checkpointer(tmp_path).save_parts(it, {"": (model, opt)}, {"sample_position": 0})
    for meta in (tmp_path / "checkpoints").glob("*/.metadata"):
        meta.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        Checkpointer(tmp_path).load_latest_parts({"": (model, opt)})
