"""Weighted k-NN against a direct loop-based computation."""

import math

import pytest
import torch

from dinotrain.eval.knn import knn_accuracy


def _reference(train_f, train_y, val_f, val_y, k, t):
    correct = 0
    for v, y in zip(val_f, val_y):
        sims = [(float(torch.dot(v / v.norm(), x / x.norm())), int(lab)) for x, lab in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for s, lab in sims[:k]:
            votes[lab] = votes.get(lab, 0.0) + math.exp(s / t)
        correct += max(votes, key=votes.get) == int(y)
    return 100.0 * correct / len(val_y)


def test_matches_reference():
    g = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_y, val_y = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    accs = knn_accuracy(train_f, train_y, val_f, val_y, ks=(1, 5, 20), temperature=0.07, chunk_size=7)
    for k in (1, 5, 20):
        assert accs[k] == pytest.approx(_reference(train_f, train_y, val_f, val_y, k, 0.07))


def test_separable_clusters_are_perfect_and_k_is_clipped():
    centers = torch.eye(3) * 10
    train_f = centers.repeat_interleave(5, 0) + 0.1 * torch.randn(15, 3)
    train_y = torch.arange(3).repeat_interleave(5)
    accs = knn_accuracy(train_f, train_y, centers, torch.arange(3), ks=(3, 200))
    assert accs[3] == 100.0 and 200 in accs


def test_unlabelled_is_an_error():
    with pytest.raises(ValueError, match="labelled"):
        knn_accuracy(torch.randn(4, 2), torch.full((4,), -1), torch.randn(2, 2), torch.zeros(2, dtype=torch.long))
