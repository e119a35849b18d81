"""A timm CNN student next to a ViT student in one `dinotrain distill` run (in-process, 1 process fp32, seconds):
the teacher runs once per step, the CNN's weights equal its single-student run's, a run killed with SIGKILL after a
checkpoint resumes bitwise (weights, BatchNorm statistics, EMA, optimizer), and the exported CNN loads in timm with
our features."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainruns import CNN_FAST, REPO, env, in_process, metrics, succeeded, wait_for

timm = pytest.importorskip("timm")

FAST = [*CNN_FAST, "train.batch_size_per_gpu=8"]
# The distillations: schedules of 8 iterations (2 epochs of 4), stopped at 4 (max_iterations caps the run, not its
# schedules) so that the kill -9 test's run, uncapped, has iterations left after its checkpoint of iteration 2.
DISTILL = [*FAST, "optim.epochs=2"]
BOTH = "distillation.students={vit: {student: {arch: vit_tiny}}, cnn: {student: {arch: timm/resnet18}}}"
CNN = "distillation.students={cnn: {student: {arch: timm/resnet18}}}"
VIT = "distillation.students={vit: {student: {arch: vit_tiny}}}"


def _distill_args(out, teacher, students):
    return ["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(out), *DISTILL,
            f"distillation.teacher={teacher}", students]


def _distill(out, teacher, students):
    return succeeded(in_process([*_distill_args(out, teacher, students), "train.max_iterations=4"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dinotrain.train.teacher import FrozenTeacher

    root = tmp_path_factory.mktemp("anystudent")
    succeeded(in_process(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(root / "teacher"), *FAST]))
    calls = []
    original = FrozenTeacher.targets

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    FrozenTeacher.targets = counted
    try:
        _distill(root / "both", root / "teacher", BOTH)
    finally:
        FrozenTeacher.targets = original
    _distill(root / "cnn", root / "teacher", CNN)
    _distill(root / "vit", root / "teacher", VIT)
    return root, len(calls)


def _student(run, name):
    from dinotrain.train.rundir import RunDir
    from dinotrain.weights.resolve import open_weights

    return open_weights(RunDir(run).student(name)).backbone


def test_one_teacher_forward_per_step_for_both_students(runs):
    assert runs[1] == 4  # 4 iterations, 1 micro-batch each


def test_each_student_trains_as_it_would_alone(runs):
    root, _ = runs
    both, alone = _student(root / "both", "vit"), _student(root / "vit", "vit")
    assert all(torch.equal(both[k], alone[k]) for k in both)
    both, alone = _student(root / "both", "cnn"), _student(root / "cnn", "cnn")
    assert both.keys() == alone.keys()
    assert all(torch.equal(both[k], alone[k]) for k in both)
    # and it did train: the EMA followed the BatchNorm statistics (the EMA model is exported with them)
    assert not torch.equal(both["bn1.running_mean"], torch.zeros_like(both["bn1.running_mean"]))


def _checkpoint_part(run, iteration, name):
    """Every tensor of student `name` in a checkpoint: weights, BatchNorm buffers, EMA, heads, optimizer state."""
    from dinotrain.distributed.checkpoint_files import read_tensors

    return read_tensors(run / "checkpoints" / f"{iteration:08d}" / "students" / name, "")


def test_kill_9_after_a_checkpoint_and_resume_is_bitwise(runs, tmp_path):
    """A real `dinotrain distill` process (ViT + ResNet-18 students) killed with SIGKILL in the iteration after its
    checkpoint of iteration 2; the same command resumes from it and ends as the uninterrupted run: the same losses,
    exports and last checkpoint, bit for bit."""
    from dinotrain.distributed.checkpoint import complete_checkpoints

    root, _ = runs
    run = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:  # uncapped: 8 iterations, killed after the checkpoint of 2
        proc = subprocess.Popen([sys.executable, "-m", "dinotrain", *_distill_args(run, root / "teacher", BOTH)],
                                env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(run / "checkpoints" / "00000002" / "extra.json", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert [int(c.name) for c in complete_checkpoints(run)] == [2] and not (run / "students").exists()
    out = _distill(run, root / "teacher", BOTH)
    assert "(iteration 2)" in out.stdout + out.stderr and "resumed from" in out.stdout + out.stderr
    ref, got = ([{k: v for k, v in m.items() if k != "images_per_s"} for m in metrics(r)] for r in (root / "both", run))
    assert [m["iteration"] for m in got] == [1, 2, 3, 4] and got == ref  # bitwise-equal losses
    for name in ("cnn", "vit"):
        a, b = _student(root / "both", name), _student(run, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        a, b = _checkpoint_part(root / "both", 4, name), _checkpoint_part(run, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # what was compared of the CNN includes its BatchNorm statistics, the student's and the EMA's ("teacher")
    assert {"model.student.backbone.model.bn1.running_mean", "model.teacher.backbone.model.layer4.1.bn2.running_var",
            "model.teacher.backbone.model.bn1.num_batches_tracked"} <= _checkpoint_part(run, 4, "cnn").keys()


def test_the_exported_cnn_loads_in_timm_by_name_with_our_features(runs):
    """`students/cnn.safetensors` in timm's layout: timm.create_model(checkpoint_path=...) gives the features
    `dinotrain embed` (through the resolver) computes, within 1e-5."""
    from dinotrain.embed import EmbedSettings, embed_batches  # noqa: F401  (the command's own path below)
    from dinotrain.weights.backbone import open_backbone

    root, _ = runs
    path = root / "both" / "students" / "cnn.safetensors"
    assert path.is_file() and not (root / "both" / "students" / "cnn.pth").exists()
    theirs = timm.create_model("resnet18", num_classes=0, checkpoint_path=str(path)).eval()
    ours = open_backbone(str(path), None)
    mine_from_run = open_backbone(str(root / "cnn"), None)  # a finished run with one student: its export
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(mine_from_run(x), theirs(x), rtol=0, atol=1e-5)


def test_a_checkpoint_reads_and_exports_the_cnn_student(runs, tmp_path):
    """The last checkpoint's `cnn` student is the exported one (the EMA), read through the resolver with its trained
    iBOT adapter; `dinotrain export --to timm --which cnn` writes what timm loads; `--to hf` is one line."""
    from dinotrain.weights.backbone import open_backbone
    from dinotrain.weights.convert import backbone_from_weights
    from dinotrain.weights.resolve import open_weights

    root, _ = runs
    ckpt = sorted((root / "both" / "checkpoints").iterdir())[-1]
    from_ckpt = backbone_from_weights(open_weights(ckpt, "cnn"))
    exported = open_backbone(str(root / "both" / "students" / "cnn.safetensors"), None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_ckpt(x), exported(x))
    assert not torch.equal(from_ckpt.patch_norm.weight, torch.ones_like(from_ckpt.patch_norm.weight))  # trained
    out = tmp_path / "cnn.safetensors"
    succeeded(in_process(["export", str(root / "both"), str(out), "--to", "timm", "--which", "cnn"]))
    theirs = timm.create_model("resnet18", num_classes=0, checkpoint_path=str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), exported(x), rtol=0, atol=1e-5)
    proc = in_process(["export", str(root / "both"), str(tmp_path / "hf"), "--to", "hf", "--which", "cnn"])
    assert proc.returncode == 2 and "exports --to timm" in proc.stderr.strip().splitlines()[-1]


def test_dinotrain_embed_gives_timms_pooled_features(runs, tmp_path):
    """`dinotrain embed --weights RUN` (the run's only student) = timm's model on the same preprocessed images."""
    import numpy as np

    from dinotrain.data.tiny import ensure_tiny_dataset
    from dinotrain.data.augmentations import make_eval_transform
    from dinotrain.eval.features import eval_sizes
    from PIL import Image

    root, _ = runs
    images = sorted((Path(ensure_tiny_dataset()) / "val").rglob("*.png"))[:4]
    out = tmp_path / "emb"
    succeeded(in_process(["embed", "--weights", str(root / "cnn"), "--image-size", "32", "--output", str(out),
                          "--no-progress", *map(str, images)]))
    ours = torch.from_numpy(np.load(out / "embeddings.npy"))
    theirs = timm.create_model("resnet18", num_classes=0,
                               checkpoint_path=str(root / "cnn" / "students" / "cnn.safetensors")).eval()
    resize, crop = eval_sizes(32)  # what `embed --image-size 32` preprocesses with
    transform = make_eval_transform(resize_size=resize, crop_size=crop)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        torch.testing.assert_close(ours, theirs(batch), rtol=0, atol=1e-5)
