"""Teacher centering (single process): softmax centering, the EMA centre, Sinkhorn-Knopp.

References are written with explicit loops in float64 and never call the implementation.
"""

import math

import numpy as np
import pytest
import torch

from dinotrain.losses.centering import ema_center_update, sinkhorn_knopp, softmax_center


def np_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """Loop-based float64 Sinkhorn-Knopp, following the DINOv2 paper's K x B notation."""
    q = np.exp(logits.astype(np.float64) / temp).T.copy()  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        for row in range(k):
            q[row] /= q[row].sum()
            q[row] /= k
        for col in range(b):
            q[:, col] /= q[:, col].sum()
            q[:, col] /= b
    q *= b
    return q.T


def prototype_imbalance(probs: torch.Tensor) -> float:
    """Max relative deviation of the per-prototype mass from the uniform B/K."""
    b, k = probs.shape
    return ((probs.double().sum(0) / (b / k)) - 1).abs().max().item()


def test_softmax_center_matches_loop_reference():
    t = torch.randn(4, 6, dtype=torch.float64)
    center = torch.randn(1, 6, dtype=torch.float64)
    out = softmax_center(t, center, 0.07)
    for i in range(4):
        z = [(t[i, j].item() - center[0, j].item()) / 0.07 for j in range(6)]
        m = max(z)
        denom = sum(math.exp(v - m) for v in z)
        for j in range(6):
            assert out[i, j].item() == pytest.approx(math.exp(z[j] - m) / denom, rel=1e-10, abs=1e-14)


def test_softmax_center_keeps_shape_with_3d_center():
    t = torch.randn(2, 3, 5)
    out = softmax_center(t, torch.zeros(1, 1, 5), 0.1)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))


def test_ema_center_update_value():
    center = torch.randn(1, 5)
    before = center.clone()
    t = torch.randn(7, 5)
    ema_center_update(center, t, momentum=0.9)
    for j in range(5):
        mean_j = sum(t[i, j].item() for i in range(7)) / 7
        assert center[0, j].item() == pytest.approx(before[0, j].item() * 0.9 + mean_j * 0.1, rel=1e-5, abs=1e-6)


def test_ema_center_update_averages_all_tokens_and_upcasts():
    center = torch.zeros(1, 1, 4)
    t = torch.randn(3, 5, 4).to(torch.bfloat16)
    ema_center_update(center, t, momentum=0.5)
    expected = 0.5 * t.double().reshape(-1, 4).mean(0)
    torch.testing.assert_close(center.reshape(-1).double(), expected, rtol=1e-5, atol=1e-6)
    assert center.dtype == torch.float32


def test_ema_center_update_empty_batch_keeps_center():
    center = torch.ones(1, 3)
    ema_center_update(center, torch.empty(0, 3), momentum=0.9)
    torch.testing.assert_close(center, torch.ones(1, 3))


@pytest.mark.parametrize("n_iterations", [0, 1, 3, 7])
def test_sinkhorn_matches_numpy_reference_float64(n_iterations):
    t = torch.randn(10, 6, dtype=torch.float64)
    out = sinkhorn_knopp(t, 0.1, n_iterations=n_iterations)
    ref = np_sinkhorn(t.numpy(), 0.1, n_iterations)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_sinkhorn_float32_and_bf16_inputs_compute_in_float32():
    t = torch.randn(12, 8)
    ref = np_sinkhorn(t.numpy(), 0.05, 3)
    out = sinkhorn_knopp(t, 0.05)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-6)
    tb = t.to(torch.bfloat16)
    out_b = sinkhorn_knopp(tb, 0.05)
    assert out_b.dtype == torch.float32
    np.testing.assert_allclose(out_b.numpy(), np_sinkhorn(tb.float().numpy(), 0.05, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_rows_sum_to_one_and_prototypes_balance():
    b, k = 64, 8
    # A teacher biased towards the last prototypes (the collapse that centering must prevent).
    t = torch.randn(b, k) * 0.3 + torch.linspace(-0.3, 0.3, k)
    temp = 0.1
    unbalanced = prototype_imbalance(torch.softmax(t / temp, dim=-1))
    assert unbalanced > 1.0
    errs = {}
    for n in (1, 3, 10, 300):
        q = sinkhorn_knopp(t, temp, n_iterations=n)
        torch.testing.assert_close(q.sum(1), torch.ones(b))  # each sample is an assignment
        errs[n] = prototype_imbalance(q)
    # Three iterations only get part of the way: much better than plain softmax, not exact.
    assert errs[3] < 0.6 and errs[3] < 0.5 * unbalanced
    assert errs[1] > errs[3] > errs[10]
    assert errs[300] < 1e-4  # converged: every prototype gets B/K


def test_sinkhorn_three_iterations_balance_cosine_range_logits():
    # Head outputs are cosines in [-1, 1]; at this spread 3 iterations already balance well.
    t = torch.randn(256, 8) * 0.1
    assert prototype_imbalance(sinkhorn_knopp(t, 0.1)) < 0.01


def test_sinkhorn_does_not_overflow_for_large_logits():
    # logits / temp ~ 200-300: exp overflows float32 without the max shift; float64 numpy does not.
    t = torch.randn(6, 5, dtype=torch.float64) + 12.0
    out = sinkhorn_knopp(t.float(), 0.05)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(t.float().double().numpy(), 0.05, 3), rtol=1e-3, atol=1e-6)


def test_sinkhorn_n_samples_tensor_is_not_modified():
    n = torch.tensor([9])
    sinkhorn_knopp(torch.randn(9, 4), 0.1, n_samples=n)
    assert n.item() == 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(teacher_output=torch.randn(3, 4, 5), teacher_temp=0.1), "2 dims"),
        (dict(teacher_output=torch.randn(3, 4), teacher_temp=0.0), "teacher_temp"),
        (dict(teacher_output=torch.randn(3, 4), teacher_temp=0.1, n_iterations=-1), "n_iterations"),
        (dict(teacher_output=torch.ones(3, 4, dtype=torch.long), teacher_temp=0.1), "floating-point"),
    ],
)
def test_sinkhorn_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp(**kwargs)


def test_center_size_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="prototypes"):
        softmax_center(torch.randn(2, 4), torch.zeros(1, 5), 0.1)
    with pytest.raises(ValueError, match="prototypes"):
        ema_center_update(torch.zeros(1, 5), torch.randn(2, 4), 0.9)


def _sinkhorn_out_of_place(t, temp, n_iterations=3):
    """The allocate-per-op sequence the in-place implementation replaced (single process)."""
    logits = t.float() / temp
    q = torch.exp(logits - logits.max()).t()
    b, k = torch.tensor(float(t.shape[0])), t.shape[1]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


class _LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts op outputs of at least `numel` elements that are new storage (not views, not in-place results)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.numel() >= self.numel and o.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


def test_sinkhorn_in_place_is_bitwise_the_out_of_place_sequence_with_one_buffer():
    t = torch.randn(64, 512)
    before = t.clone()
    with _LargeAllocations(t.numel()) as fast:
        out = sinkhorn_knopp(t, 0.07)
    with _LargeAllocations(t.numel()) as slow:
        ref = _sinkhorn_out_of_place(t, 0.07)
    assert torch.equal(out, ref)  # same arithmetic, op for op
    assert torch.equal(t, before)  # the caller's logits are left alone
    assert fast.count == 1 and slow.count >= 10, (fast.count, slow.count)
