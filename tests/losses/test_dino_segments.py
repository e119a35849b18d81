"""dino_crossview_targets: the DINO cross-view losses from one cross-entropy over [local; global] student rows
against target segments equal `dino_crossview_losses` (values and gradients), for any view counts."""

import pytest
import torch
import torch.nn.functional as F

from dinotrain.losses.cross_entropy import soft_cross_entropy
from dinotrain.losses.dino import dino_crossview_losses, dino_crossview_targets


@pytest.mark.parametrize("n_global,n_local", [(2, 8), (2, 0), (1, 3), (3, 2)])
def test_segments_give_the_crossview_losses(n_global, n_local):
    g = torch.Generator().manual_seed(n_global * 10 + n_local)
    b, k = 3, 50
    student = torch.randn((n_local + n_global) * b, k, generator=g, dtype=torch.float64)
    teacher = F.softmax(torch.randn(n_global * b, k, generator=g, dtype=torch.float64) / 0.05, dim=-1)
    a, s = student.clone().requires_grad_(), student.clone().requires_grad_()
    local_ref = s[: n_local * b] if n_local else None
    g_ref, l_ref = dino_crossview_losses(s[n_local * b:], local_ref, teacher, n_global, student_temp=0.1)

    local_t, global_t, denom = dino_crossview_targets(teacher, n_global, n_local)
    assert len(local_t) == n_local and len(global_t) == n_global
    ce = soft_cross_entropy(a, [*local_t, *global_t], 0.1)
    l_seg, g_seg = ce[: n_local * b].sum() / (b * denom), ce[n_local * b:].sum() / (b * denom)
    torch.testing.assert_close(g_seg, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(l_seg, l_ref, rtol=1e-12, atol=1e-14)
    (2 * g_seg + 3 * l_seg).backward()
    (2 * g_ref + 3 * l_ref).backward()
    torch.testing.assert_close(a.grad, s.grad, rtol=1e-12, atol=1e-14)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="n_global"):
        dino_crossview_targets(torch.zeros(5, 4), 2, 1)
    with pytest.raises(ValueError, match="n_global"):
        dino_crossview_targets(torch.zeros(4, 4), 0, 1)
