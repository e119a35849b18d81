"""The config schema (dinotrain/config_schema.py) and configs/default.yaml agree, and every declared
type, choice and range is enforced with a one-line error naming the key."""

import re
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dinotrain import config as config_module
from dinotrain import config_schema as schema
from dinotrain.config import ConfigError, configs_dir, load_config

LEAVES = schema.leaves()


def _yaml_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a YAML mapping; an empty mapping (`students: {}`) is a key, not a section."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += _yaml_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _schema_keys(section: type = schema.Config, prefix: str = "") -> list[str]:
    out = []
    for name, tp in schema.section_fields(section).items():
        out += _schema_keys(tp, f"{prefix}{name}.") if schema.is_section(tp) else [f"{prefix}{name}"]
    return out


def _defaults() -> dict:
    return yaml.safe_load((configs_dir() / "default.yaml").read_text())


def _default(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_default_yaml_and_schema_hold_the_same_keys_in_the_same_order():
    assert _yaml_keys(_defaults()) == _schema_keys()


def _type_matches(tp, value) -> bool:
    """The YAML default has exactly the declared type (an int default for a float key would let the schema and
    the file disagree about what `1` means, so it is refused here even though the check accepts it)."""
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        return isinstance(value, list) and len(value) == len(items) and all(map(_type_matches, items, value))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_type_matches(typing.get_args(tp)[0], v) for v in value)
    if typing.get_origin(tp) is typing.Union:  # e.g. a crop size: one int, or a list of them
        return any(_type_matches(option, value) for option in typing.get_args(tp))
    return type(value) is tp


@pytest.mark.parametrize("leaf", LEAVES, ids=[leaf.key for leaf in LEAVES])
def test_each_default_has_the_declared_type_and_passes_its_rule(leaf):
    value = _default(_defaults(), leaf.key)
    if value is None:
        assert leaf.optional, f"{leaf.key}: null default for a required key"
    else:
        assert _type_matches(leaf.base, value), f"{leaf.key}: default {value!r} is not a {leaf.base}"
        assert schema.problem(leaf, value, value) is None


def _copy_of_configs(tmp_path: Path, monkeypatch, edit) -> Path:
    copy = tmp_path / "configs"
    shutil.copytree(configs_dir(), copy)
    tree = _defaults()
    edit(tree)
    (copy / "default.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    monkeypatch.setattr(config_module, "configs_dir", lambda: copy)
    return copy


def test_a_new_default_without_a_schema_entry_is_refused(tmp_path, monkeypatch):
    copy = _copy_of_configs(tmp_path, monkeypatch, lambda tree: tree["train"].update(new_knob=1))
    assert "train.new_knob" not in _schema_keys()
    assert _yaml_keys(yaml.safe_load((copy / "default.yaml").read_text())) != _schema_keys()
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.new_knob' \(from configs/default\.yaml\)"):
        load_config()


def test_a_schema_key_without_a_default_is_refused(tmp_path, monkeypatch):
    _copy_of_configs(tmp_path, monkeypatch, lambda tree: tree["optim"].pop("min_lr"))
    with pytest.raises(ConfigError, match=r"default\.yaml has no default for the config keys optim\.min_lr"):
        load_config()


def _one_line_naming(key: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config("smoke/cpu_tiny", overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"config key '{key}' "), message
    return message


CHOICES = [leaf for leaf in LEAVES if typing.get_origin(leaf.base) is typing.Literal]
RANGES = [leaf for leaf in LEAVES if isinstance(leaf.rule, schema.Range)]


@pytest.mark.parametrize("leaf", CHOICES, ids=[leaf.key for leaf in CHOICES])
def test_every_choice_is_enforced(leaf):
    message = _one_line_naming(leaf.key, [f"{leaf.key}=not_a_choice"])
    assert "must be one of " + ", ".join(typing.get_args(leaf.base)) in message
    for choice in typing.get_args(leaf.base):
        family = ["student.pos_embed_type=rope"] if (leaf.key, choice) in DINOV3_ONLY_CHOICES else []
        cfg = load_config("smoke/cpu_tiny", [f"{leaf.key}={choice}", *family])
        assert _default(OmegaConf.to_container(cfg), leaf.key) == choice


def _outside(rule: schema.Range) -> list:
    """Values just outside each bound of a range."""
    out = []
    for bound, step in ((rule.ge, -1), (rule.gt, 0), (rule.le, 1), (rule.lt, 0)):
        if bound is not None:
            out.append(bound + step)
    return out


# choices of the DINOv3 backbone only (schema._backbone_family): valid with student.pos_embed_type=rope
DINOV3_ONLY_CHOICES = {("student.arch", a) for a in ("vit_so400m", "vit_huge2", "vit_7b")} | {
    ("student.ffn_layer", f) for f in ("swiglu32", "swiglu64", "swiglu128")}


@pytest.mark.parametrize("leaf", RANGES, ids=[leaf.key for leaf in RANGES])
def test_every_range_is_enforced(leaf):
    assert _outside(leaf.rule)
    for value in _outside(leaf.rule):
        message = _one_line_naming(leaf.key, [f"{leaf.key}={value}"])
        assert f"; got {value}" in message and (leaf.must or leaf.rule.text) in message


@pytest.mark.parametrize("leaf", LEAVES, ids=[leaf.key for leaf in LEAVES])
def test_every_key_refuses_a_value_of_another_type(leaf):
    wrong = "7" if leaf.base is str else "abc"  # a number where a path or name is expected, else a word
    _one_line_naming(leaf.key, [f"{leaf.key}={wrong}"])


@pytest.mark.parametrize("override,needle", [
    ("crops.blur_kernel_size=4", r"'crops\.blur_kernel_size' must be a positive odd number; got 4"),
    ("crops.local_crops_scale=[0.5,0.2]", r"'crops\.local_crops_scale' must be \[min, max\] with 0 <= min"),
    ("crops.color_jitter=[0.4,0.4,0.2,0.6]", r"'crops\.color_jitter' must be \[brightness, contrast"),
    ("student.drop_path_rate=1.0", r"'student\.drop_path_rate' must be within \[0, 1\); got 1\.0"),
    ("student.layerscale=-1", r"'student\.layerscale' must be >= 0 \(0 disables LayerScale\); got -1"),
    ("train.max_iterations=0", r"'train\.max_iterations' must be > 0 or null; got 0"),
    ("train.max_iterations=abc", r"'train\.max_iterations' expects int or null, got 'abc' \(str\)"),
    ("ibot.mask_ratio_min_max=[null,0.5]", r"'ibot\.mask_ratio_min_max' expects a list of 2 floats"),
    ("student.arch={a: 1}", r"'student\.arch' must be one of vit_tiny"),
])
def test_rules_that_are_not_plain_ranges(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke/cpu_tiny", [override])


def test_rules_over_two_keys():
    with pytest.raises(ConfigError, match=r"'train\.saveckp_freq' is 0 and checkpoint\.period_iterations is null"):
        load_config("smoke/cpu_tiny", ["train.saveckp_freq=0", "checkpoint.period_iterations=null"])
    assert load_config("smoke/cpu_tiny", ["train.saveckp_freq=0"]).train.saveckp_freq == 0  # period set: fine
    with pytest.raises(ConfigError, match=r"'crops\.local_crops_size' = 12 must be a multiple of student\.patch_size"):
        load_config("smoke/cpu_tiny", ["crops.local_crops_size=12"])


@pytest.mark.parametrize("overrides,needle", [
    (["gram.it_load_ema_teacher=300"], r"'gram\.it_load_ema_teacher' = 300 is after the run's last iteration 299"),
    (["gram.it_load_ema_teacher=100", "train.max_iterations=100"], r"= 100 is after the run's last iteration 99"),
    (["gram.it_load_ema_teacher=-1"], r"'gram\.use_loss' is true but the Gram teacher never gets weights"),
    (["gram.remove_neg=true", "gram.remove_only_teacher_neg=true"], r"'gram\.remove_only_teacher_neg' is true with gram\.remove_neg true"),
    (["gram.ema_teacher=true", "gram.ckpt=teacher.pth"], r"'gram\.ckpt' = 'teacher\.pth' is set with gram\.ema_teacher"),
    (["gram.ema_teacher=true"], r"'gram\.rep_update' is true with gram\.ema_teacher true"),
    (["gram.tokens_used=masked", "gram.img_level=true"], r"'gram\.tokens_used' = 'masked' needs gram\.img_level false"),
    (["gram.loss_weight_schedule.start=0.0"], r"sets start but not all of start, peak and end"),
    (["gram.loss_weight_schedule={start: 0, peak: 1, end: 1, warmup_epochs: 10, cosine_epochs: 3}"],
     r"lasts 13 epochs \(warmup_epochs \+ cosine_epochs\), more than optim\.epochs = 12"),
])
def test_gram_rules_over_several_keys(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load_config("smoke/cpu_tiny", ["gram.use_loss=true", "gram.it_load_ema_teacher=10", *overrides])
    assert "\n" not in str(err.value) and str(err.value).startswith("config key 'gram.")


def test_gram_configs_that_are_fine():
    # the last iteration is a valid start; a Gram teacher from weights or the EMA teacher itself needs no start
    for overrides in (["gram.it_load_ema_teacher=299"], ["gram.ckpt=teacher.pth"],
                      ["gram.ema_teacher=true", "gram.rep_update=false"]):
        assert load_config("smoke/cpu_tiny", ["gram.use_loss=true", *overrides]).gram.use_loss
    # with the loss off nothing of it is checked (an anchoring config can be switched off by one key)
    assert not load_config("smoke/cpu_tiny", ["gram.it_load_ema_teacher=5000", "gram.remove_neg=true",
                                              "gram.remove_only_teacher_neg=true"]).gram.use_loss


def test_choices_follow_what_the_code_builds():
    from dinotrain.distributed.fsdp import DTYPES
    from dinotrain.models.layers import FFN_LAYERS
    from dinotrain.models.vision_transformer import ARCH_SIZES

    from dinotrain.models.dinov3 import DINOV3_ARCH_SIZES, ROPE_DTYPES
    from dinotrain.models.dinov3_layers import FFN_ALIGN, NORM_EPS
    from dinotrain.models.rope import NORMALIZE_COORDS

    student = typing.get_type_hints(schema.Student)
    assert set(schema.VIT_ARCHS) == set(ARCH_SIZES) | set(DINOV3_ARCH_SIZES)  # + timm/<name>, torchvision/<name>
    assert set(typing.get_args(student["ffn_layer"])) == set(FFN_LAYERS) | set(FFN_ALIGN)
    assert set(typing.get_args(student["norm_layer"])) == set(NORM_EPS)
    assert set(typing.get_args(student["pos_embed_rope_dtype"])) == set(ROPE_DTYPES)
    assert set(typing.get_args(student["pos_embed_rope_normalize_coords"])) == set(NORMALIZE_COORDS)
    assert set(typing.get_args(typing.get_type_hints(schema.ComputePrecision)["dtype"])) == {"auto", *DTYPES}
    from dinotrain.losses.gram import RESIZE_METHODS, TOKENS_USED

    gram = typing.get_type_hints(schema.Gram)
    assert typing.get_args(gram["tokens_used"]) == TOKENS_USED
    assert set(typing.get_args(gram["global_teacher_resize_method"])) == set(RESIZE_METHODS)


def test_keys_named_elsewhere_exist_in_the_schema():
    from dinotrain.train.resume import ARCH_KEYS, GUARDED_KEYS

    keys = {leaf.key for leaf in LEAVES}
    assert set(ARCH_KEYS) <= keys and set(GUARDED_KEYS) <= keys
    assert config_module.STUDENT_SECTIONS == ("student", "optim", "dino", "ibot")


def test_config_py_keeps_no_key_lists():
    """Keys are declared in the schema only; config.py names the one mapping it treats specially."""
    source = Path(config_module.__file__).read_text()
    quoted = set(re.findall(r"[\"']([A-Za-z_]+\.[A-Za-z_]+)[\"']", source))
    named = quoted & ({leaf.key for leaf in LEAVES} | {"distillation.students"})
    assert named == {"distillation.students"}, named


SHIPPED = sorted(str(p.relative_to(configs_dir()).with_suffix("")) for p in configs_dir().rglob("*.yaml")
                 if p.name != "default.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name, tmp_path):
    # the full-scale recipes leave the dataset (and the distillation recipes the teacher) null on purpose, and a
    # continuation stage (the DINOv3 high-res stage) its first-stage run, which must exist
    first_stage = tmp_path / "teacher.pth"
    first_stage.write_bytes(b"")
    stage = [f"student.resume_from_teacher_chkpt={first_stage}"] if name.endswith("high_res_adapt") else []
    cfg = load_config(name, ["train.dataset_path=/data/train", "distillation.teacher=/runs/teacher", *stage])
    assert cfg.train.dataset_path == "/data/train"
