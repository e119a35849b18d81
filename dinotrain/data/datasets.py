"""Image-folder dataset that tolerates bad files, and the one image decoder behind it.

A long pretraining run should not die hours in because one JPEG in a million is truncated, so a
file that cannot be decoded is logged and returned as ``None``; training replaces it by another
image of the sample stream and counts it (:class:`dinotrain.data.loader.SeededSamples`), feature
extraction drops it (:func:`dinotrain.eval.features.extract_features`).

Every consumer of image files (training, k-NN features, ``dinotrain embed``) decodes through
:func:`load_rgb`, which never turns a valid image silently white or black: PIL's ``convert("RGB")``
clips 16-bit and float pixels instead of scaling them, so those are scaled here (or refused).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinotrain.data.index import IMAGE_EXTENSIONS, UNLABELED, build_or_load_index, is_image_file

__all__ = [
    "IMAGE_EXTENSIONS", "UNLABELED", "ImageDecodeError", "ImageFolderDataset", "ImageTooLargeError",
    "is_image_file", "load_rgb", "to_rgb",
]

logger = logging.getLogger("dinotrain.data")

_UINT16_MAX = 65535


class ImageDecodeError(ValueError):
    """An image that decodes but cannot be made 8-bit RGB without guessing; the message names file, mode, why."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than PIL's decompression-bomb limit accepts (2 x ``PIL.Image.MAX_IMAGE_PIXELS``)."""


# ---- decoding ----------------------------------------------------------------------------------------
def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncation errors surface here) and convert it to 8-bit RGB.

    High-bit-depth pixels are scaled, not clipped (see :func:`to_rgb`); images PIL refuses as
    decompression bombs raise :class:`ImageTooLargeError` saying so.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(_too_large_message(path, exc)) from exc


def _too_large_message(path: Path, exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = found.group(1) if found else "an unknown number of"
    limit = Image.MAX_IMAGE_PIXELS
    return (
        f"too large: {pixels} pixels > limit {2 * limit} (2 x PIL.Image.MAX_IMAGE_PIXELS = {limit}, PIL's "
        f"decompression-bomb guard) in {path}; downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if "
        "you trust the file"
    )


def to_rgb(img: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """8-bit RGB from any PIL mode, scaling what ``convert("RGB")`` would clip.

    * 16-bit integers (``I;16``, ``I;16B``, ...): value >> 8 (the top 8 of 16 bits).
    * 32-bit integers (``I``): read as 16-bit when every value lies in [0, 65535], else refused.
    * floats (``F``): values in [0, 1] become round(255 * value); any other range (or NaN/inf) is
      refused, since it has no agreed meaning (HDR, depth, raw counts) and min-max scaling would
      change the image's brightness per file.
    * anything else (L, LA, P, RGBA, CMYK, 1, ...): PIL's ``convert("RGB")``, which is exact there.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        return _gray8_to_rgb(_int_to_8bit(np.asarray(img), img.mode, path))
    if img.mode == "F":
        return _gray8_to_rgb(_float_to_8bit(np.asarray(img), path))
    return img.convert("RGB")


def _gray8_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")  # a 2-D uint8 array is mode L


def _int_to_8bit(values: np.ndarray, mode: str, path) -> np.ndarray:
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0 or hi > _UINT16_MAX:
        raise ImageDecodeError(
            f"cannot read {path}: integer image (PIL mode {mode}) with values in [{lo}, {hi}]; only 0..65535 "
            "(16-bit) is supported: save it as 8- or 16-bit unsigned integers"
        )
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def _float_to_8bit(values: np.ndarray, path) -> np.ndarray:
    finite = bool(np.isfinite(values).all())
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not finite or lo < 0.0 or hi > 1.0:
        what = "non-finite values (NaN or inf)" if not finite else f"values in [{lo:g}, {hi:g}]"
        raise ImageDecodeError(
            f"cannot read {path}: float image (PIL mode F) with {what}; only [0, 1] has an agreed meaning "
            "(read as 0..255): scale it to [0, 1] or save it as 8- or 16-bit integers"
        )
    return np.rint(values * 255.0).astype(np.uint8)


# ---- dataset -----------------------------------------------------------------------------------------
class ImageFolderDataset(Dataset):
    """Images under `root`, labelled by class subfolder or unlabelled.

    * Labelled (ImageFolder layout): every visible subfolder of `root` holding at least one image
      (at any depth) is a class; labels are indices into the sorted class names. Images lying
      directly in `root` next to class folders are ignored with a warning.
    * Unlabelled (flat folder): `root` has no subfolder with images; every image gets label -1.

    The file list is a compact, cached :class:`~dinotrain.data.index.ImageIndex` (see
    :func:`~dinotrain.data.index.build_or_load_index` for where the cache goes; `index_cache_dir`
    is the fallback when the data's parent folder is not writable). ``path(i)`` and ``label(i)``
    describe sample i, `classes` holds the sorted class names (empty when unlabelled) and `targets`
    all labels. ``dataset[i]`` is ``(transform(rgb_image), label)``, or ``None`` when the file
    cannot be decoded (a warning saying why is logged on logger ``dinotrain.data``).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 index_cache_dir: Optional[str | os.PathLike] = None):
        self.root = Path(root).expanduser()
        self.transform = transform
        self.index = build_or_load_index(self.root, index_cache_dir)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def targets(self) -> np.ndarray:
        """Labels in sample order, int64 (torchvision-compatible name; -1 when unlabelled)."""
        return self.index.labels.astype(np.int64)

    def path(self, index: int) -> Path:
        return self.index.path(index)

    def label(self, index: int) -> int:
        return self.index.label(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int):
        path, label = self.index.path(index), self.index.label(index)
        try:
            image = load_rgb(path)
        except ImageDecodeError as exc:  # the message says why (too large, unsupported pixel range)
            logger.warning("skipping image %s: %s", path, exc)
            return None
        except Exception as exc:  # any decoder failure: skip this sample, keep the run alive
            logger.warning("skipping unreadable image %s: %s: %s", path, type(exc).__name__, exc)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, {kind})"
