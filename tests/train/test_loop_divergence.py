"""A NaN/inf loss stops the run naming the iteration; `train.nan_tolerance` skips that many steps first."""

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.distributed.env import destroy_distributed
from dinotrain.train.loop import TrainingDiverged
from dinotrain.train.run import TrainingRun
from trainruns import FAST


def _trainer(tmp_path, tolerance, bad_iterations):
    cfg = load_config("smoke/cpu_tiny", FAST + ["train.max_iterations=4", f"train.nan_tolerance={tolerance}",
                                                "checkpoint.period_iterations=100"])
    trainer = TrainingRun(cfg, tmp_path, resume=False)
    model = trainer.objective.learners[0].model
    real = model.compute_losses
    calls = {"n": 0}

    def poisoned(batch, teacher_temp, gram=None):
        total, terms = real(batch, teacher_temp, gram)
        calls["n"] += 1
        if calls["n"] - 1 in bad_iterations:
            total = total * float("nan")
        return total, terms

    model.compute_losses = poisoned
    return trainer


@pytest.mark.slow
def test_nan_stops_the_run_naming_the_iteration(tmp_path):
    trainer = _trainer(tmp_path, tolerance=0, bad_iterations={2})
    try:
        with pytest.raises(TrainingDiverged, match="nan at iteration 2"):
            trainer.run()
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_tolerated_nan_skips_the_step(tmp_path):
    trainer = _trainer(tmp_path, tolerance=1, bad_iterations={1})
    try:
        last = trainer.run()
        assert last["iteration"] == 4 and torch.isfinite(torch.tensor(last["total_loss"]))
    finally:
        destroy_distributed()
