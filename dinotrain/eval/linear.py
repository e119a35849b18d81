"""Linear probes on frozen features: the DINOv2 linear evaluation, every head trained at once on cached features.

As the official evaluation (dinov2/eval/linear.py): a linear layer on the class tokens of the last 1 or 4
blocks (each after the final norm), concatenated, optionally with the average-pooled patch tokens of the last
block; one head per (blocks, avgpool, learning rate), all trained together with SGD (momentum 0.9, no weight
decay, cosine schedule to 0, lr scaled by batch / 256, weights ~ N(0, 0.01), bias 0); the best on val is the
result. One difference, on purpose: features are computed once, without the official random-resized-crop and
flip of the training images, so the whole sweep trains on cached features in seconds instead of re-running the
backbone every step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dinotrain.eval.features import extract_features

log = logging.getLogger("dinotrain.eval")

# the official sweep (dinov2/eval/linear.py: --learning-rates) and head variants (--n-last-blocks x avgpool)
OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
OFFICIAL_ITERATIONS = 12500  # 10 epochs of 1250 iterations
OFFICIAL_BATCH = 256


@dataclass
class LinearFeatures:
    """What every head variant needs, cached: class tokens of the last blocks and the mean patch token."""

    class_tokens: torch.Tensor  # (N, n_blocks, D), oldest block first
    patch_mean: torch.Tensor  # (N, D), average of the last block's patch tokens
    labels: torch.Tensor  # (N,)


@dataclass(frozen=True)
class HeadConfig:
    n_blocks: int
    avgpool: bool
    pooled: bool = False  # a timm / torchvision backbone: its pooled features (cached as the one "class token")

    @property
    def name(self) -> str:
        if self.pooled:
            return "pooled"
        return f"blocks{self.n_blocks}" + ("_avgpool" if self.avgpool else "")

    def inputs(self, feats: LinearFeatures) -> torch.Tensor:
        """The official `create_linear_input`: class tokens of the last n blocks, then the mean patch token."""
        x = feats.class_tokens[:, -self.n_blocks:].flatten(1)
        return torch.cat([x, feats.patch_mean], dim=1) if self.avgpool else x


POOLED = HeadConfig(1, False, pooled=True)  # the one head of a timm / torchvision backbone


def head_configs(n_last_blocks: Sequence[int], avgpool: Sequence[bool], depth: int) -> list[HeadConfig]:
    for n in n_last_blocks:
        if not 1 <= n <= depth:
            raise ValueError(f"--n-last-blocks {n}: the backbone has {depth} blocks")
    return [HeadConfig(n, a) for n in sorted(set(n_last_blocks)) for a in sorted(set(avgpool))]


def extract_linear_features(model, root: str | os.PathLike, crop_size: int, resize_size: int, n_blocks: int,
                            batch_size: int = 64, num_workers: int = 0, classes: Optional[Sequence[str]] = None,
                            device: torch.device | None = None, pooled: bool = False) -> LinearFeatures:
    """Class tokens of the last `n_blocks` blocks and the mean patch token of each image (eval transform);
    `pooled` (a timm / torchvision backbone): its pooled features `model(images)`, what its own classifier reads,
    as the one class token (no patch mean: those features are already the average of its last map)."""

    def tokens(net, images):
        if pooled:
            features = net(images)
            return features[:, None], features.new_zeros(len(features), 0)
        outputs = net.get_intermediate_layers(images, n=n_blocks, return_class_token=True, norm=True)
        return torch.stack([c for _, c in outputs], dim=1), outputs[-1][0].mean(dim=1)

    (cls, means), labels = extract_features(model, root, crop_size, batch_size, num_workers, device, classes,
                                            resize_size=resize_size, forward=tokens)
    if labels.min() < 0:
        raise ValueError(f"linear evaluation needs labelled images (class subfolders) in {root}")
    return LinearFeatures(cls, means, labels)


@dataclass
class TrainedHeads:
    """Every learning rate's head of one variant: weight (L, C, Din), bias (L, C), in `lrs` order."""

    config: HeadConfig
    lrs: tuple[float, ...]
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, feats: LinearFeatures) -> torch.Tensor:
        """(L, N, C) logits of every head on `feats`."""
        x = self.config.inputs(feats).to(self.weight.device)
        return torch.einsum("nd,lcd->lnc", x, self.weight) + self.bias[:, None, :]


def initial_weights(n_heads: int, n_classes: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(L, C, Din) head weights ~ N(0, 0.01), as the official `LinearClassifier` (bias 0)."""
    return torch.randn(n_heads, n_classes, dim, generator=gen) * 0.01


def batch_indices(n: int, batch_size: int, iterations: int, gen: torch.Generator):
    """Indices of each step's batch: epochs of a reshuffled order, the incomplete tail dropped (drop_last)."""
    size = min(batch_size, n)
    order, cursor = torch.randperm(n, generator=gen), 0
    for _ in range(iterations):
        if cursor + size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor:cursor + size]
        cursor += size


def train_heads(train: LinearFeatures, n_classes: int, configs: Sequence[HeadConfig],
                lrs: Sequence[float] = OFFICIAL_LRS,
                iterations: int = OFFICIAL_ITERATIONS, batch_size: int = OFFICIAL_BATCH, seed: int = 0,
                device: torch.device | str = "cpu") -> list[TrainedHeads]:
    """Train one head per (config, lr), all at once on the same batches (the official sweep, on cached features).

    Each step is `torch.optim.SGD(momentum=0.9)` under `CosineAnnealingLR(T_max=iterations)` on the cross-entropy
    of every head, written out (gradient in closed form) for a stack of heads, so that all learning rates of a
    variant take one batched matmul.
    """
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"--iterations and --train-batch-size must be positive, got {iterations} and {batch_size}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    lrs = tuple(float(lr) for lr in lrs)
    scaled = torch.tensor(lrs, device=device) * batch_size / 256.0  # the official linear scaling rule
    heads, momenta, inputs = [], [], []
    for config in configs:
        x = config.inputs(train).to(device)
        weight = initial_weights(len(lrs), n_classes, x.shape[1], gen).to(device)
        heads.append(TrainedHeads(config, lrs, weight, torch.zeros(len(lrs), n_classes, device=device)))
        momenta.append([torch.zeros_like(weight), torch.zeros_like(heads[-1].bias)])
        inputs.append(x)
    labels = train.labels.to(device)
    for it, idx in enumerate(batch_indices(len(labels), batch_size, iterations, gen)):
        idx = idx.to(device)
        lr_now = scaled * 0.5 * (1.0 + math.cos(math.pi * it / iterations))  # cosine to 0
        onehot = F.one_hot(labels[idx], n_classes).to(scaled.dtype)
        for h, (mw, mb), x in zip(heads, momenta, inputs):
            xb = x[idx]  # (B, Din)
            logits = torch.matmul(h.weight, xb.T) + h.bias[:, :, None]  # (L, C, B)
            # gradient of each head's mean cross-entropy (the heads share nothing, so one head's loss moves only it)
            grad = (torch.softmax(logits, dim=1) - onehot.T) / len(idx)  # (L, C, B)
            mw.mul_(0.9).add_(torch.matmul(grad, xb))  # SGD momentum, dampening 0 (the first step leaves buf = g)
            mb.mul_(0.9).add_(grad.sum(dim=2))
            h.weight.sub_(lr_now[:, None, None] * mw)
            h.bias.sub_(lr_now[:, None] * mb)
    return heads


def accuracies(heads: TrainedHeads, val: LinearFeatures) -> list[float]:
    """Top-1 accuracy (%) of each learning rate's head on `val`."""
    pred = heads.logits(val).argmax(-1).cpu()
    return [100.0 * float((p == val.labels).float().mean()) for p in pred]


def linear_eval(train: LinearFeatures, val: LinearFeatures, n_classes: int, configs: Sequence[HeadConfig],
                **train_kwargs) -> tuple[dict, list[TrainedHeads]]:
    """Train the sweep and evaluate it on val: {config name: {lr: accuracy}} and the trained heads."""
    start = time.perf_counter()
    heads = train_heads(train, n_classes, configs, **train_kwargs)
    results = {h.config.name: dict(zip((f"{lr:g}" for lr in h.lrs), accuracies(h, val))) for h in heads}
    log.info("trained %d linear heads in %.1f s", sum(len(h.lrs) for h in heads), time.perf_counter() - start)
    return results, heads


def best_head(heads: Sequence[TrainedHeads], val: LinearFeatures, allowed=None) -> tuple[HeadConfig, int, float]:
    """(config, lr index, accuracy) of the best head on val, among configs `allowed(config)` accepts."""
    best = None
    for h in heads:
        if allowed is not None and not allowed(h.config):
            continue
        for i, acc in enumerate(accuracies(h, val)):
            if best is None or acc > best[2]:
                best = (h.config, i, acc)
    if best is None:
        raise ValueError("no head variant qualifies")
    return best


def export_best_classifier(model, heads: Sequence[TrainedHeads], val: LinearFeatures, class_names: Sequence[str],
                           dst, resize_size: int, crop_size: int) -> tuple[Path, TrainedHeads, int, float]:
    """The best head that transformers can run (1 block; CLS only for DINO v1), with the backbone, as a classifier dir.

    The position table is resampled once to the evaluated grid by the forward's own method, so transformers runs
    the classifier at its native size and predicts what this evaluation predicts. Returns (path, heads, lr index,
    val accuracy).
    """
    from dinotrain.eval.hf_classifier import classifier_supports, save_hf_classifier
    from dinotrain.weights.state_dict import fit_pos_embed

    spec = model.spec
    config, index, acc = best_head(heads, val, allowed=lambda c: classifier_supports(spec, c.n_blocks, c.avgpool))
    trained = next(h for h in heads if h.config == config)
    grid_spec = dataclasses.replace(spec, img_size=crop_size // spec.patch_size * spec.patch_size)
    state = fit_pos_embed(model.state_dict(), grid_spec, what="backbone")
    out = save_hf_classifier(state, grid_spec, trained.weight[index], trained.bias[index], config.avgpool, class_names,
                             dst, resize_size, crop_size)
    return out, trained, index, acc
