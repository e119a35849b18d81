"""soft_cross_entropy: the log-softmax cross-entropy's values and gradients, computed in row blocks without
keeping (M, K) log-probabilities for the backward."""

import pytest
import torch
import torch.nn.functional as F

from dinotrain.losses import cross_entropy
from dinotrain.losses.cross_entropy import soft_cross_entropy


def reference(logits, targets, temp):
    """The textbook expression the DINO and iBOT losses were written with."""
    return -(targets * F.log_softmax(logits / temp, dim=-1)).sum(dim=-1)


def inputs(m, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, k, generator=g, dtype=torch.float64).mul(3).to(dtype)
    targets = F.softmax(torch.randn(m, k, generator=g, dtype=torch.float64) / 0.05, dim=-1).to(dtype)
    return logits, targets


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows for K = 1000, so several full blocks and a partial one are exercised."""
    monkeypatch.setattr(cross_entropy, "_BLOCK_BYTES", 3 * 4 * 1000)


def assert_matches_reference(logits, targets, full_targets, tol):
    """soft_cross_entropy(logits, targets) equals the textbook expression against `full_targets`, values and
    gradients of a weighted sum; returns the gradient."""
    weights = torch.rand(logits.shape[0], dtype=logits.dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    fast, slow = soft_cross_entropy(a, targets, 0.1), reference(b, full_targets, 0.1)
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
    return a.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_values_and_gradients_match_the_log_softmax_expression(small_blocks, dtype, tol):
    logits, targets = inputs(11, 1000, dtype)
    grad = assert_matches_reference(logits, targets, targets, tol)
    assert grad.dtype == dtype


def test_gradcheck_float64(small_blocks):
    logits, targets = inputs(7, 1000, torch.float64)
    logits = logits[:, :12].contiguous().requires_grad_()
    targets = targets[:, :12].contiguous()
    assert torch.autograd.gradcheck(lambda x: soft_cross_entropy(x, targets, 0.07), (logits,))


def test_inputs_are_left_untouched(small_blocks):
    logits, targets = inputs(5, 1000)
    before_l, before_t = logits.clone(), targets.clone()
    x = logits.requires_grad_()
    soft_cross_entropy(x, targets, 0.1).sum().backward()
    assert torch.equal(logits.detach(), before_l) and torch.equal(targets, before_t)


def test_linear_in_the_targets():
    logits, t1 = inputs(6, 300, seed=1)
    _, t2 = inputs(6, 300, seed=2)
    torch.testing.assert_close(soft_cross_entropy(logits, t1 + t2, 0.1),
                               soft_cross_entropy(logits, t1, 0.1) + soft_cross_entropy(logits, t2, 0.1))


def test_half_precision_logits_are_read_in_float32():
    logits, targets = inputs(4, 500, torch.float32)
    x = logits.bfloat16().requires_grad_()
    out = soft_cross_entropy(x, targets, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x.detach().float(), targets, 0.1), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_backward_keeps_no_block_of_log_probabilities():
    """Autograd saves only the inputs (and per-row statistics); the textbook expression also keeps an
    (M, K) log-softmax."""
    logits, targets = inputs(8, 4096)
    x = logits.requires_grad_()

    def big_saved(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x, targets, 0.1).sum()
        return {t.data_ptr() for t in saved if t.numel() >= x.numel()} - {x.data_ptr(), targets.data_ptr()}

    assert big_saved(soft_cross_entropy) == set()
    assert big_saved(reference)  # the reference does keep one: the check can fail


def test_empty_rows():
    x = torch.zeros(0, 10, requires_grad=True)
    out = soft_cross_entropy(x, torch.zeros(0, 10), 0.1)
    assert out.shape == (0,)
    out.sum().backward()
    assert x.grad.shape == (0, 10)


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.zeros(3), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_target_segments_equal_the_textbook_expression_on_each_part(small_blocks, dtype, tol):
    logits, _ = inputs(14, 1000, dtype)
    _, t_a = inputs(5, 1000, dtype, seed=1)
    _, t_b = inputs(2, 1000, dtype, seed=2)
    segments = [t_a, t_b, t_a, torch.zeros(0, 1000, dtype=dtype), t_b[:2]]  # repeated, empty, a view
    full = torch.cat(segments)
    assert full.shape[0] == 14
    assert_matches_reference(logits, segments, full, tol)


def test_bad_segments_are_refused_in_one_line():
    with pytest.raises(ValueError, match="sum\\(M_i\\) = M"):
        soft_cross_entropy(torch.zeros(4, 3), [torch.zeros(2, 3), torch.zeros(1, 3)], 0.1)
    with pytest.raises(ValueError, match="sum\\(M_i\\) = M"):
        soft_cross_entropy(torch.zeros(4, 3), [torch.zeros(4, 2)], 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_written_into_the_logits_memory(small_blocks, dtype):
    """grad_in_logits: the same loss and gradient, with the gradient in the logits' own storage (an intermediate,
    as a head's output: only the loss reads it); a second backward through the graph fails instead of reading
    the overwritten logits."""
    logits, targets = inputs(11, 1000, dtype)
    weights = torch.rand(11, dtype=dtype)
    x = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    seen = {}

    def keep(grad):
        seen["grad"] = grad
        return grad

    intermediate = x * 1.0  # like the head's output: not a leaf, read by the loss alone
    intermediate.register_hook(keep)
    loss = (soft_cross_entropy(intermediate, targets, 0.1, grad_in_logits=True) * weights).sum()
    expected = (soft_cross_entropy(x2, targets, 0.1) * weights).sum()
    assert torch.equal(loss, expected)
    loss.backward(retain_graph=True)
    expected.backward()
    assert seen["grad"].untyped_storage().data_ptr() == intermediate.untyped_storage().data_ptr()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, seen["grad"], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
