"""`dinotrain plan train|distill`: per-GPU memory, FLOPs and predicted images/s of a run on N GPUs, from a CPU."""

from __future__ import annotations

import argparse
import json

from dinotrain.train.objectives import OBJECTIVES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="size a run before queueing it: per-GPU peak memory and its breakdown, "
                                           "the largest batch that fits, FLOPs and predicted images/s (no GPU needed)")
    jobs = p.add_subparsers(dest="job", required=True)
    for job in OBJECTIVES:
        j = jobs.add_parser(job, help=f"plan `dinotrain {job}`")
        j.add_argument("--config", required=True, help=f"a YAML file or a shipped config name, as for `dinotrain {job}`")
        j.add_argument("--gpus", type=int, required=True, help="GPUs of the run (FSDP2 shards over all of them)")
        j.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU in GB, e.g. 80")
        j.add_argument("--peak-tflops", type=float, default=989.0,
                       help="the GPU's dense peak in the compute dtype, TFLOP/s (default 989: H100 SXM, bf16)")
        j.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.5],
                       help="model FLOPs utilisation(s) to predict images/s at (default 0.4 0.5)")
        j.add_argument("--margin", type=float, default=0.10,
                       help="fraction of GPU memory kept free for allocator fragmentation (default 0.10)")
        j.add_argument("--reserve-gb", type=float, default=2.0,
                       help="GB kept for the CUDA context, NCCL buffers and kernel workspaces (default 2)")
        if job == "distill":
            j.add_argument("--teacher", help="the teacher when distillation.teacher is not set: a preset such as "
                                             "dinov2_vitg14, or weights (only their shapes are read)")
        j.add_argument("--json", help="also write the plan (every measured point) to this JSON file")
        j.add_argument("--no-search", action="store_true",
                       help="plan the configured batch only (one step instead of four; no largest batch)")
        j.add_argument("--no-cuda-trace", action="store_true",
                       help="skip running the step's GPU code path on fake CUDA tensors")
        j.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.batch_size_per_gpu=16")
        j.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinotrain.config import ConfigError, load_config
    from dinotrain.plan.planner import Budget, format_plan, make_plan

    # a plan reads no data: the full-scale recipes' required dataset path may stay unset
    overrides = ["train.dataset_path=unused-by-plan", *args.overrides]
    teacher = getattr(args, "teacher", None)
    if teacher:
        overrides.append(f"distillation.teacher={teacher}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        if args.job == "distill" and "distillation.teacher" in str(exc):
            raise ConfigError(f"{exc}; or pass --teacher with a preset name such as dinov2_vitg14 (a plan needs only "
                              "the teacher's shapes)") from exc
        raise
    if args.job == "distill":
        teacher = cfg.distillation.teacher
    plan = make_plan(cfg, args.job, args.gpus, Budget(args.gpu_memory_gb, args.margin, args.reserve_gb),
                     args.peak_tflops, tuple(args.mfu), teacher=teacher or None, config_name=args.config,
                     trace_cuda=not args.no_cuda_trace, search=not args.no_search)
    print(format_plan(plan))
    if args.json:
        from dinotrain.storage import replacing

        with replacing(args.json, "the plan") as tmp:
            tmp.write_text(json.dumps(plan.to_dict(), indent=1))
    return 0
