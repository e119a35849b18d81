"""The weights resolver: for each kind of path a user can give, what `open_weights` reads (kind, source, spec,
heads, config), and the errors for paths it cannot answer."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from dinotrain.config import ConfigError, load_config
from dinotrain.distributed.checkpoint import Checkpointer
from dinotrain.models import build_preset
from dinotrain.train.rundir import RunDir
from dinotrain.train.ssl import SSLMetaArch
from dinotrain.train.teacher import read_teacher
from dinotrain.weights.convert import save_backbone, write_weights
from dinotrain.weights.full import FullExport, config_of_full, write_full
from dinotrain.weights.hf import WEIGHTS_NAME
from dinotrain.weights.resolve import open_weights, resolve
from trainruns import FAST


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save(run_dir, iteration, overrides=(), seed=0):
    """A training checkpoint of a tiny meta-arch (teacher = student + 0.5); returns (model, config dict)."""
    cfg = load_config("smoke/cpu_tiny", [*FAST, "student.depth=2", *overrides])
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        Checkpointer(run_dir).save_parts(iteration, {"": (model, None)}, {"config": OmegaConf.to_container(cfg)})
    return model, OmegaConf.to_container(cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An unfinished training run: checkpoints 3 and 6 (6 is the teacher with a separate iBOT head), a partial one."""
    root = tmp_path_factory.mktemp("resolve") / "run"
    _save(root, 3, seed=1)
    model, cfg = _save(root, 6, ["ibot.separate_head=true", "student.interpolate_offset=0.0"])
    (RunDir(root).checkpoints / ".tmp-00000009").mkdir()  # an interrupted save: never read
    return root, model, cfg


@pytest.fixture(scope="module")
def distill_ckpt(tmp_path_factory):
    """A distillation checkpoint: one training-layout part per student, the teacher's source in its extra state."""
    root = tmp_path_factory.mktemp("distill")
    ckpt = RunDir(root / "run").checkpoint(5)
    models, configs = {}, {}
    for seed, name in enumerate(("s1", "s2")):
        scratch = root / f"scratch_{name}"
        models[name], configs[name] = _save(scratch, 1, [f"train.seed={seed}"], seed=seed)
        (ckpt / RunDir.student_part(name)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(RunDir(scratch).checkpoint(1)), str(ckpt / RunDir.student_part(name)))
    (ckpt / "extra.json").write_text(json.dumps({
        "iteration": 5, "config": {}, "teacher": {"source": "runs/big/full.safetensors"},
        "students": {name: {"config": configs[name]} for name in models}}))
    return ckpt, models, configs


# ---- checkpoints and run directories -------------------------------------------------------------
def test_checkpoint_directory(run):
    root, model, cfg = run
    ckpt = RunDir(root).checkpoint(6)
    w = open_weights(ckpt, heads=True)
    assert (w.kind, w.source, w.label, w.iteration) == ("checkpoint", str(ckpt), "teacher", 6)
    assert _same(w.backbone, _state(model.teacher.backbone))
    assert set(w.heads) == {"dino_head", "ibot_head"} and _same(w.heads["ibot_head"], _state(model.teacher.ibot_head))
    assert w.config == cfg
    assert w.spec.depth == 2 and w.spec.interpolate_offset == 0.0  # the run's setting, not the inferred 0.1
    student = open_weights(ckpt, "student")
    assert student.heads is None and _same(student.backbone, _state(model.student.backbone))


def test_unfinished_run_is_pinned_to_its_newest_complete_checkpoint(run):
    root, model, _ = run
    assert resolve(root) == (RunDir(root).checkpoint(6), "checkpoint")
    w = open_weights(root)
    assert w.kind == "checkpoint" and w.source == str(RunDir(root).checkpoint(6)) and w.heads is None
    assert _same(w.backbone, _state(model.teacher.backbone))


def test_finished_run_gives_its_export_unless_heads_or_the_checkpoint_are_asked_for(run, tmp_path):
    root, model, _ = run
    finished = tmp_path / "finished"
    shutil.copytree(root, finished)
    exported = RunDir(finished).teacher_backbone
    torch.save(_state(model.teacher.backbone), exported)
    w = open_weights(finished)
    assert (w.kind, w.source, w.heads) == ("hub", str(exported), None)
    assert w.spec.interpolate_offset == 0.1  # a hub file keeps no interpolation setting: the inferred one
    assert open_weights(finished, heads=True).kind == "checkpoint"
    assert open_weights(finished, checkpoint=True).source == str(RunDir(finished).checkpoint(6))
    assert open_weights(finished, "student").label == "student"

    shutil.rmtree(RunDir(finished).checkpoints)  # heads asked for, checkpoints gone: the backbone alone
    w = open_weights(finished, heads=True)
    assert (w.kind, w.heads) == ("hub", None) and _same(w.backbone, _state(model.teacher.backbone))
    with pytest.raises(FileNotFoundError, match="nor a run directory with a complete checkpoint"):
        open_weights(finished, checkpoint=True)


def test_run_directory_without_weights_yet(tmp_path):
    RunDir(tmp_path).config.write_text("{}")
    with pytest.raises(FileNotFoundError, match="run directory without a complete checkpoint"):
        open_weights(tmp_path)


def test_distillation_checkpoint_picks_a_student(distill_ckpt):
    ckpt, models, configs = distill_ckpt
    w = open_weights(ckpt, "s2", heads=True)
    assert (w.kind, w.source, w.label, w.iteration) == ("checkpoint", str(ckpt), "student 's2' (EMA)", 5)
    assert _same(w.backbone, _state(models["s2"].teacher.backbone))  # the student's EMA
    assert set(w.heads) == {"dino_head"} and w.config == configs["s2"]
    with pytest.raises(ValueError, match="s1, s2.*--which"):
        open_weights(ckpt)
    with pytest.raises(ValueError, match="no student 'nope'"):
        open_weights(ckpt, "nope")
    with pytest.raises(ValueError, match="frozen teacher.*runs/big/full.safetensors"):
        open_weights(ckpt, "teacher")
    with pytest.raises(ConfigError, match="^distillation.teacher: .*frozen teacher"):
        read_teacher(str(ckpt.parent.parent))  # the run directory, pinned to this checkpoint


def test_finished_distillation_run(tmp_path, distill_ckpt):
    _, models, _ = distill_ckpt
    run = RunDir(tmp_path)
    run.students.mkdir()
    torch.save(_state(models["s1"].teacher.backbone), run.student("s1"))
    w = open_weights(run)
    assert (w.kind, w.source) == ("hub", str(run.student("s1")))
    torch.save(_state(models["s2"].teacher.backbone), run.student("s2"))
    with pytest.raises(ValueError, match="distillation run with students s1, s2"):
        open_weights(run)


# ---- files and directories of the weights formats ---------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_preset("dinov2_vits14_reg", depth=1, img_size=56)


def test_hub_file(vit, tmp_path):
    path = save_backbone(vit, tmp_path / "b.pth", "hub")
    w = open_weights(path, heads=True)
    assert (w.kind, w.source, w.heads, w.config, w.iteration) == ("hub", str(path), None, {}, None)
    assert w.spec == vit.spec and _same(w.backbone, _state(vit))
    with pytest.raises(ValueError, match="--which 'student'"):
        open_weights(path, "student")


def test_safetensors_file_keeps_its_recorded_spec(vit, tmp_path):
    spec = dataclasses.replace(vit.spec, interpolate_offset=0.25)  # only the metadata can carry this
    path = write_weights(vit.state_dict(), spec, tmp_path / "b.safetensors", "safetensors")
    w = open_weights(path)
    assert (w.kind, w.source, w.heads) == ("safetensors", str(path), None)
    assert w.spec == spec and _same(w.backbone, _state(vit))


def test_hf_directory_and_its_weights_file(vit, tmp_path):
    path = save_backbone(vit, tmp_path / "hf", "hf")
    w = open_weights(path)
    assert (w.kind, w.source, w.heads) == ("hf", str(path), None) and _same(w.backbone, _state(vit))
    inner = open_weights(path / WEIGHTS_NAME)
    assert (inner.kind, inner.source) == ("hf", str(path / WEIGHTS_NAME)) and _same(inner.backbone, w.backbone)


def test_full_export(run, tmp_path):
    _, model, cfg = run
    heads = {h: _state(model.teacher[h]) for h in ("dino_head", "ibot_head")}
    backbone = _state(model.teacher.backbone)
    spec = open_weights(RunDir(run[0]).checkpoint(6)).spec
    path = write_full(tmp_path / "full.safetensors", FullExport(backbone, spec, heads, cfg))
    w = open_weights(path, heads=True)
    assert (w.kind, w.source, w.config) == ("full", str(path), cfg) and w.spec == spec
    assert set(w.heads) == {"dino_head", "ibot_head"} and _same(w.heads["dino_head"], heads["dino_head"])
    plain = open_weights(path)
    assert (plain.kind, plain.heads) == ("full", None) and _same(plain.backbone, backbone)
    assert config_of_full(path) == cfg  # from the header alone (the head warm-up's reuse check)


def test_paths_that_hold_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        open_weights(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run or checkpoint directory nor a transformers"):
        open_weights(tmp_path / "empty")
