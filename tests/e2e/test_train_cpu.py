"""End to end: `dinotrain train` on the built-in dataset, on CPU, as a user runs it."""


import pytest
import torch

from dinotrain.distributed.checkpoint import complete_checkpoints
from dinotrain.distributed.checkpoint_files import read_tensors
from dinotrain.weights.convert import load_backbone

from trainruns import metrics, run_cli, train

KEYS = {"iteration", "total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss",
        "lr", "wd", "mom", "teacher_temp", "images_per_s"}


@pytest.mark.slow
def test_train_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = train(run, ["train.max_iterations=4"])
    assert "it 4/4" in proc.stdout and "img/s" in proc.stdout and "eta" in proc.stdout
    records = metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert KEYS <= set(records[-1])
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    ckpts = complete_checkpoints(run)
    assert [int(c.name) for c in ckpts] == [3, 4]
    teacher = read_tensors(ckpts[-1], "model.teacher.backbone.")
    exported = torch.load(run / "teacher_backbone.pth", weights_only=True)
    assert teacher.keys() == exported.keys()
    assert all(torch.equal(teacher[k], exported[k]) for k in teacher)
    model = load_backbone(run / "teacher_backbone.pth").eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 192)

    # the sharded checkpoint -> a Hugging Face directory that transformers loads, same features
    proc = run_cli(["export", str(run), str(tmp_path / "hf"), "--to", "hf"])
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).last_hidden_state[:, 0], model(x), atol=1e-4)


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = run_cli(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(tmp_path / "r"),
                    f"train.dataset_path={tmp_path / 'nope'}"])
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(tmp_path / "r"),
                    f"train.dataset_path={tmp_path / 'empty'}"])
    assert proc.returncode == 2 and "no images" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_unknown_key_is_a_clear_error(tmp_path):
    proc = run_cli(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(tmp_path / "r"), "optim.lrr=1"])
    assert proc.returncode == 2 and "optim.lrr" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["crops.local_crops_number=0"],                      # global crops only
    ["train.batch_size_per_gpu=1"],                      # KoLeo on one image, one masked crop
    ["crops.global_crops_size=64", "crops.local_crops_size=48"],  # crops larger than the 32-px images
    ["train.centering=centering", "ibot.separate_head=true"],
], ids=["no-local-crops", "batch-1", "crops-larger-than-images", "softmax-centering-separate-ibot-head"])
def test_edge_configs_train(tmp_path, overrides):
    run = tmp_path / "run"
    train(run, ["train.max_iterations=2", "checkpoint.period_iterations=100", *overrides])
    records = metrics(run)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
