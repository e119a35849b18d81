"""The `dinotrain` command: train, distill, submit, eval, export, convert, embed, serve, visualize, plot, tiny-dataset.

Errors a user can fix (bad config, missing file, wrong weights) print one clear line and exit 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from dinotrain.config import ConfigError
    from dinotrain.distributed.checkpoint import CheckpointError
    from dinotrain.weights.state_dict import WeightsError
    from dinotrain.distributed.env import PeerFailed
    from dinotrain.train.loop import TrainingDiverged
    from dinotrain.launch.slurm import SubmitError

    return (ConfigError, WeightsError, CheckpointError, TrainingDiverged, PeerFailed, SubmitError, FileNotFoundError,
            FileExistsError, ValueError)


# ---- train ------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """`train` and `distill` (the objective is the command's: `train.run.OBJECTIVES`); same arguments, run
    directory and resume rules."""
    from dinotrain.config import load_config
    from dinotrain.distributed.env import destroy_distributed
    from dinotrain.train.run import TrainingRun

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    try:
        TrainingRun(cfg, cfg.train.output_dir, command=args.command, resume=not args.no_resume,
                    allow_config_change=args.allow_config_change).run()
    finally:
        destroy_distributed()
    return 0


# ---- submit -----------------------------------------------------------------------------------------
SUBMIT_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "partition", "account", "qos", "time", "mem_gb",
                "cpus_per_task", "constraint", "signal_delay_s")


def cmd_submit(args: argparse.Namespace) -> int:
    """`train` or `distill` as a SLURM job; follows it to its end unless `--no-wait`."""
    from dinotrain.config import ConfigError, load_config
    from dinotrain.launch.slurm import (build_request, check_gpus_available, job_name, parse_slurm_extra, require_slurm,
                                        sbatch_script, submit)
    from dinotrain.launch.watch import follow
    from dinotrain.train.rundir import RunDir, move_aside, prepare_run_dir

    if not args.output_dir:
        raise ConfigError("give --output-dir DIR: the run directory, on a filesystem the compute nodes share")
    run_dir = Path(args.output_dir).resolve()
    cfg = load_config(args.config, [*args.overrides, f"train.output_dir={run_dir}"])  # checked before submitting
    flags = {key: getattr(args, key) for key in SUBMIT_FLAGS}
    flags["slurm_extra"] = parse_slurm_extra(args.slurm_extra)
    request = build_request(args.cluster, flags)
    name = job_name(args.job, run_dir)
    if args.dry_run:
        print(sbatch_script(request, RunDir(run_dir).slurm, name))
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
    print(f"  run directory {run_dir}; job logs {RunDir(run_dir).slurm}/{job.job_id}_<task>_log.out|err")
    print(f"  watch: squeue -j {job.job_id}; tail -f {RunDir(run_dir).log}   cancel: scancel {job.job_id}")
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
    """The backbone of `--weights` (any path the weights resolver takes: a weights file or directory, a full
    export, a run or checkpoint directory, finished or not) or a named one at random init (`--model`)."""
    import torch

    from dinotrain.models.presets import build_preset

    if weights:
        from dinotrain.weights.convert import backbone_from_weights
        from dinotrain.weights.resolve import CHECKPOINT, open_weights

        found = open_weights(weights)
        if found.kind == CHECKPOINT:
            logging.getLogger("dinotrain").info("using the %s backbone of %s (iteration %s)", found.label,
                                                found.source, found.iteration)
        return backbone_from_weights(found)
    if not model:
        raise ValueError("give --weights PATH (a .pth, .safetensors, HF directory or run directory) or --model NAME")
    torch.manual_seed(seed)
    return build_preset(model)


def _eval_data(args: argparse.Namespace):
    """(train root, val root, class names, resize, crop, device) of `eval knn|linear`, checked before any work."""
    import torch

    from dinotrain.eval.features import eval_sizes, pick_eval_device, shared_label_space

    resize, crop = eval_sizes(args.image_size, tiny=bool(args.tiny))
    device = pick_eval_device(getattr(args, "device", "auto"))
    train_root, val_root = args.train, args.val
    if args.tiny:
        from dinotrain.data.tiny import ensure_tiny_dataset

        root = ensure_tiny_dataset(kind=args.tiny if isinstance(args.tiny, str) else "digits")
        train_root, val_root = str(root / "train"), str(root / "val")
    if not train_root or not val_root:
        raise ValueError("give --train DIR and --val DIR (labelled ImageFolders), or --tiny for the built-in dataset")
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = shared_label_space(train_root, val_root)  # val classes matched to train's by name
    return train_root, val_root, classes, resize, crop, device


def _write_json(path: str | None, data) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
        print(f"written to {out}")


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import torch

    from dinotrain.eval.knn import knn_line, knn_of_models
    from dinotrain.models.vision_transformer import vit_from_spec

    train_root, val_root, classes, resize, crop, device = _eval_data(args)
    model = _backbone_from_args(args.weights, args.model)
    candidates = {"model": model}
    if args.baseline_random:
        torch.manual_seed(args.seed)
        candidates["random_init"] = vit_from_spec(model.spec)
    if args.baseline_pixels:
        from dinotrain.eval.pixels import PixelFeatures

        candidates["raw_pixels"] = PixelFeatures()
        candidates["raw_pixels_centered"] = PixelFeatures(centered=True)
    logging.getLogger("dinotrain.eval").info("k-NN on %s: resize %d bicubic, centre crop %d", device, resize, crop)
    results = knn_of_models(candidates, train_root, val_root, crop, resize, classes, device, args.batch_size,
                            ks=args.k, temperature=args.temperature)
    for name, accs in results.items():
        print(knn_line(name, accs))
    _write_json(args.output, {n: {str(k): v for k, v in a.items()} for n, a in results.items()})
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    """The official linear evaluation on cached features; optionally the best head as a transformers classifier."""
    from dinotrain.eval.linear import (OFFICIAL_LRS, best_head, export_best_classifier, extract_linear_features,
                                       head_configs, linear_eval)

    if args.export_hf:
        _refuse_existing(args.export_hf, args.force)
    train_root, val_root, classes, resize, crop, device = _eval_data(args)
    model = _backbone_from_args(args.weights, args.model).to(device)
    configs = head_configs(args.n_last_blocks, {"both": (False, True), "yes": (True,), "no": (False,)}[args.avgpool],
                           model.spec.depth)
    n_blocks = max(c.n_blocks for c in configs)
    logging.getLogger("dinotrain.eval").info("linear evaluation on %s: resize %d bicubic, centre crop %d", device,
                                             resize, crop)
    train = extract_linear_features(model, train_root, crop, resize, n_blocks, args.batch_size, classes=classes)
    val = extract_linear_features(model, val_root, crop, resize, n_blocks, args.batch_size, classes=classes)
    lrs = tuple(args.lrs) if args.lrs else OFFICIAL_LRS
    results, heads = linear_eval(train, val, len(classes), configs, lrs=lrs, iterations=args.iterations,
                                 batch_size=args.train_batch_size, seed=args.seed, device=device)
    config, lr_index, acc = best_head(heads, val)
    for name, accs in results.items():
        lr, top = max(accs.items(), key=lambda kv: kv[1])
        print(f"linear top-1 ({name}): {top:.2f}% at lr {lr}")
    print(f"linear top-1 (best): {acc:.2f}% ({config.name}, lr {lrs[lr_index]:g}; {len(train.labels)} train / "
          f"{len(val.labels)} val images, {len(classes)} classes, {args.iterations} iterations)")
    summary = {"best": {"head": config.name, "lr": lrs[lr_index], "accuracy": acc}, "results": results,
               "classes": list(classes), "n_train": len(train.labels), "n_val": len(val.labels),
               "iterations": args.iterations, "batch_size": args.train_batch_size, "image_size": crop, "resize": resize}
    if args.export_hf:
        out, trained, index, hf_acc = export_best_classifier(model, heads, val, classes, args.export_hf, resize, crop)
        lr = trained.lrs[index]
        summary["hf_classifier"] = {"path": str(out), "head": trained.config.name, "lr": lr, "accuracy": hf_acc}
        print(f"classifier ({trained.config.name}, lr {lr:g}, {hf_acc:.2f}%) -> {out} "
              "(transformers.AutoModelForImageClassification.from_pretrained)")
    _write_json(args.output, summary)
    return 0


def _refuse_existing(path: str, force: bool) -> None:
    """An output that exists is not overwritten silently."""
    if Path(path).exists() and not force:
        raise FileExistsError(f"output {path} exists; pass --force to overwrite it, or choose another path")


# ---- convert / embed / tiny-dataset -------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from dinotrain.weights.convert import convert

    out = convert(args.src, args.dst, args.to)
    print(f"converted {args.src} -> {out} ({args.to})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A backbone (teacher by default) of a sharded checkpoint, consolidated in this one process (no GPU).

    `--to full` also writes the DINO/iBOT heads and the recipe config (dinotrain.weights.full).
    """
    from dinotrain.weights.convert import write_weights
    from dinotrain.weights.full import FullExport, write_full
    from dinotrain.weights.resolve import open_weights

    _refuse_existing(args.dst, args.force)
    found = open_weights(args.src, args.which, heads=args.to == "full", checkpoint=True)
    if args.to == "full":
        heads = found.heads or {}
        out = write_full(args.dst, FullExport(found.backbone, found.spec, heads, found.config))
        what = f"{found.label} backbone + {' + '.join(heads)} + config".strip()
    else:
        out = write_weights(found.backbone, found.spec, args.dst, args.to)
        what = f"{found.label} backbone".strip()
    at = "" if found.iteration is None else f" (iteration {found.iteration})"
    print(f"{what} of {found.source}{at} -> {out} ({args.to})")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeddings of files and folders: into an output directory (resumable, `.npy`), a JSON file, or printed."""
    import os

    from dinotrain.embed import EmbedSettings, embed_batches, embed_to_directory, list_images
    from dinotrain.eval.features import eval_sizes, pick_eval_device

    resize, crop = eval_sizes(args.image_size)  # checked before any work
    device = pick_eval_device(getattr(args, "device", "auto"))
    paths = list_images(args.images)
    to_dir = args.output is not None and not args.output.endswith(".json")
    if not to_dir and any(Path(p).is_dir() for p in args.images):
        raise ValueError("embedding a folder writes files: give --output DIR (embeddings.npy + paths.txt)")
    if args.output and not to_dir:
        _refuse_existing(args.output, args.force)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    settings = EmbedSettings(weights=str(args.weights or args.model), resize=resize, crop=crop, normalize=args.normalize,
                             patch_mean=args.patch_mean, patch_tokens=args.patch_tokens, chunk_size=args.chunk_size,
                             batch_size=args.batch_size)
    if settings.chunk_size < 1 or settings.batch_size < 1:
        raise ValueError("--chunk-size and --batch-size must be positive")
    model = _backbone_from_args(args.weights, args.model).eval().to(device)
    if to_dir:
        info = embed_to_directory(model, paths, Path(args.output), settings, device, workers, force=args.force,
                                  progress=not args.no_progress)
        print(f"{info['count']} embeddings of dimension {info['dim']} -> {Path(args.output) / 'embeddings.npy'} "
              f"(rows: paths.txt; {info['skipped']} unreadable skipped, see skipped.txt; "
              f"{info['images_per_s_this_run']} img/s on {device})")
        return 0
    rows_out, n_skipped = [], 0
    for rows, feats, bad in embed_batches(model, paths, settings, device, workers=0):
        for i, why in bad:
            print(f"skipped unreadable {paths[i]}: {why}", file=sys.stderr)
            n_skipped += 1
        for j, i in enumerate(rows):
            cls = feats["cls"][j]
            row = {"image": str(paths[i]), "image_features": cls.tolist()}
            if "patch_mean" in feats:
                row["patch_mean"] = feats["patch_mean"][j].tolist()
            if "patch_tokens" in feats:
                row["patch_tokens"] = feats["patch_tokens"][j].tolist()
            rows_out.append(row)
            print(f"{paths[i]}: {cls.numel()}-dim embedding, norm {cls.norm():.3f}, first values "
                  + " ".join(f"{v:.4f}" for v in cls[:4].tolist()))
    if not rows_out:
        raise ValueError(f"none of the {len(paths)} images could be read")
    if args.output:
        Path(args.output).write_text(json.dumps(rows_out))
        print(f"written to {args.output}" + (f" ({n_skipped} unreadable skipped)" if n_skipped else ""))
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    """The DINOv2 PCA picture and the DINO attention picture of a few images, as PNG files."""
    import numpy as np
    import torch

    from dinotrain.data.augmentations import make_eval_transform
    from dinotrain.data.datasets import load_rgb
    from dinotrain.embed import list_images
    from dinotrain.eval.features import eval_sizes, pick_eval_device
    from dinotrain.viz.features import cls_attention, pca_maps
    from dinotrain.viz.render import save_attention_figure, save_pca_figure

    resize, crop = eval_sizes(args.image_size)
    device = pick_eval_device(getattr(args, "device", "auto"))
    paths = list_images(args.images)
    if len(paths) > args.max_images:
        raise ValueError(f"{len(paths)} images: a figure shows at most --max-images {args.max_images}; pass fewer")
    model = _backbone_from_args(args.weights, args.model).eval().to(device)
    crop = crop // model.patch_size * model.patch_size  # whole patches, so the maps cover the picture shown
    shown = make_eval_transform(resize_size=resize, crop_size=crop).transforms[:2]  # resize + crop, no normalising
    normalised = make_eval_transform(resize_size=resize, crop_size=crop)
    pictures = [load_rgb(p) for p in paths]
    images = torch.stack([normalised(p) for p in pictures]).to(device)
    arrays = [np.asarray(shown[1](shown[0](p))) for p in pictures]
    names = [p.name for p in paths]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.kind in ("pca", "both"):
        maps = pca_maps(model, images, threshold=args.threshold)
        written = save_pca_figure(arrays, names, maps.__class__(*(t.cpu() for t in (maps.foreground, maps.rgb,
                                                                                     maps.first_component))),
                                  out / "pca.png")
        print(f"PCA of patch features -> {written} (foreground: "
              + ", ".join(f"{n} {100 * float(m.float().mean()):.0f}%" for n, m in zip(names, maps.foreground)) + ")")
    if args.kind in ("attention", "both"):
        written = save_attention_figure(arrays, names, cls_attention(model, images).cpu(), out / "attention.png")
        print(f"CLS attention of the last block, per head -> {written}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Training curves of a run (losses, schedules, images/s) as PNG files."""
    from dinotrain.train.rundir import RunDir
    from dinotrain.viz.render import save_curves

    run = Path(args.run)
    metrics = RunDir(run).metrics if run.is_dir() else run
    if not metrics.is_file():
        name = RunDir(run).metrics.name
        raise FileNotFoundError(f"no {name} in {run} (give a run directory or a {name} file)")
    out = Path(args.output) if args.output else RunDir(metrics.parent).plots
    for path in save_curves(metrics, out):
        print(f"written {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The embeddings endpoint (managed online-endpoint format) on uvicorn."""
    import uvicorn

    from dinotrain.eval.features import eval_sizes, pick_eval_device
    from dinotrain.serve.app import ServeLimits, create_app

    resize, crop = eval_sizes(args.image_size)
    device = pick_eval_device(getattr(args, "device", "auto"))
    limits = ServeLimits(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         max_images_per_request=args.max_images_per_request, max_body_bytes=args.max_body_bytes,
                         max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                         url_timeout_s=args.url_timeout_s, allow_private_urls=args.allow_private_urls)
    if limits.max_batch_size < 1 or limits.max_wait_ms < 0 or limits.max_images_per_request < 1:
        raise ValueError("--max-batch-size and --max-images-per-request must be >= 1, --max-wait-ms >= 0")
    model = _backbone_from_args(args.weights, args.model).eval().to(device)
    app = create_app(model, device, limits, resize, crop, description=f"Weights: {args.weights or args.model}.")
    print(f"serving {args.weights or args.model} ({model.embed_dim}-dim CLS features, crop {crop}) on {device} at "
          f"http://{args.host}:{args.port}/score  (docs: /docs, health: /health; batches of up to "
          f"{limits.max_batch_size}, waiting up to {limits.max_wait_ms:g} ms)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_tiny_dataset(args: argparse.Namespace) -> int:
    from dinotrain.data.tiny import ensure_tiny_dataset

    print(ensure_tiny_dataset(args.root, kind=args.kind))
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


def _add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """--weights / --model / --device of every command that runs a backbone."""
    parser.add_argument("--weights", help="backbone weights: hub .pth, .safetensors, Hugging Face directory, full "
                                          "export, or a run / checkpoint directory (finished or not)")
    parser.add_argument("--model", help="a named backbone at random init when no --weights, e.g. dinov2_vits14")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the backbone runs (default: the GPU when torch sees one, else the CPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinotrain", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    for name, func, help_text, config_help in (
            ("train", cmd_train, "self-supervised pretraining (DINO + iBOT + KoLeo)",
             "a YAML file or a shipped config name such as smoke/cpu_tiny"),
            ("distill", cmd_train, "distil students from a frozen teacher (backbone + DINO/iBOT heads)",
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
    _add_backbone_arguments(k)
    k.add_argument("--train", help="labelled ImageFolder of training images")
    k.add_argument("--val", help="labelled ImageFolder of validation images")
    k.add_argument("--tiny", nargs="?", const="digits", choices=("digits", "shapes"),
                   help="use a built-in tiny dataset's train/val split (digits, or shapes)")
    k.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--image-size", type=int,
                   help="centre-crop side in pixels; the shorter side is first resized bicubically to "
                        "round(size*256/224) (the DINO protocol: 256 -> 224). Default 224, or 32 with --tiny")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--baseline-random", action="store_true", help="also evaluate the same architecture at random init")
    k.add_argument("--baseline-pixels", action="store_true",
                   help="also evaluate raw pixels of the same view (RGB vectors, and with each image's mean removed): "
                        "the reference a backbone must beat on small datasets")
    k.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    k.add_argument("--threads", type=int, help="torch CPU threads")
    k.add_argument("--output", help="write the accuracies as JSON here")
    k.set_defaults(func=cmd_eval_knn)

    lin = esub.add_parser("linear", help="linear probes on frozen features (official DINOv2 sweep, cached features); "
                                         "exports the best head as a transformers classifier")
    _add_backbone_arguments(lin)
    lin.add_argument("--train", help="labelled ImageFolder of training images")
    lin.add_argument("--val", help="labelled ImageFolder of validation images")
    lin.add_argument("--tiny", nargs="?", const="digits", choices=("digits", "shapes"),
                     help="use a built-in tiny dataset's train/val split (digits, or shapes)")
    lin.add_argument("--image-size", type=int, help="centre-crop side (as eval knn; default 224, or 32 with --tiny)")
    lin.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4],
                     help="class tokens of the last N blocks (official: 1 and 4)")
    lin.add_argument("--avgpool", choices=["both", "yes", "no"], default="both",
                     help="append the mean patch token of the last block (official: both variants)")
    lin.add_argument("--lrs", type=float, nargs="+", help="learning rates of the sweep (default: the official 13, "
                                                         "1e-5 ... 0.1, scaled by batch/256)")
    lin.add_argument("--iterations", type=int, default=12500, help="SGD steps (official: 12500)")
    lin.add_argument("--train-batch-size", type=int, default=256, help="batch of cached features per step")
    lin.add_argument("--batch-size", type=int, default=64, help="images per forward when computing features")
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument("--threads", type=int, help="torch CPU threads")
    lin.add_argument("--output", help="write all accuracies and the best head as JSON here")
    lin.add_argument("--export-hf", metavar="DIR", help="write the best 1-block head with the backbone as a "
                     "transformers Dinov2ForImageClassification (ViTForImageClassification for DINO v1) directory")
    lin.add_argument("--force", action="store_true", help="overwrite an existing --export-hf directory")
    lin.set_defaults(func=cmd_eval_linear)

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
    x.add_argument("--force", action="store_true", help="overwrite an existing output")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("embed", help="embed images and folders with a backbone (CLS token after the final norm)")
    m.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    _add_backbone_arguments(m)
    m.add_argument("--image-size", type=int,
                   help="centre-crop side in pixels after a bicubic resize of the shorter side to "
                        "round(size*256/224) (default 224: resize 256, crop 224, the DINO protocol)")
    m.add_argument("--output", help="a directory (embeddings.npy, paths.txt, ...: resumable; needed for folders), "
                                    "or a .json file ([{image, image_features}], for a few images)")
    m.add_argument("--batch-size", type=int, default=64, help="images per forward")
    m.add_argument("--workers", type=int, help="image decoding processes (default: min(8, CPU cores))")
    m.add_argument("--normalize", action="store_true", help="L2-normalise the CLS embeddings (default: as the model gives them)")
    m.add_argument("--patch-mean", action="store_true", help="also the mean patch token (patch_mean.npy)")
    m.add_argument("--patch-tokens", action="store_true", help="also every patch token (patch_tokens.npy: N x P x D)")
    m.add_argument("--chunk-size", type=int, default=4096, help="images per resumable chunk")
    m.add_argument("--force", action="store_true", help="overwrite finished output, or restart an unfinished one "
                                                        "that has other settings")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_embed)

    v = sub.add_parser("visualize", help="PCA of patch features (DINOv2 figure) and CLS attention per head (DINO "
                                         "figure) of a few images, as PNG")
    v.add_argument("images", nargs="+", help="image files or folders (at most --max-images images)")
    _add_backbone_arguments(v)
    v.add_argument("--image-size", type=int, help="centre-crop side after a bicubic resize to round(size*256/224) "
                                                  "(default 224); cropped down to whole patches")
    v.add_argument("--kind", choices=["pca", "attention", "both"], default="both")
    v.add_argument("--threshold", type=float, default=0.5,
                   help="foreground: first principal component (scaled to [0, 1]) above this")
    v.add_argument("--output", default="visualizations", help="folder for pca.png and attention.png")
    v.add_argument("--max-images", type=int, default=8)
    v.set_defaults(func=cmd_visualize)

    pl = sub.add_parser("plot", help="training curves of a run (losses, lr/wd/momentum/teacher temperature, images/s)")
    pl.add_argument("run", help="a run directory (or its metrics.jsonl)")
    pl.add_argument("--output", help="folder for the PNG files (default RUN/plots)")
    pl.set_defaults(func=cmd_plot)

    sv = sub.add_parser("serve", help="HTTP embeddings endpoint in the managed online-endpoint format "
                                      "(POST /score, GET /health, /docs)")
    _add_backbone_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch-size", type=int, default=32, help="images per forward, across concurrent requests "
                                                                   "(1: no batching)")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more images")
    sv.add_argument("--allow-private-urls", action="store_true",
                    help="let image URLs reach loopback, private, link-local and metadata addresses")
    sv.add_argument("--image-size", type=int, help="centre crop after a bicubic resize (default 224, as embed)")
    sv.add_argument("--max-images-per-request", type=int, default=64)
    sv.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    sv.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    sv.add_argument("--max-image-pixels", type=int, default=40_000_000)
    sv.add_argument("--url-timeout-s", type=float, default=10.0)
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("tiny-dataset", help="write the built-in tiny dataset (train/val ImageFolders) and print its path")
    d.add_argument("--root", help="where to write it (default $DINOTRAIN_DATA or ~/.cache/dinotrain, folder tiny or "
                                  "tiny-shapes)")
    d.add_argument("--kind", default="digits", choices=("digits", "shapes"),
                   help="digits (the default, what `tiny` means everywhere) or shapes (the second built-in dataset)")
    d.set_defaults(func=cmd_tiny_dataset)
    return p


def _enable_faulthandler() -> None:
    """A native crash (SIGSEGV, or SIGABRT from a C++ library) then prints each thread's Python stack."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (ValueError, OSError, AttributeError):  # stderr is not a file (captured, redirected in Python)
        pass


def main(argv: list[str] | None = None) -> int:
    _enable_faulthandler()
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
