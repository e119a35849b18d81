"""`dinotrain convert` (between weights formats) and `dinotrain export` (a run's backbone out): `weights/`."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("convert", help="convert backbone weights between hub .pth (= the official DINOv2 / "
                                              "DINOv3 .pth), Hugging Face, safetensors and (DINOv3) timm")
    c.add_argument("src", help="a hub .pth, a .safetensors file, a Hugging Face model directory, or timm dinov3 "
                               "weights (a file or timm's Hub directory)")
    c.add_argument("dst", help="output file (hub, safetensors, timm: .safetensors or .pth) or directory (hf)")
    c.add_argument("--to", required=True, choices=["hub", "hf", "safetensors", "timm"],
                   help="hf: Dinov2Model & co., or DINOv3ViTModel for a DINOv3 backbone; timm: DINOv3 only")
    c.set_defaults(func=run)

    x = subparsers.add_parser("export", help="teacher backbone of a checkpoint -> hub .pth, Hugging Face, safetensors, "
                                             "or full (backbone + heads + config)")
    x.add_argument("src", help="a run directory (its newest complete checkpoint) or one checkpoints/<iteration> directory")
    x.add_argument("dst", help="output file (hub, safetensors, timm, full: a .safetensors file) or directory (hf)")
    x.add_argument("--to", required=True, choices=["hub", "hf", "safetensors", "timm", "full"])
    x.add_argument("--which", help="training run: teacher (the EMA, default) or student; distillation run: the "
                                   "student's name (its EMA; default: the only student)")
    x.add_argument("--force", action="store_true", help="overwrite an existing output")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from dinotrain.weights.convert import convert

        out = convert(args.src, args.dst, args.to)
        print(f"converted {args.src} -> {out} ({args.to})")
        return 0
    from dinotrain.weights.export import export_run

    export_run(args.src, args.dst, args.to, args.which, force=args.force)
    return 0
