"""The commands that run a backbone take a DINOv3 one (patch 16, RoPE, storage tokens): `embed`, `eval knn`,
`eval linear` (its classifier in our format: transformers has no DINOv3 classifier class) and `serve`, from a
weights directory or file, and `--model dinov3_vits16` at random init; on the built-in tiny dataset, in seconds."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import numpy as np
import pytest
import torch

from dinotrain.cli import main
from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import load_rgb
from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.models.dinov3 import Dinov3VisionTransformer, build_dinov3
from dinotrain.weights.convert import save_backbone
from dinotrain.weights.resolve import open_weights

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    """Tiny, with LayerScale 1 instead of the official init's 1e-5: at that init the blocks add almost nothing, so
    the CLS token hardly depends on the image (k-NN at chance); this one's features do."""
    torch.manual_seed(0)
    model = build_dinov3("dinov3_vits16", embed_dim=64, num_heads=1, depth=2).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    """A transformers DINOv3ViTModel directory: `--weights` takes directories too."""
    return save_backbone(model, tmp_path_factory.mktemp("w") / "hf", "hf")


def reference(model, paths, crop=32):
    transform = make_eval_transform(resize_size=round(crop * 256 / 224), crop_size=crop)
    with torch.inference_mode():
        return model.forward_features(torch.stack([transform(load_rgb(p)) for p in paths]))


def test_embed_cls_and_patch_tokens_of_a_dinov3_directory(model, hf_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted((ensure_tiny_dataset() / "val" / "3").glob("*.png"))[:5]:
        shutil.copy(src, folder / src.name)
    out = tmp_path / "emb"
    assert main(["embed", str(folder), "--weights", str(hf_dir), "--image-size", "32", "--output", str(out),
                 "--patch-tokens", "--no-progress", "--workers", "0"]) == 0
    paths = [folder / p for p in (out / "paths.txt").read_text().split()]
    expected = reference(model, paths)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), expected["x_norm_clstoken"].numpy(), atol=1e-5)
    patches = np.load(out / "patch_tokens.npy")
    assert patches.shape == (5, 4, 64)  # 2 x 2 patches of 16 px; the 4 storage tokens are not patches
    np.testing.assert_allclose(patches, expected["x_norm_patchtokens"].numpy(), atol=1e-5)


def test_eval_knn_on_the_tiny_dataset(hf_dir, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--tiny", "--weights", str(hf_dir), "--k", "10", "20", "--baseline-random",
                 "--device", "cpu", "--output", str(out)]) == 0
    accs = json.loads(out.read_text())
    assert set(accs) == {"model", "random_init"}
    # 10 classes: random (but image-dependent) features of digits still sort them, well above chance; the official
    # init (LayerScale 1e-5) is near chance
    assert accs["model"]["20"] > 30.0 and accs["model"]["20"] > accs["random_init"]["20"] + 10, accs
    assert "k-NN top-1 (model)" in capsys.readouterr().out


def test_eval_linear_exports_backbone_and_head_in_our_format(model, hf_dir, tmp_path):
    from dinotrain.eval.features import extract_features
    from dinotrain.eval.linear_classifier import BACKBONE_FILE, read_linear_classifier

    export, out = tmp_path / "classifier", tmp_path / "linear.json"
    assert main(["eval", "linear", "--tiny", "--weights", str(hf_dir), "--iterations", "60", "--lrs", "0.01", "0.1",
                 "--n-last-blocks", "1", "2", "--device", "cpu", "--export-hf", str(export), "--output", str(out)]) == 0
    summary = json.loads(out.read_text())
    exported = summary["hf_classifier"]
    assert exported["format"] == "dinotrain" and exported["head"] == summary["best"]["head"]
    backbone = open_weights(export / BACKBONE_FILE)
    assert backbone.spec == model.spec
    assert all(torch.equal(backbone.backbone[k], v) for k, v in model.state_dict().items())
    head = read_linear_classifier(export)
    assert head.classes == summary["classes"] and (head.resize, head.crop) == (37, 32)
    # the exported head, run through its own reader, predicts what the evaluation measured
    preds, labels = extract_features(model, ensure_tiny_dataset() / "val", head.crop, resize_size=head.resize,
                                     classes=head.classes, forward=lambda net, x: head.logits(net, x).argmax(-1))
    assert 100.0 * float((preds == labels).float().mean()) == pytest.approx(exported["accuracy"], abs=1e-6)


def test_model_preset_at_random_init_and_serve(monkeypatch, tmp_path):
    """`--model dinov3_vits16` builds the preset; `serve` answers a /score request with its CLS features."""
    from dinotrain.serve.app import ServeLimits
    from dinotrain.serve.run import serve
    from dinotrain.weights.backbone import open_backbone

    assert isinstance(open_backbone(None, "dinov3_vits16"), Dinov3VisionTransformer)
    image = sorted((ensure_tiny_dataset() / "val" / "7").glob("*.png"))[0]
    small = build_dinov3("dinov3_vits16", embed_dim=64, num_heads=1, depth=1).eval()
    weights = save_backbone(small, tmp_path / "w.pth", "hub")
    apps = []
    # the app the server would run, without serving (serve() imports serve_until_stopped at the call)
    monkeypatch.setattr("dinotrain.serve.shutdown.serve_until_stopped", lambda server: apps.append(server.config.app))
    serve(str(weights), None, ServeLimits(max_wait_ms=0), image_size=32, device="cpu")
    body = json.dumps({"input_data": {"columns": ["image"], "index": [0],
                                      "data": [[base64.b64encode(image.read_bytes()).decode()]]}}).encode()
    status, answer = asyncio.run(_post(apps[0], "/score", body))
    assert status == 200
    expected = reference(small, [image])["x_norm_clstoken"][0]
    np.testing.assert_allclose(json.loads(answer)[0]["image_features"], expected.numpy(), atol=1e-5)


async def _post(app, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP request through the ASGI app, its lifespan running (the batcher), without a server or client."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
