"""`dinotrain embed`: folders searched recursively, unreadable files skipped and reported, the same numbers as a
plain forward of each image, `.npy` + path list, and a killed run that finishes identically when rerun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dinotrain.cli import main
from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import load_rgb
from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.models.vision_transformer import ViTSpec, vit_from_spec
from trainruns import REPO, env, kill_tree


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = vit_from_spec(ViTSpec(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3))
    path = tmp_path_factory.mktemp("w") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def folder(tmp_path):
    """A nested folder of 12 tiny images, one truncated file, one text file, one hidden image."""
    val = ensure_tiny_dataset() / "val"
    root = tmp_path / "imgs"
    for sub, digit in (("a", "1"), ("b/c", "2")):
        (root / sub).mkdir(parents=True)
        for src in sorted((val / digit).glob("*.png"))[:6]:
            shutil.copy(src, root / sub / src.name)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    shutil.copy(src, root / ".hidden.png")
    return root


def _reference(weights, paths, normalize=False):
    from dinotrain.weights.convert import load_backbone

    model = load_backbone(weights)
    transform = make_eval_transform(resize_size=37, crop_size=32)
    with torch.inference_mode():
        out = torch.cat([model(transform(load_rgb(p)).unsqueeze(0)) for p in paths])
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_folder_to_npy_matches_a_plain_forward(weights, folder, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", str(folder), "--weights", str(weights), "--image-size", "32", "--output", str(out),
                 "--batch-size", "5", "--workers", "1", "--patch-mean", "--patch-tokens", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "12 embeddings of dimension 48" in captured.out and "1 unreadable skipped" in captured.out
    assert "broken.png" in captured.err, "an unreadable file is reported as it is skipped"
    paths = (out / "paths.txt").read_text().splitlines()
    assert len(paths) == 12 and paths == sorted(paths) and not any("hidden" in p or "broken" in p for p in paths)
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (12, 48) and emb.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(emb), _reference(weights, paths), rtol=1e-5, atol=1e-5)
    assert np.load(out / "patch_mean.npy").shape == (12, 48)
    assert np.load(out / "patch_tokens.npy").shape == (12, 16, 48)
    assert "broken.png\t" in (out / "skipped.txt").read_text()
    info = json.loads((out / "info.json").read_text())
    assert info["count"] == 12 and info["skipped"] == 1 and not (out / ".partial").exists()


def test_normalize_json_output_and_refusals(weights, folder, tmp_path, capsys):
    images = sorted(str(p) for p in (folder / "a").glob("0*.png"))[:3]
    out = tmp_path / "e.json"
    assert main(["embed", *images, "--weights", str(weights), "--image-size", "32", "--output", str(out),
                 "--normalize"]) == 0
    rows = json.loads(out.read_text())
    feats = torch.tensor([r["image_features"] for r in rows])
    torch.testing.assert_close(feats, _reference(weights, images, normalize=True), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["embed", *images, "--weights", str(weights), "--output", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["embed", str(folder), "--weights", str(weights)]) == 2
    assert "give --output DIR" in capsys.readouterr().err
    assert main(["embed", str(folder / "nope.png"), "--weights", str(weights)]) == 2
    assert "not found" in capsys.readouterr().err


def test_finished_or_other_settings_are_not_overwritten(weights, folder, tmp_path, capsys):
    out = tmp_path / "emb"
    base = ["embed", str(folder), "--weights", str(weights), "--image-size", "32", "--output", str(out), "--no-progress"]
    assert main(base) == 0
    assert main(base) == 2 and "already holds finished embeddings" in capsys.readouterr().err
    assert main([*base, "--force"]) == 0
    (out / ".partial").mkdir()  # an unfinished run with other settings
    (out / ".partial" / "plan.json").write_text(json.dumps({"weights": "other"}))
    (out / "info.json").unlink()
    assert main(base) == 2 and "unfinished run with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_finishes_identically(weights, tmp_path):
    val = ensure_tiny_dataset() / "val"
    cmd = [sys.executable, "-m", "dinotrain", "embed", str(val), "--weights", str(weights), "--image-size", "32",
           "--chunk-size", "40", "--batch-size", "16", "--workers", "1", "--no-progress", "--output"]
    subprocess.run([*cmd, str(tmp_path / "whole")], env=env(), cwd=REPO, check=True, capture_output=True, timeout=300)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([*cmd, str(resumed)], env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (resumed / ".partial" / "chunk-000002.npz").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    assert not (resumed / "embeddings.npy").exists()
    done = subprocess.run([*cmd, str(resumed)], env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stderr
    assert (resumed / "paths.txt").read_text() == (tmp_path / "whole" / "paths.txt").read_text()
    assert np.array_equal(np.load(resumed / "embeddings.npy"), np.load(tmp_path / "whole" / "embeddings.npy"))
    assert len((resumed / "paths.txt").read_text().splitlines()) == 359
