"""Benchmark distillation steps: several students from one teacher forward vs each student on its own.

One step = the frozen teacher's forward on the global crops (+ centering), then for each student its
forward on global + local crops, DINO/iBOT/KoLeo losses, backward, clipping, AdamW and EMA: the work of
`train.loop.train_step` with the distillation objective. Data loading is excluded (synthetic crops through the real collator). Reports, in one
run, the step time of each student alone and of all students together, and the ratio of the latter to
the sum of the former (below 1: the shared teacher forward is saved), plus images/s and, on CUDA, the
peak memory. Teacher weights are random (the cost does not depend on them).

    python tools/bench/distill_step.py                                     # CPU: ViT-B/8 (4 blocks) -> Tiny + Small
    python tools/bench/distill_step.py --device cuda --dtype bf16 --teacher vit_giant2 --students vit_small vit_base \\
        --teacher-depth 0 --image 224 --local 98 --patch 14 --batch 32   # the issue's GPU benchmark
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import synthetic_batch  # noqa: E402

from dinotrain.config import load_config  # noqa: E402
from dinotrain.distributed.env import destroy_distributed, init_distributed  # noqa: E402
from dinotrain.distributed.fsdp import DTYPES, clip_grad_norm  # noqa: E402
from dinotrain.train.optim import apply_schedules, build_optimizer  # noqa: E402
from dinotrain.train.ssl import SSLMetaArch, build_backbone, _head  # noqa: E402
from dinotrain.train.teacher import FrozenTeacher  # noqa: E402
from dinotrain.weights.state_dict import Weights  # noqa: E402


def _cfg(args, arch: str, depth: int):
    return load_config("smoke/distill_cpu_tiny", [
        f"student.arch={arch}", f"student.depth={depth or 'null'}", f"student.patch_size={args.patch}",
        f"crops.global_crops_size={args.image}", f"crops.local_crops_size={args.local}",
        f"crops.local_crops_number={args.n_local}", f"dino.head_n_prototypes={args.prototypes}",
        f"ibot.head_n_prototypes={args.prototypes}", "ibot.separate_head=true", "dino.head_bottleneck_dim=256",
        "dino.head_hidden_dim=2048", "ibot.head_hidden_dim=2048", "ibot.head_bottleneck_dim=256",
        f"compute_precision.dtype={args.dtype}", "distillation.teacher=unused"])


def _teacher(args, device, dtype) -> FrozenTeacher:
    cfg = _cfg(args, args.teacher, args.teacher_depth)
    backbone = build_backbone(cfg, for_teacher=True)
    heads = {name: _head(cfg[name.split("_")[0]], backbone.embed_dim).state_dict() for name in ("dino_head", "ibot_head")}
    weights = Weights(source="random", kind="bench", backbone=backbone.state_dict(), spec=backbone.spec, heads=heads)
    teacher = FrozenTeacher(weights, cfg).to(device)
    teacher.shard(dtype)
    return teacher


def _student(args, arch, device, dtype):
    cfg = _cfg(args, arch, args.student_depth)
    model = SSLMetaArch(cfg).to(device)
    model.shard(dtype)
    optimizer = build_optimizer(model.student, cfg)
    apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
    return model, optimizer


def step(teacher, students, batch) -> None:
    t_cls, t_patch = teacher.targets(batch, 0.07)
    for model, optimizer in students:
        optimizer.zero_grad(set_to_none=True)
        total, _ = model.student_losses(batch, t_cls, t_patch, mask_inputs=False)
        total.backward()
        for module in model.student.values():
            clip_grad_norm(module, 3.0)
        optimizer.step()
        model.update_teacher(0.994)


def timed(teacher, students, batch, steps: int, device) -> tuple[float, float]:
    """(median seconds per step, peak GiB on CUDA or 0)."""
    step(teacher, students, batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(teacher, students, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="vit_base")
    p.add_argument("--teacher-depth", type=int, default=4, help="0: the arch's own depth")
    p.add_argument("--students", nargs="+", default=["vit_tiny", "vit_small"])
    p.add_argument("--student-depth", type=int, default=4, help="0: the arch's own depth")
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--local", type=int, default=32)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()
    env = init_distributed()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    try:
        torch.manual_seed(0)
        teacher = _teacher(args, device, dtype)
        students = {arch: _student(args, arch, device, dtype) for arch in args.students}
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in synthetic_batch(_cfg(args, args.students[0], 0), args.batch).items()}
        results = {"machine": platform.processor() or platform.machine(), "device": str(device),
                   "dtype": args.dtype, "teacher": f"{args.teacher} depth {args.teacher_depth or 'full'}",
                   "image": args.image, "batch": args.batch, "alone": {}}
        for arch, pair in students.items():
            sec, peak = timed(teacher, [pair], batch, args.steps, device)
            results["alone"][arch] = {"s_per_step": sec, "img_per_s": args.batch / sec, "peak_gib": peak}
        sec, peak = timed(teacher, list(students.values()), batch, args.steps, device)
        total_alone = sum(r["s_per_step"] for r in results["alone"].values())
        results["together"] = {"s_per_step": sec, "peak_gib": peak,
                               "ratio_to_sum_of_alone": sec / total_alone}
        print(json.dumps(results, indent=1))
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))
    finally:
        destroy_distributed()
        del env


if __name__ == "__main__":
    main()
