"""A cheap, measured number for *dense* (patch) features on the built-in tiny digits, where the k-NN of
`dinotrain eval knn` only sees the CLS token: a linear probe on single patch tokens, a miniature of the papers'
dense linear probes (DINOv3's Gram anchoring exists to keep patch features good; docs/training.md).

Each tiny image is resized to --image-size (default 128: 8x8 patches of 16 px, as the PCA pictures of
docs/training.md) and three numbers are measured on the val split, fitted on the train split:
  pooled -- weighted k-NN (k=20, as `eval knn`) on the mean of the patch tokens instead of the CLS token: how much
            of the image's class the patch tokens carry;
  ink    -- a linear probe per patch: does it hold the digit's stroke (at least --ink-fraction of its pixels
            brighter than the background)? balanced accuracy (ink is the minority);
  digit  -- a linear probe per ink patch: which digit it belongs to (top-1), semantic information per patch.
The labels come from the pixels and the folders, no annotation needed. Probes: scikit-learn's standardised
logistic regression on at most --max-train-patches patches.

    python tools/dense_probe.py --weights runs/v3smoke --baseline-random
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets, transforms

from dinotrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.eval.knn import knn_accuracy
from dinotrain.models.presets import backbone_from_spec
from dinotrain.weights.backbone import open_backbone

INK_LEVEL = 64  # grey level (0-255): the digits' background is ~12, strokes reach ~220


def _load_split(folder, size: int):
    """(normalised images (N, 3, S, S), grey pixels (N, S, S) in 0-255, labels (N,)) of one ImageFolder split."""
    data = datasets.ImageFolder(folder)
    resize = transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC)
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images, greys = [], []
    for path, _ in data.samples:
        picture = resize(Image.open(path).convert("RGB"))
        images.append(to_input(picture))
        greys.append(torch.from_numpy(np.asarray(picture.convert("L"), dtype=np.float32)))
    return torch.stack(images), torch.stack(greys), torch.tensor(data.targets)


@torch.inference_mode()
def _patch_tokens(model, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """(N, P, D) normalised patch tokens, L2-normalised per token (as the k-NN treats CLS tokens)."""
    out = [model.forward_features(images[i:i + batch])["x_norm_patchtokens"].float()
           for i in range(0, len(images), batch)]
    return F.normalize(torch.cat(out), dim=-1)


def _patch_labels(greys: torch.Tensor, labels: torch.Tensor, patch: int, ink_fraction: float):
    """(ink (N, P) bool, digit (N, P)) per patch, in the row-major order of the patch tokens."""
    inked = (greys > INK_LEVEL).float()[:, None]
    ink = F.avg_pool2d(inked, patch).flatten(1) >= ink_fraction
    return ink, labels[:, None].expand_as(ink)


def _linear_probe(balanced: bool):
    """Standardised logistic regression: the L2-normalised tokens are tiny per coordinate, and scikit-learn's
    default regularisation would otherwise underfit them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000,
                                                              class_weight="balanced" if balanced else None))


def probe(model, train, val, ink_fraction: float, max_train_patches: int) -> dict:
    """k-NN top-1 of mean-pooled patch tokens, balanced accuracy of ink vs background per patch and top-1 digit
    accuracy per ink patch, in percent."""
    from sklearn.metrics import balanced_accuracy_score

    scores, feats, ink, digit, pooled = {}, {}, {}, {}, {}
    for name, (images, greys, labels) in (("train", train), ("val", val)):
        tokens = _patch_tokens(model, images)
        pooled[name] = tokens.mean(dim=1)
        i, d = _patch_labels(greys, labels, model.patch_size, ink_fraction)
        feats[name], ink[name], digit[name] = tokens.flatten(0, 1).numpy(), i.flatten().numpy(), d.flatten().numpy()
    scores["pooled_patch_knn_k20"] = knn_accuracy(pooled["train"], train[2], pooled["val"], val[2], ks=(20,))[20]
    keep = np.random.default_rng(0).permutation(len(feats["train"]))[:max_train_patches]
    x, y_ink, y_digit = feats["train"][keep], ink["train"][keep], digit["train"][keep]
    fg = _linear_probe(balanced=True).fit(x, y_ink)
    scores["ink_balanced_acc"] = 100 * balanced_accuracy_score(ink["val"], fg.predict(feats["val"]))
    cls = _linear_probe(balanced=False).fit(x[y_ink], y_digit[y_ink])
    scores["digit_acc_ink_patches"] = 100 * cls.score(feats["val"][ink["val"]], digit["val"][ink["val"]])
    scores["ink_patches_val"] = int(ink["val"].sum())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="a run directory or weights file (as dinotrain eval)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-train-patches", type=int, default=30000)
    parser.add_argument("--ink-fraction", type=float, default=0.25)
    parser.add_argument("--baseline-random", action="store_true", help="also probe the architecture at random init")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output", help="write the scores as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = open_backbone(args.weights, None).eval()
    if args.image_size % model.patch_size:
        raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of the patch {model.patch_size}")
    root = ensure_tiny_dataset()
    train, val = _load_split(root / "train", args.image_size), _load_split(root / "val", args.image_size)
    models = {"model": model}
    if args.baseline_random:
        torch.manual_seed(0)
        models["random_init"] = backbone_from_spec(model.spec).eval()
    results = {name: probe(m, train, val, args.ink_fraction, args.max_train_patches) for name, m in models.items()}
    for name, s in results.items():
        print(f"{name}: mean-pooled patch k-NN k=20 {s['pooled_patch_knn_k20']:.2f} %, "
              f"ink vs background {s['ink_balanced_acc']:.2f} % (balanced), digit of ink patches "
              f"{s['digit_acc_ink_patches']:.2f} % ({s['ink_patches_val']} val ink patches)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
