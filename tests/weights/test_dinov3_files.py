"""DINOv3 weights in every layout a user can give: `open_weights` reads each into the same backbone (bitwise),
`dinotrain convert` round trips bitwise through each, transformers' `AutoModel` and timm's `Eva` load what we
write and compute our features, and a backbone of the other family is a one-line error naming both."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dinotrain.cli import main
from dinotrain.models import build_preset
from dinotrain.models.dinov3 import build_dinov3
from dinotrain.models.rope import rope_periods
from dinotrain.weights.convert import backbone_from_weights, convert, load_weights_into, save_backbone
from dinotrain.weights.dinov3_layouts import infer_timm_spec, timm_model_kwargs, to_timm, to_transformers
from dinotrain.weights.resolve import open_weights
from dinotrain.weights.state_dict import WeightsError, infer_spec

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("transformers >= 4.56 has DINOv3ViTModel", allow_module_level=True)

from timm.models.eva import Eva  # noqa: E402

TINY = dict(embed_dim=128, num_heads=2, depth=2)  # 64-wide heads: what a file without our metadata implies


def random_model(name="dinov3_vits16", **overrides):
    """Weights far from init at a realistic scale (matrices and biases N(0, 0.02), tokens N(0, 1), norm weights and
    LayerScale 1 + N(0, 0.2)), but those that keep official invariants (masked key-bias third 0, mask, periods)
    and the mask token, which timm's layout does not hold (rebuilt as the official init, zeros)."""
    torch.manual_seed(0)
    model = build_dinov3(name, **{**TINY, **overrides})
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith(("bias_mask", "periods", "mask_token")):
                continue
            if key in ("cls_token", "storage_tokens"):
                value.normal_()
            elif key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "gamma")):
                value.normal_(1.0, 0.2)
            else:
                value.normal_(0.0, 0.02)
            if key.endswith("attn.qkv.bias") and model.spec.mask_k_bias:
                value[model.embed_dim: 2 * model.embed_dim] = 0
    return model.eval()


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad


def timm_module(spec, state_dict):
    eva = Eva(**timm_model_kwargs(spec)).eval()
    eva.load_state_dict(state_dict, strict=True)
    return eva


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The model and each layout's files, written by us and by the other libraries themselves."""
    d = tmp_path_factory.mktemp("v3")
    model = random_model()
    ours = model.state_dict()
    torch.save(ours, d / "official.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in ours.items()}}, d / "official_training.pth")
    save_backbone(model, d / "ours.safetensors", "safetensors")
    save_backbone(model, d / "hf_ours", "hf")
    transformers.AutoModel.from_pretrained(d / "hf_ours").save_pretrained(d / "hf_theirs")  # transformers' own files
    save_backbone(model, d / "timm_ours.safetensors", "timm")
    eva = timm_module(model.spec, to_timm(ours, model.spec))
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(d / "timm_theirs.safetensors"))
    torch.save(eva.state_dict(), d / "timm_theirs.pth")
    return model, d


EXPECTED_KINDS = {"official.pth": "hub", "official_training.pth": "hub", "ours.safetensors": "safetensors",
                  "hf_ours": "hf", "hf_theirs": "hf", "hf_theirs/model.safetensors": "hf",
                  "timm_ours.safetensors": "timm", "timm_theirs.safetensors": "timm", "timm_theirs.pth": "timm"}


@pytest.mark.parametrize("path", sorted(EXPECTED_KINDS))
def test_every_layout_reads_as_the_same_backbone(layouts, path):
    model, d = layouts
    found = open_weights(d / path)
    assert found.kind == EXPECTED_KINDS[path]
    assert_bitwise(found.backbone, model.state_dict())
    assert found.spec == model.spec  # from our metadata, config.json, or the tensors + official defaults
    x = torch.randn(1, 3, 48, 32)
    assert torch.equal(backbone_from_weights(found)(x), model(x))


def test_timm_hub_directory_takes_the_head_width_from_its_model_name(tmp_path):
    model = random_model(embed_dim=384, num_heads=6, depth=1)
    save_backbone(model, tmp_path / "timm" / "model.safetensors", "timm")
    meta_free = load_file(str(tmp_path / "timm" / "model.safetensors"))  # as timm's Hub files: no spec metadata
    save_file(meta_free, str(tmp_path / "timm" / "model.safetensors"))
    (tmp_path / "timm" / "config.json").write_text(json.dumps(
        {"architecture": "vit_small_patch16_dinov3_qkvb", "num_classes": 0, "pretrained_cfg": {"tag": "lvd1689m"}}))
    found = open_weights(tmp_path / "timm")
    assert found.kind == "timm" and found.spec == model.spec
    assert_bitwise(found.backbone, model.state_dict())
    (tmp_path / "timm" / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_dinov3"}))
    with pytest.raises(WeightsError, match="768 wide, these tensors 384"):
        open_weights(tmp_path / "timm")


def test_timm_tensors_hold_no_head_width_the_official_preset_gives_it():
    with torch.device("meta"):  # 7B's layout (128-wide heads, SwiGLU64, no q/v bias) without allocating it
        seven_b = build_preset("dinov3_vit7b16", depth=1)
    state_dict = {**seven_b.state_dict(), "rope_embed.periods": rope_periods(128)}  # real: to_timm compares them
    timm_sd = to_timm(state_dict, seven_b.spec)
    spec = infer_timm_spec(timm_sd)
    assert (spec.num_heads, spec.head_dim, spec.qkv_bias) == (32, 128, False)
    assert spec.untie_global_and_local_cls_norm
    assert spec.ffn_hidden == seven_b.spec.ffn_hidden == 8192
    small = random_model(embed_dim=384, num_heads=6, depth=1)
    no_qv = {k: v for k, v in to_timm(small.state_dict(), small.spec).items() if not k.endswith(("q_bias", "v_bias"))}
    spec = infer_timm_spec(no_qv, "vit_small_patch16_dinov3.lvd1689m")  # timm's non-qkvb model: zero q/v biases
    assert spec.qkv_bias and spec.num_heads == 6
    with pytest.raises(WeightsError, match="not one of timm's DINOv3"):
        infer_timm_spec(no_qv, "vit_small_patch14_dinov2")


# ---- convert ------------------------------------------------------------------------------------------
def test_convert_round_trips_bitwise_through_every_layout(layouts, tmp_path):
    model, d = layouts
    chain = [("hf", "hf"), ("timm", "t.safetensors"), ("safetensors", "w.safetensors"), ("timm", "t.pth"),
             ("hf", "hf2"), ("hub", "back.pth")]
    src = d / "official.pth"
    for to, name in chain:
        src = convert(src, tmp_path / name, to)
        assert_bitwise(open_weights(src).backbone, model.state_dict())
    assert_bitwise(torch.load(src, weights_only=True), model.state_dict())  # the official .pth layout again


def test_their_files_come_back_bitwise(layouts, tmp_path):
    """transformers' own `save_pretrained` tensors and timm's own state dict, through ours and back."""
    _, d = layouts
    convert(convert(d / "hf_theirs", tmp_path / "a.pth", "hub"), tmp_path / "hf", "hf")
    assert_bitwise(load_file(str(tmp_path / "hf" / "model.safetensors")),
                   load_file(str(d / "hf_theirs" / "model.safetensors")))
    convert(convert(d / "timm_theirs.pth", tmp_path / "b.pth", "hub"), tmp_path / "t.pth", "timm")
    assert_bitwise(torch.load(tmp_path / "t.pth", weights_only=True),
                   torch.load(d / "timm_theirs.pth", weights_only=True))


@pytest.mark.parametrize("size", [(224, 224), (320, 192)])
def test_automodel_and_timm_compute_our_features(layouts, size):
    model, d = layouts
    hf = transformers.AutoModel.from_pretrained(d / "hf_ours").eval()
    assert type(hf).__name__ == "DINOv3ViTModel"
    assert transformers.AutoImageProcessor.from_pretrained(d / "hf_ours") is not None
    eva = timm_module(model.spec, load_file(str(d / "timm_ours.safetensors")))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.forward_features(x)
        ours = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)
        theirs = {"transformers": hf(pixel_values=x).last_hidden_state, "timm": eva.forward_features(x)}
    for name, feats in theirs.items():
        diff = (feats - ours).abs().max().item()
        print(f"{name} vs ours at {size}: max abs diff {diff:.2e}")
        assert diff <= 1e-5, name


# ---- the other family ---------------------------------------------------------------------------------
def test_a_backbone_of_the_other_family_is_one_line_naming_both(layouts, tmp_path, capsys):
    model, d = layouts
    v2 = save_backbone(build_preset("dinov2_vits14", depth=1, img_size=28), tmp_path / "v2.pth", "hub")
    v3 = d / "official.pth"
    cases = [(lambda: open_weights(v2, family="dinov3"), "DINOv2/DINO v1", "DINOv3", str(v2)),
             (lambda: open_weights(v3, family="dinov2"), "DINOv3", "DINOv2/DINO v1", str(v3)),
             (lambda: load_weights_into(build_preset("dinov2_vits14", depth=2), open_weights(v3)), "DINOv3",
              "DINOv2/DINO v1", str(v3)),
             (lambda: infer_spec(model.state_dict()), "DINOv3", "DINOv2/DINO v1", "")]
    for call, found, expected, where in cases:
        with pytest.raises(WeightsError) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and where in text
        assert f"{found} backbone weights" in text and f"where a {expected} backbone" in text, text
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    assert main(["embed", str(tmp_path / "img.png"), "--weights", str(v2), "--model", "dinov3_vits16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not fit --model dinov3_vits16" in err and "where a DINOv3 backbone" in err
    assert main(["convert", str(v2), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 2
    assert "DINOv3 backbones" in capsys.readouterr().err


def test_what_a_layout_cannot_hold_is_refused_in_one_line(tmp_path):
    untied = random_model(untie_cls_and_patch_norms=True)
    for to, dst in (("hf", tmp_path / "hf"), ("timm", tmp_path / "t.safetensors")):
        with pytest.raises(WeightsError, match="untied CLS norm"):
            save_backbone(untied, dst, to)
    model = random_model()
    save_backbone(model, tmp_path / "hf2", "hf")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    (tmp_path / "hf2" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(WeightsError, match=r"hf2: .*contradicts config.json.*depth: model has 2, config.json have 3"):
        open_weights(tmp_path / "hf2")
    hf = to_transformers(model.state_dict(), model.spec)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "lonely.safetensors"))
    with pytest.raises(WeightsError, match="no config.json beside it"):
        open_weights(tmp_path / "lonely.safetensors")


def test_convert_and_export_command_lines(layouts, tmp_path, capsys):
    model, d = layouts
    assert main(["convert", str(d / "hf_theirs"), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 0
    assert "(timm)" in capsys.readouterr().out
    for to, dst in (("hf", tmp_path / "hf"), ("safetensors", tmp_path / "w.safetensors"), ("hub", tmp_path / "w.pth")):
        assert main(["export", str(tmp_path / "t.safetensors"), str(dst), "--to", to]) == 0
        assert_bitwise(open_weights(dst).backbone, model.state_dict())
    assert main(["export", str(tmp_path / "t.safetensors"), str(tmp_path / "w.pth"), "--to", "hub"]) == 2
    assert "exists" in capsys.readouterr().err


def test_timm_create_model_loads_our_timm_file_by_its_model_name(tmp_path):
    model = random_model(embed_dim=384, num_heads=6, depth=1)  # ViT-S/16's width, one block
    path = save_backbone(model, tmp_path / "t.safetensors", "timm")
    eva = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=True, depth=1,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        out = model.forward_features(x)
        ours = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)
        assert (eva.forward_features(x) - ours).abs().max() <= 1e-5
