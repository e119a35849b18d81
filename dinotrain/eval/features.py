"""CLS features of a backbone over an image folder (what k-NN and linear evaluation consume).

Labels are positions in a label space of class *names*. Train and val folders are separate
ImageFolders whose folder-local indices disagree as soon as their class sets differ (a val folder
lacking one class shifts every later index), so evaluation maps val classes onto the train
folder's classes by name: :func:`shared_label_space`, then ``extract_features(..., classes=...)``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import ImageFolderDataset

log = logging.getLogger("dinotrain.eval")

# The DINO / DINOv2 evaluation protocol (official `make_classification_eval_transform`): shorter side
# resized to 256 bicubic, centre crop 224, ImageNet mean/std. Other crop sizes keep the 256/224 ratio.
PROTOCOL_CROP = 224
PROTOCOL_RESIZE = 256


TINY_CROP = 32  # the built-in tiny dataset's images are 32x32 (resize 37, crop 32: the same ratio)


def protocol_resize(crop_size: int) -> int:
    """Shorter-side resize that goes with `crop_size` in the protocol: round(crop * 256 / 224) (224 -> 256)."""
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size <= 0:
        raise ValueError(f"--image-size (the centre-crop side in pixels) must be a positive integer, got {crop_size!r}")
    return max(crop_size, round(crop_size * PROTOCOL_RESIZE / PROTOCOL_CROP))


def eval_sizes(image_size: Optional[int] = None, tiny: bool = False) -> tuple[int, int]:
    """(resize, crop) of the evaluation transform: crop `image_size`, else 32 for the tiny dataset, else 224."""
    crop = image_size if image_size is not None else (TINY_CROP if tiny else PROTOCOL_CROP)
    return protocol_resize(crop), crop


def pick_eval_device(requested: str | None = "auto") -> torch.device:
    """The device evaluation runs on: `auto` (or None) = CUDA when available, else CPU; or `cpu` / `cuda`."""
    requested = requested or "auto"
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(requested)


class UnknownClassError(ValueError):
    """Class folders of an evaluation folder that the training folder lacks (never predictable)."""


def _collate_skip_unreadable(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _unknown_message(unknown: Sequence[str], root, classes: Sequence[str], classes_from) -> str:
    source = f"the training folder {classes_from}" if classes_from is not None else "the given class list"
    shown = ", ".join(repr(c) for c in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    return (
        f"class folder(s) {shown} under {root} are not classes of {source} ({len(classes)} classes): "
        "their images could never be classified correctly; remove them from the evaluation folder or add "
        "them to the training folder"
    )


def label_map(folder_classes: Sequence[str], classes: Sequence[str], root, classes_from=None) -> np.ndarray:
    """For each class of a folder (by position), its index in `classes`, matched by name.

    Raises UnknownClassError naming every folder class missing from `classes` (and both folders).
    """
    position = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folder_classes if name not in position]
    if unknown:
        raise UnknownClassError(_unknown_message(unknown, root, classes, classes_from))
    return np.array([position[name] for name in folder_classes], dtype=np.int64)


def shared_label_space(train_root: str | os.PathLike, val_root: str | os.PathLike,
                       index_cache_dir: Optional[str | os.PathLike] = None) -> list[str]:
    """The training folder's class names, after checking every val class is one of them (before any work).

    A val folder lacking some training classes is fine; a val class the training folder lacks is an
    UnknownClassError naming it and both folders.
    """
    classes = ImageFolderDataset(train_root, index_cache_dir=index_cache_dir).classes
    val_classes = ImageFolderDataset(val_root, index_cache_dir=index_cache_dir).classes
    for root, found in ((train_root, classes), (val_root, val_classes)):
        if not found:
            raise ValueError(f"k-NN evaluation needs labelled images (class subfolders): {root} has none")
    label_map(val_classes, classes, val_root, classes_from=train_root)
    return classes


def _call(model, images):
    return model(images)


@torch.inference_mode()
def extract_features(model: torch.nn.Module, root: str | os.PathLike, image_size: int, batch_size: int = 64,
                     num_workers: int = 0, device: torch.device | None = None,
                     classes: Optional[Sequence[str]] = None,
                     index_cache_dir: Optional[str | os.PathLike] = None,
                     resize_size: Optional[int] = None, forward=None) -> tuple:
    """(features (N, D) float32, labels (N,)) for the images under `root`, resized and center-cropped.

    `forward(model, images)` picks what is kept of each batch (default: `model(images)`, the CLS features); when
    it returns a tuple of tensors, the features are that tuple, each concatenated over the batches.

    `image_size` is the centre-crop side; the shorter side is first resized (bicubic) to `resize_size`,
    by default :func:`protocol_resize` of it (224 -> 256, the DINO protocol). Runs on `device`, by
    default the model's; features come back on the CPU.

    Labels index `classes` (class names, matched to `root`'s class folders by name; e.g. the training
    folder's classes from :func:`shared_label_space`), or `root`'s own sorted classes when None.
    Unlabelled images keep label -1.
    """
    device = device or next(model.parameters()).device
    resize_size = protocol_resize(image_size) if resize_size is None else resize_size
    transform = make_eval_transform(resize_size=resize_size, crop_size=image_size)
    dataset = ImageFolderDataset(root, transform=transform, index_cache_dir=index_cache_dir)
    to_label_space = None
    if classes is not None and dataset.classes:
        to_label_space = torch.from_numpy(label_map(dataset.classes, classes, root))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_skip_unreadable)
    feats, labels = [], []
    model.eval()
    start = time.perf_counter()
    for batch in loader:
        if batch is None:
            continue
        images, y = batch
        out = (forward or _call)(model, images.to(device, non_blocking=True))
        feats.append(tuple(o.float().cpu() for o in out) if isinstance(out, tuple) else out.float().cpu())
        labels.append(y if to_label_space is None else to_label_space[y])
    if not feats:
        raise ValueError(f"no readable images under {root}")
    joined = tuple(map(torch.cat, zip(*feats))) if isinstance(feats[0], tuple) else torch.cat(feats)
    out = joined, torch.cat(labels)
    log.info("features of %d images from %s in %.1f s", len(out[1]), root, time.perf_counter() - start)
    return out
