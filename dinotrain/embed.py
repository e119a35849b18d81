"""Embeddings of many images: batched, several decode workers, a progress bar, resumable, `.npy` + a path list.

Output directory (`np.load(out / "embeddings.npy")` and `(out / "paths.txt").read_text().splitlines()`):

    embeddings.npy    float32 (N, D): CLS token after the final norm (L2-normalised with --normalize)
    patch_mean.npy    float32 (N, D): mean of the patch tokens after the final norm (--patch-mean)
    patch_tokens.npy  float32 (N, P, D): every patch token after the final norm (--patch-tokens)
    paths.txt         the N image paths, one per line, row i of every array is line i
    skipped.txt       unreadable files, `path<TAB>reason`
    info.json         weights, transform, dimensions, counts, timing

Why `.npy` + a text file: one line to load with numpy alone (no pyarrow), memory-mappable for collections
larger than RAM (`mmap_mode="r"`), readable from C/Rust/JS with any .npy reader, and a path list anyone can
grep. Work is done in chunks of `chunk_size` images, each written atomically under `.partial/` when complete;
a killed run started again with the same command skips the finished chunks, and the batches are the same as
in a run that was never killed, so the result is identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import is_image_file, load_rgb
from dinotrain.storage import replacing

log = logging.getLogger("dinotrain.embed")
PARTIAL = ".partial"


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files as given, folders searched recursively (sorted, hidden files skipped); duplicates dropped."""
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if is_image_file(name):
                        found.setdefault(str(Path(dirpath) / name), Path(dirpath) / name)
        elif path.is_file():
            found.setdefault(str(path), path)
        else:
            raise FileNotFoundError(f"image or folder not found: {path}")
    if not found:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))} (extensions: .jpg .jpeg .png .bmp .webp .tif)")
    return list(found.values())


class _Images(Dataset):
    """(position, tensor, '') of each image, or (position, None, reason) when it cannot be read."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_rgb(self.paths[i])), ""
        except Exception as exc:  # any decoder error: reported and skipped, the run goes on
            return i, None, f"{type(exc).__name__}: {exc}".replace("\t", " ").replace("\n", " ")


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


@dataclass
class EmbedSettings:
    """What the numbers depend on: a resumed run must use the same."""

    weights: str
    resize: int
    crop: int
    normalize: bool = False
    patch_mean: bool = False
    patch_tokens: bool = False
    chunk_size: int = 4096
    batch_size: int = 64
    paths_digest: str = field(default="", repr=False)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:16]


def _save_atomic(path: Path, write) -> None:
    with replacing(path, path.name) as tmp:  # complete or absent; a full disk is one StorageError
        write(tmp)


def _check_or_start(out: Path, settings: EmbedSettings, paths: Sequence[Path], force: bool) -> Path:
    """The `.partial/` folder of this run: resumed when its settings match, else a clear error."""
    partial = out / PARTIAL
    if (out / "info.json").is_file() and not partial.is_dir():
        if not force:
            raise FileExistsError(f"{out} already holds finished embeddings; pass --force to compute them again, "
                                  "or choose another --output")
        for name in ("embeddings.npy", "patch_mean.npy", "patch_tokens.npy", "paths.txt", "skipped.txt", "info.json"):
            (out / name).unlink(missing_ok=True)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} exists and is not a directory")
    plan = partial / "plan.json"
    if plan.is_file():
        saved = json.loads(plan.read_text())
        if saved != settings.as_dict():
            if not force:
                diff = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.as_dict().items()
                                 if saved.get(k) != v)
                raise ValueError(f"{out} holds an unfinished run with other settings ({diff}); rerun it with the same "
                                 "images and options to finish it, pass --force to start over, or choose another --output")
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not plan.is_file():
        _save_atomic(partial / "paths.txt", lambda t: t.write_text("".join(f"{p}\n" for p in paths)))
        _save_atomic(plan, lambda t: t.write_text(json.dumps(settings.as_dict())))
    return partial


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _chunk_file(partial: Path, k: int) -> Path:
    return partial / f"chunk-{k:06d}.npz"


def _features(model, images: torch.Tensor, settings: EmbedSettings) -> dict[str, torch.Tensor]:
    """CLS (the model's output, as `eval knn` takes it) and the patch tokens asked for, all after the final norm."""
    if not (settings.patch_mean or settings.patch_tokens):
        feats = {"cls": model(images).float()}
    else:
        out = model.forward_features(images)
        feats = {"cls": out["x_norm_clstoken"].float()}
        if settings.patch_mean:
            feats["patch_mean"] = out["x_norm_patchtokens"].float().mean(dim=1)
        if settings.patch_tokens:
            feats["patch_tokens"] = out["x_norm_patchtokens"].float()
    if settings.normalize:
        feats["cls"] = torch.nn.functional.normalize(feats["cls"], dim=-1)
    return feats


def embed_batches(model, paths: Sequence[Path], settings: EmbedSettings, device: torch.device, workers: int):
    """(rows, features, skipped) per batch, in order: for small lists printed or written as JSON."""
    dataset = _Images(paths, make_eval_transform(resize_size=settings.resize, crop_size=settings.crop))
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers, collate_fn=_collate)
    model.eval()
    with torch.inference_mode():
        for rows, images, bad in loader:
            feats = _features(model, images.to(device), settings) if images is not None else {}
            yield rows, {k: v.cpu() for k, v in feats.items()}, bad


def embed_to_directory(model, paths: Sequence[Path], out: Path, settings: EmbedSettings, device: torch.device,
                       workers: int, force: bool = False, progress: bool = True) -> dict:
    """Embed `paths` into `out` (see the module docstring), resuming an unfinished run there. Returns info.json."""
    from tqdm import tqdm

    settings.paths_digest = _digest(paths)
    partial = _check_or_start(out, settings, paths, force)
    n_chunks = (len(paths) + settings.chunk_size - 1) // settings.chunk_size
    todo = [k for k in range(n_chunks) if not _chunk_file(partial, k).is_file()]
    if len(todo) < n_chunks:
        log.info("resuming %s: %d of %d chunks already done", out, n_chunks - len(todo), n_chunks)
    batches = []  # batches never straddle chunks, so a resumed run computes exactly the same batches
    for k in todo:
        lo, hi = k * settings.chunk_size, min((k + 1) * settings.chunk_size, len(paths))
        batches += [list(range(s, min(s + settings.batch_size, hi))) for s in range(lo, hi, settings.batch_size)]
    dataset = _Images(paths, make_eval_transform(resize_size=settings.resize, crop_size=settings.crop))
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    done_before = len(paths) - sum(len(b) for b in batches)
    bar = tqdm(total=len(paths), initial=done_before, unit="img", disable=not progress, dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr, desc="embed")
    current: dict = {}
    start, n_new = time.perf_counter(), 0
    model.eval()
    with torch.inference_mode():
        for rows, images, bad in loader:
            first = (rows or [i for i, _ in bad])[0]
            k = first // settings.chunk_size
            chunk = current.setdefault(k, {"rows": [], "feats": {}, "skipped": []})
            chunk["skipped"] += bad
            for i, why in bad:
                tqdm.write(f"skipped unreadable {paths[i]}: {why}", file=sys.stderr)
            if images is not None:
                for name, value in _features(model, images.to(device, non_blocking=True), settings).items():
                    chunk["feats"].setdefault(name, []).append(value.cpu().numpy())
                chunk["rows"] += rows
            n_new += len(rows) + len(bad)
            bar.update(len(rows) + len(bad))
            end = min((k + 1) * settings.chunk_size, len(paths))
            if len(chunk["rows"]) + len(chunk["skipped"]) == end - k * settings.chunk_size:
                _write_chunk(partial, k, current.pop(k))
    bar.close()
    elapsed = time.perf_counter() - start
    return _finish(out, partial, paths, n_chunks, settings, device, elapsed, n_new)


def _write_chunk(partial: Path, k: int, chunk: dict) -> None:
    arrays = {name: np.concatenate(parts) for name, parts in chunk["feats"].items()}
    arrays["rows"] = np.asarray(chunk["rows"], dtype=np.int64)
    arrays["skipped_rows"] = np.asarray([i for i, _ in chunk["skipped"]], dtype=np.int64)
    arrays["skipped_why"] = np.asarray([why for _, why in chunk["skipped"]], dtype=str)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _save_atomic(_chunk_file(partial, k), write)


def _finish(out: Path, partial: Path, paths: Sequence[Path], n_chunks: int, settings: EmbedSettings,
            device: torch.device, elapsed: float, n_new: int) -> dict:
    """Join the chunks into the final files (each written atomically), then drop `.partial/`."""
    arrays: dict[str, list] = {}
    rows, skipped = [], []
    for k in range(n_chunks):
        with np.load(_chunk_file(partial, k), allow_pickle=False) as z:
            rows.append(z["rows"])
            skipped += list(zip(z["skipped_rows"].tolist(), z["skipped_why"].tolist()))
            for name in ("cls", "patch_mean", "patch_tokens"):
                if name in z.files:
                    arrays.setdefault(name, []).append(z[name])
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    if not len(rows):
        raise ValueError(f"none of the {len(paths)} images could be read (see {out / 'skipped.txt'})")
    files = {"cls": "embeddings.npy", "patch_mean": "patch_mean.npy", "patch_tokens": "patch_tokens.npy"}
    for name, parts in arrays.items():
        joined = np.concatenate(parts)
        _save_atomic(out / files[name], lambda t, a=joined: _save_npy(t, a))
    _save_atomic(out / "paths.txt", lambda t: t.write_text("".join(f"{paths[i]}\n" for i in rows)))
    _save_atomic(out / "skipped.txt", lambda t: t.write_text("".join(f"{paths[i]}\t{why}\n" for i, why in skipped)))
    info = {**settings.as_dict(), "count": int(len(rows)), "skipped": len(skipped), "dim": int(arrays["cls"][0].shape[1]),
            "files": {name: files[name] for name in arrays}, "device": str(device),
            "seconds_this_run": round(elapsed, 3), "images_per_s_this_run": round(n_new / elapsed, 2) if elapsed else None}
    _save_atomic(out / "info.json", lambda t: t.write_text(json.dumps(info, indent=1)))
    shutil.rmtree(partial)
    return info


def embed_command(images: Sequence[str], weights: str | None, model: str | None, *, image_size: int | None,
                  output: str | None, batch_size: int, workers: int | None, normalize: bool, patch_mean: bool,
                  patch_tokens: bool, chunk_size: int, force: bool, progress: bool, device: str = "auto",
                  precision: str = "auto", runtime: str = "auto") -> None:
    """`dinotrain embed`: into an output directory (resumable, `.npy`), a JSON file of rows, or printed.

    Every check (sizes, paths, outputs) comes before the backbone is built."""
    from dinotrain.eval.features import eval_sizes, pick_eval_device
    from dinotrain.inference import choose, open_features
    from dinotrain.outputs import refuse_existing

    resize, crop = eval_sizes(image_size)  # checked before any work
    where = pick_eval_device(device)
    choose(precision, runtime, where, weights)  # a combination this machine cannot run: said before any work
    paths = list_images(images)
    to_dir = output is not None and not output.endswith(".json")
    if not to_dir and any(Path(p).is_dir() for p in images):
        raise ValueError("embedding a folder writes files: give --output DIR (embeddings.npy + paths.txt)")
    if output and not to_dir:
        refuse_existing(output, force)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    settings = EmbedSettings(weights=str(weights or model), resize=resize, crop=crop, normalize=normalize,
                             patch_mean=patch_mean, patch_tokens=patch_tokens, chunk_size=chunk_size,
                             batch_size=batch_size)
    if settings.chunk_size < 1 or settings.batch_size < 1:
        raise ValueError("--chunk-size and --batch-size must be positive")
    backbone = open_features(weights, model, where, precision, runtime)
    if to_dir:
        info = embed_to_directory(backbone, paths, Path(output), settings, where, workers, force=force,
                                  progress=progress)
        print(f"{info['count']} embeddings of dimension {info['dim']} -> {Path(output) / 'embeddings.npy'} "
              f"(rows: paths.txt; {info['skipped']} unreadable skipped, see skipped.txt; "
              f"{info['images_per_s_this_run']} img/s on {where})")
        return
    rows, n_skipped = embed_rows(backbone, paths, settings, where)
    if output:
        Path(output).write_text(json.dumps(rows))
        print(f"written to {output}" + (f" ({n_skipped} unreadable skipped)" if n_skipped else ""))


def embed_rows(model, paths: Sequence[Path], settings: EmbedSettings, device: torch.device) -> tuple[list[dict], int]:
    """A few images in this process: one JSON row per readable image (`image`, `image_features`, and
    `patch_mean` / `patch_tokens` when asked), each printed as one line; unreadable ones reported on stderr.
    Returns (rows, number skipped)."""
    rows_out, n_skipped = [], 0
    for rows, feats, bad in embed_batches(model, paths, settings, device, workers=0):
        for i, why in bad:
            print(f"skipped unreadable {paths[i]}: {why}", file=sys.stderr)
            n_skipped += 1
        for j, i in enumerate(rows):
            cls = feats["cls"][j]
            row = {"image": str(paths[i]), "image_features": cls.tolist()}
            if "patch_mean" in feats:
                row["patch_mean"] = feats["patch_mean"][j].tolist()
            if "patch_tokens" in feats:
                row["patch_tokens"] = feats["patch_tokens"][j].tolist()
            rows_out.append(row)
            print(f"{paths[i]}: {cls.numel()}-dim embedding, norm {cls.norm():.3f}, first values "
                  + " ".join(f"{v:.4f}" for v in cls[:4].tolist()))
    if not rows_out:
        raise ValueError(f"none of the {len(paths)} images could be read")
    return rows_out, n_skipped
