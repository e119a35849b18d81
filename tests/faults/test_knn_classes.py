"""k-NN labels images by class *name*: a val folder with fewer classes than train must not score 0 %.

Images are solid colours, one colour per class, and the stub backbone returns each image's mean
colour, so the features separate the classes perfectly: any error is a labelling error.
"""

import argparse

import pytest
import torch
from PIL import Image

import dinotrain.cli as cli
from dinotrain.cli import eval as cli_eval
from dinotrain.weights import backbone
from dinotrain.eval.features import UnknownClassError, extract_features, shared_label_space
from dinotrain.eval.knn import knn_accuracy

COLOURS = {"a": (230, 20, 20), "b": (20, 230, 20), "c": (20, 20, 230), "d": (230, 230, 20)}


class MeanColour(torch.nn.Module):
    """Feature = per-channel mean of the (normalised) image: separates solid colours by direction."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # extract_features reads the device from it
        self.spec = argparse.Namespace(img_size=16)

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _folder(root, classes, per_class=3):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(max(0, v - 10 * i) for v in COLOURS[name])
            Image.new("RGB", (16, 16), shade).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def folders(tmp_path):
    return _folder(tmp_path / "train", "abc"), _folder(tmp_path / "val", "bc")


def test_val_missing_a_train_class_is_labelled_by_name(folders):
    train, val = folders
    classes = shared_label_space(train, val)
    assert classes == ["a", "b", "c"]
    model = MeanColour()
    tr_f, tr_y = extract_features(model, str(train), 16, batch_size=4, classes=classes)
    va_f, va_y = extract_features(model, str(val), 16, batch_size=4, classes=classes)
    assert sorted(set(va_y.tolist())) == [1, 2]  # b and c keep train's indices
    assert knn_accuracy(tr_f, tr_y, va_f, va_y, ks=(1, 3)) == {1: 100.0, 3: 100.0}


def test_cli_eval_knn_scores_100_percent(folders, monkeypatch, tmp_path):
    train, val = folders
    monkeypatch.setattr(backbone, "open_backbone", lambda weights, model, seed=0: MeanColour())
    out = tmp_path / "knn.json"
    args = argparse.Namespace(train=str(train), val=str(val), tiny=False, threads=None, weights=None, model="x",
                              image_size=16, baseline_random=False, baseline_pixels=False, seed=0, batch_size=4, k=[1, 3],
                              temperature=0.07, output=str(out))
    assert cli_eval.knn(args) == 0
    assert out.read_text().count("100.0") == 2


def test_val_class_unknown_to_train_is_an_error_naming_it_and_both_folders(folders, tmp_path):
    train, _ = folders
    val = _folder(tmp_path / "val2", "bd")
    with pytest.raises(UnknownClassError, match=r"'d'.*val2.*train") as info:
        shared_label_space(train, val)
    assert isinstance(info.value, ValueError) and "'b'" not in str(info.value)
    with pytest.raises(UnknownClassError, match="'d'"):
        extract_features(MeanColour(), str(val), 16, classes=["a", "b", "c"])


def test_eval_linear_refuses_a_val_class_unknown_to_train_in_one_line(folders, tmp_path, capsys, monkeypatch):
    train, _ = folders
    val = _folder(tmp_path / "val2", "bd")
    called = []
    monkeypatch.setattr(backbone, "open_backbone", lambda *a, **k: called.append(1))
    assert cli.main(["eval", "linear", "--model", "x", "--train", str(train), "--val", str(val)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dinotrain eval:")]
    assert len(err) == 1 and err[0].startswith("dinotrain eval: error:") and "'d'" in err[0], err
    assert not called, "checked before the backbone is built"
