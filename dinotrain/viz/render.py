"""PNG figures with matplotlib (Agg, no screen needed): PCA and attention pictures, training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dinotrain.train.rundir import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, works without a display
    import matplotlib.pyplot as plt

    return plt


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw[, C]) -> (H, W[, C]) by nearest neighbour: one patch, one block of pixels (what the papers show)."""
    x = grid.float()
    channels_last = x.dim() == 3
    x = x.permute(2, 0, 1)[None] if channels_last else x[None, None]
    x = torch.nn.functional.interpolate(x, size=size, mode="nearest")[0]
    return (x.permute(1, 2, 0) if channels_last else x[0]).numpy()


def _show_image(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_pca_figure(images: Sequence[np.ndarray], names: Sequence[str], maps, path: Path) -> Path:
    """One row per image: the image, the foreground mask, the PCA colours of the foreground."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.6 * len(images)), squeeze=False)
    for row, (image, name) in enumerate(zip(images, names)):
        size = image.shape[:2]
        _show_image(axes[row, 0], image, name)
        _show_image(axes[row, 1], _upsample(maps.foreground[row], size), "foreground (1st component)")
        _show_image(axes[row, 2], _upsample(maps.rgb[row], size), "PCA of foreground patches -> RGB")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_attention_figure(images: Sequence[np.ndarray], names: Sequence[str], attention: torch.Tensor,
                          path: Path) -> Path:
    """One row per image: the image, then the CLS token's attention of each head of the last block."""
    plt = _pyplot()
    heads = attention.shape[1]
    fig, axes = plt.subplots(len(images), heads + 1, figsize=(2.2 * (heads + 1), 2.4 * len(images)), squeeze=False)
    for row, (image, name) in enumerate(zip(images, names)):
        size = image.shape[:2]
        _show_image(axes[row, 0], image, name)
        for h in range(heads):
            ax = axes[row, h + 1]
            ax.imshow(_upsample(attention[row, h], size), cmap="viridis")
            ax.set_title(f"head {h}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CURVES = {
    "losses": ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"),
    "schedules": ("lr", "wd", "mom", "teacher_temp"),
    "throughput": ("images_per_s",),
}


def save_curves(metrics_path: Path, out_dir: Path) -> list[Path]:
    """losses.png, schedules.png, throughput.png from a run's metrics file (distillation: one line per student)."""
    plt = _pyplot()
    records, _ = read_metrics(metrics_path)  # a half-written last line of a killed run is skipped
    if not records:
        raise ValueError(f"{metrics_path} has no metrics yet (one line per logged iteration)")
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in records for k in r})
    written = []
    for name, wanted in CURVES.items():
        series = [k for k in keys if k.split("/")[-1] in wanted]  # "<student>/total_loss" in distillation runs
        if not series:
            continue
        panels = sorted({k.split("/")[-1] for k in series}, key=list(wanted).index)
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for key in (k for k in series if k.split("/")[-1] == panel):
                points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, label=key if "/" in key else None, linewidth=1.2)
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.grid(alpha=0.3)
            if any("/" in k for k in series):
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_run(run: str | Path, output: str | Path | None = None) -> list[Path]:
    """`dinotrain plot`: the curves of a run directory (or its metrics file) into `output` (default the run's
    plots folder); prints and returns the files written."""
    from dinotrain.train.rundir import RunDir

    run = Path(run)
    metrics = RunDir(run).metrics if run.is_dir() else run
    if not metrics.is_file():
        name = RunDir(run).metrics.name
        raise FileNotFoundError(f"no {name} in {run} (give a run directory or a {name} file)")
    out = Path(output) if output else RunDir(metrics.parent).plots
    written = save_curves(metrics, out)
    for path in written:
        print(f"written {path}")
    return written
