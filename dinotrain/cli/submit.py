"""`dinotrain submit train|distill`: a training command as a SLURM job (`launch.submit`)."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_run_arguments
from dinotrain.train.objectives import OBJECTIVES


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("submit", help="run train or distill as a SLURM job (submitit), requeued on preemption "
                                             "and at the time limit")
    jobs = s.add_subparsers(dest="job", required=True)
    for job in OBJECTIVES:  # the same names as the training commands
        j = jobs.add_parser(job, help=f"`dinotrain {job}` as a SLURM job")
        add_run_arguments(j, f"a YAML file or a shipped config name, as for `dinotrain {job}`",
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
        j.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinotrain.launch.submit import REQUEST_FLAGS, submit_run

    return submit_run(args.job, args.config, args.overrides, args.output_dir, cluster=args.cluster,
                      flags={key: getattr(args, key) for key in REQUEST_FLAGS}, slurm_extra=args.slurm_extra,
                      dry_run=args.dry_run, no_resume=args.no_resume, no_wait=args.no_wait,
                      allow_config_change=args.allow_config_change)
