"""`dinotrain visualize` (PCA and attention pictures of images) and `dinotrain plot` (a run's curves): `viz/`."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_backbone_arguments


def add_parser(subparsers) -> None:
    v = subparsers.add_parser("visualize", help="PCA of patch features (DINOv2 figure) and CLS attention per head "
                                                "(DINO figure) of a few images, as PNG")
    v.add_argument("images", nargs="+", help="image files or folders (at most --max-images images)")
    add_backbone_arguments(v)
    v.add_argument("--image-size", type=int, help="centre-crop side after a bicubic resize to round(size*256/224) "
                                                  "(default 224); cropped down to whole patches")
    v.add_argument("--kind", choices=["pca", "attention", "both"], default="both")
    v.add_argument("--threshold", type=float, default=0.5,
                   help="foreground: first principal component (scaled to [0, 1]) above this")
    v.add_argument("--output", default="visualizations", help="folder for pca.png and attention.png")
    v.add_argument("--max-images", type=int, default=8)
    v.set_defaults(func=run)

    pl = subparsers.add_parser("plot", help="training curves of a run (losses, lr/wd/momentum/teacher temperature, "
                                            "images/s)")
    pl.add_argument("run", help="a run directory (or its metrics.jsonl)")
    pl.add_argument("--output", help="folder for the PNG files (default RUN/plots)")
    pl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.command == "plot":
        from dinotrain.viz.render import plot_run

        plot_run(args.run, args.output)
        return 0
    from dinotrain.viz.pictures import visualize

    visualize(args.images, args.weights, args.model, image_size=args.image_size, kind=args.kind,
              threshold=args.threshold, output=args.output, max_images=args.max_images,
              device=getattr(args, "device", "auto"))
    return 0
