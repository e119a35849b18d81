"""The `dinotrain` command's shape: one table of training commands for the CLI and SLURM jobs, and a parser
that builds without importing torch (so `dinotrain --help` is instant)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dinotrain import cli
from dinotrain.train import objectives
from dinotrain.train.objectives import OBJECTIVES, objective_class


def test_training_commands_and_submit_jobs_are_the_objectives_table(monkeypatch):
    parse = cli.build_parser().parse_args
    assert set(OBJECTIVES) == {"train", "distill"}
    for name in OBJECTIVES:
        assert parse([name]).func is cli.train.run
        assert parse(["submit", name]).job == name
    monkeypatch.setitem(OBJECTIVES, "gram", objectives._pretraining)  # a new objective: a command and a job
    monkeypatch.setitem(cli.train.HELP, "gram", ("gram anchoring", "a config"))
    parse = cli.build_parser().parse_args
    assert parse(["gram"]).command == "gram" and parse(["submit", "gram"]).job == "gram"
    monkeypatch.delitem(OBJECTIVES, "gram")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["submit", "gram"])


def test_objective_classes():
    from dinotrain.train.distill import Distillation
    from dinotrain.train.pretrain import Pretraining

    assert objective_class("train") is Pretraining and objective_class("distill") is Distillation


def test_submit_refuses_a_command_that_is_no_objective(tmp_path):
    from dinotrain.config import ConfigError
    from dinotrain.launch.submit import submit_run

    with pytest.raises(ConfigError, match="'embed'.*train, distill"):
        submit_run("embed", "smoke/cpu_tiny", [], str(tmp_path), cluster=None, flags={}, dry_run=True)


def test_parser_builds_without_torch():
    code = "import sys; from dinotrain.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
