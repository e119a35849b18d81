"""`dinotrain eval knn|linear`: the evaluation protocols of `eval.run` on a backbone."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_backbone_arguments, add_inference_arguments, inference_options


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="evaluate a backbone")
    esub = e.add_subparsers(dest="eval_command", required=True)
    k = esub.add_parser("knn", help="weighted k-NN accuracy of CLS features (T=0.07)")
    add_backbone_arguments(k)
    add_inference_arguments(k)
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
    k.set_defaults(func=run)

    lin = esub.add_parser("linear", help="linear probes on frozen features (official DINOv2 sweep, cached features); "
                                         "exports the best head as a transformers classifier")
    add_backbone_arguments(lin)
    add_inference_arguments(lin)
    lin.add_argument("--train", help="labelled ImageFolder of training images")
    lin.add_argument("--val", help="labelled ImageFolder of validation images")
    lin.add_argument("--tiny", nargs="?", const="digits", choices=("digits", "shapes"),
                     help="use a built-in tiny dataset's train/val split (digits, or shapes)")
    lin.add_argument("--image-size", type=int, help="centre-crop side (as eval knn; default 224, or 32 with --tiny)")
    lin.add_argument("--n-last-blocks", type=int, nargs="+",
                     help="class tokens of the last N blocks (default, official: 1 and 4; a timm / torchvision "
                          "backbone: its pooled features, 1 only)")
    lin.add_argument("--avgpool", choices=["both", "yes", "no"],
                     help="append the mean patch token of the last block (default, official: both variants; a timm / "
                          "torchvision backbone: no)")
    lin.add_argument("--lrs", type=float, nargs="+", help="learning rates of the sweep (default: the official 13, "
                                                         "1e-5 ... 0.1, scaled by batch/256)")
    lin.add_argument("--iterations", type=int, default=12500, help="SGD steps (official: 12500)")
    lin.add_argument("--train-batch-size", type=int, default=256, help="batch of cached features per step")
    lin.add_argument("--batch-size", type=int, default=64, help="images per forward when computing features")
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument("--threads", type=int, help="torch CPU threads")
    lin.add_argument("--output", help="write all accuracies and the best head as JSON here")
    lin.add_argument("--export-hf", metavar="DIR", help="write the best 1-block head with the backbone as a "
                     "transformers Dinov2ForImageClassification (ViTForImageClassification for DINO v1) directory; "
                     "DINOv3 (no transformers classifier class): the best head + backbone.safetensors in "
                     "dinotrain's format")
    lin.add_argument("--force", action="store_true", help="overwrite an existing --export-hf directory")
    lin.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return {"knn": knn, "linear": linear}[args.eval_command](args)


def _data(args: argparse.Namespace):
    from dinotrain.eval.run import eval_data

    return eval_data(args.train, args.val, args.tiny, args.image_size, getattr(args, "device", "auto"), args.threads)


def knn(args: argparse.Namespace) -> int:
    from dinotrain.eval.run import run_knn

    run_knn(_data(args), args.weights, args.model, ks=args.k, temperature=args.temperature, batch_size=args.batch_size,
            baseline_random=args.baseline_random, baseline_pixels=args.baseline_pixels, seed=args.seed,
            output=args.output, **inference_options(args))
    return 0


def linear(args: argparse.Namespace) -> int:
    from dinotrain.eval.run import run_linear
    from dinotrain.outputs import refuse_existing

    if args.export_hf:
        refuse_existing(args.export_hf, args.force)
    run_linear(_data(args), args.weights, args.model, n_last_blocks=args.n_last_blocks, avgpool=args.avgpool,
               lrs=args.lrs, iterations=args.iterations, train_batch_size=args.train_batch_size,
               batch_size=args.batch_size, seed=args.seed, output=args.output, export_hf=args.export_hf,
               **inference_options(args))
    return 0
