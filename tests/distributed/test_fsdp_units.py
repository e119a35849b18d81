"""FSDP2 helpers on a single real process group: EMA over shards, reshard, clipping, resume checks."""

import pytest
import torch

from dinotrain.distributed.env import destroy_distributed, init_distributed
from dinotrain.distributed.fsdp import clip_grad_norm, ema_update, local, reshard, shard_module
from dinotrain.models.vision_transformer import build_vit


@pytest.fixture
def process_group():
    env = init_distributed()
    yield env
    destroy_distributed()


def _pair():
    torch.manual_seed(0)
    student = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2)
    teacher = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2)
    return student, teacher


def test_ema_over_sharded_parameters(process_group):
    student, teacher = _pair()
    expected = {k: 0.9 * teacher.state_dict()[k] + 0.1 * v for k, v in student.state_dict().items()}
    for m in (student, teacher):
        shard_module(m, torch.float32)
    with torch.no_grad():
        teacher(torch.randn(2, 3, 16, 16))  # a no-grad forward leaves the root unsharded ...
    reshard(teacher)  # ... until we reshard it
    ema_update(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        assert torch.allclose(local(p), expected[name], atol=1e-7), name  # one process: the shard is all


def test_clip_grad_norm_on_shards(process_group):
    student, _ = _pair()
    shard_module(student, torch.float32)
    student(torch.randn(2, 3, 16, 16)).sum().mul(1e3).backward()
    norm = clip_grad_norm(student, 1.0)
    assert float(norm) > 1.0
    after = torch.sqrt(sum(local(p.grad).pow(2).sum() for p in student.parameters() if p.grad is not None))
    assert float(after) == pytest.approx(1.0, rel=1e-4)


def test_gradient_sync_only_on_the_last_micro_batch_gives_the_accumulated_gradient(process_group):
    """Accumulating with the reduce-scatter off until the last micro-batch = plain accumulation (fp32)."""
    from torch import nn

    from dinotrain.distributed.fsdp import set_gradient_sync

    torch.manual_seed(0)
    plain = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2)
    sharded = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2)
    sharded.load_state_dict(plain.state_dict())
    nets = nn.ModuleDict({"backbone": shard_module(sharded, torch.float32)})
    micro = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    for x in micro:
        plain(x).square().mean().backward()
    for i, x in enumerate(micro):
        set_gradient_sync(nets, i == len(micro) - 1)
        sharded(x).square().mean().backward()
        if i < len(micro) - 1:  # nothing reduced yet: the sharded gradients are not written
            assert all(p.grad is None for p in sharded.parameters())
    set_gradient_sync(nets, True)
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(local(q.grad), p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradient_sums(process_group):
    """compute_precision.dtype=bf16 as FSDP2 mixed precision must be: inputs cast to bf16 and computed in bf16,
    parameters (the optimizer's master copy) kept in fp32, gradients summed in fp32. The second micro-batch's
    gradient is 2**-9 of the first's: an fp32 sum keeps it, a bf16 one (reduce_dtype=bf16) rounds it away. One
    process: the accumulation under `set_gradient_sync(False)` is the reduction whose dtype shows here."""
    from torch import nn

    from dinotrain.distributed.fsdp import set_gradient_sync

    layer = nn.Linear(4, 1, bias=False)
    nets = nn.ModuleDict({"layer": shard_module(layer, torch.bfloat16)})
    assert all(local(p).dtype == torch.float32 for p in layer.parameters()), "parameters must stay fp32"
    for i, scale in enumerate((1.0, 2.0 ** -9)):
        set_gradient_sync(nets, i == 1)
        out = layer(torch.full((1, 4), scale))  # fp32 input: FSDP2 casts it to bf16
        assert out.dtype == torch.bfloat16
        out.sum().backward()
    set_gradient_sync(nets, True)
    grad = local(layer.weight.grad)
    assert grad.dtype == torch.float32
    assert torch.equal(grad, torch.full((1, 4), 1.0 + 2.0 ** -9)), grad


def test_tf32_only_for_fp32_on_a_gpu():
    from dinotrain.distributed.fsdp import use_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert not use_tf32(torch.float32, torch.device("cpu"))
        assert not use_tf32(torch.bfloat16, torch.device("cuda"))
        assert not use_tf32(torch.float32, torch.device("cuda"), enabled=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert use_tf32(torch.float32, torch.device("cuda"))  # only sets the flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_one_fp32_process_trains_plain_modules_with_the_fsdp_steps(process_group):
    """Alone in fp32, SSLMetaArch.shard leaves plain modules (no DTensor) and two full training steps (losses,
    clipping, AdamW, EMA) give the weights FSDP2 gives; with another dtype FSDP2 is still used (it casts)."""
    from torch.distributed.tensor import DTensor

    from dinotrain.config import load_config
    from dinotrain.distributed.fsdp import fsdp_needed
    from dinotrain.data.loader import build_train_loader, to_device
    from dinotrain.train.optim import apply_schedules, build_optimizer
    from dinotrain.train.ssl import SSLMetaArch
    from trainruns import FAST

    assert not fsdp_needed(torch.float32) and fsdp_needed(torch.bfloat16)
    cfg = load_config("smoke/cpu_tiny", FAST + ["train.batch_size_per_gpu=6", "student.drop_path_rate=0.0"])
    loader, _ = build_train_loader(cfg, 0, 1, 0)
    batches = [to_device(b, torch.device("cpu")) for b, _ in zip(loader, range(2))]
    weights = {}
    for plain in (True, False):
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        model.shard(torch.float32, plain_if_unneeded=plain)
        assert any(isinstance(p, DTensor) for p in model.parameters()) is not plain
        optimizer = build_optimizer(model.student, cfg)
        apply_schedules(optimizer, lr=1e-3, wd=0.04, last_layer_lr=1e-3)
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            model.compute_losses(batch, teacher_temp=0.04)[0].backward()
            for module in model.student.values():
                clip_grad_norm(module, 3.0)
            optimizer.step()
            model.update_teacher(0.9)
        weights[plain] = {k: local(v).detach().clone() for k, v in model.state_dict().items()}
    assert weights[True].keys() == weights[False].keys()
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-5, atol=1e-6, msg=k)
    bf16 = SSLMetaArch(cfg)
    bf16.shard(torch.bfloat16)
    assert all(isinstance(p, DTensor) for p in bf16.parameters())
