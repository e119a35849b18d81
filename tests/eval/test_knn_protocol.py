"""`eval knn` and `embed` follow the DINO evaluation protocol (resize 256 bicubic, centre crop 224, ImageNet
normalisation; the same ratio for other crops), on the GPU when there is one, and refuse bad sizes."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from dinotrain import cli
from dinotrain.cli import eval as cli_eval
from dinotrain.weights import backbone
from dinotrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, make_eval_transform
from dinotrain.eval import features
from dinotrain.eval.features import eval_sizes, extract_features, pick_eval_device, protocol_resize


def _photo(w=500, h=375, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(img: Image.Image, resize: int, crop: int, resample=Image.BICUBIC) -> torch.Tensor:
    """Shorter side to `resize` (PIL), centre crop `crop`, ImageNet normalisation: written out by hand."""
    w, h = img.size
    new = (int(resize * w / h), resize) if w >= h else (resize, int(resize * h / w))
    img = img.resize(new, resample)
    left, top = int(round((new[0] - crop) / 2)), int(round((new[1] - crop) / 2))
    arr = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    t = torch.from_numpy(arr).permute(2, 0, 1)
    return (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_protocol_sizes():
    assert eval_sizes() == (256, 224)
    assert eval_sizes(None, tiny=True) == (37, 32)  # round(32 * 256 / 224) = round(36.57)
    assert eval_sizes(224, tiny=True) == (256, 224)
    assert eval_sizes(16) == (18, 16) and eval_sizes(448) == (512, 448)
    assert protocol_resize(1) == 1
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="--image-size"):
            eval_sizes(bad)


def test_eval_transform_resizes_256_bicubic_then_crops_224():
    img = _photo()
    out = make_eval_transform(*eval_sizes())(img)
    assert out.shape == (3, 224, 224)
    ref = _reference(img, 256, 224)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, _reference(img, 256, 224, Image.BILINEAR), atol=1e-2)  # bicubic, not bilinear
    assert not torch.allclose(out, _reference(img, 224, 224), atol=1e-2)  # resize 256 first, not 224
    tiny = make_eval_transform(*eval_sizes(None, tiny=True))(_photo(32, 32))
    assert tiny.shape == (3, 32, 32)
    assert torch.allclose(tiny, _reference(_photo(32, 32), 37, 32), atol=1e-5)


class _Recorder(torch.nn.Module):
    """Returns the flattened image as its features, so the transform applied can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)


def test_extract_features_uses_the_protocol_transform(tmp_path):
    (tmp_path / "a").mkdir()
    img = _photo(300, 200, seed=1)
    img.save(tmp_path / "a" / "0.png")
    feats, labels = extract_features(_Recorder(), tmp_path, 56, batch_size=1)
    assert labels.tolist() == [0]
    assert torch.allclose(feats[0], _reference(img, 64, 56).flatten(), atol=1e-5)  # 56 * 256 / 224 = 64


def test_pick_eval_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_eval_device() == torch.device("cuda") == pick_eval_device("auto") == pick_eval_device("cuda")
    assert pick_eval_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_eval_device() == torch.device("cpu") == pick_eval_device(None)
    with pytest.raises(ValueError, match="no CUDA"):
        pick_eval_device("cuda")


class _FakeNet:
    spec = None

    def __init__(self):
        self.devices = []

    def to(self, device):
        self.devices.append(torch.device(device))
        return self

    def eval(self):
        return self


@pytest.mark.parametrize("cuda", [True, False])
@pytest.mark.parametrize("tiny,image_size,expected", [(False, None, (256, 224)), (True, None, (37, 32)),
                                                      (False, 112, (128, 112))])
def test_cmd_eval_knn_sizes_and_device(monkeypatch, tmp_path, cuda, tiny, image_size, expected):
    net, calls = _FakeNet(), []

    def fake_extract(model, root, crop, batch_size, device=None, classes=None, resize_size=None):
        assert device == model.devices[-1]  # features computed where the model is
        calls.append((model.devices[-1], resize_size, crop))
        return torch.eye(2), torch.arange(2)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(features, "extract_features", fake_extract)
    monkeypatch.setattr(features, "shared_label_space", lambda train, val: ["a", "b"])
    monkeypatch.setattr(backbone, "open_backbone", lambda weights, model, seed=0: net)
    if tiny:
        import dinotrain.data.tiny as tiny_mod

        monkeypatch.setattr(tiny_mod, "ensure_tiny_dataset", lambda kind="digits": tmp_path)
    args = cli.build_parser().parse_args(
        ["eval", "knn", "--model", "x", "--k", "1", *(["--tiny"] if tiny else ["--train", "t", "--val", "v"]),
         *(["--image-size", str(image_size)] if image_size else [])])
    assert cli_eval.knn(args) == 0
    device = torch.device("cuda" if cuda else "cpu")
    assert calls == [(device, *expected)] * 2


def test_cmd_embed_protocol_and_device(monkeypatch, tmp_path, capsys):
    img = _photo(300, 200, seed=2)
    img.save(tmp_path / "x.png")
    rec = _Recorder()
    monkeypatch.setattr(backbone, "open_backbone", lambda weights, model, seed=0: rec)
    out = tmp_path / "emb.json"
    assert cli.main(["embed", str(tmp_path / "x.png"), "--model", "x", "--image-size", "56", "--output", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())
    assert torch.allclose(torch.tensor(row["image_features"]), _reference(img, 64, 56).flatten(), atol=1e-5)
    assert cli.main(["embed", str(tmp_path / "x.png"), "--model", "x"]) == 0
    assert "150528-dim" in capsys.readouterr().out  # 3 * 224 * 224: the default crop


@pytest.mark.parametrize("command", [["eval", "knn", "--tiny", "--model", "dino_vits16"],
                                     ["embed", "x.png", "--model", "dino_vits16"]])
@pytest.mark.parametrize("size", ["0", "-5"])
def test_non_positive_image_size_is_one_line_exit_2(command, size, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(backbone, "open_backbone", lambda *a, **k: called.append(1))
    assert cli.main([*command, "--image-size", size]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dinotrain {command[0]}: error:") and "--image-size" in err[0], err
    assert size in err[0] and not called  # refused before any work
