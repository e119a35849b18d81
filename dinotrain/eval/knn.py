"""Weighted k-NN classification on L2-normalised features, the DINO / DINOv2 protocol.

Each validation image votes with its k nearest training images (cosine similarity), each vote
weighted by exp(similarity / T), T = 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, ks=DEFAULT_KS, temperature: float = 0.07,
                 chunk_size: int = 256) -> dict[int, float]:
    """Top-1 accuracy in percent for each k (k larger than the training set is clipped to its size)."""
    if train_labels.min() < 0 or val_labels.min() < 0:
        raise ValueError("k-NN evaluation needs labelled images (class subfolders) in both train and val folders")
    train_n = F.normalize(train_feats.float(), dim=1)
    val_n = F.normalize(val_feats.float(), dim=1)
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    max_k = min(max(ks), len(train_n))
    correct = {k: 0 for k in ks}
    for start in range(0, len(val_n), chunk_size):
        sims = val_n[start:start + chunk_size] @ train_n.T
        top_sims, top_idx = sims.topk(max_k, dim=1)
        top_labels = train_labels[top_idx]
        truth = val_labels[start:start + chunk_size]
        for k in ks:
            kk = min(k, max_k)
            weights = (top_sims[:, :kk] / temperature).exp()
            votes = torch.zeros(len(truth), n_classes).scatter_add_(1, top_labels[:, :kk], weights)
            correct[k] += int((votes.argmax(1) == truth).sum())
    return {k: 100.0 * correct[k] / len(val_n) for k in ks}


def knn_of_models(models: dict, train_root, val_root, crop: int, resize: int, classes, device: torch.device,
                  batch_size: int = 64, ks=DEFAULT_KS, temperature: float = 0.07) -> dict[str, dict[int, float]]:
    """{name: {k: top-1 %}} of each model's features on `train_root` -> `val_root` (resize, centre crop `crop`)."""
    from dinotrain.eval.features import extract_features

    results = {}
    for name, net in models.items():
        net = net.to(device)
        tr_f, tr_y = extract_features(net, train_root, crop, batch_size, device=device, classes=classes,
                                      resize_size=resize)
        va_f, va_y = extract_features(net, val_root, crop, batch_size, device=device, classes=classes,
                                      resize_size=resize)
        results[name] = knn_accuracy(tr_f, tr_y, va_f, va_y, ks=ks, temperature=temperature)
    return results


def knn_line(name: str, accs: dict[int, float]) -> str:
    """The printed result line of one model, e.g. ``k-NN top-1 (model): k=10: 41.78%  k=20: 42.90%``."""
    return f"k-NN top-1 ({name}): " + "  ".join(f"k={k}: {acc:.2f}%" for k, acc in accs.items())
