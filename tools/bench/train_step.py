"""Benchmark one full SSL training step at ViT-S/14 scale (2 global 224 + 8 local 98 crops), fp32.

Student on all crops, teacher on the global crops, DINO + iBOT heads (65,536 prototypes), the three
losses, backward, gradient clipping, AdamW step and EMA update: the work of `train.loop.train_step`. Data
loading is excluded (synthetic crops through the real collator). Reports seconds/step, images/s and
the achieved FLOP/s as a fraction of this machine's fp32 matmul rate measured in the same run
(FLOPs counted by torch's FlopCounterMode under the math attention backend).

    python tools/bench/train_step.py --batch 8 --steps 3
    python tools/bench/train_step.py --drop-path-compare 0.4   # subset vs masked stochastic depth, one run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from inference import sync  # tools/bench/ is on sys.path: this file runs as a script

from dinotrain.config import load_config
from dinotrain.models import layers
from dinotrain.distributed.env import destroy_distributed, init_distributed
from dinotrain.distributed.fsdp import clip_grad_norm
from dinotrain.data.collate import GlobalMaskCollator
from dinotrain.train.optim import apply_schedules, build_optimizer
from dinotrain.train.ssl import SSLMetaArch


def matmul_rate(n: int = 2048, repeats: int = 10, device=torch.device("cpu"), dtype=torch.float32) -> float:
    """Sustained GFLOP/s of a square matmul on `device` in `dtype` (the machine's practical peak)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def count_flops(fn) -> int:
    """FLOPs of one call of `fn`, counted under the math attention backend (the fused kernels are not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synthetic_batch(cfg, batch: int) -> dict:
    g, lsz, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    items = [(i, ({"global_crops": [torch.randn(3, g, g) for _ in range(2)],
                   "local_crops": [torch.randn(3, lsz, lsz) for _ in range(n_local)]}, 0), 0) for i in range(batch)]
    grid = g // cfg.student.patch_size
    collate = GlobalMaskCollator(batch, grid * grid, grid, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                                 seed=0)
    return collate(items)


def step(model: SSLMetaArch, optimizer, cfg, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    total, _ = model.compute_losses(batch, teacher_temp=0.07)
    total.backward()
    for module in model.student.values():
        clip_grad_norm(module, cfg.optim.clip_grad)
    optimizer.step()
    model.update_teacher(0.994)


def compare_drop_path(args, rate: float) -> dict:
    """Step time with stochastic depth as masking (every sample through every branch, then zeroed) vs
    the official subset path (branches on the kept samples only), interleaved in one run."""
    cfg = load_config(None, [f"student.arch={args.arch}", "student.patch_size=14", "crops.local_crops_size=98",
                             "compute_precision.dtype=fp32", f"student.drop_path_rate={rate}"])
    model = SSLMetaArch(cfg)
    model.shard(torch.float32)
    optimizer = build_optimizer(model.student, cfg)
    apply_schedules(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    batch = synthetic_batch(cfg, args.batch)
    subset_above = layers.SUBSET_DROP_PATH_ABOVE
    modes = {"masked": 1.0, "subset": subset_above}  # threshold 1.0 forces the masking path
    flops, times = {}, {m: [] for m in modes}
    for mode, threshold in modes.items():
        layers.SUBSET_DROP_PATH_ABOVE = threshold
        flops[mode] = count_flops(lambda: step(model, optimizer, cfg, batch))  # also the warm-up
    for _ in range(args.steps):
        for mode, threshold in modes.items():
            layers.SUBSET_DROP_PATH_ABOVE = threshold
            t = time.perf_counter()
            step(model, optimizer, cfg, batch)
            times[mode].append(time.perf_counter() - t)
    layers.SUBSET_DROP_PATH_ABOVE = subset_above
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "arch": args.arch, "batch": args.batch, "drop_path_rate": rate,
        "seconds_per_step": {m: round(v, 3) for m, v in med.items()},
        "gflop_per_step": {m: round(v / 1e9, 1) for m, v in flops.items()},
        "subset_over_masked_time": round(med["subset"] / med["masked"], 3),
        "subset_over_masked_flops": round(flops["subset"] / flops["masked"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--drop-path-compare", type=float, metavar="RATE",
                   help="instead: time masked vs subset stochastic depth at this drop_path_rate")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    init_distributed()
    if args.drop_path_compare is not None:
        result = compare_drop_path(args, args.drop_path_compare)
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        destroy_distributed()
        return
    cfg = load_config(None, [f"student.arch={args.arch}", "student.patch_size=14", "crops.local_crops_size=98",
                             "compute_precision.dtype=fp32", "student.drop_path_rate=0.0"])
    model = SSLMetaArch(cfg)
    model.shard(torch.float32)
    optimizer = build_optimizer(model.student, cfg)
    apply_schedules(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    batch = synthetic_batch(cfg, args.batch)

    flops = count_flops(lambda: step(model, optimizer, cfg, batch))  # also the warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(model, optimizer, cfg, batch)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = matmul_rate()
    achieved = flops / sec / 1e9
    result = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "arch": args.arch, "batch": args.batch, "seconds_per_step": round(sec, 3),
        "images_per_s": round(args.batch / sec, 2), "gflop_per_step": round(flops / 1e9, 1),
        "achieved_gflops": round(achieved, 1), "matmul_gflops": round(peak, 1),
        "fraction_of_matmul_rate": round(achieved / peak, 3),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
