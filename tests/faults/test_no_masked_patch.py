"""A rank whose crops drew no masked patch must still run every sharded module (no FSDP hang).

With 1 image per process on 2 processes and `ibot.mask_sample_probability=0.25`, the global batch
has 4 global crops of which exactly one is masked: every step one rank has no masked patch.
"""

import pytest
import torch

from trainruns import metrics, run_cli, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("separate_head", [True, False], ids=["separate-ibot-head", "shared-head"])
def test_rank_without_masked_patch_does_not_hang(tmp_path, separate_head):
    run = tmp_path / "run"
    proc = run_cli(train_args(run, ["train.batch_size_per_gpu=1", "ibot.mask_sample_probability=0.25", "crops.global_crops_size=32",
                                    f"ibot.separate_head={str(separate_head).lower()}", "train.max_iterations=3",
                                    "checkpoint.period_iterations=100"]), nproc=2, timeout=150)
    assert not proc.timed_out, "the 2-process run hung (a rank skipped a sharded module)"
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    # one masked crop among the 4 of the global batch: the averaged iBOT term is non-zero
    assert all(r["ibot_loss"] != 0 for r in records)
