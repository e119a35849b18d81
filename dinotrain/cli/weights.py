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
                                             "full (backbone + heads + config), or ONNX")
    x.add_argument("src", help="a run directory (its newest complete checkpoint) or one checkpoints/<iteration> "
                               "directory; for --to onnx also any backbone weights (.pth, .safetensors, HF directory)")
    x.add_argument("dst", help="output file (hub, safetensors, timm, full: a .safetensors file; onnx: a .onnx file) "
                               "or directory (hf)")
    x.add_argument("--to", required=True, choices=["hub", "hf", "safetensors", "timm", "full", "onnx"],
                   help="onnx: one graph for any batch size and any height/width in multiples of the patch size "
                        "(position embeddings resampled, or RoPE computed, inside the graph); input pixel_values, "
                        "outputs cls_token, register_tokens / storage_tokens (if any), patch_tokens (docs/deployment.md)")
    x.add_argument("--fp16", action="store_true", help="onnx: store the weights as float16 (half the file; computed "
                                                       "in float32)")
    x.add_argument("--opset", type=int, help="onnx: ONNX opset (default 17)")
    x.add_argument("--example-size", type=int, default=224,
                   help="onnx: side of the example image the graph is traced with (does not limit the sizes it takes)")
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

    export_run(args.src, args.dst, args.to, args.which, force=args.force, fp16=args.fp16, opset=args.opset,
               example_size=args.example_size)
    return 0
