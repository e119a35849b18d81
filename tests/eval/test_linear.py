"""Linear evaluation: the sweep equals torch's SGD + cosine schedule head by head, it learns what is linearly
separable, and the exported transformers classifier predicts exactly what the evaluation predicts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinotrain.cli import main
from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import ImageFolderDataset
from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.eval.features import shared_label_space
from dinotrain.eval.linear import (HeadConfig, LinearFeatures, batch_indices, export_best_classifier,
                                   extract_linear_features, initial_weights, linear_eval, train_heads)
from dinotrain.models.vision_transformer import ViTSpec, vit_from_spec


def _blobs(n_per_class=60, classes=3, dim=8, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    # two "blocks" of class tokens (the last one is x) and a patch mean of noise
    cls = torch.stack([torch.randn(len(labels), dim, generator=g), x], dim=1)
    return LinearFeatures(cls, torch.randn(len(labels), dim, generator=g), labels)


def test_each_head_is_torch_sgd_with_cosine_schedule():
    feats = _blobs()
    lrs, iterations, batch = (0.01, 0.1, 0.5), 25, 32
    [ours] = train_heads(feats, 3, [HeadConfig(2, True)], lrs=lrs, iterations=iterations, batch_size=batch, seed=3)
    x = HeadConfig(2, True).inputs(feats)
    for i, lr in enumerate(lrs):  # the reference: one nn.Linear per lr, the official optimizer and scheduler
        gen = torch.Generator().manual_seed(3)
        linear = torch.nn.Linear(x.shape[1], 3)
        with torch.no_grad():
            linear.weight.copy_(initial_weights(len(lrs), 3, x.shape[1], gen)[i])
            linear.bias.zero_()
        opt = torch.optim.SGD(linear.parameters(), lr=lr * batch / 256, momentum=0.9, weight_decay=0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=0)
        for idx in batch_indices(len(feats.labels), batch, iterations, gen):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(linear(x[idx]), feats.labels[idx]).backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(ours.weight[i], linear.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bias[i], linear.bias.detach(), rtol=1e-5, atol=1e-6)


def _split(feats: LinearFeatures, every: int = 4) -> tuple[LinearFeatures, LinearFeatures]:
    val = torch.arange(len(feats.labels)) % every == 0
    pick = lambda m: LinearFeatures(feats.class_tokens[m], feats.patch_mean[m], feats.labels[m])  # noqa: E731
    return pick(~val), pick(val)


def test_sweep_learns_separable_features_and_not_noise():
    train, val = _split(_blobs(n_per_class=80))
    configs = [HeadConfig(1, False), HeadConfig(1, True), HeadConfig(2, False)]
    results, _ = linear_eval(train, val, 3, configs, lrs=(1e-5, 0.1), iterations=200, batch_size=64)
    assert results["blocks1"]["0.1"] == 100.0, "the last block's class token separates the classes"
    assert results["blocks1"]["1e-05"] < results["blocks1"]["0.1"], "a far too small lr does not get there"
    # the first block's tokens are noise: nothing to learn from them
    noise = lambda f: LinearFeatures(f.class_tokens[:, :1], f.patch_mean, f.labels)  # noqa: E731
    res_noise, _ = linear_eval(noise(train), noise(val), 3, [HeadConfig(1, False)], lrs=(0.1,), iterations=200,
                               batch_size=64)
    assert res_noise["blocks1"]["0.1"] < 60.0, "no signal, no accuracy (chance is 33 %)"


def _tiny_backbone(layerscale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ViTSpec(img_size=16, patch_size=8, embed_dim=48, depth=4, num_heads=3, layerscale=layerscale,
                   use_mask_token=layerscale > 0)
    return vit_from_spec(spec).eval()


@pytest.mark.parametrize("layerscale, hf_class", [(1e-5, "Dinov2ForImageClassification"),
                                                  (0.0, "ViTForImageClassification")])
def test_exported_classifier_predicts_what_the_evaluation_predicts(layerscale, hf_class, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root = ensure_tiny_dataset()
    classes = shared_label_space(root / "train", root / "val")
    model = _tiny_backbone(layerscale)  # built at 16 px, evaluated at 32 px: the export resamples the positions
    train = extract_linear_features(model, root / "train", 32, 37, 4, 256, classes=classes)
    val = extract_linear_features(model, root / "val", 32, 37, 4, 256, classes=classes)
    configs = [HeadConfig(1, False), HeadConfig(1, True), HeadConfig(4, True)]
    _, heads = linear_eval(train, val, len(classes), configs, lrs=(0.05, 0.5), iterations=150)
    out, trained, index, acc = export_best_classifier(model, heads, val, classes, tmp_path / "clf", 37, 32)
    assert trained.config.n_blocks == 1 and (layerscale or not trained.config.avgpool)
    ours = trained.logits(val)[index].argmax(-1)

    hf = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class and hf.config.id2label[3] == classes[3]
    data = ImageFolderDataset(root / "val", transform=make_eval_transform(resize_size=37, crop_size=32))
    pixels = torch.stack([data[i][0] for i in range(len(data))])
    with torch.inference_mode():
        theirs = hf(pixel_values=pixels).logits.argmax(-1)
    assert torch.equal(theirs, ours), f"{int((theirs != ours).sum())} of {len(ours)} predictions differ"
    assert acc == pytest.approx(100.0 * float((ours == val.labels).float().mean()))
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size["height"] == 32 and processor.size["shortest_edge"] == 37


@pytest.mark.slow
def test_eval_linear_command(tmp_path, capsys):
    weights = tmp_path / "backbone.pth"
    torch.save(_tiny_backbone(1e-5).state_dict(), weights)
    out = tmp_path / "lin.json"
    args = ["eval", "linear", "--weights", str(weights), "--tiny", "--iterations", "60", "--lrs", "0.01", "0.1",
            "--output", str(out), "--export-hf", str(tmp_path / "clf")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "linear top-1 (best)" in printed and "classifier (blocks1" in printed
    summary = json.loads(out.read_text())
    assert set(summary["results"]) == {"blocks1", "blocks1_avgpool", "blocks4", "blocks4_avgpool"}
    assert all(set(r) == {"0.01", "0.1"} for r in summary["results"].values())
    assert summary["n_val"] == 359 and summary["classes"] == [str(i) for i in range(10)]
    best = summary["best"]["accuracy"]
    assert best == max(max(r.values()) for r in summary["results"].values())
    assert (tmp_path / "clf" / "config.json").is_file()
    assert main(args) == 2, "an existing export directory is not overwritten without --force"
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert not math.isnan(best)
