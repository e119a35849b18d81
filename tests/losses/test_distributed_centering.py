"""Two real gloo ranks, each holding part of a batch, must reproduce the single-process centering.

The splits are deliberately unequal, so a global count assumed as `local * world_size` would fail.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinotrain.losses import DINOLoss, iBOTPatchLoss

WORLD = 2
K = 12
DINO_SPLIT = (5, 9)  # samples per rank
IBOT_SPLIT = (7, 13)  # masked tokens per rank
TEMP = 0.07


def _inputs():
    g = torch.Generator().manual_seed(1234)
    return {
        "dino": torch.randn(sum(DINO_SPLIT), K, generator=g),
        "ibot": torch.randn(sum(IBOT_SPLIT), K, generator=g),
        "center_dino": torch.randn(1, K, generator=g),
        "center_ibot": torch.randn(1, 1, K, generator=g),
    }


def _compute(x, dino_rows, ibot_rows):
    """The work every rank (or the single process, on everything) does."""
    dino, ibot = DINOLoss(K, center_momentum=0.7), iBOTPatchLoss(K, center_momentum=0.7)
    dino.center.copy_(x["center_dino"])
    ibot.center.copy_(x["center_ibot"])
    d, i = x["dino"][dino_rows], x["ibot"][ibot_rows]
    n_masked = torch.tensor([i.shape[0]])
    out = {
        "dino_sk3": dino.sinkhorn_knopp_teacher(d, TEMP),
        "dino_sk50": dino.sinkhorn_knopp_teacher(d, TEMP, n_iterations=50),
        "ibot_sk3": ibot.sinkhorn_knopp_teacher(i, TEMP, n_masked),
        "n_masked_after": n_masked.clone(),
    }
    dino.update_center(d)
    ibot.update_center(i.unsqueeze(0))  # official call shape: (1, n_masked, K)
    out["dino_center"] = dino.center.clone()
    out["ibot_center"] = ibot.center.clone()
    return out


def _slices(split, rank):
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _worker(rank, tmp_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(tmp_dir, 'store')}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        out = _compute(_inputs(), _slices(DINO_SPLIT, rank), _slices(IBOT_SPLIT, rank))
        torch.save(out, os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_single_process(tmp_path):
    assert not dist.is_initialized()
    full = _compute(_inputs(), slice(None), slice(None))
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for key in ("dino_sk3", "dino_sk50", "ibot_sk3"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), full[key], rtol=1e-5, atol=1e-7)
    # Sanity: a rank alone (no all-reduce) would give something different.
    alone = DINOLoss(K).sinkhorn_knopp_teacher(_inputs()["dino"][_slices(DINO_SPLIT, 0)], TEMP)
    assert not torch.allclose(alone, full["dino_sk3"][: DINO_SPLIT[0]], rtol=1e-3, atol=1e-5)

    for key in ("dino_center", "ibot_center"):
        for r in ranks:
            torch.testing.assert_close(r[key], full[key], rtol=1e-5, atol=1e-6)
    assert [r["n_masked_after"].item() for r in ranks] == list(IBOT_SPLIT)  # caller's count untouched
