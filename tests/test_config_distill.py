"""Config for distillation and head warm-up: `distillation.*`, `student.depth`, `train.head_warmup_iterations`."""

from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from dinotrain.config import ConfigError, load_config, student_configs
from dinotrain.train.resume import ARCH_KEYS, check_resume

TWO = {"vits14": {"student": {"arch": "vit_small"}},
       "vitb14": {"student": {"arch": "vit_base"}, "optim": {"base_lr": 0.002}}}


def _file(tmp_path: Path, students, **sections) -> Path:
    f = tmp_path / "distill.yaml"
    f.write_text(yaml.safe_dump({"distillation": {"teacher": "/runs/teacher", "students": students}, **sections},
                                sort_keys=False))
    return f


# --- defaults ---------------------------------------------------------------------------------------------

def test_defaults():
    cfg = load_config()
    assert cfg.student.depth is None
    assert cfg.train.head_warmup_iterations == 0
    assert cfg.distillation.teacher == ""
    assert isinstance(cfg.distillation.students, DictConfig) and len(cfg.distillation.students) == 0


def test_depth_is_an_arch_key():
    assert "student.depth" in ARCH_KEYS
    cfg = load_config("smoke/cpu_tiny", ["student.depth=2"])
    saved = OmegaConf.to_container(load_config("smoke/cpu_tiny", ["student.depth=3"]), resolve=True)
    with pytest.raises(ConfigError, match=r"student\.depth"):
        check_resume(saved, cfg, "ckpt")


# --- student.depth and train.head_warmup_iterations ---------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("null", None), ("1", 1), ("6", 6)])
def test_depth_accepts_null_and_positive_ints(value, expected):
    assert load_config("smoke/cpu_tiny", [f"student.depth={value}"]).student.depth == expected


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "abc", "true", "[2]"])
def test_depth_refuses_everything_else(value):
    with pytest.raises(ConfigError, match=r"student\.depth.*null.*positive int"):
        load_config("smoke/cpu_tiny", [f"student.depth={value}"])


def test_depth_from_file_must_be_an_int(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  depth: '6'\n")
    with pytest.raises(ConfigError, match=r"student\.depth.*got '6' \(str\)"):
        load_config(f)


@pytest.mark.parametrize("value", ["0", "100"])
def test_head_warmup_accepts_non_negative_ints(value):
    assert load_config("smoke/cpu_tiny", [f"train.head_warmup_iterations={value}"]).train.head_warmup_iterations == int(value)


@pytest.mark.parametrize("value,needle", [("-1", ">= 0"), ("1.5", "expects int"), ("abc", "expects int"),
                                          ("null", "required")])
def test_head_warmup_refuses_the_rest(value, needle):
    with pytest.raises(ConfigError, match=rf"train\.head_warmup_iterations.*{needle}"):
        load_config("smoke/cpu_tiny", [f"train.head_warmup_iterations={value}"])


# --- distillation.teacher ------------------------------------------------------------------------------------

def test_teacher_is_a_string():
    assert load_config(None, ["distillation.teacher=/runs/t/checkpoints"]).distillation.teacher == "/runs/t/checkpoints"
    with pytest.raises(ConfigError, match=r"distillation\.teacher"):
        load_config(None, ["distillation.teacher=3"])
    with pytest.raises(ConfigError, match=r"distillation\.teacher"):
        load_config(None, ["distillation.teacher=[a,b]"])


def test_unknown_distillation_key_has_a_hint():
    with pytest.raises(ConfigError, match=r"distillation\.teachr.*did you mean distillation\.teacher"):
        load_config(None, ["distillation.teachr=x"])


# --- distillation.students: loading ---------------------------------------------------------------------------

def test_students_from_a_file(tmp_path: Path):
    cfg = load_config(_file(tmp_path, TWO))
    assert list(cfg.distillation.students) == ["vits14", "vitb14"]
    assert cfg.distillation.students.vitb14.optim.base_lr == 0.002
    assert cfg.student.arch == "vit_large"  # the top level is untouched


def test_students_from_overrides():
    cfg = load_config("smoke/cpu_tiny", ["distillation.students.a.student.arch=vit_small",
                                         "distillation.students.b.student.depth=2",
                                         "distillation.students.b.optim.base_lr=0.01"])
    assert list(cfg.distillation.students) == ["a", "b"]
    students = student_configs(cfg)
    assert students["a"].student.arch == "vit_small"
    assert students["b"].student.depth == 2 and students["b"].optim.base_lr == 0.01


def test_overrides_merge_into_file_entries(tmp_path: Path):
    cfg = load_config(_file(tmp_path, TWO), ["distillation.students.vits14.optim.base_lr=0.003",
                                             "distillation.students.extra.dino.loss_weight=0.5"])
    students = student_configs(cfg)
    assert list(students) == ["vits14", "vitb14", "extra"]
    assert students["vits14"].student.arch == "vit_small" and students["vits14"].optim.base_lr == 0.003
    assert students["extra"].dino.loss_weight == 0.5


@pytest.mark.parametrize("name", ["vits14", "a", "9", "vit-s_14", "A-b_c"])
def test_good_names(name):
    cfg = load_config(None, [f"distillation.students.{name}.student.arch=vit_small"])
    assert list(student_configs(cfg)) == [name]


@pytest.mark.parametrize("name", ["_x", "-x", ".x", "a b", "a/b", "ü", "a:b", ""])
def test_bad_names_are_refused(tmp_path: Path, name):
    with pytest.raises(ConfigError, match="student name.*not allowed|student name.*must"):
        load_config(_file(tmp_path, {name: {"student": {"arch": "vit_small"}}}))


def test_dotted_name_from_a_file(tmp_path: Path):
    cfg = load_config(_file(tmp_path, {"vit.s-14_a": {"student": {"arch": "vit_small"}}}))
    assert list(student_configs(cfg)) == ["vit.s-14_a"]


def test_non_string_name_is_refused(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("distillation:\n  students:\n    14:\n      student: {arch: vit_small}\n")
    with pytest.raises(ConfigError, match="must be a string"):
        load_config(f)


def test_empty_entry_is_a_student_with_the_top_level_settings(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("distillation:\n  students:\n    same:\n    other: {}\n")
    students = student_configs(load_config(f))
    assert list(students) == ["same", "other"]
    assert students["same"].student.arch == students["other"].student.arch == "vit_large"


@pytest.mark.parametrize("section,needle", [
    ("studnet", r"distillation\.students\.s\.studnet.*did you mean distillation\.students\.s\.student"),
    ("crops", r"distillation\.students\.s\.crops.*share"),
    ("train", r"distillation\.students\.s\.train.*only the sections student, optim, dino, ibot"),
    ("teacher", r"distillation\.students\.s\.teacher"),
    ("nonsense", r"unknown section 'distillation\.students\.s\.nonsense'"),
])
def test_unknown_sections_are_refused(section, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [f"distillation.students.s.{section}.x=1"])


def test_unknown_key_in_an_entry_has_a_hint(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"distillation\.students\.vits14\.student\.arc\b.*did you mean "
                                          r"distillation\.students\.vits14\.student\.arch\?"):
        load_config(_file(tmp_path, {"vits14": {"student": {"arc": "vit_small"}}}))
    with pytest.raises(ConfigError, match=r"distillation\.students\.b\.optim\.base_lrr.*did you mean.*optim\.base_lr"):
        load_config(None, ["distillation.students.b.optim.base_lrr=1"])


@pytest.mark.parametrize("students,needle", [
    ({"s": 3}, r"distillation\.students\.s' .*must be a mapping"),
    ({"s": [1, 2]}, r"distillation\.students\.s' .*must be a mapping"),
    ({"s": {"student": "vit_small"}}, r"distillation\.students\.s\.student' .*is a section"),
    ([1, 2], r"distillation\.students' .*is a section"),
])
def test_malformed_entries(tmp_path: Path, students, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(_file(tmp_path, students))


@pytest.mark.parametrize("override,needle", [
    ("student.arch=vit_huge", r"student 'bad'.*student\.arch.*must be one of"),
    ("student.patch_size=abc", r"student 'bad'.*student\.patch_size.*expects int"),
    ("student.depth=2.5", r"student 'bad'.*student\.depth"),
    ("student.depth=0", r"student 'bad'.*student\.depth"),
    ("optim.base_lr=0", r"student 'bad'.*optim\.base_lr.*> 0"),
    ("optim.base_lr=fast", r"student 'bad'.*optim\.base_lr.*expects float"),
    ("dino.head_n_prototypes=0", r"student 'bad'.*dino\.head_n_prototypes"),
    ("ibot.mask_ratio_min_max=[0.6,0.1]", r"student 'bad'.*ibot\.mask_ratio_min_max"),
    ("student.arch=null", r"student 'bad'.*student\.arch.*required"),
    ("student.patch_size=7", r"student 'bad'.*global_crops_size.*multiple of student\.patch_size = 7"),
])
def test_bad_values_in_an_entry_name_the_student(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke/cpu_tiny", ["distillation.students.good.student.arch=vit_small",
                                       f"distillation.students.bad.{override}"])


def test_an_entry_can_fix_what_the_top_level_alone_gets_wrong_only_if_the_top_level_is_valid():
    # the top level is a config of its own and is checked as one
    with pytest.raises(ConfigError, match=r"^config key 'student\.arch'"):
        load_config("smoke/cpu_tiny", ["student.arch=vit_huge", "distillation.students.a.student.arch=vit_small"])


# --- student_configs ---------------------------------------------------------------------------------------------

def test_student_configs_without_entries_is_one_student_named_student():
    cfg = load_config("smoke/cpu_tiny")
    students = student_configs(cfg)
    assert list(students) == ["student"]
    assert OmegaConf.to_container(students["student"]) == OmegaConf.to_container(cfg)


def test_student_configs_merge_semantics_and_order(tmp_path: Path):
    order = {"zeta": TWO["vitb14"], "alpha": TWO["vits14"], "mid": {"ibot": {"mask_ratio_min_max": [0.2, 0.3]}}}
    cfg = load_config(_file(tmp_path, order, optim={"base_lr": 0.01, "weight_decay": 0.05},
                            student={"patch_size": 14, "drop_path_rate": 0.1},
                            crops={"global_crops_size": 224, "local_crops_size": 98}))
    students = student_configs(cfg)
    assert list(students) == ["zeta", "alpha", "mid"]  # as written, not sorted
    z, a, m = students["zeta"], students["alpha"], students["mid"]
    # the entry's keys win; the rest of the section comes from the top level (deep merge, not replacement)
    assert z.student.arch == "vit_base" and z.student.patch_size == 14 and z.student.drop_path_rate == 0.1
    assert z.optim.base_lr == 0.002 and z.optim.weight_decay == 0.05
    assert a.student.arch == "vit_small" and a.optim.base_lr == 0.01
    assert list(m.ibot.mask_ratio_min_max) == [0.2, 0.3] and m.student.arch == "vit_large"
    for s in students.values():
        assert len(s.distillation.students) == 0
        assert s.distillation.teacher == "/runs/teacher"
        assert s.crops.local_crops_size == 98
        assert not OmegaConf.is_readonly(s)
    # the loaded config keeps its entries
    assert list(cfg.distillation.students) == ["zeta", "alpha", "mid"]


def test_student_configs_are_independent_copies(tmp_path: Path):
    cfg = load_config(_file(tmp_path, TWO))
    students = student_configs(cfg)
    students["vits14"].optim.base_lr = 123.0
    students["vits14"].student.arch = "vit_tiny"
    assert students["vitb14"].optim.base_lr == 0.002
    assert cfg.optim.base_lr == 0.004 and cfg.student.arch == "vit_large"
    assert cfg.distillation.students.vits14.student.arch == "vit_small"
    OmegaConf.set_readonly(cfg, True)  # a read-only cfg still gives writable students
    again = student_configs(cfg)
    again["vitb14"].optim.base_lr = 1.0
    assert again["vitb14"].optim.base_lr == 1.0


def test_each_student_config_loads_as_a_whole_config(tmp_path: Path):
    cfg = load_config(_file(tmp_path, TWO))
    for s in student_configs(cfg).values():
        f = tmp_path / "s.yaml"
        f.write_text(OmegaConf.to_yaml(s))
        assert OmegaConf.to_container(load_config(f)) == OmegaConf.to_container(s)


def test_teacher_is_a_reserved_student_name():
    with pytest.raises(ConfigError, match="reserved"):
        load_config(None, ["distillation.students.teacher.student.depth=2"])
