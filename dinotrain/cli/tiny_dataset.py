"""`dinotrain tiny-dataset`: write the built-in tiny dataset (`data/tiny.py`) and print where."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("tiny-dataset", help="write the built-in tiny dataset (train/val ImageFolders) and print "
                                                   "its path")
    d.add_argument("--root", help="where to write it (default $DINOTRAIN_DATA or ~/.cache/dinotrain, folder tiny or "
                                  "tiny-shapes)")
    d.add_argument("--kind", default="digits", choices=("digits", "shapes"),
                   help="digits (the default, what `tiny` means everywhere) or shapes (the second built-in dataset)")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinotrain.data.tiny import ensure_tiny_dataset

    print(ensure_tiny_dataset(args.root, kind=args.kind))
    return 0
