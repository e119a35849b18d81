"""Raw-pixel k-NN baseline: the pixels of the exact evaluation view, back in RGB [0, 1], and `eval knn
--baseline-pixels` reporting them beside the model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from dinotrain.cli import eval as cli_eval
from dinotrain.weights import backbone
from dinotrain.data.augmentations import make_eval_transform
from dinotrain.eval.pixels import PixelFeatures


def _image(seed: int, side: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_pixels_are_the_rgb_values_of_the_evaluation_view():
    img = _image(0)
    view = make_eval_transform(resize_size=37, crop_size=32)(img)
    # independent reference: PIL bicubic resize + centre crop, /255, no normalisation round trip
    resized = img.resize((37, 37), Image.BICUBIC)
    crop = np.asarray(resized.crop((2, 2, 34, 34)), dtype=np.float32) / 255
    expected = torch.from_numpy(crop).permute(2, 0, 1).flatten()
    got = PixelFeatures()(view[None])[0]
    assert got.shape == (3 * 32 * 32,)
    assert torch.allclose(got, expected, atol=1e-5)


def test_centered_pixels_ignore_brightness():
    view = make_eval_transform(resize_size=32, crop_size=32)(_image(1))[None]
    brighter = view + 0.1 / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # +0.1 in every RGB channel
    plain, centered = PixelFeatures(), PixelFeatures(centered=True)
    assert torch.allclose(plain(brighter), plain(view) + 0.1, atol=1e-5)
    assert torch.allclose(centered(brighter), centered(view), atol=1e-5)
    assert torch.allclose(centered(view).mean(dim=1), torch.zeros(1), atol=1e-6)


class _Blind(torch.nn.Module):
    """A backbone whose features carry no information: every image maps to the same vector."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.spec = argparse.Namespace(img_size=16)

    def forward(self, x):
        return torch.ones(len(x), 4)


def _halves(root, per_class=4):
    """Class `left`: bright left half; class `right`: bright right half; random dark noise elsewhere."""
    rng = np.random.default_rng(0)
    for name in ("left", "right"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            arr[:, :8] += 180 if name == "left" else 0
            arr[:, 8:] += 180 if name == "right" else 0
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_eval_knn_reports_raw_pixels_beside_the_model(tmp_path, monkeypatch, capsys):
    train, val = _halves(tmp_path / "train"), _halves(tmp_path / "val")
    monkeypatch.setattr(backbone, "open_backbone", lambda weights, model, seed=0: _Blind())
    out = tmp_path / "knn.json"
    args = argparse.Namespace(train=str(train), val=str(val), tiny=False, threads=None, weights=None, model="x",
                              image_size=16, baseline_random=False, baseline_pixels=True, seed=0, batch_size=4,
                              k=[1, 3], temperature=0.07, output=str(out))
    assert cli_eval.knn(args) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"model", "raw_pixels", "raw_pixels_centered"}
    assert results["raw_pixels"] == {"1": 100.0, "3": 100.0} == results["raw_pixels_centered"]
    assert results["model"]["1"] == 50.0  # blind features: every neighbour ties, half the images are right
    assert "k-NN top-1 (raw_pixels)" in capsys.readouterr().out
