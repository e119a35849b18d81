"""`dinotrain train` and `dinotrain distill`: one command per objective of `train.objectives.OBJECTIVES`."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_run_arguments
from dinotrain.train.objectives import OBJECTIVES

# command -> (its help, the help of its --config)
HELP = {
    "train": ("self-supervised pretraining (DINO + iBOT + KoLeo)",
              "a YAML file or a shipped config name such as smoke/cpu_tiny"),
    "distill": ("distil students from a frozen teacher (backbone + DINO/iBOT heads)",
                "a YAML file or a shipped config name such as smoke/distill_cpu_tiny (see configs/distill/)"),
}


def add_parser(subparsers) -> None:
    for name in OBJECTIVES:
        help_text, config_help = HELP[name]
        parser = subparsers.add_parser(name, help=help_text)
        add_run_arguments(parser, config_help, "run directory (checkpoints, metrics.jsonl, log.txt)")
        parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Same arguments, run directory and resume rules for every objective; the command names it."""
    from dinotrain.train.run import run_command

    run_command(args.command, args.config, args.overrides, args.output_dir, resume=not args.no_resume,
                allow_config_change=args.allow_config_change)
    return 0
