"""Batch multi-crop samples and draw the iBOT masks, as the official DINOv2 collate does.

Masks are drawn here (in the DataLoader workers) rather than in the training step, so the
accelerator never waits on the Python block-masking loop.
"""

from __future__ import annotations

import os
import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dinotrain.data.masking import Rng, default_rng, rng_shuffle, rng_uniform


def stack_views(samples: list, key: str) -> torch.Tensor:
    """View 0 of every image, then view 1 of every image, ... as one (views * B, C, H, W) tensor."""
    crops = [sample[0][key] for sample in samples]
    n_views = len(crops[0])
    if any(len(c) != n_views for c in crops):
        raise ValueError(f"every sample in a batch must have the same number of {key}")
    if n_views == 0:
        first = samples[0][0]["global_crops"][0]
        return torch.empty((0, first.shape[0], 0, 0), dtype=first.dtype)
    return torch.stack([c[view] for view in range(n_views) for c in crops])


def mask_targets(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the masked patches, and each one's iBOT weight 1 / (masked patches of its image)."""
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    return mask_indices, (1.0 / per_image).expand_as(masks)[masks]


def mask_counts(n_images: int, mask_ratio_tuple: Sequence[float], mask_probability: float, n_tokens: int,
                rng: Rng) -> list[int]:
    """Masked-patch count of each of `n_images` crops, the plan of :func:`draw_masks` without the masks.

    The first ``int(n_images * mask_probability)`` crops get ratios spread evenly over `mask_ratio_tuple`
    (one draw per equal-width bin), the others 0; the order is then shuffled. Cheap (no block masks), so
    every rank can draw the plan of the whole global batch and make the masks of its own crops only.
    """
    n_masked = int(n_images * mask_probability)
    probs = np.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked + 1)
    counts = [int(n_tokens * rng_uniform(rng, probs[i], probs[i + 1])) for i in range(n_masked)]
    counts += [0] * (n_images - n_masked)
    rng_shuffle(rng, counts)
    return counts


def draw_masks(
    n_images: int,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: Callable,
    rng: Optional[Rng] = None,
) -> tuple[torch.Tensor, int]:
    """(n_images, n_tokens) bool masks and the official upper bound on their True count.

    The first ``int(n_images * mask_probability)`` images get masking ratios spread evenly over
    `mask_ratio_tuple` (one draw per equal-width bin); the others get empty masks; the order is
    then shuffled so which crop is masked is random.
    """
    draw_rng = rng if rng is not None else default_rng()
    extra = {} if rng is None else {"rng": rng}
    n_masked = int(n_images * mask_probability)
    probs = np.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked + 1)
    masks, upperbound = [], 0
    for i in range(n_images):
        count = 0
        if i < n_masked:
            count = int(n_tokens * rng_uniform(draw_rng, probs[i], probs[i + 1]))
            upperbound += int(n_tokens * probs[i + 1])
        mask = torch.from_numpy(np.asarray(mask_generator(count, **extra), dtype=bool)).flatten()
        if mask.numel() != n_tokens:
            raise ValueError(
                f"mask_generator gives masks of {mask.numel()} patches but n_tokens={n_tokens}; "
                "build it with input_size = crop size // patch size"
            )
        masks.append(mask)
    rng_shuffle(draw_rng, masks)
    return torch.stack(masks), upperbound




def collate_data_and_cast(
    samples_list: list,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: Callable,
    dtype: torch.dtype = torch.float32,
    rng: Optional[Rng] = None,
) -> Optional[dict]:
    """Collate ``(crops_dict, label)`` samples (``None`` = unreadable image, dropped) into a batch.

    With B kept images, N local crops each and T = `n_tokens` patches per global crop:

    * ``collated_global_crops`` (2B, 3, H, W) in `dtype`: view 0 of all images, then view 1.
    * ``collated_local_crops`` (N*B, 3, h, w) in `dtype`, same order; when N == 0 an empty
      tensor of shape (0, 3, 0, 0) (its spatial size is unknown without a crop).
    * ``collated_masks`` (2B, T) bool; ``mask_indices_list`` flat indices of its True entries;
      ``masks_weight`` 1 / (masked patches of its image) per masked patch, so each masked
      image weighs 1 in total; ``n_masked_patches`` (1,) long; ``upperbound`` int.
    * ``labels`` (B,) long; ``n_skipped`` how many ``None`` samples were dropped.

    Returns ``None`` when every sample was ``None``. `rng` (random.Random or numpy Generator)
    makes the masks reproducible; it is also passed to `mask_generator` as ``rng=``.
    """
    kept = [s for s in samples_list if s is not None]
    n_skipped = len(samples_list) - len(kept)
    if not kept:
        return None
    global_crops = stack_views(kept, "global_crops")
    local_crops = stack_views(kept, "local_crops")
    masks, upperbound = draw_masks(
        len(global_crops), mask_ratio_tuple, mask_probability, n_tokens, mask_generator, rng
    )
    mask_indices, masks_weight = mask_targets(masks)
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long),
        "labels": torch.tensor([int(s[1]) for s in kept], dtype=torch.long),
        "n_skipped": n_skipped,
    }


class DataCollator:
    """Picklable ``collate_fn`` for a DataLoader: `collate_data_and_cast` with fixed arguments.

    With `seed` set, masks come from a `random.Random` seeded by (seed, DataLoader worker id),
    created afresh in each process, so workers draw different but reproducible masks. Without it,
    the per-process default generator of `dinotrain.data.masking` is used (seeded by torch).
    A worker's stream restarts with the worker, so for masks that survive a resume exactly, seed
    an rng per global batch and call `draw_masks` / `collate_data_and_cast` with it instead.
    """

    def __init__(
        self,
        mask_ratio_tuple: Sequence[float],
        mask_probability: float,
        n_tokens: int,
        mask_generator: Callable,
        dtype: torch.dtype = torch.float32,
        seed: Optional[int] = None,
    ):
        low, high = (float(v) for v in mask_ratio_tuple)
        if not 0 <= low <= high <= 1:
            raise ValueError(f"mask_ratio_tuple must satisfy 0 <= min <= max <= 1, got {mask_ratio_tuple!r}")
        if not 0 <= mask_probability <= 1:
            raise ValueError(f"mask_probability must be between 0 and 1, got {mask_probability!r}")
        self.mask_ratio_tuple = (low, high)
        self.mask_probability = float(mask_probability)
        self.n_tokens = n_tokens
        self.mask_generator = mask_generator
        self.dtype = dtype
        self.seed = seed
        self._rng: Optional[random.Random] = None
        self._rng_pid: Optional[int] = None

    def _process_rng(self) -> Optional[random.Random]:
        if self.seed is None:
            return None
        if self._rng is None or self._rng_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            worker_id = -1 if worker is None else worker.id
            self._rng = random.Random(f"dinotrain-collate:{self.seed}:{worker_id}")
            self._rng_pid = os.getpid()
        return self._rng

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rng"], state["_rng_pid"] = None, None  # each process starts its own stream
        return state

    def __call__(self, samples_list: list) -> Optional[dict]:
        return collate_data_and_cast(
            samples_list,
            self.mask_ratio_tuple,
            self.mask_probability,
            self.n_tokens,
            self.mask_generator,
            dtype=self.dtype,
            rng=self._process_rng(),
        )
