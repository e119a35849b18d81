"""DINOv3 state dicts between our (= official .pth) layout, transformers' DINOv3ViTModel and timm's dinov3 Eva:
bitwise round trips both ways, the architecture read back from weights and configs, and clear refusals."""

import logging

import pytest
import torch

from dinotrain.models.dinov3 import DINOV3_PRESETS, build_dinov3, dinov3_from_spec
from dinotrain.models.rope import rope_periods
from dinotrain.weights.dinov3_layouts import (
    TIMM_MODEL_NAMES, from_timm, from_transformers, infer_dinov3_spec, spec_from_transformers_config, timm_model_kwargs,
    to_timm, to_transformers, transformers_config,
)
from dinotrain.weights.state_dict import WeightsError

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("transformers >= 4.56 has DINOv3ViTModel", allow_module_level=True)


def random_ours(name: str, depth: int = 2, **overrides) -> dict[str, torch.Tensor]:
    """Every tensor random except those that keep official invariants: the key-bias third 0 (masked, never
    learns), `bias_mask` and `rope_embed.periods` as built."""
    model = build_dinov3(name, depth=depth, **overrides)
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith(("bias_mask", "periods")):
            out[key] = value
            continue
        value = torch.randn_like(value)
        if key.endswith("attn.qkv.bias") and model.spec.mask_k_bias:
            value[model.embed_dim : 2 * model.embed_dim] = 0
        out[key] = value
    return out


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad


def hf_model(spec):
    cfg = {k: v for k, v in transformers_config(spec).items() if k not in ("architectures", "model_type")}
    return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg))


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus", "dinov3_vit7b16"])
def test_ours_to_transformers_and_back_is_bitwise(name):
    # 7B's layout (128-wide heads, SwiGLU, no qkv bias, a local CLS norm) at a narrow width
    overrides = dict(embed_dim=256, num_heads=2) if name == "dinov3_vit7b16" else {}
    spec = build_dinov3(name, depth=2, **overrides).spec
    ours = random_ours(name, 2, **overrides)
    if spec.untie_global_and_local_cls_norm:  # dropped on the way out, rebuilt as a copy of `norm`
        ours["local_cls_norm.weight"], ours["local_cls_norm.bias"] = ours["norm.weight"].clone(), ours["norm.bias"].clone()
    hf = to_transformers(ours, spec)
    assert all(k.startswith(("embeddings.", "layer.", "norm.")) for k in hf)  # the Hub's layout
    ref = hf_model(spec).state_dict()  # 5.x module layout: `model.layer.N.`
    assert sorted(k.replace("model.layer.", "layer.") for k in ref) == sorted(hf)
    assert all(hf[k.replace("model.layer.", "layer.")].shape == v.shape for k, v in ref.items())
    assert_bitwise(from_transformers(hf, spec), ours)


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vitb16"])
def test_transformers_to_ours_and_back_is_bitwise(name, tmp_path):
    spec = build_dinov3(name, depth=2).spec
    model = hf_model(spec)
    model.save_pretrained(tmp_path)  # what a transformers directory holds
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    back = to_transformers(from_transformers(saved, spec), spec)
    assert_bitwise(back, saved)
    module_layout = model.state_dict()  # `model.layer.N.` keys are read too
    assert_bitwise(from_transformers(module_layout, spec), from_transformers(saved, spec))
    import json

    assert spec_from_transformers_config(json.loads((tmp_path / "config.json").read_text())) == spec


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus"])
def test_ours_to_timm_and_back_is_bitwise(name):
    depth = 2
    ours = random_ours(name, depth)
    ours["mask_token"].zero_()  # timm has none: it comes back as the official init
    spec = build_dinov3(name, depth=depth).spec
    tm = to_timm(ours, spec)
    ref = timm.create_model(TIMM_MODEL_NAMES[name], pretrained=False, num_classes=0, depth=depth).state_dict()
    assert sorted(tm) == sorted(ref) and all(tm[k].shape == ref[k].shape for k in ref)
    assert_bitwise(from_timm(tm, spec), ours)


@pytest.mark.parametrize("name", ["dinov3_vits16plus", "dinov3_vitl16"])
def test_timm_to_ours_and_back_is_bitwise(name):
    tm = timm.create_model(TIMM_MODEL_NAMES[name], pretrained=False, num_classes=0, depth=1)
    for p in tm.parameters():
        torch.nn.init.normal_(p)
    saved = {k: v for k, v in tm.state_dict().items()}
    spec = build_dinov3(name, depth=1).spec
    assert_bitwise(to_timm(from_timm(saved, spec), spec), saved)


def test_timm_kwargs_build_the_same_networks_as_timms_names():
    """Our kwargs vs timm's own model definitions (2 blocks, meta device): same tensors, same shapes."""
    from timm.models.eva import Eva

    for name, timm_name in TIMM_MODEL_NAMES.items():
        with torch.device("meta"):
            spec = build_dinov3(name, depth=2).spec
            ours = Eva(**timm_model_kwargs(spec)).state_dict()
            theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, depth=2).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name


def test_timm_without_qkv_biases_loads_with_zero_biases():
    """timm's `vit_*_dinov3` (no `_qkvb`) hold no q/v biases (the released distilled ones are 0)."""
    tm = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, depth=1).eval()
    spec = build_dinov3("dinov3_vits16", depth=1).spec
    ours = dinov3_from_spec(spec).eval()
    ours.load_state_dict(from_timm(tm.state_dict(), spec))
    assert torch.equal(ours.blocks[0].attn.qkv.bias, torch.zeros(3 * 384))
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x)["x_norm_patchtokens"], tm.forward_features(x)[:, 5:])


@pytest.mark.parametrize("name", sorted(DINOV3_PRESETS))
def test_architecture_is_read_back_from_weights(name):
    with torch.device("meta"):
        model = build_dinov3(name)
    state_dict = dict(model.state_dict(), **{"rope_embed.periods": rope_periods(model.spec.head_dim)})  # real values
    found = infer_dinov3_spec(state_dict)
    if name == "dinov3_vit7b16":  # same tensors: 8192 is also what the plain 8-alignment gives, and without a
        # qkv bias there is no mask to find
        assert (found.ffn_layer, found.ffn_hidden, found.mask_k_bias) == ("swiglu", 8192, False)
        found = found.__class__(**{**found.to_dict(), "ffn_layer": "swiglu64", "mask_k_bias": True})
    assert found == model.spec
    if name != "dinov3_vit7b16":
        assert spec_from_transformers_config(transformers_config(model.spec)) == model.spec


def test_bf16_rounded_periods_are_read_and_reported(caplog):
    """Released checkpoints hold bf16-rounded periods (timm's note); the base is still found, and exporting to a
    library that recomputes fp32 periods says its outputs will differ."""
    ours = random_ours("dinov3_vits16", depth=1)
    ours["rope_embed.periods"] = ours["rope_embed.periods"].bfloat16()
    spec = infer_dinov3_spec(ours)
    assert spec.pos_embed_rope_base == 100.0 and spec.num_heads == 6
    with caplog.at_level(logging.WARNING, logger="dinotrain.weights"):
        to_transformers(ours, spec)
    assert "RoPE periods" in caplog.text and "transformers" in caplog.text


def test_what_the_targets_cannot_hold_is_refused():
    untied = build_dinov3("dinov3_vits16", depth=1, untie_cls_and_patch_norms=True)
    with pytest.raises(WeightsError, match="untied CLS norm"):
        to_transformers(untied.state_dict(), untied.spec)
    with pytest.raises(WeightsError, match="untied CLS norm"):
        to_timm(untied.state_dict(), untied.spec)
    unmasked = build_dinov3("dinov3_vits16", depth=1, mask_k_bias=False)
    with pytest.raises(WeightsError, match="key bias that is not masked"):
        to_timm(unmasked.state_dict(), unmasked.spec)
    assert transformers_config(unmasked.spec)["key_bias"] is True  # transformers can hold that one
    periods = build_dinov3("dinov3_vits16", depth=1, pos_embed_rope_base=None, pos_embed_rope_min_period=0.5,
                           pos_embed_rope_max_period=50.0)
    with pytest.raises(WeightsError, match="min/max period"):
        to_transformers(periods.state_dict(), periods.spec)
    assert infer_dinov3_spec(periods.state_dict()).pos_embed_rope_max_period == pytest.approx(50.0)


def test_wrong_weights_are_one_clear_error():
    from dinotrain.models import build_preset

    dinov2 = build_preset("dinov2_vits14", depth=1).state_dict()
    with pytest.raises(WeightsError, match="DINOv2/DINO v1 backbone weights .* where a DINOv3 backbone"):
        infer_dinov3_spec(dinov2)
    with pytest.raises(WeightsError, match="not a DINOv3 backbone state dict"):
        infer_dinov3_spec(torch.nn.Linear(2, 2).state_dict())
    spec = build_dinov3("dinov3_vits16", depth=2).spec
    hf = to_transformers(random_ours("dinov3_vits16", depth=2), spec)
    del hf["layer.1.norm2.weight"]
    with pytest.raises(WeightsError, match=r"missing \['blocks.1.norm2.weight'\]"):
        from_transformers(hf, spec)
    wider = build_dinov3("dinov3_vitb16", depth=2).spec
    with pytest.raises(WeightsError, match="do not fit"):
        from_transformers(to_transformers(random_ours("dinov3_vits16", depth=2), spec), wider)
