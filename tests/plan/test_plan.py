"""`dinotrain plan`: the breakdown of a small run's step against its model's own sizes, FLOPs against the
arithmetic of a ViT, the GPU path traced on fake CUDA tensors (and the bugs it is there to catch), bad input."""

import json

import pytest
import torch

from dinotrain.config import load_config
from trainruns import run_cli

# The smoke recipe cut to 2 blocks (a fake step's cost is its operation count, not its size), in bf16 as on a GPU.
SMALL = ["student.depth=2", "compute_precision.dtype=bf16", "train.batch_size_per_gpu=16"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    proc = run_cli(["plan", "train", "--config", "smoke/cpu_tiny", "--gpus", "2", "--gpu-memory-gb", "4", "--json",
                    str(out), *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_the_breakdown_matches_the_models_own_sizes(planned):
    from dinotrain.train.ssl import SSLMetaArch

    text, plan = planned
    p = plan["profile"]
    model = SSLMetaArch(load_config("smoke/cpu_tiny", SMALL))
    every = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(t.numel() for t in model.student.parameters())
    # fp32 master weights sharded over the 2 GPUs (shards are padded and rounded to 512-byte blocks: a few %)
    assert p["parameters"] == pytest.approx(4 * every / 2, rel=0.05)
    assert p["gradients"] == pytest.approx(4 * trainable / 2, rel=0.05)
    assert p["optimizer"] == pytest.approx(2 * 4 * trainable / 2, rel=0.05)
    alive = p["parameters"] + p["optimizer"] + p["activations"] + p["temporaries"]
    assert p["peak_phase"] in ("forward", "backward")
    assert alive + (p["gradients"] if p["peak_phase"] == "backward" else 0) == p["peak"] and p["activations"] > 0
    assert plan["compute_dtype"] == "bfloat16"
    # activation checkpointing keeps fewer activations, so more images fit
    assert plan["largest"]["with"] > plan["largest"]["without"] > p["batch_size"]
    assert plan["images_per_s_per_gpu"]["0.4"] == pytest.approx(16 * 989e12 * 0.4 / p["flops"])
    assert "GPU code path: traced on a fake CUDA device" in text and "fits" in text


def test_flops_of_a_vit_forward_equal_its_arithmetic():
    from dinotrain.models.vision_transformer import build_vit
    from dinotrain.plan.fake_world import FakeWorld
    from dinotrain.plan.meter import StepMeter

    d, depth, patch, size, batch = 384, 3, 14, 224, 2
    with FakeWorld(1, "cpu"):
        model = build_vit("vit_small", patch_size=patch, img_size=size, depth=depth)
        with StepMeter() as meter:
            model(torch.zeros(batch, 3, size, size))
    tokens = (size // patch) ** 2 + 1
    per_block = 2 * tokens * d * (3 * d + d + 4 * d + 4 * d) + 2 * (2 * tokens * tokens * d)  # linears + attention
    patch_embed = 2 * (tokens - 1) * (3 * patch * patch) * d
    assert meter.flops == batch * (depth * per_block + patch_embed)


@pytest.mark.parametrize("bug", ["tensor-left-on-cpu", "no-mixed-precision"])
def test_the_cuda_trace_catches_a_broken_gpu_path(monkeypatch, bug):
    """What the trace is for: a step that moves a tensor to the CPU on the way, or a mixed-precision policy that
    is not applied: bugs a CPU run cannot show."""
    import dinotrain.distributed.fsdp as fsdp
    import dinotrain.train.ssl as ssl
    from dinotrain.plan.cuda_trace import GpuPathError, trace_on_cuda

    cfg = load_config("smoke/cpu_tiny", SMALL)
    assert "traced on a fake CUDA device" in trace_on_cuda(cfg, "train", 2)
    if bug == "tensor-left-on-cpu":
        tokens_at = ssl.patch_tokens_at
        monkeypatch.setattr(ssl, "patch_tokens_at", lambda out, idx: tokens_at(out, idx).cpu())
    else:
        policy = fsdp.MixedPrecisionPolicy
        monkeypatch.setattr(fsdp, "MixedPrecisionPolicy", lambda param_dtype, reduce_dtype: policy())
    with pytest.raises(GpuPathError, match="cpu" if bug == "tensor-left-on-cpu" else "blocks computed in .*float32"):
        trace_on_cuda(cfg, "train", 2)


@pytest.mark.parametrize("args, expected", [
    (["train", "--config", "smoke/cpu_tiny", "--gpus", "0", "--gpu-memory-gb", "80"], "--gpus must be at least 1"),
    (["distill", "--config", "distill/vitl14_from_vitg14", "--gpus", "8", "--gpu-memory-gb", "80"],
     "pass --teacher with a preset name"),
    (["train", "--config", "smoke/cpu_tiny", "--gpus", "2", "--gpu-memory-gb", "0.002", "--margin", "0",
      "--reserve-gb", "0", *SMALL, "--no-cuda-trace"], r"does not fit 2 GPU\(s\) of 0.002 GB even at "
                                                       r"train.batch_size_per_gpu=1 .* it needs 0\.\d+ GB per GPU"),
], ids=["no-gpus", "distillation-without-teacher", "does-not-fit"])
def test_bad_input_is_one_line(args, expected):
    import re

    proc = run_cli(["plan", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and re.search(expected, lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_distillation_plan_runs_the_teacher_once_for_all_students():
    """Two students planned together cost the teacher's forward once: FLOPs(a + b) = FLOPs(a) + FLOPs(b) - teacher."""
    from dinotrain.models.vision_transformer import ViTSpec
    from dinotrain.plan.step import profile_step

    spec = ViTSpec(embed_dim=192, depth=3, num_heads=3, patch_size=8, img_size=32)  # a small teacher: a fast plan
    base = ["train.batch_size_per_gpu=8", "student.depth=1"]

    def flops(students: str) -> int:
        cfg = load_config("smoke/distill_cpu_tiny", [*base, f"distillation.students={students}"])
        return profile_step(cfg, "distill", 2, 8, False, teacher=spec).flops

    a, b = flops("{a: null}"), flops("{b: {student: {depth: 2}}}")
    both = flops("{a: null, b: {student: {depth: 2}}}")
    # the teacher's forward: what a student-less step would cost, i.e. a's step minus a's own share
    cfg = load_config("smoke/distill_cpu_tiny", base)
    from dinotrain.models.vision_transformer import vit_from_spec
    from dinotrain.plan.fake_world import FakeWorld
    from dinotrain.plan.meter import StepMeter

    assert a < both < a + b
    with FakeWorld(1, "cpu"):
        teacher = vit_from_spec(spec)
        with StepMeter() as meter:  # the teacher backbone on this rank's global crops
            teacher(torch.zeros(2 * 8, 3, cfg.crops.global_crops_size, cfg.crops.global_crops_size))
    # what the joint step saves is one teacher forward (its last block computes only the CLS and masked rows: less
    # than a full forward, 87 % of it here); a teacher run per student would save nothing
    assert 0.75 * meter.flops <= a + b - both <= meter.flops


def test_a_distillation_plan_takes_a_dinov3_teacher():
    """A DINOv3 teacher (e.g. `--teacher dinov3_vit7b16`) is planned as one: one more of its blocks costs exactly
    that block's forward arithmetic on the global crops (it built a DINOv2 ViT from the spec and failed before)."""
    from dinotrain.models.dinov3 import Dinov3Spec
    from dinotrain.plan.step import profile_step

    cfg = load_config("smoke/distill_cpu_tiny", ["train.batch_size_per_gpu=4", "student.depth=1", "student.patch_size=16",
                                                 "crops.global_crops_size=64", "crops.local_crops_size=32"])

    def flops(depth: int) -> int:
        spec = Dinov3Spec(embed_dim=192, depth=depth, num_heads=3, n_storage_tokens=4, mask_k_bias=True,
                          layerscale_init=1e-5, norm_layer="layernormbf16")
        return profile_step(cfg, "distill", 1, 4, False, teacher=spec).flops

    images, tokens, dim = 2 * 4, 1 + 4 + (64 // 16) ** 2, 192  # 2 global crops per image; CLS + storage + patches
    block = images * (2 * 12 * dim * dim * tokens + 2 * 2 * tokens * tokens * dim)  # qkv, proj, MLP 4x; QK^T, AV
    assert flops(2) - flops(1) == block
