"""Batch this rank's multi-crop samples and draw their iBOT masks, as the official DINOv2 collate does.

Masks are drawn here (in the DataLoader workers) rather than in the training step, so the
accelerator never waits on the Python block-masking loop; each is seeded by its place in the global
batch (see :class:`GlobalMaskCollator`), so a batch is the same on any number of ranks and after a resume.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from dinotrain.data.masking import MaskingGenerator, Rng, rng_shuffle, rng_uniform
from dinotrain.data.seeds import mix_seed


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
    """Masked-patch count of each of `n_images` crops, the plan of a batch's iBOT masks.

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
                 seed: int, origin: int = 0, patch_size: int | None = None):
        self.global_batch, self.n_tokens, self.seed, self.origin = global_batch, n_tokens, seed, origin
        self.mask_ratio_tuple, self.mask_probability = tuple(mask_ratio_tuple), mask_probability
        # With `patch_size`, the mask grid of each batch comes from its global crops' side (the high-res stage
        # mixes sizes); without it, every batch has `grid`.
        self.grid, self.patch_size = grid, patch_size
        self.mask_generators: dict[int, MaskingGenerator] = {}
        self.mask_generator = self._mask_generator(grid) if patch_size is None else None

    def _mask_generator(self, grid: int) -> MaskingGenerator:
        if grid not in self.mask_generators:  # as official train.py
            self.mask_generators[grid] = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
        return self.mask_generators[grid]

    def _mask(self, batch_start: int, crop: int, count: int, grid: int) -> torch.Tensor:
        rng = random.Random(mix_seed(self.seed, batch_start, 6, crop))
        generate = self.mask_generator if self.patch_size is None else self._mask_generator(grid)
        return torch.from_numpy(np.asarray(generate(count, rng=rng), dtype=bool)).flatten()

    def __call__(self, items: list) -> dict:
        offsets = [p - self.origin for p, _, _ in items]
        step = offsets[0] // self.global_batch
        assert all(o // self.global_batch == step for o in offsets), "a batch must not straddle global batches"
        batch_start = self.origin + step * self.global_batch  # a global batch is named by its first sample
        samples = [s for _, s, _ in items]
        global_crops = stack_views(samples, "global_crops")
        grid = self.grid if self.patch_size is None else global_crops.shape[-1] // self.patch_size
        n_tokens = self.n_tokens if self.patch_size is None else grid * grid
        counts = mask_counts(2 * self.global_batch, self.mask_ratio_tuple, self.mask_probability, n_tokens,
                             random.Random(mix_seed(self.seed, batch_start, 4)))
        slots = [(p - self.origin) % self.global_batch for p, _, _ in items]
        crops = [v * self.global_batch + j for v in range(2) for j in slots]
        masks = torch.stack([self._mask(batch_start, c, counts[c], grid) for c in crops])
        mask_indices, masks_weight = mask_targets(masks)
        gram = {"collated_gram_teacher_crops": stack_views(samples, "gram_teacher_crops")} \
            if "gram_teacher_crops" in samples[0][0] else {}
        return {
            "collated_global_crops": global_crops,
            "collated_local_crops": stack_views(samples, "local_crops"),
            **gram,
            "collated_masks": masks,
            "mask_indices_list": mask_indices,
            "masks_weight": masks_weight,
            "labels": torch.tensor([s[1] for s in samples], dtype=torch.long),
            "n_skipped": sum(n for _, _, n in items),
        }
