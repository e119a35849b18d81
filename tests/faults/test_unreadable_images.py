"""Unreadable images never change a rank's batch size: they are replaced from the sample stream."""

import shutil

import pytest
import torch

from dinotrain.data.datasets import ImageFolderDataset
from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.data.loader import SeededSamples, UnreadableDatasetError
from trainruns import metrics, run_cli, train_args


def _folder_with_bad_images(root, n_good=14, n_bad=2):
    src = sorted((ensure_tiny_dataset() / "train" / "3").glob("*.png"))[:n_good]
    cls = root / "images" / "3"
    cls.mkdir(parents=True)
    for p in src:
        shutil.copy(p, cls / p.name)
    for i in range(n_bad):
        (cls / f"broken_{i}.png").write_bytes(b"not a png at all")
    return root / "images"


def test_replacement_is_deterministic_and_counted(tmp_path):
    data = ImageFolderDataset(_folder_with_bad_images(tmp_path), transform=lambda img: torch.tensor(img.size))
    bad = [i for i in range(len(data)) if "broken" in str(data.path(i))]
    samples = SeededSamples(data, seed=0)
    position, sample, replaced = samples[(5, bad[0])]
    assert position == 5 and sample is not None and replaced >= 1
    assert samples[(5, bad[0])][2] == replaced  # same position, same replacement (exact resume)
    good = next(i for i in range(len(data)) if i not in bad)
    assert samples[(6, good)][2] == 0


def test_all_unreadable_dataset_is_a_clear_error(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"junk")
    data = ImageFolderDataset(folder)
    with pytest.raises(UnreadableDatasetError, match="could not be decoded"):
        SeededSamples(data, seed=0, max_attempts=8)[(0, 0)]
    proc = run_cli(train_args(tmp_path / "run", [f"train.dataset_path={folder}", "train.max_iterations=2"]), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not be decoded" in proc.stderr and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_with_global_koleo_survive_unreadable_images(tmp_path):
    folder = _folder_with_bad_images(tmp_path)
    run = tmp_path / "run"
    proc = run_cli(train_args(run, [f"train.dataset_path={folder}", "train.batch_size_per_gpu=4", "dino.koleo_global=true",
                                    "train.max_iterations=4", "checkpoint.period_iterations=100"]), nproc=2, timeout=200)
    assert not proc.timed_out and proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    # 4 iterations x 8 images = 32 draws from 16 files: both broken ones are drawn (summed over both ranks)
    assert records[-1]["skipped_images"] >= 2
    assert "unreadable images replaced" in proc.stdout
