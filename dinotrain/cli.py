"""The `dinotrain` command: train, distill, submit, eval, export, convert, embed, tiny-dataset.

Errors a user can fix (bad config, missing file, wrong weights) print one clear line and exit 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from dinotrain.config import ConfigError
    from dinotrain.distributed.checkpoint import CheckpointError
    from dinotrain.models.state_dict import WeightsError
    from dinotrain.distributed.env import PeerFailed
    from dinotrain.train.loop import TrainingDiverged
    from dinotrain.launch.slurm import SubmitError

    return (ConfigError, WeightsError, CheckpointError, TrainingDiverged, PeerFailed, SubmitError, FileNotFoundError,
            ValueError)


# ---- train ------------------------------------------------------------------------------------------
def _run_loop(args: argparse.Namespace, loop_class) -> int:
    from dinotrain.config import load_config
    from dinotrain.distributed.env import destroy_distributed

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    try:
        loop_class(cfg, cfg.train.output_dir, resume=not args.no_resume,
                   allow_config_change=args.allow_config_change).run()
    finally:
        destroy_distributed()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dinotrain.train.loop import Trainer

    return _run_loop(args, Trainer)


def cmd_distill(args: argparse.Namespace) -> int:
    """`train`'s twin for distillation: same arguments, run directory and resume rules."""
    from dinotrain.train.distill import Distiller

    return _run_loop(args, Distiller)


# ---- submit -----------------------------------------------------------------------------------------
SUBMIT_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "partition", "account", "qos", "time", "mem_gb",
                "cpus_per_task", "constraint", "signal_delay_s")


def cmd_submit(args: argparse.Namespace) -> int:
    """`train` or `distill` as a SLURM job; follows it to its end unless `--no-wait`."""
    from dinotrain.config import ConfigError, load_config
    from dinotrain.launch.slurm import (build_request, check_gpus_available, job_name, parse_slurm_extra, require_slurm,
                                        sbatch_script, submit)
    from dinotrain.launch.watch import follow
    from dinotrain.train.rundir import move_aside, prepare_run_dir

    if not args.output_dir:
        raise ConfigError("give --output-dir DIR: the run directory, on a filesystem the compute nodes share")
    run_dir = Path(args.output_dir).resolve()
    cfg = load_config(args.config, [*args.overrides, f"train.output_dir={run_dir}"])  # checked before submitting
    flags = {key: getattr(args, key) for key in SUBMIT_FLAGS}
    flags["slurm_extra"] = parse_slurm_extra(args.slurm_extra)
    request = build_request(args.cluster, flags)
    name = job_name(args.job, run_dir)
    if args.dry_run:
        print(sbatch_script(request, run_dir / "slurm", name))
        return 0
    require_slurm()
    check_gpus_available(request)
    prepare_run_dir(run_dir)
    if args.no_resume:
        move_aside(run_dir)
    job = submit(args.job, cfg, run_dir, request, allow_config_change=args.allow_config_change)
    where = f"partition {request.partition}" if request.partition else "the default partition"
    per_node = f"{request.gpus_per_node} GPU(s)" if request.gpus_per_node else f"{request.tasks_per_node} CPU process(es)"
    print(f"submitted job {job.job_id} ({name}): {request.nodes} node(s) x {per_node} on {where}, "
          f"time limit {request.time} min, up to {cfg.launch.max_requeues} requeues")
    print(f"  run directory {run_dir}; job logs {run_dir / 'slurm'}/{job.job_id}_<task>_log.out|err")
    print(f"  watch: squeue -j {job.job_id}; tail -f {run_dir / 'log.txt'}   cancel: scancel {job.job_id}")
    sys.stdout.flush()
    if args.no_wait:
        return 0
    try:
        result = follow(job, run_dir, print_fn=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"stopped following job {job.job_id}; it keeps running (scancel {job.job_id} to stop it)", file=sys.stderr)
        return 130
    metrics = result.get("metrics") or {}
    loss = f", total_loss {metrics['total_loss']:.4f}" if "total_loss" in metrics else ""
    print(f"job {job.job_id} completed: iteration {result.get('iteration')}{loss}; run directory {result.get('run_dir')}")
    return 0


# ---- eval -------------------------------------------------------------------------------------------
def _backbone_from_args(weights: str | None, model: str | None, seed: int = 0):
    import torch

    from dinotrain.export.convert import load_backbone
    from dinotrain.models.presets import build_preset

    if weights:
        path = Path(weights)
        students = sorted((path / "students").glob("*.pth")) if path.is_dir() else []
        if path.is_dir() and (path / "teacher_backbone.pth").is_file():
            path = path / "teacher_backbone.pth"  # a run directory
        elif len(students) == 1:
            path = students[0]  # a distillation run directory: its student's EMA backbone
        elif students:
            raise ValueError(f"{path} is a distillation run with students {', '.join(p.stem for p in students)}: "
                             f"pass one of them, e.g. --weights {students[0]}")
        elif path.is_dir() and ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()):
            raise FileNotFoundError(
                f"{path} is a run directory without teacher_backbone.pth or students/*.pth (written when the run finishes); "
                f"export its newest checkpoint with `dinotrain export {path} teacher.pth --to hub` and pass that")
        return load_backbone(path)
    if not model:
        raise ValueError("give --weights PATH (a .pth, .safetensors, HF directory or run directory) or --model NAME")
    torch.manual_seed(seed)
    return build_preset(model)


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import torch

    from dinotrain.eval.features import eval_sizes, extract_features, pick_eval_device, shared_label_space
    from dinotrain.eval.knn import knn_accuracy
    from dinotrain.models.vision_transformer import vit_from_spec

    resize, crop = eval_sizes(args.image_size, tiny=args.tiny)  # checked before any work
    device = pick_eval_device(getattr(args, "device", "auto"))
    train_root, val_root = args.train, args.val
    if args.tiny:
        from dinotrain.data.tiny import ensure_tiny_dataset

        root = ensure_tiny_dataset()
        train_root, val_root = str(root / "train"), str(root / "val")
    if not train_root or not val_root:
        raise ValueError("give --train DIR and --val DIR (labelled ImageFolders), or --tiny for the built-in dataset")
    torch.set_num_threads(args.threads) if args.threads else None
    classes = shared_label_space(train_root, val_root)  # val classes matched to train's by name, checked first
    model = _backbone_from_args(args.weights, args.model)
    candidates = {"model": model}
    if args.baseline_random:
        torch.manual_seed(args.seed)
        candidates["random_init"] = vit_from_spec(model.spec)
    logging.getLogger("dinotrain.eval").info("k-NN on %s: resize %d bicubic, centre crop %d", device, resize, crop)
    results = {}
    for name, net in candidates.items():
        net = net.to(device)
        tr_f, tr_y = extract_features(net, train_root, crop, args.batch_size, classes=classes, resize_size=resize)
        va_f, va_y = extract_features(net, val_root, crop, args.batch_size, classes=classes, resize_size=resize)
        results[name] = knn_accuracy(tr_f, tr_y, va_f, va_y, ks=args.k, temperature=args.temperature)
    for name, accs in results.items():
        print(f"k-NN top-1 ({name}): " + "  ".join(f"k={k}: {acc:.2f}%" for k, acc in accs.items()))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({n: {str(k): v for k, v in a.items()} for n, a in results.items()}, indent=1))
        print(f"written to {out}")
    return 0


# ---- convert / embed / tiny-dataset -------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from dinotrain.export.convert import convert

    out = convert(args.src, args.dst, args.to)
    print(f"converted {args.src} -> {out} ({args.to})")
    return 0


def _export_source(ckpt: Path, which: str | None) -> tuple[Path, str, str, dict | None]:
    """(DCP directory, tensor prefix, label, config or None = the checkpoint's) of what `--which` picks.

    A training checkpoint holds `model.teacher.*` (the EMA, default) and `model.student.*`. A distillation
    checkpoint holds one training-layout checkpoint per student under `students/<name>/`, whose
    `model.teacher.*` is that student's EMA: the exported model. Its frozen teacher is not stored.
    """
    from dinotrain.distributed.checkpoint import read_extra

    students = ckpt / "students"
    if not students.is_dir():
        which = which or "teacher"
        if which not in ("teacher", "student"):
            raise ValueError(f"--which {which!r}: a training checkpoint holds 'teacher' (the EMA, default) "
                             "and 'student'")
        return ckpt, f"model.{which}.", which, None
    extra = read_extra(ckpt)
    names = sorted(d.name for d in students.iterdir() if d.is_dir())
    if not names:
        raise FileNotFoundError(f"distillation checkpoint {ckpt} has no student under students/")
    if which is None and len(names) > 1:
        raise ValueError(f"distillation checkpoint {ckpt} has students {', '.join(names)}: pick one with --which NAME")
    which = which or names[0]
    if which not in names:
        if which == "teacher":
            source = (extra.get("teacher") or {}).get("source", "see its extra.json")
            raise ValueError(f"the frozen teacher of a distillation run is not stored in its checkpoints "
                             f"(its source: {source}); export a student with --which {names[0]}")
        raise ValueError(f"distillation checkpoint {ckpt} has no student {which!r}; its students: {', '.join(names)}")
    config = ((extra.get("students") or {}).get(which) or {}).get("config") or {}
    return students / which, "model.teacher.", f"student {which!r} (EMA)", config


def cmd_export(args: argparse.Namespace) -> int:
    """A backbone (teacher by default) of a sharded checkpoint, consolidated in this one process (no GPU).

    `--to full` also writes the DINO/iBOT heads and the recipe config (dinotrain.export.full).
    """
    import dataclasses

    from dinotrain.distributed.checkpoint import complete_checkpoints, read_extra
    from dinotrain.distributed.checkpoint_files import read_metadata, read_tensors
    from dinotrain.export.convert import write_weights
    from dinotrain.export.full import FullExport, write_full
    from dinotrain.models.state_dict import infer_spec

    src = Path(args.src)
    ckpt = src
    if not (src / "extra.json").is_file():
        found = complete_checkpoints(src)
        if not found:
            raise FileNotFoundError(f"{src} is neither a checkpoint directory nor a run directory with checkpoints")
        ckpt = found[-1]
    tensors_dir, prefix, label, config = _export_source(ckpt, args.which)
    # only the chosen backbone's (and heads') byte ranges are read (not the optimizer), after the shards
    # are checked; the metadata is unpickled allow-listed and never runs code
    state = read_tensors(tensors_dir, prefix + "backbone.", what=f"{label} backbone")
    extra = read_extra(ckpt)
    config = (extra.get("config") or {}) if config is None else config
    student_cfg = config.get("student") or {}
    spec = infer_spec(state)
    if "interpolate_offset" in student_cfg:  # not stored in weights: take it from the run's config
        spec = dataclasses.replace(spec, interpolate_offset=float(student_cfg["interpolate_offset"]),
                                   interpolate_antialias=bool(student_cfg["interpolate_antialias"]))
    if args.to == "full":
        stored = read_metadata(tensors_dir).state_dict_metadata
        heads = {h: read_tensors(tensors_dir, f"{prefix}{h}.", what=f"{label} {h}") for h in ("dino_head", "ibot_head")
                 if h == "dino_head" or any(k.startswith(f"{prefix}{h}.") for k in stored)}
        out = write_full(args.dst, FullExport(state, spec, heads, config))
        what = f"{label} backbone + {' + '.join(heads)} + config"
    else:
        out = write_weights(state, spec, args.dst, args.to)
        what = f"{label} backbone"
    print(f"{what} of {ckpt} (iteration {extra.get('iteration', ckpt.name)}) -> {out} ({args.to})")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from dinotrain.data.augmentations import make_eval_transform
    from dinotrain.data.datasets import load_rgb
    from dinotrain.eval.features import eval_sizes, pick_eval_device

    resize, crop = eval_sizes(args.image_size)  # checked before any work
    device = pick_eval_device(getattr(args, "device", "auto"))

    def read(image: str):
        try:
            return load_rgb(Path(image))
        except (FileNotFoundError, ValueError):
            raise  # already a clear message (missing file, image that cannot be made 8-bit RGB)
        except Exception as exc:  # PIL's decoder errors: not an image, truncated, unsupported
            raise ValueError(f"cannot read image {image}: {type(exc).__name__}: {exc}") from exc

    images = [read(image) for image in args.images]  # every file checked before any work
    model = _backbone_from_args(args.weights, args.model).eval().to(device)
    transform = make_eval_transform(resize_size=resize, crop_size=crop)
    rows = []
    with torch.inference_mode():
        for image, pil in zip(args.images, images):
            x = transform(pil).unsqueeze(0).to(device)
            feats = model(x)[0].float().cpu()
            rows.append({"image": image, "image_features": feats.tolist()})
            print(f"{image}: {feats.numel()}-dim embedding, norm {feats.norm():.3f}, first values "
                  + " ".join(f"{v:.4f}" for v in feats[:4].tolist()))
    if args.output:
        Path(args.output).write_text(json.dumps(rows))
        print(f"written to {args.output}")
    return 0


def cmd_tiny_dataset(args: argparse.Namespace) -> int:
    from dinotrain.data.tiny import ensure_tiny_dataset

    print(ensure_tiny_dataset(args.root))
    return 0


# ---- parser -----------------------------------------------------------------------------------------
def _add_run_arguments(parser: argparse.ArgumentParser, config_help: str, output_help: str) -> None:
    """What `train`, `distill` and `submit train|distill` share: config, run directory, resume, overrides."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--output-dir", help=output_help)
    parser.add_argument("--no-resume", action="store_true",
                        help="start over: existing checkpoints and metrics of the run directory are moved aside")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though train.dataset_path or train.centering differ from the checkpoint's")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.base_lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinotrain", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    for name, func, help_text, config_help in (
            ("train", cmd_train, "self-supervised pretraining (DINO + iBOT + KoLeo)",
             "a YAML file or a shipped config name such as smoke/cpu_tiny"),
            ("distill", cmd_distill, "distil students from a frozen teacher (backbone + DINO/iBOT heads)",
             "a YAML file or a shipped config name such as smoke/distill_cpu_tiny (see configs/distill/)")):
        t = sub.add_parser(name, help=help_text)
        _add_run_arguments(t, config_help, "run directory (checkpoints, metrics.jsonl, log.txt)")
        t.set_defaults(func=func)

    s = sub.add_parser("submit", help="run train or distill as a SLURM job (submitit), requeued on preemption and "
                                      "at the time limit")
    ssub = s.add_subparsers(dest="job", required=True)
    for job in ("train", "distill"):
        j = ssub.add_parser(job, help=f"`dinotrain {job}` as a SLURM job")
        _add_run_arguments(j, f"a YAML file or a shipped config name, as for `dinotrain {job}`",
                           "run directory on a filesystem the nodes share (job logs go to its slurm/)")
        j.add_argument("--cluster", help="cluster profile: NAME (slurm/NAME.yaml, ~/.config/dinotrain/slurm/NAME.yaml, "
                                         "$DINOTRAIN_SLURM_PROFILES) or a path to a YAML file")
        j.add_argument("--nodes", type=int, help="nodes (default 1)")
        j.add_argument("--gpus-per-node", type=int, help="GPUs per node, one process each (0: CPU processes)")
        j.add_argument("--tasks-per-node", type=int, help="CPU processes per node with --gpus-per-node 0 (default 1)")
        j.add_argument("--partition")
        j.add_argument("--account")
        j.add_argument("--qos")
        j.add_argument("--constraint", help="node features (sbatch --constraint)")
        j.add_argument("--time", type=int, help="time limit of one job run in minutes (default: the profile's, else 2800)")
        j.add_argument("--mem-gb", type=float, help="memory per node in GB")
        j.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
        j.add_argument("--signal-delay-s", type=int,
                       help="seconds before the time limit at which the job checkpoints and requeues (default 120)")
        j.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                       help="another sbatch option, e.g. reservation=x or exclusive (repeat for more)")
        j.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting")
        j.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the job")
        j.set_defaults(func=cmd_submit)

    e = sub.add_parser("eval", help="evaluate a backbone")
    esub = e.add_subparsers(dest="eval_command", required=True)
    k = esub.add_parser("knn", help="weighted k-NN accuracy of CLS features (T=0.07)")
    k.add_argument("--weights", help="backbone weights: .pth, .safetensors, HF directory, or a run directory")
    k.add_argument("--model", help="a named backbone (random init) when no --weights, e.g. dinov2_vits14")
    k.add_argument("--train", help="labelled ImageFolder of training images")
    k.add_argument("--val", help="labelled ImageFolder of validation images")
    k.add_argument("--tiny", action="store_true", help="use the built-in tiny dataset's train/val split")
    k.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--image-size", type=int,
                   help="centre-crop side in pixels; the shorter side is first resized bicubically to "
                        "round(size*256/224) (the DINO protocol: 256 -> 224). Default 224, or 32 with --tiny")
    k.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where features are computed (default: the GPU when torch sees one, else the CPU)")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--baseline-random", action="store_true", help="also evaluate the same architecture at random init")
    k.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    k.add_argument("--threads", type=int, help="torch CPU threads")
    k.add_argument("--output", help="write the accuracies as JSON here")
    k.set_defaults(func=cmd_eval_knn)

    c = sub.add_parser("convert", help="convert backbone weights between hub .pth, Hugging Face and safetensors")
    c.add_argument("src", help="a hub .pth, a .safetensors file, or a Hugging Face model directory")
    c.add_argument("dst", help="output file (hub, safetensors) or directory (hf)")
    c.add_argument("--to", required=True, choices=["hub", "hf", "safetensors"])
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser("export", help="teacher backbone of a checkpoint -> hub .pth, Hugging Face, safetensors, "
                                      "or full (backbone + heads + config)")
    x.add_argument("src", help="a run directory (its newest complete checkpoint) or one checkpoints/<iteration> directory")
    x.add_argument("dst", help="output file (hub, safetensors, full: a .safetensors file) or directory (hf)")
    x.add_argument("--to", required=True, choices=["hub", "hf", "safetensors", "full"])
    x.add_argument("--which", help="training run: teacher (the EMA, default) or student; distillation run: the "
                                   "student's name (its EMA; default: the only student)")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("embed", help="embed images with a backbone (CLS token after the final norm)")
    m.add_argument("images", nargs="+", help="image files")
    m.add_argument("--weights", help="backbone weights (any supported format) or a run directory")
    m.add_argument("--model", default=None, help="named backbone at random init when no --weights")
    m.add_argument("--image-size", type=int,
                   help="centre-crop side in pixels after a bicubic resize of the shorter side to "
                        "round(size*256/224) (default 224: resize 256, crop 224, the DINO protocol)")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: the GPU when torch sees one, else the CPU")
    m.add_argument("--output", help="write [{image, image_features}] as JSON here")
    m.set_defaults(func=cmd_embed)

    d = sub.add_parser("tiny-dataset", help="write the built-in tiny dataset (train/val ImageFolders) and print its path")
    d.add_argument("--root", help="where to write it (default $DINOTRAIN_DATA or ~/.cache/dinotrain/tiny)")
    d.set_defaults(func=cmd_tiny_dataset)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"dinotrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from dinotrain.launch.watch import JobFailed

        if isinstance(exc, JobFailed) and not args.debug:  # the job's own error text, not ours: exit code 1
            print(f"dinotrain {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
