"""Batches are a function of (seed, global position): same on any world size and after resume."""

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.train.batches import build_train_loader

OVERRIDES = ["train.dataset_path=tiny", "student.patch_size=4", "crops.global_crops_size=16", "crops.local_crops_size=8",
             "crops.local_crops_number=2", "crops.blur_kernel_size=3", "train.num_workers=0"]


def _batches(world_size, rank, start, n, batch, workers=0):
    cfg = load_config(None, OVERRIDES + [f"train.batch_size_per_gpu={batch}", f"train.num_workers={workers}"])
    loader, _ = build_train_loader(cfg, rank, world_size, start)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _view(batch, key, view, n_images):
    return batch[key][view * n_images:(view + 1) * n_images]


@pytest.mark.slow
def test_two_ranks_see_the_one_rank_batch():
    (full,) = _batches(1, 0, 0, 1, batch=8)
    halves = [_batches(2, r, 0, 1, batch=4)[0] for r in range(2)]
    for view in range(2):
        one = _view(full, "collated_global_crops", view, 8)
        masks = _view(full, "collated_masks", view, 8)
        for r, half in enumerate(halves):
            # rank r holds the global positions r, r+2, r+4, ...
            assert torch.equal(_view(half, "collated_global_crops", view, 4), one[r::2])
            assert torch.equal(_view(half, "collated_masks", view, 4), masks[r::2])
    assert torch.equal(full["collated_local_crops"][:8][0::2], halves[0]["collated_local_crops"][:4])
    # official: masks are drawn for half the global crops (on a 4x4 grid the smallest ratios give empty masks)
    assert 0 < int(full["collated_masks"].any(1).sum()) <= int(0.5 * 16)


def test_resume_continues_the_stream_and_workers_do_not_matter():
    straight = _batches(1, 0, 0, 2, batch=4)
    resumed = _batches(1, 0, 4, 1, batch=4, workers=1)
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "labels"):
        assert torch.equal(straight[1][key], resumed[0][key]), key
    assert not torch.equal(straight[0]["collated_global_crops"], straight[1]["collated_global_crops"])


def test_masks_weight_and_indices_are_consistent():
    (b,) = _batches(1, 0, 0, 1, batch=6)
    masks = b["collated_masks"]
    assert torch.equal(b["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert b["masks_weight"].sum().item() == pytest.approx(float(masks.any(1).sum()))
    assert b["collated_global_crops"].shape == (12, 3, 16, 16) and b["collated_local_crops"].shape == (12, 3, 8, 8)
