"""collate_data_and_cast / DataCollator: batch layout, mask statistics, skipped samples."""

import pickle
import random

import numpy as np
import pytest
import torch

from dinotrain.data import DataCollator, MaskingGenerator, collate_data_and_cast

N_TOKENS = 196


def _collate(samples, ratio=(0.1, 0.5), probability=0.5, rng=None, **kwargs):
    rng = random.Random(0) if rng is None else rng
    return collate_data_and_cast(samples, ratio, probability, N_TOKENS, MaskingGenerator(14), rng=rng, **kwargs)


def test_shapes_dtypes_and_view_order(fake_sample):
    samples = [fake_sample(label, n_local=3) for label in range(4)]
    batch = _collate(samples)
    glob, local = batch["collated_global_crops"], batch["collated_local_crops"]
    assert glob.shape == (8, 3, 16, 16) and glob.dtype == torch.float32
    assert local.shape == (12, 3, 8, 8) and local.dtype == torch.float32
    # view 0 of images 0..3, then view 1 of images 0..3
    assert [glob[i, 0, 0, 0].item() for i in range(8)] == [0, 1, 2, 3, 100, 101, 102, 103]
    assert [local[i, 0, 0, 0].item() for i in range(12)] == [v * 1000 + i for v in (1, 2, 3) for i in range(4)]
    cast = _collate(samples, dtype=torch.bfloat16)
    assert cast["collated_global_crops"].dtype == cast["collated_local_crops"].dtype == torch.bfloat16
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["labels"].dtype == torch.long
    assert batch["collated_masks"].shape == (8, N_TOKENS) and batch["collated_masks"].dtype == torch.bool
    assert batch["n_skipped"] == 0


def test_mask_bookkeeping_is_consistent(fake_sample):
    batch = _collate([fake_sample(label) for label in range(8)])
    masks = batch["collated_masks"]
    n_masked_images = int(masks.any(-1).sum())
    assert n_masked_images == 8  # int(16 * 0.5)
    assert torch.equal(batch["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert batch["n_masked_patches"].tolist() == [int(masks.sum())]
    assert batch["n_masked_patches"].dtype == torch.long
    assert batch["masks_weight"].shape == (int(masks.sum()),)
    assert batch["masks_weight"].sum().item() == pytest.approx(n_masked_images, rel=1e-5)
    per_image = masks.sum(-1)
    expected = (1.0 / per_image.clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    assert torch.allclose(batch["masks_weight"], expected)
    assert int(masks.sum()) <= batch["upperbound"]


def test_upperbound_matches_official_formula(fake_sample):
    batch = _collate([fake_sample(label) for label in range(3)], ratio=(0.1, 0.5), probability=0.5)
    probs = np.linspace(0.1, 0.5, 3 + 1)  # 6 crops * 0.5 = 3 masked
    assert batch["upperbound"] == sum(int(N_TOKENS * p) for p in probs[1:])


def test_masked_fraction_and_mean_ratio_statistics(fake_sample):
    rng = random.Random(0)
    samples = [fake_sample(label) for label in range(8)]
    masked_images, ratios = 0, []
    for _ in range(100):
        masks = _collate(samples, rng=rng)["collated_masks"]
        counts = masks.sum(-1)
        assert int((counts > 0).sum()) == 8  # exactly half of the 16 crops, every batch
        masked_images += int((counts > 0).sum())
        ratios.extend((counts[counts > 0] / N_TOKENS).tolist())
    assert masked_images / (100 * 16) == 0.5
    assert abs(np.mean(ratios) - 0.3) < 0.015
    assert min(ratios) >= 0.05 and max(ratios) <= 0.5  # blocks may fall a few patches short


def test_which_crops_are_masked_is_shuffled(fake_sample):
    rng = random.Random(0)
    samples = [fake_sample(label) for label in range(4)]
    patterns = {tuple(_collate(samples, rng=rng)["collated_masks"].any(-1).tolist()) for _ in range(30)}
    assert len(patterns) > 5


def test_batch_of_one(fake_sample):
    batch = _collate([fake_sample(7)])
    assert batch["collated_global_crops"].shape == (2, 3, 16, 16)
    assert int(batch["collated_masks"].any(-1).sum()) == 1
    assert batch["labels"].tolist() == [7]
    assert batch["masks_weight"].sum().item() == pytest.approx(1.0)


def test_no_mask_probability_gives_no_masks(fake_sample):
    batch = _collate([fake_sample(0), fake_sample(1)], probability=0.0)
    assert not batch["collated_masks"].any() and batch["upperbound"] == 0
    assert batch["mask_indices_list"].numel() == 0 and batch["masks_weight"].numel() == 0
    assert batch["n_masked_patches"].tolist() == [0]


def test_zero_local_crops_gives_empty_tensor(fake_sample):
    batch = _collate([fake_sample(0, n_local=0), fake_sample(1, n_local=0)])
    assert batch["collated_local_crops"].shape == (0, 3, 0, 0)


def test_none_samples_are_dropped_and_counted(fake_sample):
    batch = _collate([None, fake_sample(1), None, fake_sample(2)])
    assert batch["n_skipped"] == 2 and batch["labels"].tolist() == [1, 2]
    assert batch["collated_global_crops"].shape[0] == 4
    assert _collate([None, None]) is None


def test_seeded_rng_reproducible(fake_sample):
    samples = [fake_sample(label) for label in range(4)]
    a = _collate(samples, rng=np.random.default_rng(3))["collated_masks"]
    b = _collate(samples, rng=np.random.default_rng(3))["collated_masks"]
    assert torch.equal(a, b)


def test_mask_size_mismatch_raises(fake_sample):
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast([fake_sample(0)], (0.1, 0.5), 0.5, 100, MaskingGenerator(14))


def test_data_collator_pickles_and_seeds_per_process(fake_sample):
    collator = DataCollator((0.1, 0.5), 0.5, N_TOKENS, MaskingGenerator(14), seed=1)
    samples = [fake_sample(label) for label in range(4)]
    first = collator(samples)["collated_masks"]
    clone = pickle.loads(pickle.dumps(collator))  # as a spawned worker gets it: a fresh stream
    assert torch.equal(clone(samples)["collated_masks"], first)
    assert not torch.equal(collator(samples)["collated_masks"], first)


@pytest.mark.parametrize("kwargs", [{"mask_ratio_tuple": (0.5, 0.1)}, {"mask_probability": 1.5}])
def test_data_collator_validates(kwargs):
    args = {"mask_ratio_tuple": (0.1, 0.5), "mask_probability": 0.5, "n_tokens": 16}
    args["mask_generator"] = MaskingGenerator(4)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DataCollator(**{**args, **kwargs})
