"""Built-in tiny labelled dataset of real images, generated offline in about a second.

Smoke tests, CI and the quick-start need real images with real labels (so k-NN / linear probes
mean something) without any download. scikit-learn bundles 1797 8x8 handwritten digits; each is
upsampled smoothly, placed at a random scale and position on a canvas, and painted with random
foreground/background colours, so random crops, flips and colour jitter actually change the input.
Everything is derived from `seed`, so the same parameters always give byte-identical files.

`kind="shapes"` writes the second built-in dataset instead (:mod:`dinotrain.data.shapes`: ten vector
shapes, painted the same way), so a recipe can be checked on data it was not tuned on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

MARKER_NAME = ".dinotrain_tiny.json"
_LOCK_NAME = ".dinotrain_tiny.lock"
_BUILD_PREFIX = ".build-"
_FORMAT_VERSION = 2  # 2: light digits on dark backgrounds with a mild tint
_SCALE_RANGE = (0.6, 1.0)  # digit side as a fraction of the canvas side
_TINT = 24.0  # per-channel colour offset (0-255): no more than colour jitter changes
_SPLITS = ("train", "val")
KINDS = ("digits", "shapes")
_SHAPES_PER_CLASS = 180  # 1800 images, as many as the digits (1797)
_SHAPES_VERSION = 1


def default_tiny_root(kind: str = "digits") -> Path:
    """Cache folder of a tiny dataset: ``$DINOTRAIN_DATA/tiny`` or ``~/.cache/dinotrain/tiny`` (``tiny-shapes``
    for the shapes)."""
    name = "tiny" if _check_kind(kind) == "digits" else f"tiny-{kind}"
    base = os.environ.get("DINOTRAIN_DATA")
    if base:
        return Path(base).expanduser() / name
    return Path.home() / ".cache" / "dinotrain" / name


def ensure_tiny_dataset(
    root: Optional[str | os.PathLike] = None, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0,
    kind: str = "digits",
) -> Path:
    """The tiny dataset's root, generated first if not already there.

    Train on ``root / "train"`` and evaluate on ``root / "val"`` (the root itself holds both).
    """
    return make_tiny_dataset(default_tiny_root(kind) if root is None else root, image_size, val_fraction, seed, kind)


def make_tiny_dataset(
    root: str | os.PathLike, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0, kind: str = "digits"
) -> Path:
    """Write ``root/{train,val}/<digit>/<index>.png`` (RGB, `image_size` square) and return `root`.

    Idempotent: a complete dataset with the same parameters is left as it is; other parameters
    rewrite it. The marker file is written last, so an interrupted generation is never taken for a
    complete one. A file lock makes concurrent callers (several ranks on one node) safe.
    """
    params = _validated_params(image_size, val_fraction, seed, kind)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if _is_complete(root, params):
            return root
        _claim_and_clear(root, params)
        counts = _generate(root, params)
        _write_marker(root, {"params": params, "counts": counts, "complete": True})
    return root


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"tiny dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def _validated_params(image_size: int, val_fraction: float, seed: int, kind: str = "digits") -> dict:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 (the digits are 8x8), got {image_size!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if _check_kind(kind) == "shapes":
        return {"version": _SHAPES_VERSION, "source": "dinotrain.data.shapes", "image_size": image_size,
                "val_fraction": float(val_fraction), "seed": seed}
    return {
        "version": _FORMAT_VERSION,
        "source": "sklearn.datasets.load_digits",
        "image_size": image_size,
        "val_fraction": float(val_fraction),
        "seed": seed,
    }


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on `root` while checking/generating (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / _LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(root: Path, content: dict) -> None:
    tmp = root / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
    os.replace(tmp, root / MARKER_NAME)


def _count_pngs(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.png")) if folder.is_dir() else 0


def _is_complete(root: Path, params: dict) -> bool:
    marker = _read_marker(root)
    if not marker or not marker.get("complete") or marker.get("params") != params:
        return False
    counts = marker.get("counts", {})
    return all(_count_pngs(root / split) == counts.get(split, -1) for split in _SPLITS)


def _claim_and_clear(root: Path, params: dict) -> None:
    """Remove a stale/incomplete tiny dataset, refusing to delete folders dinotrain did not write."""
    foreign = [root / split for split in _SPLITS if (root / split).exists()]
    if foreign and _read_marker(root) is None:
        raise ValueError(
            f"{root} already holds {', '.join(p.name for p in foreign)}/ without the marker file "
            f"{MARKER_NAME}, so it was not written by dinotrain; refusing to overwrite it. Choose an "
            "empty folder for the tiny dataset, or delete those folders."
        )
    # Claim the folder before deleting anything, so an interruption from here on leaves a
    # marker that says "ours, incomplete" and the next call can safely clean up.
    _write_marker(root, {"params": params, "complete": False})
    for path in [root / split for split in _SPLITS] + list(root.glob(_BUILD_PREFIX + "*")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _split_indices(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean "is validation" per image: a deterministic, per-class (stratified) random split."""
    is_val = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = min(max(int(round(len(members) * val_fraction)), 1), len(members) - 1)
        is_val[rng.permutation(members)[:n_val]] = True
    return is_val


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A light foreground on a dark background, both with a mild random tint.

    Colour stays a weak cue on purpose: strongly coloured images would let self-supervised
    training match views by colour (which the augmentations barely change) instead of by shape.
    """
    fg = rng.uniform(190, 255) + rng.uniform(-_TINT, _TINT, size=3)
    bg = rng.uniform(0, 70) + rng.uniform(-_TINT, _TINT, size=3)
    return np.clip(fg, 0, 255), np.clip(bg, 0, 255)


def _render(digit: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit (values 0-16) as a `size` x `size` RGB image at random scale/position/colours."""
    side = max(8, int(round(size * rng.uniform(*_SCALE_RANGE))))
    top, left = rng.integers(0, size - side + 1, size=2)
    fg, bg = _colours(rng)
    ink = Image.fromarray(np.round(digit * (255.0 / 16.0)).astype(np.uint8))
    ink = np.asarray(ink.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    alpha = np.zeros((size, size))
    alpha[top : top + side, left : left + side] = ink
    pixels = bg + alpha[..., None] * (fg - bg)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _source(params: dict) -> tuple:
    """(one item per image to render, labels, render(item, size, rng) -> image, class folder name of a label)."""
    if params["source"] == "dinotrain.data.shapes":
        from dinotrain.data.shapes import CLASSES, render_shape

        labels = np.repeat(np.arange(len(CLASSES)), _SHAPES_PER_CLASS)

        def render_one(label, size, rng):
            fg, bg = _colours(rng)
            return render_shape(int(label), size, rng, fg, bg)

        return labels, labels, render_one, lambda label: CLASSES[label]
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return digits.images, digits.target, _render, str


def _generate(root: Path, params: dict) -> dict:
    """Render every image into a hidden build folder, then move `train/` and `val/` into place."""
    seed = params["seed"]
    items, labels, render, folder_name = _source(params)
    is_val = _split_indices(labels, params["val_fraction"], np.random.default_rng([seed, 0]))
    render_rng = np.random.default_rng([seed, 1])
    build = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=root))
    try:
        counts = {split: 0 for split in _SPLITS}
        for index, (item, label, val) in enumerate(zip(items, labels, is_val)):
            split = "val" if val else "train"
            folder = build / split / folder_name(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            render(item, params["image_size"], render_rng).save(folder / f"{index:04d}.png")
            counts[split] += 1
        for split in _SPLITS:
            os.replace(build / split, root / split)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return counts
