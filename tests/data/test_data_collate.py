"""GlobalMaskCollator (the training collate): batch layout, mask statistics, seeding, skipped-image counts."""

import pickle

import numpy as np
import pytest
import torch

from dinotrain.data.collate import GlobalMaskCollator

GRID = 14
N_TOKENS = GRID * GRID


def _collate(samples, ratio=(0.1, 0.5), probability=0.5, seed=0, step=0, skipped=None):
    """One global batch (`step`) of `samples` on one rank: positions step * B .. step * B + B - 1."""
    n = len(samples)
    collator = GlobalMaskCollator(n, N_TOKENS, GRID, ratio, probability, seed=seed)
    skipped = skipped or [0] * n
    return collator([(step * n + j, s, k) for j, (s, k) in enumerate(zip(samples, skipped))])


def test_shapes_dtypes_and_view_order(fake_sample):
    samples = [fake_sample(label, n_local=3) for label in range(4)]
    batch = _collate(samples)
    glob, local = batch["collated_global_crops"], batch["collated_local_crops"]
    assert glob.shape == (8, 3, 16, 16) and glob.dtype == torch.float32
    assert local.shape == (12, 3, 8, 8) and local.dtype == torch.float32
    # view 0 of images 0..3, then view 1 of images 0..3
    assert [glob[i, 0, 0, 0].item() for i in range(8)] == [0, 1, 2, 3, 100, 101, 102, 103]
    assert [local[i, 0, 0, 0].item() for i in range(12)] == [v * 1000 + i for v in (1, 2, 3) for i in range(4)]
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["labels"].dtype == torch.long
    assert batch["collated_masks"].shape == (8, N_TOKENS) and batch["collated_masks"].dtype == torch.bool
    assert batch["n_skipped"] == 0


def test_crops_keep_their_dtype():
    """uint8 crops stay uint8 (to_device normalises them where the model runs)."""
    crops = {"global_crops": [torch.zeros(3, 16, 16, dtype=torch.uint8)] * 2,
             "local_crops": [torch.zeros(3, 8, 8, dtype=torch.uint8)]}
    batch = _collate([(crops, 0), (crops, 1)])
    assert batch["collated_global_crops"].dtype == batch["collated_local_crops"].dtype == torch.uint8


def test_mask_bookkeeping_is_consistent(fake_sample):
    batch = _collate([fake_sample(label) for label in range(8)])
    masks = batch["collated_masks"]
    n_masked_images = int(masks.any(-1).sum())
    assert n_masked_images == 8  # int(16 * 0.5)
    assert torch.equal(batch["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert batch["masks_weight"].shape == (int(masks.sum()),)
    assert batch["masks_weight"].sum().item() == pytest.approx(n_masked_images, rel=1e-5)
    per_image = masks.sum(-1)
    expected = (1.0 / per_image.clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    assert torch.allclose(batch["masks_weight"], expected)
    assert int(masks.sum()) <= sum(int(N_TOKENS * p) for p in np.linspace(0.1, 0.5, 8 + 1)[1:])  # official bound


def test_masked_fraction_and_mean_ratio_statistics(fake_sample):
    samples = [fake_sample(label) for label in range(8)]
    masked_images, ratios = 0, []
    for step in range(100):
        masks = _collate(samples, step=step)["collated_masks"]
        counts = masks.sum(-1)
        assert int((counts > 0).sum()) == 8  # exactly half of the 16 crops, every batch
        masked_images += int((counts > 0).sum())
        ratios.extend((counts[counts > 0] / N_TOKENS).tolist())
    assert masked_images / (100 * 16) == 0.5
    assert abs(np.mean(ratios) - 0.3) < 0.015
    assert min(ratios) >= 0.05 and max(ratios) <= 0.5  # blocks may fall a few patches short


def test_which_crops_are_masked_is_shuffled(fake_sample):
    samples = [fake_sample(label) for label in range(4)]
    patterns = {tuple(_collate(samples, step=step)["collated_masks"].any(-1).tolist()) for step in range(30)}
    assert len(patterns) > 5


def test_batch_of_one(fake_sample):
    batch = _collate([fake_sample(7)])
    assert batch["collated_global_crops"].shape == (2, 3, 16, 16)
    assert int(batch["collated_masks"].any(-1).sum()) == 1
    assert batch["labels"].tolist() == [7]
    assert batch["masks_weight"].sum().item() == pytest.approx(1.0)


def test_no_mask_probability_gives_no_masks(fake_sample):
    batch = _collate([fake_sample(0), fake_sample(1)], probability=0.0)
    assert not batch["collated_masks"].any()
    assert batch["mask_indices_list"].numel() == 0 and batch["masks_weight"].numel() == 0


def test_zero_local_crops_gives_empty_tensor(fake_sample):
    batch = _collate([fake_sample(0, n_local=0), fake_sample(1, n_local=0)])
    assert batch["collated_local_crops"].shape == (0, 3, 0, 0)


def test_replaced_images_are_counted(fake_sample):
    """Training replaces an unreadable image (SeededSamples) and the batch counts the replacements."""
    batch = _collate([fake_sample(label) for label in range(4)], skipped=[0, 2, 0, 1])
    assert batch["n_skipped"] == 3 and batch["labels"].tolist() == [0, 1, 2, 3]


def test_masks_are_a_function_of_seed_and_batch(fake_sample):
    samples = [fake_sample(label) for label in range(4)]
    a = _collate(samples, seed=3, step=2)["collated_masks"]
    assert torch.equal(a, _collate(samples, seed=3, step=2)["collated_masks"])
    assert not torch.equal(a, _collate(samples, seed=4, step=2)["collated_masks"])
    assert not torch.equal(a, _collate(samples, seed=3, step=3)["collated_masks"])


def test_collator_pickles_into_workers_with_the_same_masks(fake_sample):
    """A DataLoader worker gets a pickled copy: it must draw exactly the masks of the original."""
    collator = GlobalMaskCollator(4, N_TOKENS, GRID, (0.1, 0.5), 0.5, seed=1)
    items = [(j, fake_sample(j), 0) for j in range(4)]
    first = collator(items)["collated_masks"]
    clone = pickle.loads(pickle.dumps(collator))
    assert torch.equal(clone(items)["collated_masks"], first)
    assert torch.equal(collator(items)["collated_masks"], first)  # no state carried from call to call


@pytest.mark.parametrize("override", ["ibot.mask_ratio_min_max=[0.5,0.1]", "ibot.mask_sample_probability=1.5"])
def test_mask_settings_are_validated_where_training_reads_them(override):
    from dinotrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])
