"""`dinotrain embed`: embeddings of image files and folders (`dinotrain.embed`)."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_backbone_arguments, add_inference_arguments, inference_options


def add_parser(subparsers) -> None:
    m = subparsers.add_parser("embed", help="embed images and folders with a backbone (CLS token after the final norm)")
    m.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    add_backbone_arguments(m)
    add_inference_arguments(m)
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
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinotrain.embed import embed_command

    embed_command(args.images, args.weights, args.model, image_size=args.image_size, output=args.output,
                  batch_size=args.batch_size, workers=args.workers, normalize=args.normalize,
                  patch_mean=args.patch_mean, patch_tokens=args.patch_tokens, chunk_size=args.chunk_size,
                  force=args.force, progress=not args.no_progress, device=getattr(args, "device", "auto"),
                  **inference_options(args))
    return 0
