"""Compact, cached index of an image folder: which files, with which labels, in which order.

ImageNet-22k has ~14 M images. A Python list of ``(path, label)`` tuples costs ~420 B per image,
is rebuilt by every rank and is slowly copied into every DataLoader worker (reference counts write
to its pages). Here the index is a few numpy arrays: one buffer of root-relative paths (file-system
bytes, back to back), their offsets and the labels, i.e. ``len(path) + 12`` bytes per image. It is
saved once as an ``.npz`` file and reused while the folder is unchanged.

Order and layout rules are those of :class:`dinotrain.data.datasets.ImageFolderDataset`: class
folders sorted by name, images sorted as :mod:`pathlib` sorts paths, hidden (dot) files and folders
skipped, symlinked folders followed, extensions matched in any letter case.

Cache rule. The index records the modification time (ns) of every folder it listed: the root and
every visible folder below it. Adding, removing or renaming an entry changes the mtime of the folder
holding it, so the cache is used only when every recorded folder still exists with the same mtime;
otherwise the folder is scanned again and the cache rewritten. A folder whose mtime lies within
``RACY_WINDOW_NS`` of the scan's start is recorded as "unknown" (it could still change within the
same timestamp tick, e.g. 1 s on Lustre), which forces one more scan at the next load. Each
folder's mtime is read before the folder is listed, so a change racing the scan makes the cache
stale, never wrong. Changing a file's content is not noticed (the index holds no content).

Cache location: ``.dinotrain-index-<name>-<hash>.npz`` next to the data folder (in its parent, so
writing it never changes the folder's own mtime), else in the caller's `cache_dir` (e.g. the run
directory) when the parent is not writable, else nowhere (the index is kept in memory only). Files
are written under a unique temporary name and renamed, so processes racing to build the same index
never read a partial file; they may each scan once (let rank 0 build first to avoid that).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

logger = logging.getLogger("dinotrain.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
UNLABELED = -1
FORMAT_VERSION = 1
RACY_WINDOW_NS = 2_000_000_000
UNKNOWN_MTIME = -1


def is_image_file(name: str) -> bool:
    """True for a visible file name with an accepted image extension (any letter case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True, eq=False)
class PackedStrings:
    """Many strings in two arrays: their file-system bytes (``os.fsencode``) back to back, and N+1 offsets.

    Two numpy objects instead of N Python strings: ~8 B of overhead per string instead of ~60, and
    nothing that reference counting writes to when a forked worker reads it.
    """

    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64, offsets[i]:offsets[i + 1] is string i

    @classmethod
    def pack(cls, strings: Sequence[str]) -> "PackedStrings":
        return cls.concat([_chunk(strings)])

    @classmethod
    def concat(cls, chunks: Iterable[tuple[bytes, np.ndarray]]) -> "PackedStrings":
        """Join ``(joined bytes, lengths)`` chunks, built one class folder at a time to keep the peak low."""
        chunks = list(chunks)
        data = np.frombuffer(b"".join(c for c, _ in chunks), dtype=np.uint8)
        lengths = np.concatenate([np.zeros(1, np.int64)] + [n for _, n in chunks])
        return cls(data, np.cumsum(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        i %= n  # negative indices count from the end, as for a list
        return os.fsdecode(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def tolist(self) -> list[str]:
        return [self[i] for i in range(len(self))]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """The images of a folder: root-relative paths, labels (-1 when unlabelled) and class names."""

    root: Path
    classes: list[str]
    paths: PackedStrings
    labels: np.ndarray  # int32
    ignored_loose: int = 0  # images lying next to class folders, not used

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-image arrays (paths, offsets, labels)."""
        return self.paths.nbytes + self.labels.nbytes


class _Stamps:
    """Modification times of the folders a scan listed, each read *before* the folder is listed."""

    def __init__(self, root: Path):
        self.root = root
        self.start_ns = time.time_ns()
        self.dirs: list[str] = []
        self.mtimes: list[int] = []

    def add(self, rel: str) -> None:
        try:
            mtime = os.stat(self.root / rel).st_mtime_ns
        except OSError:
            mtime = UNKNOWN_MTIME
        if mtime >= self.start_ns - RACY_WINDOW_NS:
            mtime = UNKNOWN_MTIME  # may change again within the same timestamp tick: do not trust it
        self.dirs.append(rel)
        self.mtimes.append(mtime)


def _pathlib_order(rel: str) -> list[str]:
    """Sort key equal to how pathlib orders paths (component by component), as the old scan did."""
    return rel.split("/")


def _walk_images(root: Path, top: str, stamps: _Stamps) -> list[str]:
    """Root-relative paths of the images under ``root/top`` at any depth, in pathlib order."""
    found = []
    top_abs = os.path.join(root, top)
    stamps.add(top)
    for dirpath, dirnames, filenames in os.walk(top_abs, followlinks=True):
        rel = top + dirpath[len(top_abs):]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:  # stamped now, listed by os.walk later
            stamps.add(f"{rel}/{d}")
        found.extend(f"{rel}/{f}" for f in filenames if is_image_file(f))
    found.sort(key=_pathlib_order)
    return found


def _list_root(root: Path) -> tuple[list[str], list[str]]:
    """(visible subfolder names, visible image file names) directly in `root`, sorted."""
    subdirs, loose = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subdirs.append(entry.name)
            elif entry.is_file() and is_image_file(entry.name):
                loose.append(entry.name)
    return sorted(subdirs), sorted(loose)


def _chunk(strings: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """(the strings' file-system bytes joined, their lengths): one PackedStrings chunk."""
    encoded = [os.fsencode(s) for s in strings]
    return b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))


def _scan(root: Path) -> tuple[ImageIndex, _Stamps]:
    """List `root` (labelled if some subfolder holds images, else flat) and stamp what was listed."""
    stamps = _Stamps(root)
    stamps.add("")
    subdirs, loose = _list_root(root)
    classes, chunks, counts = [], [], []
    for name in subdirs:
        rels = _walk_images(root, name, stamps)
        if rels:
            classes.append(name)
            chunks.append(_chunk(rels))
            counts.append(len(rels))
    if not classes:
        labels = np.full(len(loose), UNLABELED, dtype=np.int32)
        return ImageIndex(root, [], PackedStrings.pack(loose), labels), stamps
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), counts)
    return ImageIndex(root, classes, PackedStrings.concat(chunks), labels, ignored_loose=len(loose)), stamps


# ---- cache file --------------------------------------------------------------------------------------
def _cache_name(root: Path) -> str:
    key = f"{FORMAT_VERSION}:{root.resolve()}".encode("utf-8", "surrogateescape")
    return f".dinotrain-index-{root.resolve().name or 'root'}-{hashlib.sha256(key).hexdigest()[:16]}.npz"


def _cache_paths(root: Path, cache_dir: Optional[str | os.PathLike]) -> list[Path]:
    """Where the cache may live, in order of preference: next to the data, then `cache_dir`."""
    name = _cache_name(root)
    paths = [root.resolve().parent / name]
    if cache_dir is not None:
        paths.append(Path(cache_dir).expanduser() / name)
    return paths


def _save(path: Path, index: ImageIndex, stamps: _Stamps) -> None:
    """Write atomically: a unique temporary file renamed over `path` (readers never see a partial file)."""
    classes, dirs = PackedStrings.pack(index.classes), PackedStrings.pack(stamps.dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f, version=np.array([FORMAT_VERSION]), ignored_loose=np.array([index.ignored_loose]),
                path_data=index.paths.data, path_offsets=index.paths.offsets, labels=index.labels,
                class_data=classes.data, class_offsets=classes.offsets,
                dir_data=dirs.data, dir_offsets=dirs.offsets, dir_mtimes=np.array(stamps.mtimes, dtype=np.int64),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _folders_unchanged(root: Path, dirs: PackedStrings, mtimes: np.ndarray) -> bool:
    for i, recorded in enumerate(mtimes.tolist()):
        if recorded == UNKNOWN_MTIME:
            return False
        try:
            if os.stat(root / dirs[i]).st_mtime_ns != recorded:
                return False
        except OSError:
            return False
    return True


def _load(path: Path, root: Path) -> Optional[ImageIndex]:
    """The cached index at `path` if it exists, is readable and the folder has not changed since; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"][0]) != FORMAT_VERSION:
                return None
            if not _folders_unchanged(root, PackedStrings(z["dir_data"], z["dir_offsets"]), z["dir_mtimes"]):
                return None
            classes = PackedStrings(z["class_data"], z["class_offsets"]).tolist()
            paths = PackedStrings(z["path_data"], z["path_offsets"])
            return ImageIndex(root, classes, paths, z["labels"], int(z["ignored_loose"][0]))
    except Exception as exc:  # a damaged or foreign file is only a cache miss
        logger.warning("ignoring unreadable dataset index cache %s: %s: %s", path, type(exc).__name__, exc)
        return None


# ---- public entry points -----------------------------------------------------------------------------
def check_dataset_root(root: Path) -> None:
    """Clear errors for a missing folder or a file given as the data folder."""
    if not root.exists():
        raise FileNotFoundError(
            f"dataset folder does not exist: {root} (set train.dataset_path to an existing "
            "image folder, or to `tiny` for the built-in dataset)"
        )
    if not root.is_dir():
        raise ValueError(f"dataset path is not a folder: {root} (point it at a folder of images)")


def _checked(index: ImageIndex) -> ImageIndex:
    if not len(index):
        raise ValueError(
            f"no images found under {index.root} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}, "
            "any letter case; put images in class subfolders or directly in the folder)"
        )
    if index.ignored_loose:
        logger.warning(
            "ignoring %d image(s) directly in %s: the folder has class subfolders, so only images "
            "inside them are used",
            index.ignored_loose,
            index.root,
        )
    return index


def build_or_load_index(root: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> ImageIndex:
    """The index of `root`: from a valid cache file if there is one, else scanned and cached.

    Safe to call from several processes at once (each may scan; writes are atomic). The cache goes
    next to the data folder if its parent is writable, else into `cache_dir` (e.g. the run
    directory) if given; see the module docstring for when a cache is reused.
    """
    root = Path(root).expanduser()
    check_dataset_root(root)
    locations = _cache_paths(root, cache_dir)
    for path in locations:
        index = _load(path, root)
        if index is not None:
            logger.info("dataset index of %s: %d images from cache %s", root, len(index), path)
            return _checked(index)
    start = time.perf_counter()
    index, stamps = _scan(root)
    _checked(index)
    written = _write_first(locations, index, stamps)
    logger.info("dataset index of %s: %d images scanned in %.1f s, cached at %s", root, len(index),
                time.perf_counter() - start, written or "nowhere (no writable location)")
    return index


def _write_first(locations: list[Path], index: ImageIndex, stamps: _Stamps) -> Optional[Path]:
    """Write the cache at the first location that accepts it; None when none does."""
    for path in locations:
        try:
            _save(path, index, stamps)
            return path
        except OSError as exc:
            logger.debug("cannot write dataset index cache %s: %s", path, exc)
    return None
