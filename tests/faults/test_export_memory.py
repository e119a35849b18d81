"""Export memory is bounded by the exported backbone, not by the checkpoint (optimizer, heads).

Peak RSS of a fresh process is measured by tools/bench/export_memory.py's `measure` mode, which is also
what BENCHMARKS.md reports. The old full consolidation is measured as a control: it shows the
measurement does see a checkpoint-sized allocation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainruns import REPO, env

MIB = 1024 ** 2
BENCH = REPO / "tools" / "bench" / "export_memory.py"


def _measure(which: str, ckpt: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH), "measure", which, str(ckpt)], env=env(),
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_reads_only_the_backbone(tmp_path):
    # 8 MiB of teacher backbone, 256 MiB of optimizer state: the layout of a training checkpoint
    ckpt = tmp_path / "checkpoints" / "00000001"
    backbone = {f"teacher.backbone.blocks.{i}.mlp.fc1.weight": torch.full((512, 512), float(i)) for i in range(8)}
    optim = {"state": {f"student.x{i}": {"exp_avg": torch.ones(2048, 2048), "step": torch.tensor(1.0)}
                       for i in range(16)},
             "param_groups": [{"lr": 0.1, "params": [f"student.x{i}" for i in range(16)]}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": backbone, "optim": optim}, checkpoint_id=str(ckpt), no_dist=True)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir())
    assert ckpt_bytes > 260 * MIB

    new = _measure("new", ckpt)
    assert new["tensors"] == 8 and new["exported_bytes"] == 8 * MIB
    new_increase = (new["peak_rss_kib"] - new["rss_before_kib"]) * 1024
    assert new_increase < 2 * new["exported_bytes"] + 48 * MIB, new  # backbone + slack, not the 264 MiB

    old = _measure("old", ckpt)  # control: the full consolidation holds the whole checkpoint
    assert old["tensors"] == 8
    old_increase = (old["peak_rss_kib"] - old["rss_before_kib"]) * 1024
    assert old_increase > 200 * MIB, old
