"""Image-folder dataset that tolerates bad files.

A long pretraining run should not die hours in because one JPEG in a million is truncated, so a
file that cannot be decoded is logged and returned as ``None``; the collate function drops it and
counts it (see :func:`dinotrain.data.collate.collate_data_and_cast`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional

from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("dinotrain.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
UNLABELED = -1


def is_image_file(name: str) -> bool:
    """True for a visible file name with an accepted image extension (any letter case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _find_images(folder: Path) -> list[Path]:
    """Image files under `folder` at any depth, sorted so indices are stable across runs and ranks.

    Hidden files and folders (dot names) are skipped, so a cache's marker or temporary build
    folders never leak into the data. Symlinked folders are followed (common for ImageNet setups).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(found)


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so truncation errors surface here) and convert it to RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images under `root`, labelled by class subfolder or unlabelled.

    * Labelled (ImageFolder layout): every visible subfolder of `root` holding at least one image
      (at any depth) is a class; labels are indices into the sorted class names. Images lying
      directly in `root` next to class folders are ignored with a warning.
    * Unlabelled (flat folder): `root` has no subfolder with images; every image gets label -1.

    `samples` is the list of ``(path, label)`` and `classes` the sorted class names (empty when
    unlabelled). ``dataset[i]`` is ``(transform(rgb_image), label)``, or ``None`` when the file
    cannot be decoded (a warning is logged on logger ``dinotrain.data``).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None):
        self.root = Path(root).expanduser()
        self.transform = transform
        if not self.root.exists():
            raise FileNotFoundError(
                f"dataset folder does not exist: {self.root} (set train.dataset_path to an existing "
                "image folder, or to `tiny` for the built-in dataset)"
            )
        if not self.root.is_dir():
            raise ValueError(f"dataset path is not a folder: {self.root} (point it at a folder of images)")
        self.classes, self.samples = self._scan()
        if not self.samples:
            raise ValueError(
                f"no images found under {self.root} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}, "
                "any letter case; put images in class subfolders or directly in the folder)"
            )

    def _scan(self) -> tuple[list[str], list[tuple[str, int]]]:
        per_class = [(d.name, _find_images(d)) for d in _visible_subdirs(self.root)]
        per_class = [(name, images) for name, images in per_class if images]
        loose = sorted(p for p in self.root.iterdir() if p.is_file() and is_image_file(p.name))
        if not per_class:
            return [], [(str(p), UNLABELED) for p in loose]
        if loose:
            logger.warning(
                "ignoring %d image(s) directly in %s: the folder has class subfolders, so only images "
                "inside them are used",
                len(loose),
                self.root,
            )
        classes = [name for name, _ in per_class]
        samples = [(str(p), label) for label, (_, images) in enumerate(per_class) for p in images]
        return classes, samples

    @property
    def targets(self) -> list[int]:
        """Labels in sample order (torchvision-compatible name; -1 when unlabelled)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_rgb(Path(path))
        except Exception as exc:  # any decoder failure: skip this sample, keep the run alive
            logger.warning("skipping unreadable image %s: %s: %s", path, type(exc).__name__, exc)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, {kind})"
