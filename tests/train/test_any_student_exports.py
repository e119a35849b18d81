"""What a timm CNN student's run hands on (in-process, 1 process fp32, seconds): `eval linear` on its pooled
features, the full export with heads (read back, distilled from as a teacher, continued as a student) and
`dinotrain serve` answering with the features `dinotrain embed` computes."""

import asyncio
import json
from pathlib import Path

import pytest
import torch

from trainruns import CNN_FAST, in_process, succeeded

timm = pytest.importorskip("timm")

FAST = [*CNN_FAST, "train.batch_size_per_gpu=8", "train.OFFICIAL_EPOCH_LENGTH=2"]  # 2 iterations
CNN = "distillation.students={cnn: {student: {arch: timm/resnet18}}}"
VIT = "distillation.students={vit: {student: {arch: vit_tiny}}}"


def _distill(out, teacher, students, *extra):
    return succeeded(in_process(["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(out), *FAST,
                                 f"distillation.teacher={teacher}", students, *extra]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ViT teacher run, a ResNet-18 student distilled from it, and the student's full export."""
    root = tmp_path_factory.mktemp("cnnexports")
    succeeded(in_process(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(root / "teacher"), *FAST]))
    _distill(root / "cnn", root / "teacher", CNN)
    succeeded(in_process(["export", str(root / "cnn"), str(root / "cnn_full.safetensors"), "--to", "full",
                          "--which", "cnn"]))
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 classes of the tiny dataset, 12 train and 8 val images each: features in a second."""
    import shutil

    from dinotrain.data.tiny import ensure_tiny_dataset

    root = tmp_path_factory.mktemp("small")
    for split, n in (("train", 12), ("val", 8)):
        for cls in ("0", "1", "2"):
            (root / split / cls).mkdir(parents=True)
            for p in sorted((Path(ensure_tiny_dataset()) / split / cls).glob("*.png"))[:n]:
                shutil.copy(p, root / split / cls / p.name)
    return root


def _images(n=4):
    from dinotrain.data.tiny import ensure_tiny_dataset

    return sorted((Path(ensure_tiny_dataset()) / "val").rglob("*.png"))[:n]


def _transform(size=32):
    """What `--image-size 32` preprocesses with (`embed`, `eval`)."""
    from dinotrain.data.augmentations import make_eval_transform
    from dinotrain.eval.features import eval_sizes

    resize, crop = eval_sizes(size)
    return make_eval_transform(resize_size=resize, crop_size=crop)


def _preprocessed(paths):
    from PIL import Image

    transform = _transform()
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def _timm_model(root):
    return timm.create_model("resnet18", num_classes=0,
                             checkpoint_path=str(root / "cnn" / "students" / "cnn.safetensors")).eval()


# --- eval linear ----------------------------------------------------------------------------------------------------

def test_eval_linear_trains_the_pooled_head_on_the_models_pooled_features(run, small, tmp_path):
    """The sweep runs over the lrs with one head, `pooled`; what it caches is timm's own pooled features; its
    classifier (`--export-hf`: our format, backbone in timm's layout) predicts what was measured."""
    from dinotrain.data.datasets import ImageFolderDataset
    from dinotrain.eval.features import eval_sizes
    from dinotrain.eval.linear import extract_linear_features
    from dinotrain.eval.linear_classifier import BACKBONE_FILE, read_linear_classifier
    from dinotrain.inference import TorchFeatures
    from dinotrain.weights.backbone import open_backbone

    out, clf_dir = tmp_path / "linear.json", tmp_path / "clf"
    succeeded(in_process(["eval", "linear", "--weights", str(run / "cnn"), "--train", str(small / "train"),
                          "--val", str(small / "val"), "--image-size", "32", "--iterations", "30",
                          "--lrs", "0.001", "0.01", "0.1", "--output", str(out), "--device", "cpu",
                          "--export-hf", str(clf_dir)]))
    summary = json.loads(out.read_text())
    assert list(summary["results"]) == ["pooled"] and len(summary["results"]["pooled"]) == 3
    assert summary["best"]["head"] == "pooled" and 0 <= summary["best"]["accuracy"] <= 100
    val = small / "val"
    resize, crop = eval_sizes(32)  # what `eval linear --image-size 32` uses
    dataset = ImageFolderDataset(val, transform=_transform())  # the order the features come in
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    model = TorchFeatures(open_backbone(str(run / "cnn"), None))
    feats = extract_linear_features(model, val, crop, resize, 1, batch_size=64, pooled=True)
    with torch.no_grad():
        theirs = _timm_model(run)(images[:8])
    assert feats.class_tokens.shape == (len(dataset), 1, 512)
    torch.testing.assert_close(feats.class_tokens[:8, 0], theirs, rtol=0, atol=1e-5)

    measured = summary["hf_classifier"]
    assert measured["format"] == "dinotrain" and measured["head"] == "pooled"
    clf = read_linear_classifier(clf_dir)
    logits = clf.logits(open_backbone(str(clf_dir / BACKBONE_FILE), None), images)
    accuracy = 100.0 * float((logits.argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(measured["accuracy"], abs=1e-6)


def test_eval_linear_refuses_block_and_avgpool_variants_of_a_cnn_in_one_line(run, small):
    for flags in (["--n-last-blocks", "4"], ["--avgpool", "yes"]):
        proc = in_process(["eval", "linear", "--weights", str(run / "cnn"), "--train", str(small / "train"), "--val",
                           str(small / "val"), "--image-size", "32", "--iterations", "1", *flags])
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "pooled features" in last and "Traceback" not in proc.stderr, proc.stderr


# --- the full export --------------------------------------------------------------------------------------------

def test_the_full_export_reads_back_with_heads_and_gives_the_checkpoints_features(run):
    from dinotrain.models.any_student import AnySpec
    from dinotrain.weights.convert import backbone_from_weights
    from dinotrain.weights.resolve import open_weights

    full = open_weights(run / "cnn_full.safetensors", heads=True)
    assert full.kind == "full" and full.spec == AnySpec("timm/resnet18", 8)
    assert "dino_head" in full.heads and full.config["student"]["arch"] == "timm/resnet18"
    assert "model.conv1.weight" in full.backbone and "patch_norm.weight" in full.backbone
    ckpt = sorted((run / "cnn" / "checkpoints").iterdir())[-1]
    ours, theirs = backbone_from_weights(full), backbone_from_weights(open_weights(ckpt, "cnn"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours.forward_features(x), theirs.forward_features(x)
    assert torch.equal(a["x_norm_clstoken"], b["x_norm_clstoken"])
    assert torch.equal(a["x_norm_patchtokens"], b["x_norm_patchtokens"])
    assert not torch.equal(ours.patch_norm.weight, torch.ones_like(ours.patch_norm.weight))  # the trained adapter


def test_the_full_export_exports_on_to_what_timm_loads(run, tmp_path):
    """`--to timm` from the full export leaves the adapter and heads out: timm loads it by name, same features."""
    from dinotrain.weights.backbone import open_backbone

    out = tmp_path / "cnn.safetensors"
    succeeded(in_process(["export", str(run / "cnn_full.safetensors"), str(out), "--to", "timm"]))
    theirs = timm.create_model("resnet18", num_classes=0, checkpoint_path=str(out)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), open_backbone(str(run / "cnn_full.safetensors"), None)(x),
                                   rtol=0, atol=1e-5)


def test_a_vit_distils_from_the_cnns_full_export(run, tmp_path):
    """The CNN (pooled features, resampled patch tokens, its DINO/iBOT heads) as a frozen teacher of a ViT-tiny."""
    from dinotrain.weights.resolve import open_weights

    out = tmp_path / "vit"
    proc = _distill(out, run / "cnn_full.safetensors", VIT)
    assert "(full; timm/resnet18, patch grid 8)" in proc.stdout + proc.stderr
    vit = open_weights(out / "students" / "vit.pth")
    assert vit.spec.patch_size == 8 and vit.spec.embed_dim == 192


def test_the_cnn_continues_from_its_full_export(run, tmp_path):
    """`student.pretrained_weights` = the full export loads the backbone and the iBOT adapter (student and EMA);
    a full export of another architecture is one line."""
    from omegaconf import OmegaConf

    from dinotrain.train.ssl import SSLMetaArch
    from dinotrain.weights.resolve import open_weights
    from dinotrain.weights.state_dict import WeightsError

    full = open_weights(run / "cnn_full.safetensors")
    config = OmegaConf.create(open_weights(sorted((run / "cnn" / "checkpoints").iterdir())[-1], "cnn").config)
    model = SSLMetaArch(config)
    model.load_any_student(str(run / "cnn_full.safetensors"))
    for nets in (model.student, model.teacher):
        state = nets["backbone"].state_dict()
        assert state.keys() == full.backbone.keys()
        assert all(torch.equal(state[k], full.backbone[k]) for k in state)
    # and through `dinotrain distill`: the run starts from it (its log says so) and trains
    full_path = run / "cnn_full.safetensors"
    proc = _distill(tmp_path / "again", run / "teacher", "distillation.students={cnn: {student: {arch: timm/resnet18, "
                    f"pretrained_weights: '{full_path}'}}}}}}")
    assert f"student timm/resnet18 from the full export {full_path}" in proc.stdout + proc.stderr
    other = OmegaConf.merge(config, {"student": {"arch": "timm/resnet10t"}})
    with pytest.raises(WeightsError, match="not of the student's timm/resnet10t"):
        SSLMetaArch(other).load_any_student(str(run / "cnn_full.safetensors"))


# --- serve ----------------------------------------------------------------------------------------------------------

def _score(app, payload: dict) -> tuple[int, list]:
    """One POST /score straight through the ASGI app, its lifespan (the batcher) running around it."""
    body = json.dumps(payload).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/score",
             "raw_path": b"/score", "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    async def call():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(call())
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_serve_answers_with_the_features_embed_computes(run, tmp_path):
    """The endpoint's features of an image = `dinotrain embed`'s = timm's pooled features, within 1e-5."""
    import numpy as np

    from dinotrain.eval.features import eval_sizes
    from dinotrain.inference import open_features
    from dinotrain.serve.app import ServeLimits, create_app
    from serving import b64, score_request

    paths = _images(2)
    emb = tmp_path / "emb"
    succeeded(in_process(["embed", "--weights", str(run / "cnn"), "--image-size", "32", "--output", str(emb),
                          "--no-progress", *map(str, paths)]))
    embedded = torch.from_numpy(np.load(emb / "embeddings.npy"))
    resize, crop = eval_sizes(32)
    model = open_features(str(run / "cnn"), None, torch.device("cpu"), "fp32", "torch")
    app = create_app(model, torch.device("cpu"), ServeLimits(), resize, crop)
    status, rows = _score(app, score_request([b64(p) for p in paths]))
    assert status == 200, rows
    served = torch.tensor([row["image_features"] for row in rows])
    with torch.no_grad():
        theirs = _timm_model(run)(_preprocessed(paths))
    torch.testing.assert_close(served, embedded, rtol=0, atol=1e-5)
    torch.testing.assert_close(served, theirs, rtol=0, atol=1e-5)


def test_a_cnn_backbone_without_heads_as_teacher_names_the_full_export(run, tmp_path):
    proc = in_process(["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(tmp_path / "x"), *FAST,
                       f"distillation.teacher={run / 'cnn' / 'students' / 'cnn.safetensors'}",
                       "train.head_warmup_iterations=2", VIT])
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "--to full --which NAME" in last and "Traceback" not in proc.stderr, proc.stderr
