"""The `dinotrain` command: train, distill, plan, submit, eval, export, convert, embed, serve, visualize, plot, tiny-dataset.

Errors a user can fix (bad config, missing file, wrong weights) print one clear line and exit 2;
`--debug` shows the traceback. Each command group is a module here (`add_parser` + `run`, parsing only);
what a command does lives in the package it belongs to.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys

from dinotrain.cli import embed, eval as eval_, plan, serve, submit, tiny_dataset, train, visualize, weights

# In the order `dinotrain --help` lists them.
COMMAND_GROUPS = (train, plan, submit, eval_, weights, embed, visualize, serve, tiny_dataset)


def _user_errors() -> tuple[type[BaseException], ...]:
    from dinotrain.config import ConfigError
    from dinotrain.distributed.checkpoint import CheckpointError
    from dinotrain.weights.state_dict import WeightsError
    from dinotrain.distributed.env import PeerFailed
    from dinotrain.train.loop import TrainingDiverged
    from dinotrain.launch.slurm import SubmitError
    from dinotrain.data.loader import DataWorkersDied
    from dinotrain.storage import StorageError
    from dinotrain.distributed.compile import CompileError

    return (ConfigError, WeightsError, CheckpointError, TrainingDiverged, PeerFailed, SubmitError, DataWorkersDied,
            StorageError, CompileError, FileNotFoundError, FileExistsError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinotrain", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
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
    from dinotrain.train.stop import Stopped

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
    except Stopped as exc:  # a stop signal: checkpoint saved, say where the run resumes (once, from rank 0)
        if exc.is_main:
            print(f"dinotrain {args.command}: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except Exception as exc:
        from dinotrain.launch.watch import JobFailed

        if isinstance(exc, JobFailed) and not args.debug:  # the job's own error text, not ours: exit code 1
            print(f"dinotrain {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
