"""One line on stderr and exit code 2 for every user error the README promises it for."""

import shutil

import pytest

from dinotrain.data.tiny import ensure_tiny_dataset
from trainruns import run_cli, train_args


def _one_line(proc, command):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"dinotrain {command}: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _one_line(run_cli(train_args(tmp_path / "afile" / "run")), "train")
    assert "afile" in line and "--output-dir" in line


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    line = _one_line(run_cli(train_args(tmp_path / "run")), "train")
    assert "not a directory" in line


def test_output_dir_that_is_not_writable(tmp_path):
    # /proc/self exists and refuses new files even for root (CI runs as root, so chmod would not do)
    line = _one_line(run_cli(train_args("/proc/self")), "train")
    assert "not writable" in line and "/proc/self" in line


def test_log_txt_that_is_a_directory(tmp_path):
    (tmp_path / "run" / "log.txt").mkdir(parents=True)
    line = _one_line(run_cli(train_args(tmp_path / "run")), "train")
    assert "log.txt" in line and "is a directory" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # written only after the checks pass


def test_missing_dataset_is_checked_before_the_config_is_written(tmp_path):
    line = _one_line(run_cli(train_args(tmp_path / "run", [f"train.dataset_path={tmp_path / 'nope'}"])), "train")
    assert "nope" in line and not (tmp_path / "run" / "config.yaml").exists()


def test_corrupt_image_given_to_embed_is_reported_and_skipped(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    good = next((ensure_tiny_dataset() / "val" / "1").glob("*.png"))
    proc = run_cli(["embed", str(good), str(bad), "--model", "dino_vits16", "--image-size", "32"])
    assert proc.returncode == 0, proc.stderr
    assert "skipped unreadable" in proc.stderr and "bad.jpg" in proc.stderr and "Traceback" not in proc.stderr
    assert str(good) in proc.stdout and "bad.jpg" not in proc.stdout
    only_bad = _one_line(run_cli(["embed", str(bad), "--model", "dino_vits16", "--image-size", "32"]), "embed")
    assert "none of the 1 images could be read" in only_bad


def test_knn_on_a_run_directory_without_teacher_backbone(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    line = _one_line(run_cli(["eval", "knn", "--weights", str(run), "--tiny"]), "eval")
    assert "teacher_backbone.pth" in line and "without a complete checkpoint" in line


@pytest.mark.slow
def test_truncated_checkpoint_on_export(tmp_path):
    from trainruns import train

    run = tmp_path / "run"
    train(run, ["train.max_iterations=3"])
    (ckpt,) = (run / "checkpoints").iterdir()
    for shard in ckpt.glob("*.distcp"):
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 3)
    line = _one_line(run_cli(["export", str(run), str(tmp_path / "t.pth"), "--to", "hub"]), "export")
    assert "truncated" in line and not (tmp_path / "t.pth").exists()
    shutil.rmtree(run)


def test_export_of_a_run_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-00000005").mkdir(parents=True)  # only an unfinished write
    (run / "config.yaml").write_text("{}")
    line = _one_line(run_cli(["export", str(run), str(tmp_path / "t.pth"), "--to", "hub"]), "export")
    assert "without a complete checkpoint" not in line and "complete checkpoint" in line
    assert not (tmp_path / "t.pth").exists()
