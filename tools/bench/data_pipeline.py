"""Data pipeline throughput per CPU core: decode + multi-crop + iBOT masks + collate, ours vs official-style.

The images are ImageNet-like JPEGs made from the built-in tiny dataset: each 32x32 image upscaled to
500x375 (ImageNet's most common size), given photo-like grain, and re-encoded at quality 90 (cached under
$DINOTRAIN_DATA or ~/.cache/dinotrain). Both pipelines run in this process on one thread, so images/s is
per core (a DataLoader with N workers scales it by about N):

* official-style: what facebookresearch/dinov2 runs per sample: PIL decode, RandomResizedCrop + flip,
  colour jitter, grayscale, torchvision GaussianBlur, solarize, ToTensor + Normalize for 2 x 224 + 8 x 98
  crops, then the per-batch block masks and collate; written here from torchvision, independently of dinotrain.
* dinotrain: the training loader's own code (ImageFolderDataset + DataAugmentationDINO + GlobalMaskCollator).
  It ships uint8 crops, normalised where the model runs (`to_device`); the row "normalised on this core"
  adds that normalisation on the CPU too, for a like-for-like count when training runs on the CPU.

    python tools/bench/data_pipeline.py --batch 32 --batches 4
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

JPEG_SIZE = (500, 375)
N_IMAGES = 256


def jpeg_folder(n: int = N_IMAGES) -> Path:
    """A flat folder of `n` ImageNet-sized JPEGs made from the tiny dataset (made once, then reused)."""
    from dinotrain.data.tiny import default_tiny_root, ensure_tiny_dataset

    folder = default_tiny_root().parent / f"bench-jpegs-{n}"
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((ensure_tiny_dataset() / "train").glob("*/*.png"))[:n]
    rng = np.random.default_rng(0)
    for i, src in enumerate(sources):
        big = np.asarray(Image.open(src).convert("RGB").resize(JPEG_SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 6, size=big.shape)  # sensor-like noise: real photos do not compress like flat colour
        Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def official_style(global_size: int = 224, local_size: int = 98, n_local: int = 8):
    """(per-sample transform, collate) as the official dinov2 code builds them, from torchvision alone."""
    from torchvision import transforms as T

    from dinotrain.data.masking import MaskingGenerator

    bicubic = T.InterpolationMode.BICUBIC
    geo_g = T.Compose([T.RandomResizedCrop(global_size, scale=(0.32, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(0.5)])
    geo_l = T.Compose([T.RandomResizedCrop(local_size, scale=(0.05, 0.32), interpolation=bicubic),
                       T.RandomHorizontalFlip(0.5)])
    colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)])
    blur = lambda p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)  # noqa: E731
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    # The official GaussianBlur(p) is a RandomApply with probability 1 - p: global view 1 is never blurred,
    # view 2 is 90 % of the time (the train/vitl14 config's blur_probabilities say the same).
    g1 = T.Compose([colour, blur(0.0), norm])
    g2 = T.Compose([colour, blur(0.9), T.RandomSolarize(128, p=0.2), norm])
    loc = T.Compose([colour, blur(0.5), norm])

    def transform(path):
        img = Image.open(path).convert("RGB")
        return [g1(geo_g(img)), g2(geo_g(img))], [loc(geo_l(img)) for _ in range(n_local)]

    grid = global_size // 14
    masker = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)

    def collate(samples):
        b = len(samples)
        global_crops = torch.stack([s[0][v] for v in range(2) for s in samples])
        local_crops = torch.stack([s[1][v] for v in range(n_local) for s in samples])
        probs = np.linspace(0.1, 0.5, b + 1)  # official: half of the 2B crops masked, ratios spread evenly
        masks = [torch.BoolTensor(masker(int(grid * grid * random.uniform(probs[i], probs[i + 1])))) for i in range(b)]
        masks += [torch.BoolTensor(masker(0)) for _ in range(b)]
        random.shuffle(masks)
        masks = torch.stack(masks).flatten(1)
        return {"collated_global_crops": global_crops, "collated_local_crops": local_crops, "collated_masks": masks,
                "mask_indices_list": masks.flatten().nonzero().flatten()}

    return transform, collate


def dinotrain_pipeline(folder: Path, batch: int):
    """(dataset, collate) exactly as the training loader builds them for the official ViT-L/14 crops."""
    from dinotrain.config import load_config
    from dinotrain.data.collate import GlobalMaskCollator
    from dinotrain.data.loader import SeededSamples, build_train_dataset

    cfg = load_config("train/vitl14", [f"train.dataset_path={folder}", f"train.batch_size_per_gpu={batch}"])
    dataset = SeededSamples(build_train_dataset(cfg), cfg.train.seed)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    collate = GlobalMaskCollator(batch, grid * grid, grid, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                                 cfg.train.seed)
    return dataset, collate


def compare_pipelines(batch: int = 32, batches: int = 4) -> list[dict]:
    """Rows (images/s per core) of dinotrain's pipeline and the official-style one, batches interleaved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = jpeg_folder()
        paths = sorted(folder.glob("*.jpg"))
        from dinotrain.data.loader import to_device

        transform, official_collate = official_style()
        dataset, ours_collate = dinotrain_pipeline(folder, batch)

        def official(step):
            picks = [paths[(step * batch + i) % len(paths)] for i in range(batch)]
            return official_collate([transform(p) for p in picks])

        def ours(step):
            return ours_collate([dataset[(step * batch + i, (step * batch + i) % len(paths))] for i in range(batch)])

        def ours_normalised(step):
            return to_device(ours(step), torch.device("cpu"))

        runners = {"dinotrain": ours, "dinotrain, normalised on this core": ours_normalised,
                   "official-style PIL": official}
        for run in runners.values():
            run(0)  # warm-up (index load, first decode)
        times = {name: [] for name in runners}
        for step in range(1, batches + 1):
            for name in (list(runners) if step % 2 else list(runners)[::-1]):
                t = time.perf_counter()
                runners[name](step)
                times[name].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for name, ts in times.items():
        rows.append({"case": "data (1 core)", "impl": name, "images_per_s": batch / statistics.median(ts),
                     "ms": 1000 * statistics.median(ts), "gflop": None, "peak_gib": None})
    for row in rows:
        row["ratio_to_first"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = compare_pipelines(args.batch, args.batches)
    official = rows[-1]["images_per_s"]
    for row in rows:
        print(f"{row['impl']:>36}: {row['images_per_s']:.1f} images/s per core "
              f"({row['images_per_s'] / official:.2f}x the official-style pipeline)")


if __name__ == "__main__":
    main()
