"""The full export (backbone + DINO/iBOT heads + config) round-trips bitwise, is recognised cheaply, and
`dinotrain export --to full` / `--which` pick the right model from training and distillation checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.utils.parametrizations import weight_norm

from dinotrain.cli import main
from dinotrain.models.heads import DINOHead, head_from_state_dict, head_settings
from dinotrain.models.vision_transformer import build_vit
from dinotrain.weights.convert import save_backbone
from dinotrain.weights.resolve import read_weights
from dinotrain.weights.full import FULL_FORMAT, FullExport, backbone_of_full, is_full_export, read_full, write_full
from dinotrain.weights.state_dict import WeightsError
from trainruns import FAST

HEAD_CONFIGS = [
    dict(in_dim=16, out_dim=40, nlayers=1, bottleneck_dim=8),
    dict(in_dim=16, out_dim=40, nlayers=2, hidden_dim=24, bottleneck_dim=8),
    dict(in_dim=12, out_dim=33, nlayers=3, hidden_dim=20, bottleneck_dim=6, mlp_bias=False),
    dict(in_dim=8, out_dim=64, nlayers=4, hidden_dim=16, bottleneck_dim=10),
]


def _randomised(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- heads from their weights -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", HEAD_CONFIGS, ids=lambda k: f"nlayers{k['nlayers']}")
def test_head_settings_round_trip(kwargs):
    head = _randomised(DINOHead(**kwargs))
    settings = head_settings(head.state_dict())
    expected = {"hidden_dim": 2048, "mlp_bias": True, **kwargs}
    assert settings == expected
    rebuilt = head_from_state_dict(head.state_dict())
    assert_identical(rebuilt.state_dict(), head.state_dict())
    x = torch.randn(5, kwargs["in_dim"])
    assert torch.equal(rebuilt(x), head(x))


def test_head_settings_accept_the_older_prototype_layouts():
    head = _randomised(DINOHead(16, 40, nlayers=2, hidden_dim=24, bottleneck_dim=8))
    state = head.state_dict()
    # torch's parametrized weight norm: original0 = g, original1 = v
    param = {k: v for k, v in state.items() if not k.startswith("last_layer.")}
    param["last_layer.parametrizations.weight.original0"] = state["last_layer.weight_g"]
    param["last_layer.parametrizations.weight.original1"] = state["last_layer.weight_v"]
    official = weight_norm(torch.nn.Linear(8, 40, bias=False))
    assert {f"last_layer.{k}" for k in official.state_dict()} == {k for k in param if k.startswith("last_layer.")}
    x = torch.randn(3, 16)
    assert head_settings(param)["out_dim"] == 40
    assert torch.equal(head_from_state_dict(param)(x), head(x))
    # the former single `weight` (gain 1)
    old = {k: v for k, v in state.items() if not k.startswith("last_layer.")}
    old["last_layer.weight"] = state["last_layer.weight_v"]
    assert head_settings(old) == head_settings(state)
    assert torch.equal(head_from_state_dict(old).last_layer.weight_g, torch.ones(40, 1))


@pytest.mark.parametrize("state, words", [
    ({}, "empty"),
    ({"a": torch.zeros(2)}, "no prototype layer"),
    ({"last_layer.weight_v": torch.zeros(4, 3), "last_layer.weight_g": torch.zeros(4, 1)}, "no MLP"),
    ({"last_layer.weight_v": torch.zeros(4, 3)}, "weight_g"),
    ({"mlp.weight": torch.zeros(3, 5), "last_layer.weight_v": torch.zeros(4, 3),
      "last_layer.weight_g": torch.zeros(4, 1), "extra": torch.zeros(1)}, "extra"),
    ({"mlp.weight": torch.zeros(7, 5), "last_layer.weight_v": torch.zeros(4, 3),
      "last_layer.weight_g": torch.zeros(4, 1)}, "mlp.weight"),
    ({"mlp.weight": "not a tensor"}, "not tensors"),
])
def test_head_settings_refuse_other_dicts(state, words):
    with pytest.raises(WeightsError, match="my_head") as info:
        head_settings(state, what="my_head")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_batchnorm_heads_are_unsupported():
    with pytest.raises(WeightsError, match="dino_head.*BatchNorm.*not supported"):
        head_settings(DINOHead(16, 40, use_bn=True, nlayers=2, hidden_dim=8).state_dict(), what="dino_head")


# ---- the file -----------------------------------------------------------------------------------
def _export(ibot=True) -> FullExport:
    torch.manual_seed(0)
    backbone = _randomised(build_vit("vit_tiny", patch_size=8, img_size=32, depth=2))
    spec = dataclasses.replace(backbone.spec, interpolate_offset=0.0, interpolate_antialias=True)
    heads = {"dino_head": _randomised(DINOHead(192, 50, hidden_dim=32, bottleneck_dim=16)).state_dict()}
    if ibot:
        heads["ibot_head"] = _randomised(DINOHead(192, 30, nlayers=2, hidden_dim=24, bottleneck_dim=8)).state_dict()
    config = {"student": {"arch": "vit_tiny", "patch_size": 8}, "dino": {"head_n_prototypes": 50}}
    return FullExport(backbone.state_dict(), spec, heads, config)


@pytest.mark.parametrize("ibot", [True, False])
def test_write_read_round_trip_is_bitwise(tmp_path, ibot):
    export = _export(ibot)
    out = write_full(tmp_path / "sub" / "full.safetensors", export)
    assert out == tmp_path / "sub" / "full.safetensors" and [p.name for p in out.parent.iterdir()] == [out.name]
    back = read_full(out)
    assert_identical(back.backbone, export.backbone)
    assert back.heads.keys() == export.heads.keys()
    for name in export.heads:
        assert_identical(back.heads[name], export.heads[name])
    assert back.spec == export.spec and back.config == export.config
    assert is_full_export(out)
    # the backbone alone, as read_weights and backbone_of_full give it, with the recorded spec
    for state, spec in (backbone_of_full(out), read_weights(out)):
        assert_identical(state, export.backbone)
        assert spec == export.spec


def test_a_dinov3_backbone_round_trips_with_its_spec(tmp_path):
    """A DINOv3 run's full export (or the head warm-up of DINOv3 weights) reads back as a DINOv3 backbone with the
    recorded spec, norm and RoPE settings included (it was read as a DINOv2 one and refused)."""
    from dinotrain.models.dinov3 import build_dinov3

    torch.manual_seed(0)
    backbone = _randomised(build_dinov3("dinov3_vits16", embed_dim=64, num_heads=1, depth=2, norm_layer="layernorm",
                                        pos_embed_rope_dtype="bf16"))
    heads = {"dino_head": _randomised(DINOHead(64, 50, hidden_dim=32, bottleneck_dim=16)).state_dict()}
    export = FullExport(backbone.state_dict(), backbone.spec, heads, {})
    back = read_full(write_full(tmp_path / "full.safetensors", export))
    assert_identical(back.backbone, export.backbone)
    assert back.spec == backbone.spec  # layernorm (eps 1e-6) and bf16 tables: not what the tensors imply
    for state, spec in (backbone_of_full(tmp_path / "full.safetensors"), read_weights(tmp_path / "full.safetensors")):
        assert_identical(state, export.backbone)
        assert spec == backbone.spec


def test_is_full_export_only_for_full_exports(tmp_path):
    model = build_vit("vit_tiny", patch_size=8, img_size=32, depth=2)
    hub = save_backbone(model, tmp_path / "b.pth", "hub")
    plain = save_backbone(model, tmp_path / "b.safetensors", "safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for path in (hub, plain, tmp_path / "junk.safetensors", tmp_path / "missing.safetensors", tmp_path):
        assert not is_full_export(path), path
    # no metadata, but DINO head tensors: still recognised
    head = DINOHead(192, 10, nlayers=1, bottleneck_dim=4).state_dict()
    save_file({**{f"backbone.{k}": v for k, v in model.state_dict().items()},
               **{f"dino_head.{k}": v for k, v in head.items()}}, str(tmp_path / "bare.safetensors"))
    assert is_full_export(tmp_path / "bare.safetensors")
    assert read_full(tmp_path / "bare.safetensors").config == {}


def test_read_full_errors(tmp_path):
    export = _export()
    with pytest.raises(FileNotFoundError, match="missing"):
        read_full(tmp_path / "missing.safetensors")
    cases = {
        "nohead": ({f"backbone.{k}": v for k, v in export.backbone.items()}, "no `dino_head"),
        "nobackbone": ({f"dino_head.{k}": v for k, v in export.heads["dino_head"].items()}, "no `backbone"),
        "notvit": ({"backbone.x": torch.zeros(2), **{f"dino_head.{k}": v for k, v in export.heads["dino_head"].items()}},
                   "not a ViT"),
    }
    for name, (tensors, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"format": FULL_FORMAT})
        with pytest.raises(WeightsError) as info:
            read_full(path)
        assert words in str(info.value) and path.name in str(info.value) and "\n" not in str(info.value), name


def test_write_full_refuses_bad_input(tmp_path):
    export = _export()
    with pytest.raises(ValueError, match=r"\.safetensors"):
        write_full(tmp_path / "full.pth", export)
    with pytest.raises(WeightsError, match="dino_head"):
        write_full(tmp_path / "a.safetensors", dataclasses.replace(export, heads={"ibot_head": export.heads["ibot_head"]}))
    small = DINOHead(64, 10, nlayers=1, bottleneck_dim=4).state_dict()  # the backbone is 192 wide
    with pytest.raises(WeightsError, match="64-dim"):
        write_full(tmp_path / "b.safetensors", dataclasses.replace(export, heads={"dino_head": small}))
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


# ---- dinotrain export --to full / --which ---------------------------------------------------------
def _checkpoint(run_dir, overrides=(), seed=0, iteration=3, shift=0.5):
    """A Checkpointer checkpoint of a tiny SSL meta-arch (teacher = student + shift); returns (model, cfg, dir)."""
    from omegaconf import OmegaConf

    from dinotrain.config import load_config
    from dinotrain.distributed.checkpoint import Checkpointer
    from dinotrain.train.ssl import SSLMetaArch

    cfg = load_config("smoke/cpu_tiny", [*FAST, "student.depth=2", *overrides])
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(shift)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # one process, no group
        ckpt = Checkpointer(run_dir).save_parts(iteration, {"": (model, None)}, {"config": OmegaConf.to_container(cfg)})
    return model, OmegaConf.to_container(cfg), ckpt


def _module_state(module):
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    model, cfg, _ = _checkpoint(run, ["ibot.separate_head=true", "student.interpolate_offset=0.0"])
    return run, model, cfg


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """checkpoints/<it>/extra.json + students/<name>/ (each a training-layout checkpoint)."""
    root = tmp_path_factory.mktemp("distill")
    ckpt = root / "run" / "checkpoints" / "00000005"
    (ckpt / "students").mkdir(parents=True)
    models, configs = {}, {}
    for seed, name in enumerate(("s1", "s2")):
        models[name], configs[name], part = _checkpoint(root / f"scratch_{name}", [f"train.seed={seed}"], seed=seed)
        shutil.move(str(part), str(ckpt / "students" / name))
    (ckpt / "extra.json").write_text(json.dumps({
        "iteration": 5, "config": {"run": "distill"}, "teacher": {"source": "runs/big/teacher_full.safetensors"},
        "students": {name: {"config": configs[name]} for name in models}}))
    return root / "run", models, configs


def _user_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinotrain export: error:"), lines
    return lines[0]


def test_export_full_from_a_training_run(tmp_path, training_run, capsys):
    run, model, cfg = training_run
    out = tmp_path / "full.safetensors"
    assert main(["export", str(run), str(out), "--to", "full"]) == 0
    assert "teacher backbone + dino_head + ibot_head" in capsys.readouterr().out
    export = read_full(out)
    assert_identical(export.backbone, _module_state(model.teacher.backbone))
    assert_identical(export.heads["dino_head"], _module_state(model.teacher.dino_head))
    assert_identical(export.heads["ibot_head"], _module_state(model.teacher.ibot_head))
    assert export.config == cfg and export.spec.interpolate_offset == 0.0 and export.spec.depth == 2

    assert main(["export", str(run), str(out), "--to", "full", "--which", "student"]) == 2  # exists: refused
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--to", "full", "--which", "student", "--force"]) == 0
    export = read_full(out)
    assert_identical(export.backbone, _module_state(model.student.backbone))
    assert_identical(export.heads["dino_head"], _module_state(model.student.dino_head))

    hub = tmp_path / "student.pth"  # --which works for the backbone formats too
    assert main(["export", str(run), str(hub), "--to", "hub", "--which", "student"]) == 0
    assert_identical(torch.load(hub, weights_only=True), _module_state(model.student.backbone))
    line = _user_error(capsys, ["export", str(run), str(tmp_path / "s1.pth"), "--to", "hub", "--which", "s1"])
    assert "'teacher'" in line and "'student'" in line
    line = _user_error(capsys, ["export", str(run), str(tmp_path / "f.pth"), "--to", "full"])
    assert ".safetensors" in line


def test_export_shared_ibot_head_writes_only_the_dino_head(tmp_path):
    _, _, ckpt = _checkpoint(tmp_path / "run")  # smoke config: iBOT shares the DINO head
    out = tmp_path / "full.safetensors"
    assert main(["export", str(ckpt), str(out), "--to", "full"]) == 0
    assert set(read_full(out).heads) == {"dino_head"}


def test_export_a_distillation_student(tmp_path, distill_run, capsys):
    run, models, configs = distill_run
    for name in ("s1", "s2"):
        out = tmp_path / f"{name}.safetensors"
        assert main(["export", str(run), str(out), "--to", "full", "--which", name]) == 0
        export = read_full(out)  # the student's EMA = `model.teacher.*` of its part
        assert_identical(export.backbone, _module_state(models[name].teacher.backbone))
        assert_identical(export.heads["dino_head"], _module_state(models[name].teacher.dino_head))
        assert export.config == configs[name]
    assert not torch.equal(read_full(tmp_path / "s1.safetensors").backbone["cls_token"],
                           read_full(tmp_path / "s2.safetensors").backbone["cls_token"])
    hub = tmp_path / "s2.pth"
    assert main(["export", str(run), str(hub), "--to", "hub", "--which", "s2"]) == 0
    assert_identical(torch.load(hub, weights_only=True), _module_state(models["s2"].teacher.backbone))


def test_export_distillation_which_errors(tmp_path, distill_run, capsys):
    run, _, _ = distill_run
    dst = str(tmp_path / "x.safetensors")
    line = _user_error(capsys, ["export", str(run), dst, "--to", "full"])
    assert "s1, s2" in line and "--which" in line
    line = _user_error(capsys, ["export", str(run), dst, "--to", "full", "--which", "nope"])
    assert "'nope'" in line and "s1, s2" in line
    line = _user_error(capsys, ["export", str(run), dst, "--to", "full", "--which", "teacher"])
    assert "frozen teacher" in line and "runs/big/teacher_full.safetensors" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_export_the_only_student_by_default(tmp_path, distill_run):
    run, models, _ = distill_run
    ckpt = tmp_path / "run" / "checkpoints" / "00000005"
    shutil.copytree(run / "checkpoints" / "00000005", ckpt)
    shutil.rmtree(ckpt / "students" / "s2")
    out = tmp_path / "only.safetensors"
    assert main(["export", str(ckpt), str(out), "--to", "full"]) == 0
    assert_identical(read_full(out).backbone, _module_state(models["s1"].teacher.backbone))
