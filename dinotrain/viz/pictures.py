"""`dinotrain visualize`: a few images through a backbone into the DINOv2 PCA picture and the DINO attention
picture (PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import load_rgb
from dinotrain.viz.features import cls_attention, pca_maps
from dinotrain.viz.render import save_attention_figure, save_pca_figure


def visualize(images: Sequence[str], weights: str | None, model: str | None, *, image_size: int | None,
              kind: str = "both", threshold: float = 0.5, output: str = "visualizations", max_images: int = 8,
              device: str = "auto") -> None:
    """pca.png and/or attention.png (`kind`: pca, attention, both) of at most `max_images` images in `output`."""
    from dinotrain.embed import list_images
    from dinotrain.eval.features import eval_sizes, pick_eval_device
    from dinotrain.weights.backbone import open_backbone

    resize, crop = eval_sizes(image_size)
    where = pick_eval_device(device)
    paths = list_images(images)
    if len(paths) > max_images:
        raise ValueError(f"{len(paths)} images: a figure shows at most --max-images {max_images}; pass fewer")
    backbone = open_backbone(weights, model).eval().to(where)
    crop = crop // backbone.patch_size * backbone.patch_size  # whole patches, so the maps cover the picture shown
    shown = make_eval_transform(resize_size=resize, crop_size=crop).transforms[:2]  # resize + crop, no normalising
    normalised = make_eval_transform(resize_size=resize, crop_size=crop)
    pictures = [load_rgb(p) for p in paths]
    batch = torch.stack([normalised(p) for p in pictures]).to(where)
    arrays = [np.asarray(shown[1](shown[0](p))) for p in pictures]
    names = [p.name for p in paths]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if kind in ("pca", "both"):
        maps = pca_maps(backbone, batch, threshold=threshold)
        written = save_pca_figure(arrays, names, maps.__class__(*(t.cpu() for t in (maps.foreground, maps.rgb,
                                                                                     maps.first_component))),
                                  out / "pca.png")
        print(f"PCA of patch features -> {written} (foreground: "
              + ", ".join(f"{n} {100 * float(m.float().mean()):.0f}%" for n, m in zip(names, maps.foreground)) + ")")
    if kind in ("attention", "both"):
        written = save_attention_figure(arrays, names, cls_attention(backbone, batch).cpu(), out / "attention.png")
        print(f"CLS attention of the last block, per head -> {written}")
