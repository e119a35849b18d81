"""The dataset index is compact (numpy arrays, not a list of tuples), cached, and never stale.

Checked against an inline copy of the old list-of-tuples scan, so ordering and layout rules
(sorting, hidden files, symlinks, labelled vs flat) are provably unchanged.
"""

import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

import dinotrain.data.index as index_module
from dinotrain.data.datasets import ImageFolderDataset
from dinotrain.data.index import build_or_load_index, is_image_file

OLD = time.time() - 3600  # folders modified an hour ago are outside the "racy" window


def _old_scan(root: Path):
    """The previous ImageFolderDataset._scan, verbatim in behaviour: (classes, [(path str, label)])."""
    def find(folder):
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
        return sorted(found)

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, images) for d in subdirs if (images := find(d))]
    loose = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p.name))
    if not per_class:
        return [], [(str(p), -1) for p in loose]
    return [n for n, _ in per_class], [(str(p), lab) for lab, (_, imgs) in enumerate(per_class) for p in imgs]


def _as_old(index):
    return index.classes, [(str(index.path(i)), index.label(i)) for i in range(len(index))]


def _touch(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _backdate(root: Path):
    """Set every folder's mtime an hour back, as for data that is not being written right now."""
    for dirpath, _, _ in os.walk(root, followlinks=True):
        os.utime(dirpath, (OLD, OLD))


def _grid(root: Path, n_classes=10, per_class=200) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            _touch(root / f"c{c}" / f"{i:04d}.jpg")
    _backdate(root)
    return root


@pytest.fixture
def count_scans(monkeypatch):
    calls = []
    real = index_module._scan

    def counting(root):
        calls.append(root)
        return real(root)

    monkeypatch.setattr(index_module, "_scan", counting)
    return calls


def test_same_order_and_rules_as_the_old_list_of_tuples(tmp_path):
    root = tmp_path / "data"
    for rel in ["b/c.jpg", "b-c/x.jpg", "b/z/a.PNG", "b/z.JPEG", "b/.hidden.jpg", "b/.dir/y.jpg", "a/1.tif",
                "a/deep/er/2.webp", "a/notes.txt", "loose.png", ".h/q.jpg", "ü/ß.jpg"]:
        _touch(root / rel)
    (root / "empty").mkdir()
    (tmp_path / "elsewhere" / "in").mkdir(parents=True)
    _touch(tmp_path / "elsewhere" / "in" / "s.bmp")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    expected = _old_scan(root)
    assert expected[0] == ["a", "b", "b-c", "linked", "ü"]
    assert _as_old(build_or_load_index(root)) == expected  # scanned (no cache yet)
    assert _as_old(build_or_load_index(root)) == expected  # from the cache it wrote

    flat = tmp_path / "flat"
    for name in ["b.png", "a.JPG", ".c.png", "d.txt"]:
        _touch(flat / name)
    (flat / "sub").mkdir()
    assert _as_old(build_or_load_index(flat)) == _old_scan(flat) == ([], [(str(flat / "a.JPG"), -1),
                                                                          (str(flat / "b.png"), -1)])


def test_round_trips_through_the_cache_next_to_the_data(tmp_path, count_scans):
    root = _grid(tmp_path / "data")
    built = build_or_load_index(root)
    assert len(count_scans) == 1
    assert [p.name for p in tmp_path.glob(".dinotrain-index-data-*.npz")] != []
    loaded = build_or_load_index(root)
    assert len(count_scans) == 1  # from the cache
    assert _as_old(loaded) == _as_old(built) == _old_scan(root)
    assert loaded.labels.dtype == np.int32 and loaded.paths.data.dtype == np.uint8


@pytest.mark.parametrize("change", ["add file", "remove file", "add class", "add nested file", "remove class"])
def test_cache_is_invalidated_when_the_folder_changes(tmp_path, count_scans, change):
    root = _grid(tmp_path / "data", n_classes=3, per_class=5)
    (root / "c1" / "deep").mkdir()
    _touch(root / "c1" / "deep" / "n.jpg")
    _backdate(root)
    build_or_load_index(root)
    if change == "add file":
        _touch(root / "c2" / "new.jpg")
    elif change == "remove file":
        (root / "c0" / "0001.jpg").unlink()
    elif change == "add class":
        _touch(root / "c9" / "x.jpg")
    elif change == "add nested file":
        _touch(root / "c1" / "deep" / "m.jpg")
    else:
        for f in (root / "c2").iterdir():
            f.unlink()
        (root / "c2").rmdir()
    after = build_or_load_index(root)
    assert len(count_scans) == 2
    assert _as_old(after) == _old_scan(root)


def test_freshly_modified_folders_are_not_trusted(tmp_path, count_scans):
    """A folder changed within the timestamp tick of the scan could change again unseen: scan again."""
    root = tmp_path / "data"
    _touch(root / "a" / "x.jpg")  # mtimes: now
    build_or_load_index(root)
    build_or_load_index(root)
    assert len(count_scans) == 2


def test_falls_back_to_the_callers_cache_dir(tmp_path, monkeypatch, count_scans):
    root = _grid(tmp_path / "data", n_classes=2, per_class=3)
    real_save = index_module._save

    def parent_read_only(path, *args):
        if path.parent == tmp_path:
            raise PermissionError(13, "read-only", str(path))
        return real_save(path, *args)

    monkeypatch.setattr(index_module, "_save", parent_read_only)
    run_dir = tmp_path / "run"
    build_or_load_index(root, cache_dir=run_dir)
    assert len(list(run_dir.glob("*.npz"))) == 1 and not list(tmp_path.glob(".dinotrain-index*"))
    ds = ImageFolderDataset(root, index_cache_dir=run_dir)
    assert len(count_scans) == 1 and len(ds) == 6 and ds.classes == ["c0", "c1"]
    assert list(ds.targets) == [0, 0, 0, 1, 1, 1] and ds.path(5) == root / "c1" / "0002.jpg"


def test_damaged_cache_is_a_miss_not_an_error(tmp_path, count_scans, caplog):
    root = _grid(tmp_path / "data", n_classes=2, per_class=3)
    build_or_load_index(root)
    (cache,) = tmp_path.glob(".dinotrain-index-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="dinotrain.data"):
        assert _as_old(build_or_load_index(root)) == _old_scan(root)
    assert len(count_scans) == 2 and "unreadable dataset index cache" in caplog.text


def _build_in_child(root, queue):
    index = build_or_load_index(root)
    queue.put(_as_old(index))


def test_concurrent_builders_agree_and_leave_one_complete_cache(tmp_path):
    root = _grid(tmp_path / "data", n_classes=20, per_class=50)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(root, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == _old_scan(root) for r in results)
    assert [p.suffix for p in tmp_path.iterdir() if p.name.startswith(".dinotrain")] == [".npz"]


def test_memory_per_image_is_far_below_a_list_of_tuples(tmp_path):
    root = _grid(tmp_path / "data", n_classes=10, per_class=200)  # paths like c3/0042.jpg
    index = build_or_load_index(root)
    assert len(index) == 2000
    assert index.nbytes / len(index) < 100  # ~420 B per image as (str, int) tuples


def test_dataset_indexing_behaves_like_the_old_list(tmp_path):
    root = _grid(tmp_path / "data", n_classes=2, per_class=2)
    ds = ImageFolderDataset(root)
    assert ds.path(-1) == root / "c1" / "0001.jpg" and ds.label(-1) == 1 and ds.label(-4) == 0
    with pytest.raises(IndexError):
        ds.path(4)
    with pytest.raises(IndexError):
        ds[-5]
