"""Training batches that are a pure function of (seed, global sample position).

Each sample's augmentations are seeded by its position in the global sample stream, and each
global batch's iBOT masks by the batch index, so a batch does not depend on the number of
processes, DataLoader workers, or whether the run was interrupted. This is what makes resume exact,
also onto another world size, and a 2-process run take the same steps as a 1-process run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from dinotrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from dinotrain.data.collate import mask_counts, mask_targets, stack_views
from dinotrain.data.datasets import ImageFolderDataset
from dinotrain.data.masking import MaskingGenerator
from dinotrain.data.photometric import normalize_pixels
from dinotrain.data.samplers import InfiniteShardedSampler
from dinotrain.data.tiny import ensure_tiny_dataset


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike hash())."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def seed_step(seed: int, iteration: int, rank: int) -> None:
    """Reseed torch (drop path etc.) for one training step; needs no RNG state in checkpoints."""
    torch.manual_seed(_mix(seed, iteration, rank, 1))


class PositionedSampler(Sampler):
    """Yields (global position, dataset index) for this rank's share of the global sample stream."""

    def __init__(self, dataset_size: int, seed: int, rank: int, world_size: int, start: int):
        self.inner = InfiniteShardedSampler(dataset_size, seed=seed, rank=rank, world_size=world_size, start=start)
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, index in enumerate(self.inner):
            yield self.start + self.rank + k * self.world_size, int(index)


class UnreadableDatasetError(ValueError):
    """So many images failed to decode in a row that the dataset is unusable (wrong folder, wrong files)."""


class SeededSamples(Dataset):
    """Wraps a dataset: item (position, index) -> (position, sample, n_replaced) with seeded randomness.

    An unreadable image is replaced by another image drawn from (seed, position, attempt), so every
    rank's batch stays full (cross-rank ops such as the global KoLeo see equal sizes) and the
    replacement is the same after a resume or on another world size. `n_replaced` counts the
    unreadable images skipped for this position.
    """

    def __init__(self, dataset: Dataset, seed: int, max_attempts: int = 64):
        self.dataset, self.seed, self.max_attempts = dataset, seed, max_attempts

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        for attempt in range(self.max_attempts):
            if attempt:
                index = _mix(self.seed, position, 5, attempt) % len(self)
            salt = (attempt,) if attempt else ()  # attempt 0 keeps the stream of a dataset without bad files
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, position, 2, *salt))
                random.seed(_mix(self.seed, position, 3, *salt))
                sample = self.dataset[index]
            if sample is not None:
                return position, sample, attempt
        raise UnreadableDatasetError(
            f"{self.max_attempts} images in a row could not be decoded (the log names each file and why); "
            "is train.dataset_path a folder of images this machine can read?")


class GlobalMaskCollator:
    """Collate this rank's samples with iBOT masks that are a slice of the global batch's.

    The global batch (all ranks, `global_batch` images, 2 global crops each) gets masks as the official
    per-batch recipe: half of the 2 x global_batch crops (mask_sample_probability) get ratios spread evenly
    over `mask_ratio_tuple`, the others none, in a random order. That plan (one patch count per crop) is
    cheap and drawn whole from the batch's seed; the block masks themselves, the costly part, are drawn
    only for this rank's crops, each from its own seed (batch, crop), so crop (view v, image j) gets the
    same mask on any number of ranks while each rank does 1/world_size of the work.
    """

    def __init__(self, global_batch: int, n_tokens: int, grid: int, mask_ratio_tuple, mask_probability: float,
                 seed: int, origin: int = 0):
        self.global_batch, self.n_tokens, self.seed, self.origin = global_batch, n_tokens, seed, origin
        self.mask_ratio_tuple, self.mask_probability = tuple(mask_ratio_tuple), mask_probability
        self.mask_generator = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)  # as official train.py

    def _mask(self, batch_start: int, crop: int, count: int) -> torch.Tensor:
        rng = random.Random(_mix(self.seed, batch_start, 6, crop))
        return torch.from_numpy(np.asarray(self.mask_generator(count, rng=rng), dtype=bool)).flatten()

    def __call__(self, items: list) -> dict:
        offsets = [p - self.origin for p, _, _ in items]
        step = offsets[0] // self.global_batch
        assert all(o // self.global_batch == step for o in offsets), "a batch must not straddle global batches"
        batch_start = self.origin + step * self.global_batch  # a global batch is named by its first sample
        counts = mask_counts(2 * self.global_batch, self.mask_ratio_tuple, self.mask_probability, self.n_tokens,
                             random.Random(_mix(self.seed, batch_start, 4)))
        slots = [(p - self.origin) % self.global_batch for p, _, _ in items]
        samples = [s for _, s, _ in items]
        crops = [v * self.global_batch + j for v in range(2) for j in slots]
        masks = torch.stack([self._mask(batch_start, c, counts[c]) for c in crops])
        mask_indices, masks_weight = mask_targets(masks)
        return {
            "collated_global_crops": stack_views(samples, "global_crops"),
            "collated_local_crops": stack_views(samples, "local_crops"),
            "collated_masks": masks,
            "mask_indices_list": mask_indices,
            "masks_weight": masks_weight,
            "labels": torch.tensor([s[1] for s in samples], dtype=torch.long),
            "n_skipped": sum(n for _, _, n in items),
        }


def resolve_dataset_root(cfg: DictConfig) -> Path:
    """`train.dataset_path`, or a built-in tiny dataset's train split for `tiny` (digits) and `tiny-shapes`."""
    if cfg.train.dataset_path == "tiny":
        return ensure_tiny_dataset() / "train"
    if cfg.train.dataset_path == "tiny-shapes":
        return ensure_tiny_dataset(kind="shapes") / "train"
    return Path(cfg.train.dataset_path).expanduser()


def build_train_dataset(cfg: DictConfig, index_cache_dir: str | Path | None = None) -> ImageFolderDataset:
    """The training images with the multi-crop augmentation (the index is cached, see data/index.py).

    Its crops are uint8: `to_device` normalises them where the model runs, so the workers skip that pass and
    hand over (and the GPU receives) a quarter of the bytes of float32 crops.
    """
    aug = DataAugmentationDINO(
        tuple(cfg.crops.global_crops_scale), tuple(cfg.crops.local_crops_scale), cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size, local_crops_size=cfg.crops.local_crops_size,
        blur_kernel_size=cfg.crops.blur_kernel_size, blur_probabilities=tuple(cfg.crops.blur_probabilities),
        color_jitter=tuple(cfg.crops.color_jitter), color_jitter_probability=cfg.crops.color_jitter_probability,
        grayscale_probability=cfg.crops.grayscale_probability, normalize=False,
    )
    return ImageFolderDataset(resolve_dataset_root(cfg), transform=aug, index_cache_dir=index_cache_dir)


def build_train_loader(cfg: DictConfig, rank: int, world_size: int, start_position: int,
                       dataset: ImageFolderDataset | None = None) -> tuple[DataLoader, int]:
    """Infinite loader of this rank's micro-batches, resuming at `start_position` of the global stream."""
    dataset = dataset if dataset is not None else build_train_dataset(cfg)
    batch = cfg.train.batch_size_per_gpu
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    collate = GlobalMaskCollator(batch * world_size, grid * grid, grid, cfg.ibot.mask_ratio_min_max,
                                 cfg.ibot.mask_sample_probability, cfg.train.seed, origin=start_position)
    sampler = PositionedSampler(len(dataset), cfg.train.seed, rank, world_size, start_position)
    loader = DataLoader(
        SeededSamples(dataset, cfg.train.seed), batch_size=batch, sampler=sampler, collate_fn=collate,
        num_workers=cfg.train.num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=cfg.train.num_workers > 0,
    )
    return loader, len(dataset)


def first_sample(cfg: DictConfig, dataset: ImageFolderDataset, rank: int, world_size: int, start_position: int):
    """Decode this rank's next sample now, so an unusable dataset fails before any model is built."""
    sampler = PositionedSampler(len(dataset), cfg.train.seed, rank, world_size, start_position)
    return SeededSamples(dataset, cfg.train.seed)[next(iter(sampler))]


CROP_KEYS = ("collated_global_crops", "collated_local_crops")


def to_device(batch: dict, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """The batch on `device`, its uint8 crops normalised there (the same values as normalising in the workers)."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for key in CROP_KEYS:
        if key in moved and moved[key].dtype == torch.uint8:
            moved[key] = normalize_pixels(moved[key], mean, std)
    return moved

