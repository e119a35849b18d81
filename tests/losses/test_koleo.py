"""KoLeoLoss against a loop reference, and its degenerate batches."""

import math

import pytest
import torch

from dinotrain.losses import KoLeoLoss


def ref_koleo(x, eps=1e-8):
    rows = []
    for r in x.tolist():
        n = max(math.sqrt(sum(v * v for v in r)), eps)
        rows.append([v / n for v in r])
    total = 0.0
    for i, a in enumerate(rows):
        best, best_j = -math.inf, None
        for j, b in enumerate(rows):
            if j != i:
                d = sum(u * v for u, v in zip(a, b))
                if d > best:
                    best, best_j = d, j
        b = rows[best_j]
        dist = math.sqrt(sum((u - v + eps) ** 2 for u, v in zip(a, b)))  # PairwiseDistance adds eps
        total -= math.log(dist + eps)
    return total / len(rows)


def test_matches_loop_reference():
    x = torch.randn(9, 5, dtype=torch.float64)
    assert KoLeoLoss()(x).item() == pytest.approx(ref_koleo(x), rel=1e-10)


def test_matches_loop_reference_float32_with_custom_eps():
    x = torch.randn(6, 4)
    assert KoLeoLoss()(x, eps=1e-4).item() == pytest.approx(ref_koleo(x.double(), eps=1e-4), rel=1e-5)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batch_is_zero_and_differentiable(n):
    x = torch.randn(n, 4, requires_grad=True)
    out = KoLeoLoss()(x)
    assert out.shape == () and out.item() == 0.0 and out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_duplicated_rows_stay_finite():
    x = torch.randn(3, 6)
    x = torch.cat([x, x[:1]]).requires_grad_(True)  # rows 0 and 3 identical
    out = KoLeoLoss()(x)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(ref_koleo(x.detach().double()), rel=1e-4)
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_all_rows_identical_stay_finite():
    x = torch.ones(4, 3, requires_grad=True)
    out = KoLeoLoss()(x)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def test_never_picks_itself_as_neighbour():
    # Two antipodal rows: dot = -1 with each other; the neighbour must still be the other row.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(2.0), rel=1e-6)


def test_gradient_is_finite_and_low_precision_is_upcast():
    x = torch.randn(16, 8, requires_grad=True)
    out = KoLeoLoss()(x.bfloat16())
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        KoLeoLoss()(torch.randn(2, 3, 4))


def test_pool_mode_equals_plain_koleo_over_the_union():
    """Two 'ranks' each scoring their rows against the gathered pool average to the whole-batch KoLeo."""
    torch.manual_seed(3)
    x = torch.randn(10, 6, dtype=torch.float64)
    whole = KoLeoLoss()(x)
    halves = [KoLeoLoss()(x[r * 5:(r + 1) * 5], pool=x, offset=r * 5) for r in range(2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, whole)
