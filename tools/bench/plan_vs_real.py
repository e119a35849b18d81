"""The planner against real steps on this CPU: `dinotrain plan`'s peak vs the same step on real tensors.

Each rank builds the run for real (gloo), takes 3 steps on the batch the planner uses, and reports
- the tracked peak of steps 2-3 (the steady state), counted by the planner's own meter on real tensors;
- the process's memory growth from before the set-up to its peak over the 3 steps (peak RSS, reset through
  /proc/self/clear_refs, less the RSS before), beside the tracked peak (which counts from the set-up too);
while rank 0 first plans the same step on fake tensors (`plan/step.py profile_step`). One JSON line per run.

    python tools/bench/plan_vs_real.py --config smoke/cpu_tiny compute_precision.dtype=fp32
    torchrun --nproc_per_node 2 tools/bench/plan_vs_real.py --config smoke/cpu_tiny compute_precision.dtype=bf16

Where the CPU and a GPU differ the real step is set up as the GPU has it (the planner's `as_on_gpu`: AdamW's
multi-tensor path), and the tracker rounds allocations to the CUDA allocator's 512-byte blocks in both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--command", default="train", choices=["train", "distill"])
    p.add_argument("--teacher", help="distillation: a preset name (both the plan and the real run build it)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from dinotrain.config import load_config
    from dinotrain.data.loader import to_device
    from dinotrain.distributed.env import destroy_distributed, init_distributed
    from dinotrain.plan.meter import CUDA_BLOCK, StepMeter
    from dinotrain.plan.step import as_on_gpu, build_objective, planned_config, profile_step, synthetic_batch, \
        take_step, teacher_spec

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(args.config, ["train.dataset_path=unused", *args.overrides])
    batch_size, ac = int(cfg.train.batch_size_per_gpu), bool(cfg.fsdp.activation_checkpointing)
    planned, teacher = None, teacher_spec(args.teacher) if args.teacher else None
    if int(os.environ.get("RANK", 0)) == 0:  # before any process group: the plan's fake world is its own
        planned = profile_step(cfg, args.command, world, batch_size, ac, teacher=teacher)

    env = init_distributed()
    cfg = planned_config(cfg, batch_size, ac)
    torch.manual_seed(0)
    meter = StepMeter(granularity=CUDA_BLOCK)
    rss_start = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from here
    with meter:
        meter.phase = "set-up"
        objective = build_objective(cfg, args.command, env, teacher)
        as_on_gpu(objective, env.device)
        batch = to_device(synthetic_batch(cfg, batch_size, world), env.device)
        take_step(objective, batch, meter, 0)
        meter.peak, meter.peaks = meter.current, {}
        before = meter.current
        start = time.perf_counter()
        for it in (1, 2):
            take_step(objective, batch, meter, it)
        seconds = (time.perf_counter() - start) / 2
    rss_growth = _rss("VmHWM") - rss_start
    destroy_distributed()
    if env.is_main:
        row = {"config": args.config, "overrides": args.overrides, "processes": world,
               "batch_per_process": batch_size, "real_peak": meter.peak,
               "real_growth": meter.peak - before, "rss_growth": rss_growth, "rss_over_real": rss_growth / meter.peak, "real_step_s": seconds,
               "planned_peak": planned.peak,
               "planned_phase": planned.peak_phase, "plan_s": planned.seconds,
               "planned_over_real": planned.peak / meter.peak}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
