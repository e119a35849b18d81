"""The DINOv3 backbone against two independent implementations, transformers' `DINOv3ViTModel` and timm's dinov3
`Eva`, on identical random weights (nothing is downloaded): each reference is built at random init, its weights
are randomised further (LayerScale ~1, so every block contributes) and converted into ours.

Reduced depth (real widths, heads and FFN widths of each size): S and S+ 2 blocks, B and L 1 block. Run with
`-s` to see the measured max |diff| per size, resolution and library.
"""

import pytest
import torch

from dinotrain.models import build_preset
from dinotrain.models.dinov3 import Dinov3VisionTransformer, build_dinov3
from dinotrain.weights.dinov3_layouts import (
    TIMM_MODEL_NAMES, from_timm, from_transformers, spec_from_transformers_config, transformers_config,
)

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("transformers >= 4.56 has DINOv3ViTModel", allow_module_level=True)

TOL = 1e-5
SIZES = {"dinov3_vits16": 2, "dinov3_vits16plus": 2, "dinov3_vitb16": 1, "dinov3_vitl16": 1}
RESOLUTIONS = [(224, 224), (320, 192), (512, 512)]


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Weights far from init: matrices N(0, 0.02), tokens N(0, 1), norm weights / LayerScale 1 + N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "token" in name:
                p.copy_(r)
            elif p.ndim >= 2:
                p.copy_(0.02 * r)
            else:
                p.copy_(0.1 * r if name.endswith("bias") else 1 + 0.2 * r)


def hf_model(spec):
    cfg = {k: v for k, v in transformers_config(spec).items() if k not in ("architectures", "model_type")}
    return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)).eval()


def token_diffs(ours: dict, theirs: torch.Tensor, n_storage: int) -> dict[str, float]:
    return {
        "cls": (ours["x_norm_clstoken"] - theirs[:, 0]).abs().max().item(),
        "storage": (ours["x_storage_tokens"] - theirs[:, 1 : 1 + n_storage]).abs().max().item(),
        "patch": (ours["x_norm_patchtokens"] - theirs[:, 1 + n_storage :]).abs().max().item(),
    }


@pytest.mark.parametrize("name", sorted(SIZES))
def test_same_outputs_as_transformers_and_timm(name):
    depth = SIZES[name]
    spec = build_dinov3(name, depth=depth).spec

    hf = hf_model(spec)
    randomise_(hf, 0)
    from_hf = Dinov3VisionTransformer(**spec_from_transformers_config(hf.config).to_dict()).eval()
    from_hf.load_state_dict(from_transformers(hf.state_dict(), from_hf.spec))

    tm = timm.create_model(TIMM_MODEL_NAMES[name], pretrained=False, num_classes=0, depth=depth).eval()
    randomise_(tm, 1)
    from_tm = build_dinov3(name, depth=depth).eval()
    from_tm.load_state_dict(from_timm(tm.state_dict(), spec))

    worst = 0.0
    for h, w in RESOLUTIONS:
        x = torch.randn(1 if h * w > 100_000 else 2, 3, h, w)
        with torch.no_grad():
            vs_hf = token_diffs(from_hf.forward_features(x), hf(pixel_values=x).last_hidden_state, 4)
            vs_tm = token_diffs(from_tm.forward_features(x), tm.forward_features(x), 4)
        for lib, d in (("transformers", vs_hf), ("timm", vs_tm)):
            print(f"\n{name} depth {depth} {h}x{w} vs {lib}: max|diff| cls {d['cls']:.2e} storage "
                  f"{d['storage']:.2e} patch {d['patch']:.2e}", end="")
            worst = max(worst, *d.values())
    assert worst < TOL


def test_intermediate_layers_equal_transformers_hidden_states():
    spec = build_dinov3("dinov3_vits16", depth=3).spec
    hf = hf_model(spec)
    randomise_(hf, 2)
    ours = Dinov3VisionTransformer(**spec.to_dict()).eval()
    ours.load_state_dict(from_transformers(hf.state_dict(), spec))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings, then each layer
        raw = ours.get_intermediate_layers(x, n=[0, 2], norm=False, return_class_token=True, return_extra_tokens=True)
        normed = ours.get_intermediate_layers(x, n=1, reshape=True)
    for (patches, cls, storage), layer in zip(raw, (1, 3)):
        ref = hidden[layer]
        assert (patches - ref[:, 5:]).abs().max() < TOL and (cls - ref[:, 0]).abs().max() < TOL
        assert (storage - ref[:, 1:5]).abs().max() < TOL
    assert normed[0].shape == (2, 384, 6, 8)
    assert (normed[0].flatten(2).transpose(1, 2) - hf.norm(hidden[3])[:, 5:]).abs().max() < TOL


def test_rope_tables_in_training_equal_transformers_and_timm_draws():
    """Shift, jitter and rescale drawn from torch's RNG in the official order: the same seed gives the tables
    transformers' and timm's RoPE modules give in training mode (20 x 12 grid, 64-wide heads)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    aug = dict(pos_embed_rope_shift_coords=0.3, pos_embed_rope_jitter_coords=1.5, pos_embed_rope_rescale_coords=2.0)
    ours = build_dinov3("dinov3_vits16", depth=1, **aug).rope_embed.train()
    cfg = transformers_config(build_dinov3("dinov3_vits16", depth=1, **aug).spec)
    hf_rope = transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTRopePositionEmbedding(
        transformers.DINOv3ViTConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    tm_rope = RotaryEmbeddingDinoV3(64, temperature=100, shift_coords=0.3, jitter_coords=1.5, rescale_coords=2.0)
    for mod in (hf_rope, tm_rope):
        mod.train()
    torch.manual_seed(7)
    sin, cos = ours(20, 12)
    torch.manual_seed(7)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, 3, 320, 192))
    torch.manual_seed(7)
    tm_sin, tm_cos = tm_rope.get_embed([20, 12]).chunk(2, dim=-1)
    print(f"\nRoPE training tables vs transformers: {max((sin - hf_sin).abs().max(), (cos - hf_cos).abs().max()):.2e}, "
          f"vs timm: {max((sin - tm_sin).abs().max(), (cos - tm_cos).abs().max()):.2e}")
    assert torch.allclose(sin, hf_sin, atol=1e-5) and torch.allclose(cos, hf_cos, atol=1e-5)
    assert torch.equal(sin, tm_sin) and torch.equal(cos, tm_cos)
    torch.manual_seed(8)
    assert not torch.allclose(ours(20, 12)[0], sin, atol=1e-3)  # another draw, other tables


def test_rope_augmentations_act_in_training_only():
    rope = build_dinov3("dinov3_vits16", depth=1, pos_embed_rope_shift_coords=0.25,
                        pos_embed_rope_jitter_coords=1.5).rope_embed
    rope.eval()
    plain = rope.coords(6, 4)
    assert torch.equal(plain, rope.coords(6, 4))  # deterministic
    assert plain[0].tolist() == pytest.approx([-1 + 1 / 6, -1 + 1 / 4]) and plain.shape == (24, 2)
    assert plain[-1].tolist() == pytest.approx([1 - 1 / 6, 1 - 1 / 4])  # patch centres, row-major
    rope.train()
    for seed in range(5):
        torch.manual_seed(seed)
        aug = rope.coords(6, 4)
        # per axis: (plain + shift) * scale, one shift in [-0.25, 0.25] and one scale in [1/1.5, 1.5] per axis;
        # with rescale 2 on top, the scale range is [1/3, 3]
        scale = (aug[-1] - aug[0]) / (plain[-1] - plain[0])
        shift = aug[0] / scale - plain[0]
        assert torch.allclose(aug, (plain + shift) * scale, atol=1e-6)
        assert (shift.abs() <= 0.25 + 1e-6).all() and ((scale >= 1 / 3 - 1e-6) & (scale <= 3 + 1e-6)).all()
        assert not torch.allclose(aug, plain)


def test_training_forward_redraws_rope_per_block_and_is_seeded():
    model = build_dinov3("dinov3_vits16", depth=3)  # rescale 2, as the released models were trained
    randomise_(model, 4)  # LayerScale ~1: the blocks, and so the positions, matter
    x = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 48)]
    calls = []
    original = model.rope_embed.forward
    model.rope_embed.forward = lambda h, w: calls.append((h, w)) or original(h, w)
    with torch.no_grad():
        model.eval()
        first, second = model.forward_features(x), model.forward_features(x)
        assert calls == [(4, 4), (2, 3)] * 2  # eval: once per crop group and forward
        assert torch.equal(first[1]["x_norm_patchtokens"], second[1]["x_norm_patchtokens"])
        calls.clear()
        model.train()
        torch.manual_seed(3)
        a = model.forward_features(x)
        assert calls == [(4, 4), (2, 3)] * 3  # training: fresh draws before every block
        torch.manual_seed(3)
        b = model.forward_features(x)
    assert torch.equal(a[0]["x_norm_clstoken"], b[0]["x_norm_clstoken"])
    assert not torch.allclose(a[0]["x_norm_patchtokens"], first[0]["x_norm_patchtokens"], atol=1e-4)


def test_api_of_our_backbones():
    model = build_preset("dinov3_vits16", depth=1).eval()
    assert isinstance(model, Dinov3VisionTransformer)
    assert (model.embed_dim, model.patch_size, model.n_storage_tokens, model.num_register_tokens) == (384, 16, 4, 4)
    x = torch.randn(2, 3, 230, 200)  # not multiples of 16: cropped down to 224 x 192, as our DINOv2 models do
    with torch.no_grad():
        out = model.forward_features(x)
        cropped = model.forward_features(x[:, :, :224, :192])
        assert torch.equal(out["x_norm_patchtokens"], cropped["x_norm_patchtokens"])
        assert out["x_norm_patchtokens"].shape == (2, 14 * 12, 384) and out["x_norm_regtokens"].shape == (2, 4, 384)
        assert out["x_prenorm"].shape == (2, 1 + 4 + 168, 384)
        assert torch.equal(model(x), out["x_norm_clstoken"])
        assert set(model(x, is_training=True)) == {"x_norm_clstoken", "x_norm_regtokens", "x_storage_tokens",
                                                   "x_norm_patchtokens", "x_prenorm", "masks"}
        masks = torch.ones(2, 168, dtype=torch.bool)  # every patch masked: the image no longer matters
        masked = model.forward_features([x, torch.randn(2, 3, 224, 192)], [masks, masks])
    assert torch.allclose(masked[0]["x_norm_patchtokens"], masked[1]["x_norm_patchtokens"], atol=1e-6)
    assert sorted(model.state_dict())[:4] == ["blocks.0.attn.proj.bias", "blocks.0.attn.proj.weight",
                                             "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.bias_mask"]


def test_masked_key_bias_never_acts():
    model = build_dinov3("dinov3_vits16", depth=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_features(x)["x_norm_patchtokens"]
        model.blocks[0].attn.qkv.bias[384:768] = 5.0  # the key third
        assert torch.equal(model.forward_features(x)["x_norm_patchtokens"], before)
        model.blocks[0].attn.qkv.bias[:384] = 5.0  # the query third does act
        assert not torch.allclose(model.forward_features(x)["x_norm_patchtokens"], before)


def test_untied_norms():
    model = build_dinov3("dinov3_vits16", depth=1, untie_cls_and_patch_norms=True,
                         untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        model.cls_norm.weight.fill_(2.0)
        model.local_cls_norm.weight.fill_(3.0)
        crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
        model.eval()
        out = model.forward_features(crops)
        ref = torch.nn.functional.layer_norm(out[1]["x_prenorm"][:, 0], (384,), eps=1e-5)
        assert torch.allclose(out[1]["x_norm_clstoken"], 2 * ref, atol=1e-5)  # eval: cls_norm for every crop
        model.train()
        out = model.forward_features(crops)
        ref = torch.nn.functional.layer_norm(out[1]["x_prenorm"][:, 0], (384,), eps=1e-5)
        assert torch.allclose(out[1]["x_norm_clstoken"], 3 * ref, atol=1e-5)  # training: entry 1 = local crops
        patches = torch.nn.functional.layer_norm(out[0]["x_prenorm"][:, 5:], (384,), eps=1e-5)
        assert torch.allclose(out[0]["x_norm_patchtokens"], patches, atol=1e-5)  # `norm` for the patches


def test_presets_have_the_official_sizes():
    """Widths / FFN widths / head counts of the official table (dinov3/hub/backbones.py), on the meta device."""
    expected = {"dinov3_vits16": (384, 12, 6, 1536), "dinov3_vits16plus": (384, 12, 6, 1536),
                "dinov3_vitb16": (768, 12, 12, 3072), "dinov3_vitl16": (1024, 24, 16, 4096),
                "dinov3_vitl16plus": (1024, 24, 16, 4096), "dinov3_vith16plus": (1280, 32, 20, 5120),
                "dinov3_vit7b16": (4096, 40, 32, 8192)}
    for name, (dim, depth, heads, hidden) in expected.items():
        with torch.device("meta"):
            model = build_preset(name)
        assert (model.embed_dim, len(model.blocks), model.num_heads, model.spec.ffn_hidden) == (dim, depth, heads, hidden)
        fc = model.blocks[0].mlp.w1 if hasattr(model.blocks[0].mlp, "w1") else model.blocks[0].mlp.fc1
        assert fc.out_features == hidden and model.blocks[0].norm1.eps == 1e-5
        assert (model.blocks[0].attn.qkv.bias is None) == (name == "dinov3_vit7b16")
        assert (model.local_cls_norm is not None) == (name == "dinov3_vit7b16")


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown DINOv3 backbone argument"):
        build_dinov3("dinov3_vits16", num_register_tokens=4)
    with pytest.raises(ValueError, match="unknown model"):
        build_preset("dinov3_vitz16")
    model = build_dinov3("dinov3_vits16", depth=1)
    with pytest.raises(ValueError, match="masks have 4 entries"):
        model.forward_features(torch.randn(1, 3, 64, 64), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=[3])
