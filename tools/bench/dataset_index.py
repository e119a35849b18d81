"""Benchmark the dataset index: compact cached numpy index vs the old list of (path, label) tuples.

Generates an ImageNet-like folder (default 1000 classes x 200 empty ``nXXXXXXXX/nXXXXXXXX_N.JPEG``
files, 200,000 images; the scan never decodes them) in a temporary directory, then measures, in
one run and on the same files:

* old: the previous ``ImageFolderDataset._scan`` (re-implemented inline), a Python list of tuples;
* new, cold: ``build_or_load_index`` with no cache file (scan + write the cache);
* new, cached: ``build_or_load_index`` reading the cache (folder mtimes checked, ``.npz`` loaded).

Times are medians of `--repeats` runs without tracing; memory comes from separate runs under
tracemalloc: the peak while building and what stays allocated afterwards, per image. Folder
mtimes are set an hour back after generation, as for data not being written right now (a folder
modified within 2 s of a scan is not trusted by the cache).

    python tools/bench/dataset_index.py --classes 1000 --per-class 200
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from dinotrain.data.index import build_or_load_index, is_image_file


def old_scan(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The previous scan, same behaviour: (classes, [(path str, label)])."""
    def find(folder: Path) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
        return sorted(found)

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, images) for d in subdirs if (images := find(d))]
    classes = [name for name, _ in per_class]
    return classes, [(str(p), label) for label, (_, images) in enumerate(per_class) for p in images]


def generate(root: Path, n_classes: int, per_class: int) -> None:
    """Empty files named like ImageNet's; folder mtimes set an hour back."""
    for c in range(n_classes):
        wnid = f"n{c:08d}"
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{wnid}_{i}.JPEG").touch()
    old = time.time() - 3600
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (old, old))


def remove_caches(root: Path) -> None:
    for path in root.parent.glob(".dinotrain-index-*.npz"):
        path.unlink()


def timed(fn, repeats: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traced(fn, before=lambda: None) -> tuple[int, int]:
    """(peak bytes while running fn, bytes still allocated by its result)."""
    before()
    gc.collect()
    tracemalloc.start()
    result = fn()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return peak, retained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to create the temporary folder (default: system temp)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dinotrain-index-bench-", dir=args.dir))
    root = work / "train"
    try:
        start = time.perf_counter()
        generate(root, args.classes, args.per_class)
        n = args.classes * args.per_class
        print(f"generated {n} files in {time.perf_counter() - start:.1f} s under {root}")

        classes, samples = old_scan(root)
        index = build_or_load_index(root)
        assert index.classes == classes and len(index) == len(samples) == n
        assert all(str(index.path(i)) == samples[i][0] and index.label(i) == samples[i][1] for i in range(0, n, 997))
        del classes, samples
        cache_file = next(root.parent.glob(".dinotrain-index-*.npz"))

        rows = {
            "old list of tuples": (timed(lambda: old_scan(root), args.repeats), traced(lambda: old_scan(root)), None),
            "new index, cold build": (
                timed(lambda: build_or_load_index(root), args.repeats, before=lambda: remove_caches(root)),
                traced(lambda: build_or_load_index(root), before=lambda: remove_caches(root)),
                index.nbytes,
            ),
            "new index, from cache": (timed(lambda: build_or_load_index(root), args.repeats),
                                      traced(lambda: build_or_load_index(root)), index.nbytes),
        }
        print(f"\n{n} images, {args.classes} classes, mean path length {index.paths.data.nbytes / n:.1f} B "
              f"(root-relative), cache file {cache_file.stat().st_size / n:.1f} B/image")
        print("| representation | time (s) | peak while building (B/image) | retained (B/image) "
              "| arrays nbytes (B/image) |")
        print("|---|---:|---:|---:|---:|")
        results = {}
        for name, (seconds, (peak, retained), nbytes) in rows.items():
            arrays = f"{nbytes / n:.1f}" if nbytes is not None else "-"
            print(f"| {name} | {seconds:.2f} | {peak / n:.0f} | {retained / n:.0f} | {arrays} |")
            results[name] = {"seconds": seconds, "peak_B_per_image": peak / n,
                             "retained_B_per_image": retained / n,
                             "nbytes_B_per_image": None if nbytes is None else nbytes / n}
        print(json.dumps({"n_images": n, "machine": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "results": results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
