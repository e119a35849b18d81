"""The training data loader: batches that are a pure function of (seed, global sample position).

Each sample's augmentations are seeded by its position in the global sample stream, and each
global batch's iBOT masks by the batch index, so a batch does not depend on the number of
processes, DataLoader workers, or whether the run was interrupted. This is what makes resume exact,
also onto another world size, and a 2-process run take the same steps as a 1-process run.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from dinotrain.data.augmentations import (IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO,
                                          MultiResolutionAugmentation)
from dinotrain.data.collate import GlobalMaskCollator
from dinotrain.data.datasets import ImageFolderDataset
from dinotrain.data.photometric import normalize_pixels
from dinotrain.data.resolutions import ResolutionPlan, crop_size_options
from dinotrain.data.samplers import InfiniteShardedSampler
from dinotrain.data.seeds import mix_seed
from dinotrain.data.tiny import ensure_tiny_dataset

log = logging.getLogger("dinotrain.data")


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


class DataWorkersDied(RuntimeError):
    """DataLoader workers died again and again in a short time (most likely the out-of-memory killer)."""


class SeededSamples(Dataset):
    """Wraps a dataset: item (position, index) -> (position, sample, n_replaced) with seeded randomness.

    An unreadable image is replaced by another image drawn from (seed, position, attempt), so every
    rank's batch stays full (cross-rank ops such as the global KoLeo see equal sizes) and the
    replacement is the same after a resume or on another world size. `n_replaced` counts the
    unreadable images skipped for this position.
    """

    def __init__(self, dataset: Dataset, seed: int, max_attempts: int = 64, plan: ResolutionPlan | None = None):
        self.dataset, self.seed, self.max_attempts, self.plan = dataset, seed, max_attempts, plan

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        if self.plan is not None:  # the high-res stage: this sample gets the sizes of its global batch
            self.dataset.transform.select(self.plan.index_at(position))  # type: ignore[attr-defined]
        for attempt in range(self.max_attempts):
            if attempt:
                index = mix_seed(self.seed, position, 5, attempt) % len(self)
            salt = (attempt,) if attempt else ()  # attempt 0 keeps the stream of a dataset without bad files
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, position, 2, *salt))
                random.seed(mix_seed(self.seed, position, 3, *salt))
                sample = self.dataset[index]
            if sample is not None:
                return position, sample, attempt
        raise UnreadableDatasetError(
            f"{self.max_attempts} images in a row could not be decoded (the log names each file and why); "
            "is train.dataset_path a folder of images this machine can read?")


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
    return ImageFolderDataset(resolve_dataset_root(cfg), transform=build_train_augmentation(cfg),
                              index_cache_dir=index_cache_dir)


def build_train_augmentation(cfg: DictConfig) -> DataAugmentationDINO | MultiResolutionAugmentation:
    """The multi-crop augmentation of `cfg.crops`; with size lists (the high-res stage) one per size tuple."""
    c = cfg.crops
    options, _ = crop_size_options(OmegaConf.to_container(c))
    augs = [DataAugmentationDINO(
        tuple(c.global_crops_scale), tuple(c.local_crops_scale), c.local_crops_number,
        global_crops_size=sizes.global_size, local_crops_size=sizes.local_size,
        blur_kernel_size=c.blur_kernel_size, blur_probabilities=tuple(c.blur_probabilities),
        color_jitter=tuple(c.color_jitter), color_jitter_probability=c.color_jitter_probability,
        grayscale_probability=c.grayscale_probability, normalize=False,
        gram_teacher_crops_size=sizes.gram_size, gram_teacher_no_distortions=c.gram_teacher_no_distortions,
        horizontal_flips=c.horizontal_flips,
    ) for sizes in options]
    return augs[0] if len(augs) == 1 else MultiResolutionAugmentation(augs)


def resolution_plan(cfg: DictConfig, world_size: int, origin: int) -> ResolutionPlan | None:
    """Which size tuple each global batch gets (None with a single one: nothing to choose)."""
    options, ratios = crop_size_options(OmegaConf.to_container(cfg.crops))
    if len(options) == 1:
        return None
    return ResolutionPlan(ratios, cfg.train.seed, cfg.train.batch_size_per_gpu * world_size, origin)


def build_train_loader(cfg: DictConfig, rank: int, world_size: int, start_position: int,
                       dataset: ImageFolderDataset | None = None) -> tuple[DataLoader, int]:
    """Infinite loader of this rank's micro-batches, resuming at `start_position` of the global stream."""
    dataset = dataset if dataset is not None else build_train_dataset(cfg)
    batch = cfg.train.batch_size_per_gpu
    plan = resolution_plan(cfg, world_size, start_position)
    if plan is None:
        grid = cfg.crops.global_crops_size // cfg.student.patch_size
        collate = GlobalMaskCollator(batch * world_size, grid * grid, grid, cfg.ibot.mask_ratio_min_max,
                                     cfg.ibot.mask_sample_probability, cfg.train.seed, origin=start_position)
    else:  # the mask grid follows each batch's global crop size
        collate = GlobalMaskCollator(batch * world_size, 0, 0, cfg.ibot.mask_ratio_min_max,
                                     cfg.ibot.mask_sample_probability, cfg.train.seed, origin=start_position,
                                     patch_size=cfg.student.patch_size)
    sampler = PositionedSampler(len(dataset), cfg.train.seed, rank, world_size, start_position)
    loader = DataLoader(
        SeededSamples(dataset, cfg.train.seed, plan=plan), batch_size=batch, sampler=sampler, collate_fn=collate,
        num_workers=cfg.train.num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=cfg.train.num_workers > 0,
    )
    return loader, len(dataset)


def first_sample(cfg: DictConfig, dataset: ImageFolderDataset, rank: int, world_size: int, start_position: int):
    """Decode this rank's next sample now, so an unusable dataset fails before any model is built."""
    sampler = PositionedSampler(len(dataset), cfg.train.seed, rank, world_size, start_position)
    plan = resolution_plan(cfg, world_size, start_position)
    return SeededSamples(dataset, cfg.train.seed, plan=plan)[next(iter(sampler))]


CROP_KEYS = ("collated_global_crops", "collated_local_crops", "collated_gram_teacher_crops")


def to_device(batch: dict, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """The batch on `device`, its uint8 crops normalised there (the same values as normalising in the workers)."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for key in CROP_KEYS:
        if key in moved and moved[key].dtype == torch.uint8:
            moved[key] = normalize_pixels(moved[key], mean, std)
    return moved



class Batches:
    """This rank's micro-batches, step by step, surviving DataLoader workers that die.

    A worker killed (by the out-of-memory killer, by a signal) ends its DataLoader. A batch depends only on the
    seed and its position in the global sample stream, so a new DataLoader started at the position of the step
    being fetched yields the very batches the old one would have: the run goes on, logged as a warning, and
    ends bitwise equal to an undisturbed one. `max_deaths` deaths within `window_s` seconds stop it instead
    (`DataWorkersDied`), naming the likely cause. PyTorch's SIGCHLD handler, which raises the worker's death
    in the main thread wherever it happens to be (possibly half-way through an optimizer step), is turned off:
    the death is noticed where the next batch is fetched (within `torch.utils.data` 's 5-s status check).
    """

    def __init__(self, make_loader: Callable[[int], DataLoader], position: int, num_workers: int = 0,
                 max_deaths: int = 3, window_s: float = 600.0):
        self.make_loader, self.num_workers = make_loader, num_workers
        self.max_deaths, self.window_s = max_deaths, window_s
        self.deaths: list[float] = []
        self._data = None
        self._start(position)

    def _start(self, position: int) -> None:
        self._data = iter(self.make_loader(position))
        if self.num_workers and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _stop(self) -> None:
        shutdown = getattr(self._data, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        self._data = None

    def next_step(self, accum: int, position: int) -> list[dict]:
        """The `accum` micro-batches of the step that starts at global sample `position`."""
        while True:
            try:
                return [next(self._data) for _ in range(accum)]
            except UnreadableDatasetError as exc:  # from a worker the message carries the worker's traceback
                raise UnreadableDatasetError(
                    str(exc).strip().splitlines()[-1].split("UnreadableDatasetError: ")[-1]) from exc
            except RuntimeError as exc:
                if not worker_died(exc):
                    raise
                self._worker_died(exc, position)

    def _worker_died(self, exc: RuntimeError, position: int) -> None:
        cause = str(exc).strip().splitlines()[0].rstrip(". ")
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < self.window_s] + [now]
        self._stop()
        if len(self.deaths) >= self.max_deaths:
            raise DataWorkersDied(
                f"DataLoader workers died {len(self.deaths)} times within {self.window_s / 60:g} min (last: {cause}): "
                f"most likely out of memory; lower train.num_workers (now {self.num_workers}) or "
                "train.batch_size_per_gpu") from exc
        log.warning("%s: restarting the data loader at sample %d (the same batches follow; %d death(s) within "
                    "%g min, %d stop the run)", cause, position, len(self.deaths), self.window_s / 60, self.max_deaths)
        self._start(position)

    def close(self) -> None:
        self._stop()


def worker_died(exc: BaseException) -> bool:
    """Is this PyTorch's error for a DataLoader worker that ended (killed, or exited) without finishing?"""
    text = str(exc)
    return "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text)


def train_batches(cfg: DictConfig, rank: int, world_size: int, position: int,
                  dataset: ImageFolderDataset | None = None) -> tuple[Batches, int]:
    """`build_train_loader` wrapped in `Batches` (restartable at any position); with the number of images."""
    dataset = dataset if dataset is not None else build_train_dataset(cfg)
    make = lambda at: build_train_loader(cfg, rank, world_size, at, dataset=dataset)[0]  # noqa: E731
    return Batches(make, position, cfg.train.num_workers), len(dataset)
