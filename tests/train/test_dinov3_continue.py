"""Continuing from released DINOv3 weights, and distilling from a DINOv3 teacher (issue 26, deliverable 5).

Backbone-only DINOv3 weights in the three layouts users have — a transformers `DINOv3ViTModel` directory written by
transformers itself, timm's dinov3 `Eva` weights written by timm, an official-layout `.pth` — start a short
`smoke/dinov3_cpu_tiny` run through the head warm-up: before the first update, student and teacher backbones are the
given weights bitwise (in our layout) and compute what transformers / timm compute; the heads are the warm-up's.
A backbone-only DINOv3 teacher gets warm-up heads in `dinotrain distill`, stays frozen, teaches a DINOv3 or a DINOv2
student of its patch size, and a resume does not redo the warm-up. Runs in this process (a few seconds each), shared
between the checks through module-scoped fixtures.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from dinotrain.cli import main
from dinotrain.config import load_config
from dinotrain.distributed.checkpoint import full_state_dict
from dinotrain.distributed.env import destroy_distributed
from dinotrain.models.dinov3 import Dinov3Spec, build_dinov3
from dinotrain.train.rundir import RunDir
from dinotrain.train.run import TrainingRun
from dinotrain.weights.full import read_full
from dinotrain.weights.resolve import open_weights
from trainruns import max_abs_diff

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("transformers >= 4.56 has DINOv3ViTModel", allow_module_level=True)

# smoke/dinov3_cpu_tiny (a DINOv3 ViT-Tiny/16 as every released DINOv3: 4 storage tokens, masked key bias, eps 1e-5)
# at depth 2, 64/32-px crops, batch 4, tiny heads, 4 iterations (lr 0 at the first: the warmup starts at 0)
FAST = ["student.depth=2", "train.batch_size_per_gpu=4", "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=2",
        "optim.epochs=2", "optim.warmup_epochs=1", "train.log_every=1", "crops.local_crops_number=2",
        "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=64", "checkpoint.period_iterations=2", "gram.use_loss=false"]
WARMUP = 3
# the DINOv3 student of smoke/distill_cpu_tiny (whose student is a DINOv2 ViT-Tiny/8)
DINOV3_STUDENT = ["student.pos_embed_type=rope", "student.patch_size=16", "student.n_storage_tokens=4",
                  "student.mask_k_bias=true", "student.norm_layer=layernormbf16",
                  "student.pos_embed_rope_rescale_coords=2", "student.pos_embed_rope_dtype=fp32"]
DISTILL = [*FAST, "student.patch_size=16", "crops.global_crops_size=64", "crops.local_crops_size=32"]
WIDTH, HEADS, DEPTH = 192, 3, 2  # vit_tiny at depth 2


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Backbone-only DINOv3 weights, one random network per layout, written by the library whose layout it is;
    LayerScale 1 (not the official init's 1e-5) so that the blocks count in the feature checks."""
    d = tmp_path_factory.mktemp("v3weights")
    torch.manual_seed(1)
    config = transformers.DINOv3ViTConfig(hidden_size=WIDTH, num_attention_heads=HEADS, num_hidden_layers=DEPTH,
                                          intermediate_size=4 * WIDTH, num_register_tokens=4, layerscale_value=1.0)
    hf = transformers.DINOv3ViTModel(config).eval()
    hf.save_pretrained(d / "hf")
    torch.manual_seed(2)
    eva = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, embed_dim=WIDTH, num_heads=HEADS,
                            depth=DEPTH, init_values=1.0).eval()
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(d / "timm.safetensors"))
    torch.manual_seed(3)
    ours = build_dinov3("dinov3_vits16", embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH, layerscale_init=1.0).eval()
    torch.save(ours.state_dict(), d / "official.pth")
    references = {"hf": lambda x: hf(pixel_values=x).last_hidden_state[:, 0],
                  "timm": lambda x: eva.forward_features(x)[:, 0],
                  "pth": lambda x: ours.forward_features(x)["x_norm_clstoken"]}
    paths = {"hf": d / "hf", "timm": d / "timm.safetensors", "pth": d / "official.pth"}
    return paths, references


def _build(config, overrides, run_dir, command="train", resume=True) -> TrainingRun:
    return TrainingRun(load_config(config, overrides), run_dir, command=command, resume=resume)


def _finish(run: TrainingRun) -> dict:
    try:
        return run.run()
    finally:
        destroy_distributed()


def _backbone_state(module) -> dict:
    return full_state_dict(module)


@pytest.fixture(scope="module")
def continued(sources, tmp_path_factory):
    """Per layout: a 4-iteration continued pretraining through a 3-iteration head warm-up; what the networks held
    when built (iteration 0, before any update) and the run directory."""
    paths, _ = sources
    out = {}
    for name, path in paths.items():
        run_dir = tmp_path_factory.mktemp(f"continue_{name}") / "run"
        run = _build("smoke/dinov3_cpu_tiny", [*FAST, f"student.pretrained_weights={path}",
                                               f"train.head_warmup_iterations={WARMUP}"], run_dir)
        model = run.objective.learners[0].model
        at_start = {net: {part: copy.deepcopy(_backbone_state(getattr(model, net)[part]))
                          for part in getattr(model, net)} for net in ("student", "teacher")}
        teacher_backbone = copy.deepcopy(model.teacher["backbone"]).eval()
        _finish(run)
        out[name] = (run_dir, at_start, teacher_backbone)
    return out


@pytest.mark.parametrize("layout", ["hf", "timm", "pth"])
def test_student_and_teacher_start_as_the_given_weights(sources, continued, layout):
    paths, references = sources
    _, at_start, teacher_backbone = continued[layout]
    given = open_weights(paths[layout])
    assert isinstance(given.spec, Dinov3Spec) and given.kind == {"hf": "hf", "timm": "timm", "pth": "hub"}[layout]
    for net in ("student", "teacher"):
        assert max_abs_diff(at_start[net]["backbone"], given.backbone) == 0.0, f"{net} backbone is not the weights"
    # and computes what the library that wrote them computes (an independent reference for the conversion)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours = teacher_backbone.forward_features(x)["x_norm_clstoken"]
        theirs = references[layout](x)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("layout", ["hf", "timm", "pth"])
def test_the_heads_come_from_the_warm_up_on_the_frozen_weights(sources, continued, layout):
    paths, _ = sources
    run_dir, at_start, _ = continued[layout]
    run = RunDir(run_dir)
    warm = [json.loads(line) for line in run.warmup_metrics.read_text().splitlines()]
    assert [r["iteration"] for r in warm] == list(range(1, WARMUP + 1))
    full = read_full(run.warmup_full)
    recorded = full.config["head_warmup"]
    assert recorded["iterations"] == WARMUP and recorded["source"] == str(paths[layout])
    assert max_abs_diff(full.backbone, open_weights(paths[layout]).backbone) == 0.0, "the warm-up moved the backbone"
    assert set(full.heads) == {"dino_head"}  # ibot.separate_head false: one shared head
    for net in ("student", "teacher"):
        assert max_abs_diff(at_start[net]["dino_head"], full.heads["dino_head"]) == 0.0, f"{net} head"
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert run.teacher_backbone.is_file()


def test_a_resumed_continuation_does_not_redo_the_warm_up(sources, continued):
    run_dir, _, _ = continued["hf"]
    warm = RunDir(run_dir).warmup_full
    stamp, lines = warm.stat().st_mtime_ns, RunDir(run_dir).warmup_metrics.read_text()
    _finish(_build("smoke/dinov3_cpu_tiny", [*FAST, f"student.pretrained_weights={sources[0]['hf']}",
                                             f"train.head_warmup_iterations={WARMUP}", "optim.epochs=3"], run_dir))
    assert warm.stat().st_mtime_ns == stamp and RunDir(run_dir).warmup_metrics.read_text() == lines
    records = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]


def _error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_config_the_weights_do_not_fit_is_one_line_naming_both(sources, tmp_path, capsys):
    path = sources[0]["pth"]
    err = _error(capsys, ["train", "--config", "smoke/dinov3_cpu_tiny", "--output-dir", str(tmp_path / "r"), *FAST,
                          f"student.pretrained_weights={path}", f"train.head_warmup_iterations={WARMUP}",
                          "student.depth=3", "student.n_storage_tokens=0"])
    assert str(path) in err
    assert "depth: model has 3, weights of student.pretrained_weights have 2" in err
    assert "n_storage_tokens: model has 0, weights of student.pretrained_weights have 4" in err
    assert err.endswith("to continue from these weights set student.depth=2 student.n_storage_tokens=4")
    assert not RunDir(tmp_path / "r").warmup_metrics.exists(), "refused before the warm-up"


def test_dinov3_weights_in_a_dinov2_config_is_one_line_naming_both_families(sources, tmp_path, capsys):
    err = _error(capsys, ["train", "--config", "smoke/cpu_tiny", "--output-dir", str(tmp_path / "r"),
                          f"student.pretrained_weights={sources[0]['hf']}", "train.head_warmup_iterations=3"])
    assert "DINOv3" in err and "DINOv2" in err


def test_a_norm_the_weights_do_not_have_is_warned(sources, tmp_path, capsys):
    """transformers' config.json says LayerNorm eps 1e-5 (`layernormbf16`); a config with `layernorm` (1e-6) runs
    with its own, and says so; RoPE periods of another base than the config's are loaded from the weights, said too."""
    run = _build("smoke/dinov3_cpu_tiny", [*FAST, f"student.pretrained_weights={sources[0]['hf']}",
                                           "student.norm_layer=layernorm", "student.pos_embed_rope_base=50",
                                           "train.head_warmup_iterations=0"],
                 tmp_path / "r")
    destroy_distributed()
    logged = capsys.readouterr().out  # (the run's log handler writes to stdout)
    assert "have norm_layer layernormbf16" in logged and "student.norm_layer is layernorm" in logged
    assert "RoPE periods of the weights of student.pretrained_weights ([1.0, 74.989])" in logged
    student = run.objective.learners[0].model.student["backbone"]
    assert student.spec.norm_layer == "layernorm"
    assert torch.equal(student.rope_embed.periods, open_weights(sources[0]["hf"]).backbone["rope_embed.periods"])


# ---- distillation from a DINOv3 teacher ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled(sources, tmp_path_factory):
    """A DINOv3 student distilled for 2 iterations from the backbone-only transformers directory (heads from a
    3-iteration warm-up), then resumed to 4; the frozen teacher's state after each part."""
    teacher = sources[0]["hf"]
    run_dir = tmp_path_factory.mktemp("distill_v3") / "run"
    overrides = [*DISTILL, *DINOV3_STUDENT, f"distillation.teacher={teacher}", f"train.head_warmup_iterations={WARMUP}"]
    first = _build("smoke/distill_cpu_tiny", [*overrides, "train.max_iterations=2"], run_dir, command="distill")
    calls = []
    first.objective.teacher.nets["backbone"].register_forward_hook(lambda *_: calls.append(1))
    _finish(first)
    after_first = {name: _backbone_state(net) for name, net in first.objective.teacher.nets.items()}
    requires_grad = any(p.requires_grad for p in first.objective.teacher.parameters())
    stamp = RunDir(run_dir).warmup_full.stat().st_mtime_ns
    second = _build("smoke/distill_cpu_tiny", overrides, run_dir, command="distill")
    _finish(second)
    return run_dir, after_first, requires_grad, calls, stamp, second


def test_a_dinov3_teacher_is_frozen_with_its_warm_up_heads(sources, distilled):
    run_dir, after_first, requires_grad, calls, _, _ = distilled
    given = open_weights(sources[0]["hf"])
    warm = read_full(RunDir(run_dir).warmup_full)
    assert isinstance(warm.spec, Dinov3Spec) and warm.config["head_warmup"]["iterations"] == WARMUP
    assert not requires_grad and len(calls) == 2, "frozen, one forward per step"
    assert max_abs_diff(after_first["backbone"], given.backbone) == 0.0, "the teacher backbone changed"
    assert max_abs_diff(after_first["dino_head"], warm.heads["dino_head"]) == 0.0, "not the warm-up's head"
    student = open_weights(RunDir(run_dir).student("student"))
    assert isinstance(student.spec, Dinov3Spec) and student.spec.depth == 2


def test_a_resumed_distillation_does_not_redo_the_warm_up(distilled):
    run_dir, _, _, _, stamp, second = distilled
    assert second.start_iter == 2
    assert RunDir(run_dir).warmup_full.stat().st_mtime_ns == stamp, "the warm-up must be reused on resume"
    assert len(RunDir(run_dir).warmup_metrics.read_text().splitlines()) == WARMUP
    extra = json.loads((RunDir(run_dir).checkpoint(4) / "extra.json").read_text())
    assert extra["teacher"]["kind"] == "backbone+warm-up" and extra["teacher"]["spec"]["n_storage_tokens"] == 4
    records = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]


def test_a_dinov2_student_of_the_patch_size_learns_from_a_dinov3_teacher(sources, tmp_path):
    """From the official-layout .pth: the DINOv2 student (learned position table) sees the same 16-px patches."""
    run = _build("smoke/distill_cpu_tiny", [*DISTILL, f"distillation.teacher={sources[0]['pth']}",
                                            f"train.head_warmup_iterations={WARMUP}", "train.max_iterations=2"],
                 tmp_path / "d", command="distill")
    last = _finish(run)
    assert torch.isfinite(torch.tensor(last["student/total_loss"]))
    student = open_weights(RunDir(tmp_path / "d").student("student"))
    assert not isinstance(student.spec, Dinov3Spec) and student.spec.patch_size == 16


def test_a_student_of_another_patch_size_is_one_line(sources, tmp_path, capsys):
    err = _error(capsys, ["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(tmp_path / "d"),
                          *FAST, "student.patch_size=8", f"distillation.teacher={sources[0]['hf']}",
                          f"train.head_warmup_iterations={WARMUP}"])
    assert "student.patch_size=8" in err and "patch size 16" in err


@pytest.mark.parametrize("preset, config, hint", [
    ("dinov3_vitl16", "train/dinov3_vitl16",  # the official ImageNet-1k recipe trains without storage tokens
     "student.norm_layer=layernormbf16 student.mask_k_bias=true student.n_storage_tokens=4"),
    ("dinov3_vits16plus", "smoke/dinov3_cpu_tiny", "student.arch=vit_small student.depth=12 student.ffn_layer=swiglu "
                                                   "student.ffn_ratio=6.0"),
    ("dinov3_vit7b16", "train/dinov3_vit7b16", ""),
])
def test_the_error_says_which_student_keys_fit_a_released_model(preset, config, hint):
    """What a user continuing from a released model (built on the meta device: shapes only) is told to set."""
    from dinotrain.train.fit_backbone import fitting_student_keys
    from dinotrain.train.ssl import build_backbone

    cfg = load_config(config, ["train.dataset_path=tiny"])
    with torch.device("meta"):
        released, ours = build_dinov3(preset).spec, build_backbone(cfg, for_teacher=False).spec
    assert fitting_student_keys(released, ours) == hint.split()
