"""Batches are a function of (seed, global position): same on any world size and after resume."""

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.data.loader import build_train_loader

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


def _items(positions, size=8):
    sample = ({"global_crops": [torch.zeros(3, size, size)] * 2, "local_crops": []}, 0)
    return [(p, sample, 0) for p in positions]


def test_each_rank_draws_only_its_own_masks_and_they_are_the_one_rank_masks(monkeypatch):
    from dinotrain.data.collate import GlobalMaskCollator

    def collator():
        return GlobalMaskCollator(32, 16 * 16, 16, (0.1, 0.5), 0.5, seed=3, origin=0)

    full = collator()(_items(range(32, 64)))["collated_masks"]  # global batch 1 (positions 32..63), one rank
    calls = []
    for rank in range(4):  # 4 ranks of 8 images: rank r holds positions 32 + r, 32 + r + 4, ...
        part = collator()
        real = part.mask_generator
        part.mask_generator = lambda count, rng=None: calls.append(count) or real(count, rng=rng)
        got = part(_items(range(32 + rank, 64, 4)))["collated_masks"]
        for view in range(2):
            assert torch.equal(got[view * 8:(view + 1) * 8], full[view * 32:(view + 1) * 32][rank::4])
    assert len(calls) == 4 * 2 * 8  # every rank made the masks of its 16 crops only, not the 64 of the batch
    counts = full.sum(1)
    assert int((counts > 0).sum()) == 32  # official plan: half of the 2 x 32 crops masked ...
    assert 0.1 * 256 <= counts[counts > 0].float().mean() <= 0.5 * 256  # ... at ratios within the range
