"""RunDir names every path of a run directory (the layout users and the README rely on), and the
checkpointer writes where it says."""

from __future__ import annotations

import warnings

import pytest
import torch

from dinotrain.distributed.checkpoint import Checkpointer, complete_checkpoints
from dinotrain.train.rundir import RunDir, RunDirError, move_aside, prepare_run_dir


def test_the_layout(tmp_path):
    run = RunDir(tmp_path)
    paths = (run.config, run.metrics, run.log, run.resume_history, run.checkpoints, run.checkpoint(12),
             run.teacher_backbone, run.students, run.student("vits14"), run.head_warmup, run.warmup_full,
             run.warmup_metrics, run.slurm, run.plots)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert names == {"config.yaml", "metrics.jsonl", "log.txt", "resume_history.jsonl", "checkpoints",
                     "checkpoints/00000012", "teacher_backbone.pth", "students", "students/vits14.pth", "head_warmup",
                     "head_warmup/teacher_full.safetensors", "head_warmup/metrics.jsonl", "slurm", "plots"}
    assert RunDir.student_part("vits14") == "students/vits14"
    assert str(run) == str(tmp_path) and RunDir(run).root == tmp_path


def test_what_a_run_directory_looks_like(tmp_path):
    run = RunDir(tmp_path)
    assert not run.looks_like_run() and run.finished_students() == []
    run.students.mkdir()
    for name in ("b", "a"):
        torch.save({}, run.student(name))
    assert run.looks_like_run() and run.finished_students() == ["a", "b"]
    assert RunDir.checkpoint_students(tmp_path) == []  # a checkpoint's student parts are directories
    (tmp_path / "students" / "s1").mkdir()
    assert RunDir.checkpoint_students(tmp_path) == ["s1"] and RunDir.checkpoint_students(tmp_path / "nope") is None


def test_checkpointer_writes_where_the_run_directory_says(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        saved = Checkpointer(tmp_path).save_parts(7, {"": (torch.nn.Linear(2, 2), None)}, {})
    assert saved == RunDir(tmp_path).checkpoint(7) and complete_checkpoints(tmp_path) == [saved]


def test_prepare_and_move_aside(tmp_path):
    run = RunDir(tmp_path / "run")
    prepare_run_dir(run)
    run.checkpoint(1).mkdir(parents=True)
    run.metrics.write_text("{}\n")
    move_aside(run)
    assert not run.checkpoints.exists() and not run.metrics.exists()
    assert sorted(p.name.split("-")[0] for p in run.root.iterdir()) == ["checkpoints.old", "metrics.old"]
    run.config.mkdir()
    with pytest.raises(RunDirError, match="config.yaml is a directory"):
        prepare_run_dir(run)
