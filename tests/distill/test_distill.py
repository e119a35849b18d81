"""Distillation in one process: frozen teacher, one teacher forward per step, multi = single student,
every teacher source (run, checkpoint, full export, backbone + head warm-up), one-line errors."""

import json

import pytest
import torch

from dinotrain.cli import main
from dinotrain.config import load_config
from dinotrain.distributed.checkpoint import full_state_dict
from dinotrain.distributed.env import destroy_distributed
from dinotrain.train.run import TrainingRun
from dinotrain.train.teacher import read_teacher
from dinotrain.weights.full import read_full
from trainruns import FAST, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(run, ["train.max_iterations=4"])
    return run


@pytest.fixture(scope="module")
def full_export(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "teacher.safetensors"
    assert main(["export", str(teacher_run), str(out), "--to", "full"]) == 0
    return out


def _overrides(teacher, *more):
    return [*FAST, f"distillation.teacher={teacher}", "student.depth=2", *more]


def _distiller(run_dir, teacher, *more, resume=False) -> TrainingRun:
    return TrainingRun(load_config("smoke/distill_cpu_tiny", _overrides(teacher, *more)), run_dir, command="distill",
                       resume=resume)


def _run(distiller: TrainingRun) -> dict:
    try:
        return distiller.run()
    finally:
        destroy_distributed()


def _weights(path):
    return torch.load(path, weights_only=True)


def test_teacher_is_frozen_and_runs_once_per_step(teacher_run, tmp_path):
    d = _distiller(tmp_path / "d", teacher_run, "train.max_iterations=3", "distillation.students.a.student.depth=2",
                   "distillation.students.b.student.depth=3")
    calls = []
    d.objective.teacher.nets["backbone"].register_forward_hook(lambda *_: calls.append(1))
    _run(d)
    assert len(calls) == 3, "the teacher must run exactly once per step, whatever the number of students"
    original = read_teacher(str(teacher_run))
    assert all(not p.requires_grad and p.grad is None for p in d.objective.teacher.parameters())
    after = full_state_dict(d.objective.teacher.nets["backbone"])
    assert after.keys() == original.backbone.keys()
    assert all(torch.equal(after[k], original.backbone[k]) for k in after), "teacher backbone changed"
    for name, head in original.heads.items():
        got = full_state_dict(d.objective.teacher.nets[name])
        assert all(torch.equal(got[k], head[k]) for k in head), f"teacher {name} changed"
    assert (tmp_path / "d" / "students" / "a.pth").is_file() and (tmp_path / "d" / "students" / "b.pth").is_file()


def test_each_student_of_a_multi_student_run_equals_its_single_run(teacher_run, tmp_path):
    students = ["distillation.students.a.student.depth=2", "distillation.students.b.student.depth=3",
                "distillation.students.b.optim.base_lr=0.002"]
    _run(_distiller(tmp_path / "multi", teacher_run, "train.max_iterations=4", *students))
    _run(_distiller(tmp_path / "b", teacher_run, "train.max_iterations=4", *students[1:]))
    multi, single = _weights(tmp_path / "multi/students/b.pth"), _weights(tmp_path / "b/students/b.pth")
    assert all(torch.equal(multi[k], single[k]) for k in single), "student b differs when trained beside a"
    records = [json.loads(line) for line in (tmp_path / "multi/metrics.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    for m, s in zip(records, single_records):
        assert m["b/total_loss"] == s["b/total_loss"]
        assert "a/total_loss" in m and "a/total_loss" not in s


@pytest.mark.parametrize("source", ["run", "checkpoint", "full"])
def test_teacher_with_heads_from_every_source(teacher_run, full_export, tmp_path, source):
    teacher = {"run": teacher_run, "checkpoint": teacher_run / "checkpoints" / "00000004", "full": full_export}[source]
    _run(_distiller(tmp_path / "d", teacher, "train.max_iterations=2"))
    extra = json.loads((tmp_path / "d/checkpoints/00000002/extra.json").read_text())
    assert extra["teacher"]["kind"] == ("full" if source == "full" else "run")
    assert (tmp_path / "d/students/student.pth").is_file()
    # the same weights whatever the source: one fingerprint
    assert extra["teacher"]["fingerprint"] == _fingerprint_of(teacher_run, tmp_path)


def _fingerprint_of(teacher_run, tmp_path):
    from dinotrain.train.teacher import all_tensors, fingerprint

    return fingerprint(all_tensors(read_teacher(str(teacher_run))))


def test_backbone_only_teacher_gets_heads_from_the_warm_up_once(teacher_run, tmp_path):
    backbone = teacher_run / "teacher_backbone.pth"
    run = tmp_path / "d"
    _run(_distiller(run, backbone, "train.max_iterations=2", "train.head_warmup_iterations=3"))
    warm = run / "head_warmup" / "teacher_full.safetensors"
    full = read_full(warm)
    original = _weights(backbone)
    assert all(torch.equal(full.backbone[k], original[k]) for k in original), "the warm-up changed the backbone"
    random_head = read_teacher(str(teacher_run)).heads["dino_head"]  # another head of the same shape
    assert not torch.equal(full.heads["dino_head"]["mlp.0.weight"], random_head["mlp.0.weight"])
    assert full.config["head_warmup"]["iterations"] == 3
    assert len((run / "head_warmup" / "metrics.jsonl").read_text().splitlines()) == 3
    stamp = warm.stat().st_mtime_ns
    _run(_distiller(run, backbone, "train.max_iterations=3", "train.head_warmup_iterations=3", resume=True))
    assert warm.stat().st_mtime_ns == stamp, "the warm-up must be reused on resume, not redone"
    extra = json.loads((run / "checkpoints/00000003/extra.json").read_text())
    assert extra["teacher"]["kind"] == "backbone+warm-up"


def test_continued_pretraining_starts_from_a_full_export_with_its_heads(full_export, tmp_path):
    cfg = load_config("smoke/cpu_tiny", [*FAST, f"student.pretrained_weights={full_export}"])
    try:
        trainer = TrainingRun(cfg, tmp_path / "t", resume=False)
        heads = read_full(full_export).heads
        model = trainer.objective.learners[0].model
        for nets in (model.student, model.teacher):
            got = full_state_dict(nets["dino_head"])
            assert all(torch.equal(got[k], heads["dino_head"][k]) for k in got)
    finally:
        destroy_distributed()


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _cli(run_dir, teacher, *more):
    return ["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(run_dir), *_overrides(teacher, *more)]


@pytest.mark.parametrize("override,expected", [
    ("student.patch_size=8", "patch size"),
    ("dino.head_n_prototypes=128", "dino.head_n_prototypes=256"),
    ("ibot.separate_head=true", "ibot.separate_head=False"),
    ("distillation.students.s.dino.head_n_prototypes=64", "student 's'"),
])
def test_student_that_cannot_learn_from_the_teacher_is_refused(teacher_run, tmp_path, capsys, override, expected):
    assert expected in _error(capsys, _cli(tmp_path / "d", teacher_run, override))


def test_bad_teacher_inputs_are_one_line_errors(teacher_run, tmp_path, capsys):
    assert "does not exist" in _error(capsys, _cli(tmp_path / "d1", tmp_path / "nowhere"))
    not_a_vit = tmp_path / "not_a_vit.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, not_a_vit)
    assert "distillation.teacher" in _error(capsys, _cli(tmp_path / "d2", not_a_vit))
    no_heads = _error(capsys, _cli(tmp_path / "d3", teacher_run / "teacher_backbone.pth", "train.head_warmup_iterations=0"))
    assert "head_warmup_iterations" in no_heads
    assert "required" in _error(capsys, ["distill", "--config", "distill/vits14_from_vitg14", "--output-dir",
                                         str(tmp_path / "d4"), "train.dataset_path=tiny"])


def test_changed_full_export_teacher_is_refused_on_resume(full_export, tmp_path, capsys):
    from dinotrain.weights.full import write_full

    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(full_export.read_bytes())
    run = tmp_path / "d"
    _run(_distiller(run, teacher, "train.max_iterations=2"))
    changed = read_full(teacher)
    changed.heads["dino_head"]["mlp.0.bias"] += 1.0  # same backbone, other heads
    write_full(teacher, changed)
    err = _error(capsys, _cli(run, teacher, "train.max_iterations=3"))
    assert "differ from the ones this run was distilled from" in err


def test_students_must_share_the_runs_length_and_keep_their_names_on_resume(teacher_run, tmp_path, capsys):
    assert "optim.epochs" in _error(capsys, _cli(tmp_path / "d0", teacher_run, "distillation.students.a.optim.epochs=5"))
    run = tmp_path / "d"
    two = ["distillation.students.a.student.depth=2", "distillation.students.b.student.depth=3"]
    _run(_distiller(run, teacher_run, "train.max_iterations=3", *two))
    assert "keeps its students" in _error(capsys, _cli(run, teacher_run, "train.max_iterations=4", two[0]))
    changed = _error(capsys, _cli(run, teacher_run, "train.max_iterations=4", two[0],
                                  "distillation.students.b.student.depth=4"))
    assert "student 'b'" in changed and "student.depth" in changed


def test_a_student_with_ibot_gets_patch_targets_when_the_top_level_has_none(teacher_run, tmp_path):
    d = _distiller(tmp_path / "d", teacher_run, "train.max_iterations=2", "ibot.loss_weight=0",
                   "distillation.students.a.ibot.loss_weight=1.0", "distillation.students.b.student.depth=2")
    last = _run(d)
    assert last["a/ibot_loss"] > 0 and "b/ibot_loss" not in last


def test_a_resume_never_redoes_the_warm_up_with_other_settings(teacher_run, tmp_path, capsys):
    backbone = teacher_run / "teacher_backbone.pth"
    run = tmp_path / "d"
    _run(_distiller(run, backbone, "train.max_iterations=2", "train.head_warmup_iterations=2"))
    err = _error(capsys, _cli(run, backbone, "train.max_iterations=3", "train.head_warmup_iterations=2",
                              "teacher.teacher_temp=0.05", "teacher.warmup_teacher_temp=0.05"))
    assert "head warm-up" in err and "other settings" in err
