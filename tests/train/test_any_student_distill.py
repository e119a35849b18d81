"""A timm CNN student next to a ViT student in one `dinotrain distill` run (in-process, 1 process fp32, seconds):
the teacher runs once per step, the CNN's weights equal its single-student run's, a run stopped after a checkpoint
(as by kill -9: the later files removed) resumes bitwise, and the exported CNN loads in timm with our features."""

import shutil
from pathlib import Path

import pytest
import torch

from trainruns import CNN_FAST, in_process, succeeded

timm = pytest.importorskip("timm")

FAST = [*CNN_FAST, "train.batch_size_per_gpu=8"]
BOTH = "distillation.students={vit: {student: {arch: vit_tiny}}, cnn: {student: {arch: timm/resnet18}}}"
CNN = "distillation.students={cnn: {student: {arch: timm/resnet18}}}"
VIT = "distillation.students={vit: {student: {arch: vit_tiny}}}"


def _distill(out, teacher, students):
    return succeeded(in_process(["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(out), *FAST,
                                 f"distillation.teacher={teacher}", students]))


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


def test_a_run_stopped_after_a_checkpoint_resumes_bitwise(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "cut"
    shutil.copytree(root / "both", run)
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in ckpts][-2:] == ["00000002", "00000004"], ckpts
    shutil.rmtree(ckpts[-1])  # what a kill -9 between iterations 2 and 4 leaves behind
    shutil.rmtree(run / "students")
    proc = _distill(run, root / "teacher", BOTH)
    assert "(from 2)" in proc.stdout + proc.stderr
    for name in ("cnn", "vit"):
        a, b = _student(root / "both", name), _student(run, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


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
