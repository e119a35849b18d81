"""Builders shared by the data tests, exposed as fixtures (plain modules could clash by name
with helpers of other test folders, which have no __init__.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _write_image(path: Path, size=(24, 20), colour=(200, 30, 30), mode="RGB") -> Path:
    """Write a small solid-colour image (any PIL-supported extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def _fake_sample(label: int, n_local: int = 2, global_size: int = 16, local_size: int = 8, fill=None):
    """A (crops_dict, label) sample whose pixel values encode (label, view) for order checks."""
    value = float(label) if fill is None else fill
    glob = [torch.full((3, global_size, global_size), value + 100.0 * v) for v in range(2)]
    local = [torch.full((3, local_size, local_size), value + 1000.0 * (v + 1)) for v in range(n_local)]
    return {"global_crops": glob, "global_crops_teacher": glob, "local_crops": local, "offsets": ()}, label


def _connected_components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected True regions of a 2-D mask."""
    seen = np.zeros_like(mask, dtype=bool)
    sizes = []
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, size = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    y, x = stack.pop()
                    size += 1
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                sizes.append(size)
    return sizes


@pytest.fixture
def write_image():
    return _write_image


@pytest.fixture
def fake_sample():
    return _fake_sample


@pytest.fixture
def connected_components():
    return _connected_components
