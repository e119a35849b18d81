"""CLS features of a backbone over an image folder (what k-NN and linear evaluation consume)."""

from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader

from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import ImageFolderDataset

log = logging.getLogger("dinotrain.eval")


def _collate_skip_unreadable(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@torch.inference_mode()
def extract_features(model: torch.nn.Module, root: str, image_size: int, batch_size: int = 64,
                     num_workers: int = 0, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) for the images under `root`, resized and center-cropped."""
    device = device or next(model.parameters()).device
    transform = make_eval_transform(resize_size=image_size, crop_size=image_size)
    dataset = ImageFolderDataset(root, transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_skip_unreadable)
    feats, labels = [], []
    model.eval()
    start = time.perf_counter()
    for batch in loader:
        if batch is None:
            continue
        images, y = batch
        feats.append(model(images.to(device)).float().cpu())
        labels.append(y)
    if not feats:
        raise ValueError(f"no readable images under {root}")
    out = torch.cat(feats), torch.cat(labels)
    log.info("features of %d images from %s in %.1f s", len(out[0]), root, time.perf_counter() - start)
    return out
