"""DINOLoss: the pairwise cross-entropy, the view swap, normalisation, and the centre state."""

import math

import pytest
import torch

from dinotrain.losses import DINOLoss, dino_crossview_losses


def ref_mean_ce(student, teacher, temp):
    """-mean_b sum_k t_bk * log_softmax(s_b / temp)_k with explicit loops, in float64."""
    total = 0.0
    for b in range(student.shape[0]):
        z = [student[b, k].item() / temp for k in range(student.shape[1])]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        total -= sum(teacher[b, k].item() * (z[k] - lse) for k in range(student.shape[1]))
    return total / student.shape[0]


def ref_crossview(student_global, student_local, teacher_probs, n_global, temp):
    """Official meta-arch normalisation, written out pair by pair."""
    b = teacher_probs.shape[0] // n_global
    sg = [student_global[i * b:(i + 1) * b] for i in range(n_global)]
    tg = [teacher_probs[i * b:(i + 1) * b] for i in range(n_global)]
    n_local = 0 if student_local is None else student_local.shape[0] // b
    sl = [student_local[i * b:(i + 1) * b] for i in range(n_local)]
    denom = (n_global - 1) * n_global + max(n_local * n_global, 1)
    g = sum(ref_mean_ce(sg[i], tg[j], temp) for i in range(n_global) for j in range(n_global) if i != j)
    loc = sum(ref_mean_ce(s, t, temp) for s in sl for t in tg)
    return g / denom, loc / denom


def probs(n, k, dtype=torch.float64):
    return torch.softmax(torch.randn(n, k, dtype=dtype) * 2, dim=-1)


def test_forward_matches_loop_reference():
    loss = DINOLoss(5, student_temp=0.1)
    students = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    teachers = [probs(4, 5) for _ in range(2)]
    expected = sum(ref_mean_ce(s, t, 0.1) for s in students for t in teachers)
    assert loss(students, teachers).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n_global, n_local", [(2, 3), (2, 0), (3, 2), (1, 2)])
def test_crossview_matches_loop_reference(n_global, n_local):
    b, k, temp = 3, 6, 0.1
    sg = torch.randn(n_global * b, k, dtype=torch.float64)
    sl = torch.randn(n_local * b, k, dtype=torch.float64) if n_local else None
    tp = probs(n_global * b, k)
    g, loc = dino_crossview_losses(sg, sl, tp, n_global=n_global, student_temp=temp)
    g_ref, l_ref = ref_crossview(sg, sl, tp, n_global, temp)
    assert g.item() == pytest.approx(g_ref, rel=1e-10, abs=1e-12)
    assert loc.item() == pytest.approx(l_ref, rel=1e-10, abs=1e-12)


def test_crossview_equals_official_form_for_two_global_views():
    b, k, n_local = 4, 7, 3
    loss = DINOLoss(k, student_temp=0.1)
    sg = torch.randn(2 * b, k, dtype=torch.float64)
    sl = torch.randn(n_local * b, k, dtype=torch.float64)
    tp = probs(2 * b, k)
    t0, t1 = tp.chunk(2)
    terms = 2 * 1 + max(n_local * 2, 1)
    official_global = loss([sg], [torch.cat([t1, t0])]) * 2 / terms  # swapped teacher, flattened
    official_local = loss(list(sl.chunk(n_local)), [t1, t0]) / terms
    g, loc = loss.dino_crossview_losses(sg, sl, tp)
    torch.testing.assert_close(g, official_global)
    torch.testing.assert_close(loc, official_local)


def test_global_views_are_swapped_never_self_paired():
    b, k, temp = 5, 4, 0.1
    # Teacher view A is one-hot on prototype 0, view B on prototype 3; the student's view A logits
    # agree with teacher A exactly (self-pair cost ~0) and disagree with teacher B (cost ~ 200).
    t_a = torch.zeros(b, k, dtype=torch.float64)
    t_a[:, 0] = 1
    t_b = torch.zeros(b, k, dtype=torch.float64)
    t_b[:, 3] = 1
    s_a = 20.0 * (t_a - 0.5)
    s_b = 20.0 * (t_b - 0.5)
    teacher = torch.cat([t_a, t_b])
    student = torch.cat([s_a, s_b])
    g, loc = dino_crossview_losses(student, None, teacher, student_temp=temp)
    cross = ref_mean_ce(s_a, t_b, temp) + ref_mean_ce(s_b, t_a, temp)
    self_pairs = ref_mean_ce(s_a, t_a, temp) + ref_mean_ce(s_b, t_b, temp)
    assert self_pairs < 1e-6 and cross > 100
    assert g.item() == pytest.approx(cross / 3, rel=1e-10)  # 2 pairs + max(0, 1) local terms
    assert loc.item() == 0.0


def test_no_local_crops_normalisation_and_zero_local_loss():
    sg = torch.randn(6, 5, dtype=torch.float64)
    tp = probs(6, 5)
    for empty in (None, torch.empty(0, 5, dtype=torch.float64)):
        g, loc = dino_crossview_losses(sg, empty, tp)
        s0, s1 = sg.chunk(2)
        t0, t1 = tp.chunk(2)
        expected = (ref_mean_ce(s0, t1, 0.1) + ref_mean_ce(s1, t0, 0.1)) / 3
        assert g.item() == pytest.approx(expected, rel=1e-10)
        assert loc.item() == 0.0 and loc.device == sg.device


def test_crossview_gradients_reach_students_only_via_log_softmax():
    sg = torch.randn(4, 6, requires_grad=True)
    sl = torch.randn(8, 6, requires_grad=True)
    g, loc = dino_crossview_losses(sg, sl, probs(4, 6, torch.float32))
    (g + loc).backward()
    assert torch.isfinite(sg.grad).all() and sg.grad.abs().sum() > 0
    assert torch.isfinite(sl.grad).all() and sl.grad.abs().sum() > 0


def test_bf16_inputs_give_float32_loss():
    loss = DINOLoss(8)
    s = torch.randn(4, 8).to(torch.bfloat16)
    t = probs(4, 8, torch.float32).to(torch.bfloat16)
    out = loss([s], [t])
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_center_buffer_state_dict_and_ema_update():
    loss = DINOLoss(6, center_momentum=0.8)
    sd = loss.state_dict()
    assert "center" in sd and sd["center"].shape == (1, 6) and (sd["center"] == 0).all()
    t = torch.randn(5, 6)
    p_before = loss.softmax_center_teacher(t, 0.04)
    torch.testing.assert_close(p_before, torch.softmax(t / 0.04, -1))
    assert (loss.center == 0).all()  # softmax centering does not update
    loss.update_center(t)
    torch.testing.assert_close(loss.center, 0.2 * t.mean(0, keepdim=True))
    loss.update_center(t)
    torch.testing.assert_close(loss.center, (0.8 * 0.2 + 0.2) * t.mean(0, keepdim=True))
    torch.testing.assert_close(loss.softmax_center_teacher(t, 0.04), torch.softmax((t - loss.center) / 0.04, -1))

    restored = DINOLoss(6)
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored.center, loss.center)


def test_sinkhorn_teacher_rows_are_distributions():
    loss = DINOLoss(16)
    q = loss.sinkhorn_knopp_teacher(torch.randn(32, 16).to(torch.bfloat16), 0.07)
    assert q.dtype == torch.float32 and q.shape == (32, 16)
    torch.testing.assert_close(q.sum(1), torch.ones(32))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(4, student_temp=0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(4, center_momentum=1.5)
    with pytest.raises(ValueError, match="same shape"):
        DINOLoss(4)([torch.randn(3, 4)], [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="lists"):
        DINOLoss(4)(torch.randn(3, 4), [torch.randn(3, 4)])
    with pytest.raises(ValueError, match="divisible"):
        dino_crossview_losses(torch.randn(5, 4), None, torch.randn(5, 4))
    with pytest.raises(ValueError, match="multiple"):
        dino_crossview_losses(torch.randn(6, 4), torch.randn(4, 4), torch.randn(6, 4))
