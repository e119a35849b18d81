"""iBOTPatchLoss: per-image weighting of masked tokens, padding, centring state."""

import math

import pytest
import torch

from dinotrain.losses import iBOTPatchLoss


def ref_ce(s_row, t_row, temp):
    z = [v / temp for v in s_row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return sum(t * (zv - lse) for t, zv in zip(t_row, z))


def ref_forward_masked(student_tokens, teacher_tokens, masks, temp):
    """Loop reference: walk the images and their masked positions in row-major order."""
    n_images, n_tokens = masks.shape
    row, total = 0, 0.0
    for i in range(n_images):
        count = int(sum(bool(masks[i, j]) for j in range(n_tokens)))
        for j in range(n_tokens):
            if masks[i, j]:
                ce = ref_ce(student_tokens[row].tolist(), teacher_tokens[row].tolist(), temp)
                total -= ce / count
                row += 1
    assert row == student_tokens.shape[0]
    return total / n_images


def make_batch(masks, k=5, dtype=torch.float64):
    m = int(masks.sum())
    s = torch.randn(m, k, dtype=dtype)
    t = torch.softmax(torch.randn(m, k, dtype=dtype) * 2, dim=-1)
    return s, t


def test_forward_masked_matches_loop_reference():
    masks = torch.rand(4, 9) < 0.4
    masks[2] = False  # an image without masked tokens still counts in N_images
    masks[0, 0] = True
    s, t = make_batch(masks)
    out = iBOTPatchLoss(5, student_temp=0.1).forward_masked(s, t, masks)
    assert out.item() == pytest.approx(ref_forward_masked(s, t, masks, 0.1), rel=1e-10)


def test_images_count_equally_regardless_of_masked_count():
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, 3] = True  # 1 masked token
    masks[1, :10] = True  # 10 masked tokens
    k = 4
    # Every token has the same student/teacher pair, so each token's CE is the same c.
    s = torch.randn(1, k, dtype=torch.float64).expand(11, k).clone().requires_grad_(True)
    t = torch.softmax(torch.randn(1, k, dtype=torch.float64), -1).expand(11, k)
    c = ref_ce(s[0].tolist(), t[0].tolist(), 0.1)
    loss = iBOTPatchLoss(k).forward_masked(s, t, masks)
    assert loss.item() == pytest.approx(-(c + c) / 2, rel=1e-10)  # not -(11 c) / 2
    loss.backward()
    g_single = s.grad[0].norm()
    g_each_of_ten = s.grad[1:].norm(dim=1)
    torch.testing.assert_close(g_each_of_ten, torch.full((10,), g_single.item() / 10, dtype=torch.float64))
    torch.testing.assert_close(s.grad[1:].sum(0), s.grad[0])  # image 1's tokens together == image 0's one


def test_n_masked_patches_ignores_padding_rows():
    masks = torch.rand(3, 8) < 0.5
    masks[:, 0] = True
    s, t = make_batch(masks)
    n = s.shape[0]
    s_pad = torch.cat([s, torch.randn(6, 5, dtype=s.dtype) * 100])
    t_pad = torch.cat([t, torch.rand(6, 5, dtype=t.dtype)])
    loss = iBOTPatchLoss(5)
    expected = ref_forward_masked(s, t, masks, 0.1)
    assert loss.forward_masked(s_pad, t_pad, masks, n_masked_patches=n).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="mask weights"):
        loss.forward_masked(s_pad, t_pad, masks)


def test_explicit_masks_weight_is_used():
    masks = torch.ones(2, 3, dtype=torch.bool)
    s, t = make_batch(masks)
    w = torch.arange(1, 7, dtype=torch.float64)
    out = iBOTPatchLoss(5).forward_masked(s, t, masks, masks_weight=w)
    expected = -sum(w[r].item() * ref_ce(s[r].tolist(), t[r].tolist(), 0.1) for r in range(6)) / 2
    assert out.item() == pytest.approx(expected, rel=1e-10)


def test_bf16_inputs_give_float32_loss():
    masks = torch.rand(2, 6) < 0.5
    masks[:, 0] = True
    s, t = make_batch(masks, dtype=torch.float32)
    out = iBOTPatchLoss(5).forward_masked(s.bfloat16(), t.bfloat16(), masks)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_center_buffer_softmax_and_ema_update():
    loss = iBOTPatchLoss(6, center_momentum=0.9)
    sd = loss.state_dict()
    assert "center" in sd and sd["center"].shape == (1, 1, 6) and (sd["center"] == 0).all()
    tokens = torch.randn(3, 4, 6)  # (images, tokens, K)
    loss.update_center(tokens)
    official = tokens.mean(1).sum(0, keepdim=True) / tokens.shape[0]  # official formula
    torch.testing.assert_close(loss.center, 0.1 * official.unsqueeze(0))
    flat = torch.randn(7, 6)
    p = loss.softmax_center_teacher(flat, 0.07)
    assert p.shape == (7, 6)  # a 2-D input is not broadcast to 3-D by the (1, 1, K) centre
    torch.testing.assert_close(p, torch.softmax((flat - loss.center.reshape(6)) / 0.07, -1))
    assert loss.softmax_center_teacher(tokens, 0.07).shape == tokens.shape


def test_sinkhorn_teacher_uses_count_and_leaves_it_untouched():
    loss = iBOTPatchLoss(8)
    t = torch.randn(20, 8)
    n = torch.tensor([20])
    q = loss.sinkhorn_knopp_teacher(t, 0.07, n, n_iterations=200)
    assert n.item() == 20
    torch.testing.assert_close(q.sum(1), torch.ones(20))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 20 / 8), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_value_error():
    loss = iBOTPatchLoss(4)
    with pytest.raises(ValueError, match="bool"):
        loss.forward_masked(torch.randn(2, 4), torch.randn(2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="same shape"):
        loss.forward_masked(torch.randn(2, 4), torch.randn(3, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_out_dim"):
        iBOTPatchLoss(0)
