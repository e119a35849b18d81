"""fp16 with the sharded gradient scaler: an overflowing step is skipped and the scale backs off."""

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.distributed.env import destroy_distributed
from dinotrain.distributed.fsdp import local
from dinotrain.train.loop import train_step
from dinotrain.train.run import TrainingRun
from trainruns import FAST


def _set_scale(scaler, value: float) -> None:
    state = scaler.state_dict()
    state["scale"] = value
    scaler.load_state_dict(state)


@pytest.mark.slow
def test_fp16_overflow_step_is_skipped(tmp_path):
    # LayerScale 0.1: with 1e-5 the initial CLS tokens nearly coincide and KoLeo's 1/distance gradients
    # overflow fp16 at any scale (the scaler then keeps backing off, as it should)
    cfg = load_config("smoke/cpu_tiny", FAST + ["compute_precision.dtype=fp16", "train.max_iterations=2",
                                                "student.layerscale=0.1"])
    trainer = TrainingRun(cfg, tmp_path, resume=False)
    learner = trainer.objective.learners[0]
    try:
        assert learner.scaler.is_enabled()
        params = [p for p in learner.model.student.parameters()]
        before = [local(p).detach().clone() for p in params]
        _set_scale(learner.scaler, 2.0 ** 60)  # guarantees inf gradients in fp16
        out = train_step(trainer.objective, trainer.batches.next_step(1, 0), 0, trainer.env.device)
        assert out["grad_scale"] < 2.0 ** 60  # backed off
        assert all(torch.equal(b, local(p)) for b, p in zip(before, params)), "an overflowing step changed weights"
        _set_scale(learner.scaler, 2.0 ** 8)
        out = train_step(trainer.objective, trainer.batches.next_step(1, 8), 1, trainer.env.device)
        assert out["grad_scale"] == 2.0 ** 8 and torch.isfinite(torch.tensor(out["total_loss"]))
        assert any(not torch.equal(b, local(p)) for b, p in zip(before, params)), "a normal step changed nothing"
    finally:
        destroy_distributed()
