"""A finished DINOv3 training run (Gram anchoring on) exported in every format, each loaded by the library that
consumes it, giving the run's CLS and patch tokens on a few images at a non-square size (64x48: RoPE takes it as is).

One tiny run (a 2-block ViT-Tiny/16, 4 iterations, the Gram teacher in use from iteration 2, LayerScale 1 so that
the blocks count in the features) is shared by the checks. The reference is our backbone read from the run
directory (its config gives what the tensors do not: `norm_layer: layernorm`, eps 1e-6), which `dinotrain embed`
reproduces. Measured (torch 2.14.1, transformers 5.25, timm 1.0.31, 2-core EPYC), max |difference| of CLS and
patch tokens against it: hub `.pth` through torch.hub 0.0, `transformers.AutoModel` 0.0, timm's `Eva` 0.0,
safetensors and full export 0.0; the official `DinoVisionTransformer` (facebookresearch/dinov3 at 6876159, built
with the run's settings, `load_state_dict(strict=True)` of the hub file) 0.0 as well, once, by hand (its code is
not vendored here; `DINOV3_REPO=<checkout>` runs that check too).

The `.pth` and timm's file hold tensors only: a consumer built with the released models' eps 1e-5 (what
torch.hub's `dinov3_vits16` and timm's `vit_*_dinov3_qkvb` build) gives another CLS token, so these exports warn
and the consumers here are built with the run's `norm_layer`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from functools import partial

import numpy as np
import pytest
import torch

from dinotrain.cli import main
from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import load_rgb
from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.eval.features import eval_sizes
from dinotrain.weights.convert import load_backbone
from dinotrain.weights.resolve import open_weights
from trainruns import REPO, dinov3_args, run_cli

TOL = 1e-5
# The tiny arch as keyword arguments of the `dinov3_vits16` entry point / timm's `vit_small_patch16_dinov3_qkvb`
# (no timm model is 192 wide); the official hub entry fixes them, the official DinoVisionTransformer takes them.
TINY = dict(embed_dim=192, num_heads=3, depth=2, n_storage_tokens=2)
FORMATS = {"hub": "teacher.pth", "hf": "hf", "safetensors": "teacher.safetensors", "timm": "timm.safetensors",
           "full": "full.safetensors"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dinov3_story") / "run"
    proc = run_cli(dinov3_args(run, ["optim.epochs=1", "gram.it_load_ema_teacher=2", "student.layerscale=1.0"]),
                   timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gram_loss" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return run


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dinov3_exports")
    paths = {fmt: out / name for fmt, name in FORMATS.items()}
    for fmt, path in paths.items():
        assert main(["export", str(run), str(path), "--to", fmt]) == 0, fmt
    return paths


@pytest.fixture(scope="module")
def images():
    """3 images, 64 high and 48 wide (a 4x3 patch grid)."""
    paths = sorted((ensure_tiny_dataset() / "val" / "3").glob("*.png"))[:3]
    transform = make_eval_transform(resize_size=64, crop_size=64)
    return torch.stack([transform(load_rgb(p)) for p in paths])[..., 8:56]


def _tokens(out: dict) -> torch.Tensor:
    """CLS + patch tokens after the final norm, as (B, 1 + P, D)."""
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)


def _without_storage(tokens: torch.Tensor, n_storage: int = 2) -> torch.Tensor:
    """(CLS, storage, patches) sequences of transformers / timm, as (CLS, patches)."""
    return torch.cat([tokens[:, :1], tokens[:, 1 + n_storage:]], 1)


def _diff(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return {"cls": float((got[:, 0] - ref[:, 0]).abs().max()), "patch": float((got[:, 1:] - ref[:, 1:]).abs().max())}


@pytest.fixture(scope="module")
def reference(run, images):
    with torch.inference_mode():
        return _tokens(load_backbone(run).forward_features(images))


def test_the_run_read_from_its_directory_is_what_embed_gives(run, tmp_path):
    """`dinotrain embed` of the run directory = our backbone of the run on embed's own transform."""
    image = sorted((ensure_tiny_dataset() / "val" / "3").glob("*.png"))[0]
    out = tmp_path / "emb"
    assert main(["embed", str(image), "--weights", str(run), "--image-size", "64", "--patch-tokens", "--output",
                 str(out), "--no-progress"]) == 0
    resize, crop = eval_sizes(64)
    x = make_eval_transform(resize_size=resize, crop_size=crop)(load_rgb(image))[None]
    with torch.inference_mode():
        ours = _tokens(load_backbone(run).forward_features(x))
    embedded = torch.cat([torch.from_numpy(np.load(out / "embeddings.npy"))[:, None],
                          torch.from_numpy(np.load(out / "patch_tokens.npy"))], 1)
    assert max(_diff(embedded, ours).values()) <= TOL


def test_hub_pth_through_torch_hub_and_in_the_official_layout(run, exports, images, reference):
    hub = torch.load(exports["hub"], weights_only=True)
    # the official layout: the official names (ours), no wrapper, RoPE periods and the masked key bias stored
    assert hub.keys() == torch.load(run / "teacher_backbone.pth", weights_only=True).keys()
    assert {"rope_embed.periods", "storage_tokens", "blocks.1.attn.qkv.bias_mask"} <= hub.keys()
    model = torch.hub.load(str(REPO), "dinov3_vits16", source="local", trust_repo=True, weights=str(exports["hub"]),
                           norm_layer="layernorm", **TINY)
    with torch.inference_mode():
        diff = _diff(_tokens(model.eval().forward_features(images)), reference)
        released = torch.hub.load(str(REPO), "dinov3_vits16", source="local", trust_repo=True,
                                   weights=str(exports["hub"]), **TINY).eval()  # eps 1e-5, as the released models
        released_diff = _diff(_tokens(released.forward_features(images)), reference)
    print("hub", diff, "built with the released eps:", released_diff)
    assert max(diff.values()) <= TOL
    assert released_diff["cls"] > 10 * TOL, "the eps no longer matters: drop the export's warning?"


def test_hub_and_timm_exports_warn_that_the_file_cannot_hold_the_runs_norm(run, tmp_path, caplog):
    for fmt, name in (("hub", "t.pth"), ("timm", "t.safetensors"), ("safetensors", "s.safetensors")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dinotrain.weights"):
            assert main(["export", str(run), str(tmp_path / name), "--to", fmt]) == 0
        warned = [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()]
        if fmt == "safetensors":  # records the spec
            assert warned == []
        else:
            assert len(warned) == 1 and "norm_layer='layernorm'" in warned[0], warned


@pytest.mark.skipif(not os.environ.get("DINOV3_REPO"), reason="DINOV3_REPO=<facebookresearch/dinov3 checkout> unset")
def test_hub_pth_in_the_official_dinov3_model(exports, images, reference, monkeypatch):
    monkeypatch.syspath_prepend(os.environ["DINOV3_REPO"])
    from dinov3.models.vision_transformer import DinoVisionTransformer  # the official hub's constructor

    official = DinoVisionTransformer(
        img_size=224, patch_size=16, pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", ffn_ratio=4, qkv_bias=True,
        layerscale_init=1e-5, norm_layer="layernorm", ffn_layer="mlp", mask_k_bias=True, **TINY)
    official.load_state_dict(torch.load(exports["hub"], weights_only=True), strict=True)
    with torch.inference_mode():
        assert max(_diff(_tokens(official.eval().forward_features(images)), reference).values()) <= TOL
    sys.modules.pop("dinov3", None)


def test_hf_directory_through_automodel(exports, images, reference):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(exports["hf"]).eval()
    assert type(model).__name__ == "DINOv3ViTModel"
    with torch.inference_mode():
        diff = _diff(_without_storage(model(pixel_values=images).last_hidden_state), reference)
    print("hf", diff)
    assert max(diff.values()) <= TOL


def test_timm_file_through_create_model(exports, images, reference):
    timm = pytest.importorskip("timm")
    from timm.layers import LayerNorm

    model = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=True, num_heads=3, embed_dim=192, depth=2,
                              num_reg_tokens=2, norm_layer=partial(LayerNorm, eps=1e-6),
                              pretrained_cfg_overlay=dict(file=str(exports["timm"]))).eval()
    with torch.inference_mode():
        diff = _diff(_without_storage(model.forward_features(images)), reference)
    print("timm", diff)
    assert max(diff.values()) <= TOL


def test_safetensors_and_full_export(run, exports, images, reference):
    from safetensors.torch import load_file

    plain, hub = load_file(str(exports["safetensors"])), torch.load(exports["hub"], weights_only=True)
    assert plain.keys() == hub.keys() and all(torch.equal(plain[k], hub[k]) for k in hub)
    for fmt in ("safetensors", "full"):  # both record the spec: the run's eps without being told
        assert open_weights(exports[fmt]).spec == open_weights(run).spec, fmt
        with torch.inference_mode():
            diff = _diff(_tokens(load_backbone(exports[fmt]).forward_features(images)), reference)
        print(fmt, diff)
        assert max(diff.values()) <= TOL, fmt
    full = open_weights(exports["full"], heads=True)
    assert set(full.heads) == {"dino_head"} and full.config["gram"]["use_loss"] is True
    assert all(torch.equal(full.backbone[k], hub[k]) for k in hub)
