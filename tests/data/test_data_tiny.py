"""Built-in tiny dataset: real digits, stratified split, deterministic, idempotent, safe."""

import json

import numpy as np
import pytest
from PIL import Image

from dinotrain.data import ImageFolderDataset, ensure_tiny_dataset, make_tiny_dataset
from dinotrain.data.tiny import MARKER_NAME, _is_complete, default_tiny_root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), image_size=32, seed=0)


def _png_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.png"))}


def test_layout_classes_counts_and_stratified_split(tiny_root):
    train, val = ImageFolderDataset(tiny_root / "train"), ImageFolderDataset(tiny_root / "val")
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797
    assert abs(len(val) / 1797 - 0.2) < 0.01
    train_counts = np.bincount(train.targets, minlength=10)
    val_counts = np.bincount(val.targets, minlength=10)
    assert np.all(np.abs(val_counts / (train_counts + val_counts) - 0.2) < 0.01)
    train_names = {train.path(i).name for i in range(len(train))}
    assert not train_names & {val.path(i).name for i in range(len(val))}


def test_images_are_rgb_of_requested_size_and_varied(tiny_root):
    paths = sorted((tiny_root / "train").glob("*/*.png"))[:50]
    arrays = []
    for path in paths:
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (32, 32)
            arrays.append(np.asarray(img, dtype=np.float64))
    backgrounds = np.stack([a[0, 0] for a in arrays])
    assert backgrounds.std(axis=0).min() > 20  # colours vary between images
    assert all(a.std() > 10 for a in arrays)  # each image shows a digit, not a flat colour


def test_second_call_is_a_no_op(tiny_root):
    marker = tiny_root / MARKER_NAME
    some_png = next((tiny_root / "train").glob("*/*.png"))
    before = (marker.stat().st_mtime_ns, some_png.stat().st_mtime_ns)
    assert make_tiny_dataset(tiny_root, image_size=32, seed=0) == tiny_root
    assert (marker.stat().st_mtime_ns, some_png.stat().st_mtime_ns) == before


def test_deterministic_regenerated_when_incomplete_rewritten_on_new_params(tiny_root, monkeypatch, tmp_path):
    # One chain, to keep the number of (file-system bound) generations small.
    monkeypatch.setenv("DINOTRAIN_DATA", str(tmp_path))
    root = ensure_tiny_dataset(image_size=32, seed=0)
    assert root == tmp_path / "tiny" and (root / MARKER_NAME).is_file()
    reference = _png_bytes(tiny_root)
    assert _png_bytes(root) == reference  # same parameters, same bytes

    params = json.loads((root / MARKER_NAME).read_text())["params"]
    victim = next((root / "val").glob("*/*.png"))
    victim.unlink()  # a missing file: the marker's counts no longer match
    assert not _is_complete(root, params)
    (root / ".build-leftover").mkdir()  # as left by a killed generation
    marker = json.loads((root / MARKER_NAME).read_text())
    marker["complete"] = False  # as written before anything is deleted or moved
    (root / MARKER_NAME).write_text(json.dumps(marker))
    make_tiny_dataset(root, image_size=32, seed=0)
    assert _is_complete(root, params) and not list(root.glob(".build-*"))
    assert _png_bytes(root) == reference

    make_tiny_dataset(root, image_size=16, seed=1)  # other parameters: rewritten
    after = _png_bytes(root)
    assert len(after) == 1797 and after != reference
    assert json.loads((root / MARKER_NAME).read_text())["params"]["seed"] == 1
    with Image.open(next((root / "val").glob("*/*.png"))) as img:
        assert img.size == (16, 16)


def test_generation_killed_after_moving_train_is_cleaned_up_next_time(monkeypatch, tmp_path):
    import os

    import sklearn.datasets
    from sklearn.utils import Bunch

    digits = sklearn.datasets.load_digits()
    small = Bunch(images=digits.images[:60], target=digits.target[:60])
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: small)  # keep this test fast
    real_replace, calls = os.replace, []

    def dies_on_moving_val(src, dst):
        calls.append(dst)
        if str(dst).endswith("val"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_moving_val)
    with pytest.raises(KeyboardInterrupt):
        make_tiny_dataset(tmp_path, image_size=8)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "train").is_dir() and not (tmp_path / "val").exists()
    assert not _is_complete(tmp_path, json.loads((tmp_path / MARKER_NAME).read_text())["params"])
    make_tiny_dataset(tmp_path, image_size=8)  # not refused as foreign data, and completed
    assert len(list(tmp_path.glob("*/*/*.png"))) == 60 and (tmp_path / "val").is_dir()


def test_refuses_to_overwrite_foreign_folders(tmp_path, write_image):
    write_image(tmp_path / "train" / "mine" / "keep.png")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_tiny_dataset(tmp_path)
    assert (tmp_path / "train" / "mine" / "keep.png").exists()


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 4}, {"image_size": 32.0}, {"val_fraction": 0}, {"val_fraction": 1.0}, {"seed": -1}]
)
def test_bad_parameters_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_tiny_dataset(tmp_path, **kwargs)


def test_default_location_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DINOTRAIN_DATA", str(tmp_path))
    assert default_tiny_root() == tmp_path / "tiny"
    monkeypatch.delenv("DINOTRAIN_DATA")
    assert default_tiny_root().parts[-3:] == (".cache", "dinotrain", "tiny")


def test_shapes_dataset_layout_determinism_and_kind_kept_apart(tmp_path, monkeypatch):
    from dinotrain.data.shapes import CLASSES

    monkeypatch.setenv("DINOTRAIN_DATA", str(tmp_path / "cache"))
    assert default_tiny_root("shapes") == tmp_path / "cache" / "tiny-shapes"
    assert default_tiny_root() == tmp_path / "cache" / "tiny"
    root = make_tiny_dataset(tmp_path / "a", kind="shapes")
    train, val = ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")
    assert train.classes == val.classes == sorted(CLASSES)
    assert len(train) + len(val) == 1800 and np.all(np.bincount(val.targets) == 36)
    again = make_tiny_dataset(tmp_path / "b", kind="shapes")
    assert _png_bytes(root) == _png_bytes(again)  # same parameters, byte-identical files
    with pytest.raises(ValueError, match="kind"):
        make_tiny_dataset(tmp_path / "c", kind="letters")
    # the digits and the shapes are different datasets: asking for the other kind rewrites the folder
    digits = make_tiny_dataset(tmp_path / "a")
    assert ImageFolderDataset(digits / "train").classes == [str(d) for d in range(10)]


def test_each_shape_class_is_drawn_as_itself():
    """Each class covers the area its geometry predicts (same random scale per seed for every class)."""
    from dinotrain.data.shapes import CLASSES, shape_mask

    coverage = {}
    for label, name in enumerate(CLASSES):
        masks = [shape_mask(label, 64, np.random.default_rng(seed)) for seed in range(8)]
        assert all(m.shape == (64, 64) and 0 <= m.min() and m.max() <= 1 for m in masks)
        coverage[name] = np.mean([m.mean() for m in masks])
    # filled vs outlined (stroke = a quarter of the radius): circle 3.14 r^2 vs ring 1.37 r^2, square 2 r^2 vs 1.41 r^2
    assert coverage["circle"] > 2 * coverage["ring"] and coverage["square"] > 1.3 * coverage["square_outline"]
    # regular polygons in the same circle: circle 3.14 > hexagon 2.6 > square 2 > triangle 1.3 (x r^2)
    assert coverage["circle"] > coverage["hexagon"] > coverage["square"] > coverage["triangle"]


def test_dataset_path_tiny_shapes_and_cli_kinds(tmp_path, monkeypatch):
    from dinotrain import cli
    from dinotrain.config import load_config
    from dinotrain.data.loader import resolve_dataset_root

    monkeypatch.setenv("DINOTRAIN_DATA", str(tmp_path))
    cfg = load_config("smoke/cpu_tiny", ["train.dataset_path=tiny-shapes"])
    assert resolve_dataset_root(cfg) == tmp_path / "tiny-shapes" / "train"
    assert (tmp_path / "tiny-shapes" / "train" / "star").is_dir()
    parse = cli.build_parser().parse_args
    assert parse(["eval", "knn", "--model", "x", "--tiny"]).tiny == "digits"
    assert parse(["eval", "knn", "--model", "x", "--tiny", "shapes"]).tiny == "shapes"
    assert parse(["eval", "linear", "--model", "x", "--tiny", "shapes"]).tiny == "shapes"
    assert parse(["tiny-dataset", "--kind", "shapes"]).kind == "shapes"
