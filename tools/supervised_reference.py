"""What a recipe's backbone can learn in its budget *with* the labels: a supervised reference for its k-NN.

Trains the recipe's student backbone (the same architecture, crops, batch, iterations, lr and weight-decay
schedules as `dinotrain train --config ...`) with a linear classifier on its CLS token and cross-entropy on
both global crops, then evaluates its CLS features with the same k-NN as `dinotrain eval knn` (and the raw
pixels beside them). Self-supervised features rarely beat supervised ones trained as long, so this says
what a self-supervised recipe can hope to reach in the same number of iterations (docs/recipes.md).

    python tools/supervised_reference.py --config smoke/cpu_tiny
    python tools/supervised_reference.py --config smoke/cpu_tiny --iterations 1200 --output sup.json

On the CPU (where the smoke recipes run). Labelled data only (ImageFolder with class subfolders): the built-in
`tiny` / `tiny-shapes` datasets, or a `train.dataset_path` whose sibling `val/` folder holds the evaluation images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dinotrain.config import load_config
from dinotrain.data.photometric import normalize_pixels
from dinotrain.eval.features import eval_sizes, shared_label_space
from dinotrain.eval.knn import knn_line, knn_of_models
from dinotrain.eval.pixels import PixelFeatures
from dinotrain.data.loader import build_train_dataset, resolve_dataset_root
from dinotrain.train.optim import apply_schedules, build_optimizer
from dinotrain.train.schedules import build_schedules, scaled_lr
from dinotrain.train.ssl import build_backbone

log = logging.getLogger("dinotrain.supervised_reference")


def _global_crops(batch):
    """Default-collated (dict of uint8 crops, labels) -> (global crops (2B, C, H, W), labels (2B,))."""
    crops, labels = batch
    images = torch.cat(crops["global_crops"])
    return images, labels.repeat(len(crops["global_crops"]))


def train_supervised(cfg, iterations: int, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """The recipe's backbone trained `iterations` steps with labels; returns (backbone, seconds)."""
    torch.manual_seed(seed)
    data_cfg = cfg.copy()
    data_cfg.crops.local_crops_number = 0  # only the global crops are trained on
    dataset = build_train_dataset(data_cfg)
    backbone = build_backbone(cfg, for_teacher=False)
    # named like the SSL student, so the recipe's parameter groups (wd, lr multipliers) apply unchanged
    model = torch.nn.ModuleDict({"backbone": backbone,
                                 "classifier": torch.nn.Linear(backbone.embed_dim, len(dataset.classes))})
    batch = cfg.train.batch_size_per_gpu
    schedules = build_schedules(cfg, scaled_lr(cfg, batch))
    optimizer = build_optimizer(model, cfg)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=cfg.train.num_workers,
                        persistent_workers=cfg.train.num_workers > 0, generator=torch.Generator().manual_seed(seed))
    aug = dataset.transform
    model.train()
    start, it = time.perf_counter(), 0
    while it < iterations:
        for raw in loader:
            if it >= iterations:
                break
            step = min(it * schedules.total_iters // iterations, schedules.total_iters - 1)  # schedules stretched
            apply_schedules(optimizer, schedules.lr[step], schedules.wd[step], schedules.lr[step])
            images, labels = _global_crops(raw)
            loss = F.cross_entropy(model["classifier"](backbone(normalize_pixels(images, aug.mean, aug.std))), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            it += 1
            if it % max(cfg.train.log_every, 1) == 0 or it == iterations:
                log.info("it %d/%d  cross-entropy %.4f  lr %.2e  %.1f s", it, iterations, loss.item(),
                         schedules.lr[step], time.perf_counter() - start)
    return backbone, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="smoke/cpu_tiny", help="recipe (as `dinotrain train --config`)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training steps (default: the recipe's, optim.epochs x train.OFFICIAL_EPOCH_LENGTH); the "
                             "recipe's lr and weight-decay schedules are stretched over them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the k-NN figures and the wall time as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for `dinotrain train`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        iterations = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH if args.iterations is None else args.iterations
        if iterations < 1:
            raise ValueError(f"--iterations must be at least 1, got {iterations}")
        train_root = resolve_dataset_root(cfg)
        val_root = train_root.parent / "val"
        if not val_root.is_dir():
            raise ValueError(f"no evaluation images: expected a labelled folder {val_root} beside {train_root}")
        classes = shared_label_space(train_root, val_root)  # both labelled, val's classes among train's
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backbone, seconds = train_supervised(cfg, iterations, args.seed)
    resize, crop = eval_sizes(None, tiny=cfg.train.dataset_path in ("tiny", "tiny-shapes"))
    results = knn_of_models({"supervised": backbone, "raw_pixels": PixelFeatures()}, train_root, val_root, crop, resize,
                            classes, torch.device("cpu"))
    print(f"supervised reference: {iterations} iterations of {cfg.student.arch}/{cfg.student.patch_size} "
          f"in {seconds:.0f} s")
    for name, accs in results.items():
        print(knn_line(name, accs))
    if args.output:
        Path(args.output).write_text(json.dumps({"iterations": iterations, "train_seconds": seconds,
                                                 **{n: {str(k): v for k, v in a.items()} for n, a in results.items()}},
                                                indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
