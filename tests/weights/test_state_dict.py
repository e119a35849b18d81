"""Inferring architectures from weights, and refusing files that are not (the right) ViT weights."""

from pathlib import Path

import pytest
import torch

from dinotrain.models import PRESETS, DinoVisionTransformer, build_preset
from dinotrain.weights.convert import load_backbone
from dinotrain.weights.state_dict import (
    WeightsError,
    check_compatible,
    infer_spec,
    load_backbone_weights,
    read_state_dict,
    strip_to_backbone,
)


def small_vit(**kwargs) -> DinoVisionTransformer:
    """Width 128 = two 64-dim heads, the head size `infer_spec` assumes."""
    args = dict(img_size=56, patch_size=14, embed_dim=128, depth=2, num_heads=2)
    args.update(kwargs)
    return DinoVisionTransformer(**args).eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_infer_spec_recovers_every_preset(name):
    with torch.device("meta"):  # infer_spec reads shapes only
        model = build_preset(name)
    assert infer_spec(model.state_dict()) == model.spec


def test_infer_spec_small_variants():
    for kwargs in (dict(ffn_layer="swiglufused"), dict(mlp_ratio=2.0), dict(init_values=None, use_mask_token=False),
                   dict(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True)):
        model = small_vit(**kwargs)
        assert infer_spec(model.state_dict()) == model.spec, kwargs


def test_strip_to_backbone_handles_wrappers_and_block_chunks():
    sd = small_vit(depth=4).state_dict()
    chunked = {}
    for k, v in sd.items():  # official `block_chunks=2` layout: blocks.<chunk>.<global index>.
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{int(i) // 2}.{i}.{rest}"
        chunked["teacher.backbone." + k] = v
    chunked["teacher.dino_head.mlp.0.weight"] = torch.zeros(2, 2)
    chunked["student.backbone.cls_token"] = torch.zeros(1)  # other model in the same checkpoint
    stripped = strip_to_backbone(chunked)
    assert stripped.keys() == sd.keys()
    assert all(torch.equal(stripped[k], sd[k]) for k in sd)
    ddp = strip_to_backbone({"module." + k: v for k, v in sd.items()})
    assert ddp.keys() == sd.keys()


def test_read_state_dict_unwraps_training_checkpoints(tmp_path):
    sd = small_vit().state_dict()
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}, "iteration": 3}, tmp_path / "ckpt.pth")
    model = load_backbone(tmp_path / "ckpt.pth")
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_wrong_architecture_names_the_mismatch():
    model = small_vit(depth=2)
    other = small_vit(depth=3, num_register_tokens=4).state_dict()
    with pytest.raises(WeightsError, match=r"depth: model has 2, weights have 3.*num_register_tokens"):
        load_backbone_weights(model, other)
    with pytest.raises(WeightsError, match="patch_size"):
        check_compatible(model.spec, small_vit(patch_size=8, img_size=32).spec)


def test_non_vit_state_dict_is_refused(tmp_path):
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(WeightsError, match="not a ViT backbone state dict.*weight"):
        load_backbone(tmp_path / "linear.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_random_bytes_are_refused(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightsError, match="garbage"):
        read_state_dict(path)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "code_ran"
    torch.save({"cls_token": torch.zeros(1), "evil": payload}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pth")
    assert not payload.marker.exists()


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


def test_non_square_position_table_is_refused():
    sd = small_vit().state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, :-1]
    with pytest.raises(WeightsError, match="square"):
        infer_spec(sd)
