"""Our HF export is read by `transformers` as the same network, and HF directories import back.

`transformers` is an independent implementation, so equal outputs check our backbone and the
name mapping at once. To stay cheap on CPU every model keeps its full width and heads but is built
with img_size = 4 patches per side (inputs of 56/64/32 px); S and B keep all 12 blocks, L and g
are cut to 2 blocks. `test_full_vit_s_at_224` covers one complete model at the usual resolution.
"""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, Dinov2Model, Dinov2WithRegistersModel, ViTModel

from dinotrain.models import PRESETS, build_preset
from dinotrain.weights.convert import load_backbone, save_backbone
from dinotrain.weights.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from dinotrain.weights.state_dict import WeightsError

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ATOL = 1e-4
HF_CLASS = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel, "vit": ViTModel}
REDUCED_DEPTH = {"l": 2, "g": 2}  # L and g: full width, 2 blocks


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (tokens, pos_embed, LayerScale, norms) at sane scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(generator=gen)
            if p.ndim >= 2 and not name.endswith(("token", "tokens", "pos_embed", "position_embeddings")):
                p.mul_(p[0].numel() ** -0.5)  # linear / conv weights: unit-variance outputs
            elif "norm" in name and name.endswith("weight"):
                p.mul_(0.2).add_(1.0)
            elif "gamma" in name or "lambda1" in name:
                p.abs_().add_(0.5)
            else:
                p.mul_(0.5)  # biases, CLS/register/mask tokens, position embeddings
    return model


def random_preset(name: str, seed: int = 0, **overrides):
    """Preset `name` with random weights; built on the meta device first to skip the costly init."""
    with torch.device("meta"):
        model = build_preset(name, **overrides)
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def small_preset(name: str, **overrides):
    """Preset `name` at full width, img_size of 4x4 patches, depth reduced for L/g."""
    size = name.split("_vit")[1][0]
    kwargs = dict(img_size=PRESETS[name]["patch_size"] * 4)
    if size in REDUCED_DEPTH:
        kwargs["depth"] = REDUCED_DEPTH[size]
    kwargs.update(overrides)
    return random_preset(name, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Inputs here are a few dozen tokens: extra threads only add overhead (and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_models(directory, model_type: str):
    """The directory loaded by AutoModel and by the specific class, checking every weight was used."""
    kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
    models = []
    for loader in (AutoModel, HF_CLASS[model_type]):
        model, info = loader.from_pretrained(directory, output_loading_info=True, **kwargs)
        assert type(model) is HF_CLASS[model_type]
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        models.append(model.eval())
    return models


def hf_forward(hf_model, x):
    kwargs = {"interpolate_pos_encoding": True} if isinstance(hf_model, ViTModel) else {}
    return hf_model(pixel_values=x, **kwargs).last_hidden_state


def max_diffs(ours, hf_model, x):
    """(CLS, patch) max abs differences between our normed tokens and HF's last_hidden_state."""
    with torch.inference_mode():
        out = ours.forward_features(x)
        hidden = hf_forward(hf_model, x)
    first_patch = 1 + ours.num_register_tokens
    assert hidden.shape[1] == first_patch + out["x_norm_patchtokens"].shape[1]
    return ((out["x_norm_clstoken"] - hidden[:, 0]).abs().max().item(),
            (out["x_norm_patchtokens"] - hidden[:, first_patch:]).abs().max().item())


# ---- every architecture at its native grid -----------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_export_matches_transformers(name, tmp_path):
    model = small_preset(name)
    save_backbone(model, tmp_path, "hf")
    config = json.loads((tmp_path / "config.json").read_text())
    size = model.spec.img_size
    x = torch.randn(2, 3, size, size)
    for hf_model in hf_models(tmp_path, config["model_type"]):
        assert sum(p.numel() for p in hf_model.parameters()) == sum(p.numel() for p in model.parameters())
        cls_diff, patch_diff = max_diffs(model, hf_model, x)
        assert cls_diff <= ATOL and patch_diff <= ATOL, (cls_diff, patch_diff)


def test_full_vit_s_at_224(tmp_path):
    """The complete 12-block ViT-S/14 at 224 px (16x16 patches), no reductions."""
    model = random_preset("dinov2_vits14", img_size=224)
    save_backbone(model, tmp_path, "hf")
    (hf_model, _) = hf_models(tmp_path, "dinov2")
    cls_diff, patch_diff = max_diffs(model, hf_model, torch.randn(2, 3, 224, 224))
    assert cls_diff <= ATOL and patch_diff <= ATOL, (cls_diff, patch_diff)


# ---- other input sizes: interpolation of the position embeddings -------------------------------
OTHER_SIZES = [(6, 6), (5, 3), (3, 7)]  # in patches: larger, non-square, smaller side below native


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitg14_reg", "dino_vitb16", "dino_vits8"])
def test_other_sizes_match_with_offset_zero(name, tmp_path):
    """`interpolate_offset=0` resizes to the exact grid, the `transformers` convention (and the
    official one of the register models, which also antialias like Dinov2WithRegistersModel)."""
    model = small_preset(name, depth=2, interpolate_offset=0.0)
    save_backbone(model, tmp_path, "hf")
    (hf_model, _) = hf_models(tmp_path, json.loads((tmp_path / "config.json").read_text())["model_type"])
    patch = model.patch_size
    for gh, gw in OTHER_SIZES:
        cls_diff, patch_diff = max_diffs(model, hf_model, torch.randn(2, 3, gh * patch, gw * patch))
        assert cls_diff <= ATOL and patch_diff <= ATOL, ((gh, gw), cls_diff, patch_diff)


@pytest.mark.parametrize("name", ["dinov2_vitb14", "dino_vits8"])
def test_other_sizes_with_official_offset_differ_from_transformers(name, tmp_path):
    """The official DINOv2/DINO v1 resampling scales the grid by (new + 0.1) / old; `transformers`
    resizes to the exact size. Same grid shape, slightly different bicubic sample points.

    Measured here (2 blocks, 6x6 / 5x3 / 3x7 grids from a 4x4 table of random position embeddings
    with std 0.5): max abs difference of the normed tokens 0.11-0.28, relative (Frobenius) 1.3-3.1%.
    Trained position embeddings are smooth, and then the gap is ~10x smaller (a smooth sin-cos table
    of the same amplitude gave 0.011-0.020 max abs, 0.2-0.3% relative). We assert < 0.5 abs and < 6%
    relative, and that the difference is real (> 1e-3), so a silent change of convention is noticed.
    """
    model = small_preset(name, depth=2)
    assert model.interpolate_offset == 0.1
    save_backbone(model, tmp_path, "hf")
    (hf_model, _) = hf_models(tmp_path, json.loads((tmp_path / "config.json").read_text())["model_type"])
    patch = model.patch_size
    for gh, gw in OTHER_SIZES:
        x = torch.randn(2, 3, gh * patch, gw * patch)
        with torch.inference_mode():
            ours = model.norm(model.forward_features(x)["x_prenorm"])
            theirs = hf_forward(hf_model, x)
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        abs_diff = (ours - theirs).abs().max().item()
        assert 1e-3 < abs_diff < 0.5 and rel < 0.06, ((gh, gw), abs_diff, rel)


# ---- importing HF directories written by transformers itself ----------------------------------
def _hf_config(model_type: str, **extra):
    common = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                  layer_norm_eps=1e-6)
    if model_type == "vit":
        return transformers.ViTConfig(**{**common, "image_size": 64, "patch_size": 16, "intermediate_size": 512, **extra})
    if model_type == "dinov2_with_registers":
        return transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=4, **extra)
    return transformers.Dinov2Config(**common, **extra)


HF_CASES = {
    "dinov2": ("dinov2", {}),
    "dinov2_swiglu": ("dinov2", {"use_swiglu_ffn": True}),
    "dinov2_registers": ("dinov2_with_registers", {}),
    "vit": ("vit", {}),
}


@pytest.mark.parametrize("layout", ["save_pretrained", "v5_state_dict"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_import_directories_written_by_transformers(case, layout, tmp_path):
    """`save_pretrained` (which transformers 5 writes in the legacy layout) and a raw 5.x
    `state_dict()` (q_proj/o_proj, gate_proj/up_proj/down_proj, ViT `layers.N`) both import."""
    model_type, extra = HF_CASES[case]
    kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
    hf_model = randomize_(HF_CLASS[model_type](_hf_config(model_type, **extra), **kwargs), seed=3).eval()
    if layout == "save_pretrained":
        hf_model.save_pretrained(tmp_path)
    else:
        hf_model.config.save_pretrained(tmp_path)
        save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(tmp_path / "model.safetensors"),
                  metadata={"format": "pt"})
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert any("q_proj" in k for k in f.keys())  # really the renamed layout
    ours = load_backbone(tmp_path)
    assert ours.interpolate_offset == 0.0  # HF's resampling convention, so all sizes agree
    patch = ours.patch_size
    for gh, gw in [(4, 4), (5, 3)]:
        cls_diff, patch_diff = max_diffs(ours, hf_model, torch.randn(2, 3, gh * patch, gw * patch))
        assert cls_diff <= ATOL and patch_diff <= ATOL, ((gh, gw), cls_diff, patch_diff)


# ---- layout and config details -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["dinov2_vitg14", "dinov2_vits14_reg", "dino_vits16"])
def test_export_writes_the_legacy_hub_layout(name, tmp_path):
    """Same key set as `save_pretrained` writes (the layout of the facebook/dino* Hub repos)."""
    model = small_preset(name, depth=2)
    save_backbone(model, tmp_path / "ours", "hf")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    kwargs = {"add_pooling_layer": False} if config["model_type"] == "vit" else {}
    reference = HF_CLASS[config["model_type"]](transformers.AutoConfig.for_model(**config), **kwargs)
    reference.save_pretrained(tmp_path / "reference")
    keys = {}
    for which in ("ours", "reference"):
        with safe_open(str(tmp_path / which / "model.safetensors"), "pt") as f:
            keys[which] = set(f.keys())
    assert keys["ours"] == keys["reference"]
    assert not any("q_proj" in k or "gate_proj" in k for k in keys["ours"])


def test_hf_config_fields():
    giant = build_preset("dinov2_vitg14_reg", depth=1).spec
    cfg = hf_config(giant)
    assert cfg["architectures"] == ["Dinov2WithRegistersModel"] and cfg["model_type"] == "dinov2_with_registers"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (1536, 1, 24)
    assert cfg["use_swiglu_ffn"] is True and cfg["mlp_ratio"] == 4 and cfg["num_register_tokens"] == 4
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["qkv_bias"] is True and cfg["image_size"] == 518
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    v1 = hf_config(build_preset("dino_vitb8", depth=1).spec, torch.bfloat16)
    assert v1["architectures"] == ["ViTModel"] and v1["intermediate_size"] == 3072 and v1["patch_size"] == 8
    assert v1["dtype"] == "bfloat16" and "layerscale_value" not in v1


def test_specs_transformers_cannot_hold_are_refused():
    spec = build_preset("dinov2_vits14", depth=1, init_values=None, num_register_tokens=4).spec
    with pytest.raises(ValueError, match="LayerScale.*hub.*safetensors"):
        hf_config(spec)


def test_state_dict_mapping_round_trip_is_exact():
    model = small_preset("dinov2_vitg14_reg", depth=2)
    sd = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, model.spec))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_import_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(WeightsError, match="bert"):
        load_backbone(tmp_path)
    with pytest.raises(WeightsError, match="unexpected parameters"):
        from_hf_state_dict({"embeddings.cls_token": torch.zeros(1, 1, 4), "encoder.layer.0.crossattention.w": torch.zeros(1)})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_transformers_at_full_size(name):
    """Full-size models (518 or 224 px, all blocks) on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        ours = build_preset(name)
        config = transformers.AutoConfig.for_model(**hf_config(ours.spec))
        kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        theirs = HF_CLASS[config.model_type](config, **kwargs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name, overrides, hf_extra", [
    ("dinov2_vits14_reg", dict(use_mask_token=False), {"missing_keys": {"embeddings.mask_token"}}),
    ("dino_vits16", dict(use_mask_token=True), {"unexpected_keys": {"embeddings.mask_token"}}),
])
def test_near_miss_specs_export_losslessly(name, overrides, hf_extra, tmp_path):
    """A register model without mask token, a LayerScale-free one with: transformers loads them
    (initialising / ignoring the mask token), outputs agree, and our import is exact."""
    model = small_preset(name, depth=2, **overrides)
    save_backbone(model, tmp_path, "hf")
    kwargs = {"add_pooling_layer": False} if name.startswith("dino_") else {}
    hf_model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    for key in ("missing_keys", "unexpected_keys"):
        assert set(info[key]) == hf_extra.get(key, set())
    size = model.spec.img_size
    cls_diff, patch_diff = max_diffs(model, hf_model.eval(), torch.randn(2, 3, size, size))
    assert cls_diff <= ATOL and patch_diff <= ATOL
    back = load_backbone(tmp_path)
    assert back.spec == model.spec
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
