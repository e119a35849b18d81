"""The plan's meter: live bytes and their peak follow allocations, frees and storage resizes; FLOPs follow torch's
formulas, CPU flash attention included (a fake CPU step runs it where a GPU runs flash attention)."""

import torch
import torch.nn.functional as F

from dinotrain.plan.meter import StepMeter


def test_bytes_follow_allocations_frees_and_resizes():
    with StepMeter() as meter:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.float64)
        view = a[10:20]  # a view holds no new storage
        assert meter.current == 4000 + 4000
        del b
        assert meter.current == 4000
        a.untyped_storage().resize_(0)  # how FSDP2 frees a gathered parameter
        assert meter.current == 0
        a.untyped_storage().resize_(400)
        assert meter.current == 400
        del a, view
    assert meter.current == 0 and meter.peak == 8000


def test_granularity_rounds_like_the_cuda_allocator():
    with StepMeter(granularity=512) as meter:
        x = torch.empty(3, dtype=torch.uint8)
        assert meter.current == 512
        del x


def test_held_tensors_count_once_and_peaks_are_per_phase():
    w = torch.empty(250)  # made before: 1000 bytes
    with StepMeter() as meter:
        meter.hold(w, w, w[:5])
        meter.phase = "forward"
        y = torch.empty(250)
        meter.phase = "backward"
        del y
    assert meter.peaks == {"": 1000, "forward": 2000}
    assert meter.bytes_of([w, w[:3]]) == 1000


def test_flops_of_matmuls_and_of_cpu_flash_attention_equal_the_arithmetic():
    m, k, n = 7, 11, 13
    with StepMeter() as meter:
        torch.randn(m, k) @ torch.randn(k, n)
    assert meter.flops == 2 * m * k * n
    b, h, s, d = 2, 3, 17, 8
    q, key, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with StepMeter() as fused:
        out = F.scaled_dot_product_attention(q, key, v)
    # the same attention written as its two batched matmuls: q k^T and (softmax) v
    with StepMeter() as plain:
        ((q @ key.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v
    assert fused.flops == plain.flops == 2 * (2 * b * h * s * s * d)
    with StepMeter() as backward:
        out.sum().backward()
    # flash attention's backward: five matmuls of the forward's size (q k^T again, then dV, dP, dQ, dK)
    assert backward.flops == 5 * (2 * b * h * s * s * d)
