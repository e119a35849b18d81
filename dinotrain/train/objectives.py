"""Which objective each training command runs: the one table for the CLI and SLURM jobs.

`dinotrain train` pretrains, `dinotrain distill` distils; `dinotrain submit <command>` accepts the same
names, and `train.run.TrainingRun` builds the objective a command names. Each entry imports its class only
when called, so the CLI lists the commands without importing torch (`dinotrain --help` stays instant).
"""

from __future__ import annotations


def _pretraining():
    from dinotrain.train.pretrain import Pretraining

    return Pretraining


def _distillation():
    from dinotrain.train.distill import Distillation

    return Distillation


# command -> a function returning its objective class
OBJECTIVES = {"train": _pretraining, "distill": _distillation}


def objective_class(command: str):
    """The objective class of a training command (a name from `OBJECTIVES`)."""
    return OBJECTIVES[command]()
