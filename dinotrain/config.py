"""Configuration: `configs/default.yaml` + a YAML file + `key=value` overrides, validated up front.

A typo in a key or a value of the wrong type fails at start-up with a message naming the key,
instead of surfacing as a traceback deep inside training hours later.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message says which key and why."""


def configs_dir() -> Path:
    """Directory of the shipped configs (installed package data, or the repo's `configs/`)."""
    try:
        packaged = Path(str(resources.files("dinotrain.configs")))
        if (packaged / "default.yaml").is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    return _REPO_CONFIGS


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a shipped config such as `smoke/cpu_tiny`."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = configs_dir() / (str(name) if str(name).endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    available = sorted(str(p.relative_to(configs_dir()).with_suffix("")) for p in configs_dir().rglob("*.yaml"))
    raise ConfigError(f"config file not found: {name} (shipped configs: {', '.join(available)})")


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, Exception) as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(cfg).__name__}")
    return cfg


def _leaves(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain nested dict."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def _check_known_keys(defaults: DictConfig, user: DictConfig, source: str, prefix: str = "") -> None:
    for key in user.keys():
        full = f"{prefix}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults.keys()], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key '{full}' (from {source}){hint} — see configs/default.yaml for all keys")
        default_node = defaults._get_node(key)
        user_node = user._get_node(key)
        if isinstance(default_node, DictConfig):
            if not isinstance(user_node, DictConfig):
                raise ConfigError(f"config key '{full}' (from {source}) is a section; give its sub-keys, e.g. {full}.<key>=...")
            if full == _STUDENTS:
                _check_student_entries(user_node, source)
            else:
                _check_known_keys(default_node, user_node, source, full + ".")


# `distillation.students`: name -> sections set over the top-level ones for that student. Its keys are
# names, not config keys, so they are checked here instead of against the defaults.
_STUDENTS = "distillation.students"
STUDENT_SECTIONS = ("student", "optim", "dino", "ibot")
_STUDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEFAULT_STUDENT = "student"


def _check_student_entries(students: DictConfig, source: str) -> None:
    """Names and sections of the `distillation.students` entries; keys inside checked against the defaults."""
    defaults = _load_yaml(configs_dir() / "default.yaml")
    for name in students.keys():
        if not isinstance(name, str):
            raise ConfigError(f"distillation student name {name!r} (from {source}) must be a string; quote it in YAML, "
                              f"e.g. '{name}':")
        where = f"{_STUDENTS}.{name}"
        if name == "teacher":
            raise ConfigError(f"distillation student name 'teacher' (from {source}) is reserved: `dinotrain export "
                              "--which teacher` means the teacher; choose another name")
        if not _STUDENT_NAME.match(name):
            raise ConfigError(f"distillation student name {name!r} (from {source}) is not allowed: it becomes a directory "
                              "name and a metrics prefix, so it must start with a letter or digit and hold only "
                              "letters, digits, '_', '.' and '-'")
        entry = students._get_node(name)
        if entry is None or entry._is_none():  # `name:` with nothing: a student with the top-level settings
            continue
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"config key '{where}' (from {source}) must be a mapping of sections "
                              f"({', '.join(STUDENT_SECTIONS)}); got {entry._value()!r}")
        for section in entry.keys():
            full = f"{where}.{section}"
            if section not in STUDENT_SECTIONS:
                close = difflib.get_close_matches(str(section), STUDENT_SECTIONS, n=1)
                hint = f"; did you mean {where}.{close[0]}?" if close else ""
                shared = (" (a section all students share: one teacher forward on the same crops feeds them all)"
                          if section in defaults else "")
                raise ConfigError(f"unknown section '{full}' (from {source}){shared}{hint} — a student entry may set "
                                  f"only the sections {', '.join(STUDENT_SECTIONS)}")
            node = entry._get_node(section)
            if not isinstance(node, DictConfig):
                raise ConfigError(f"config key '{full}' (from {source}) is a section; give its sub-keys, "
                                  f"e.g. {full}.<key>=...")
            _check_known_keys(defaults[section], node, source, full + ".")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(key: str, default: Any, value: Any) -> None:
    """The merged value must have the default's type (ints are fine where floats are expected)."""
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list) and len(value) == len(default) if default else isinstance(value, list)
        if ok:
            for i, (d, v) in enumerate(zip(default, value)):
                _check_type(f"{key}[{i}]", d, v)
            return
    else:
        ok = True
    if not ok:
        expected = f"a list of {len(default)}" if isinstance(default, list) else type(default).__name__
        raise ConfigError(f"config key '{key}' expects {expected}, got {value!r} ({_type_name(value)})")


_CHOICES = {
    "train.centering": ("centering", "sinkhorn_knopp"),
    "student.arch": ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.ffn_layer": ("mlp", "swiglufused", "swiglu"),
    "student.attn_impl": ("sdpa", "xformers"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_1024", "none"),
    "compute_precision.dtype": ("auto", "bf16", "fp16", "fp32"),
}
_POSITIVE_INTS = ("train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "train.grad_accum_steps",
                  "train.log_every", "student.patch_size", "crops.global_crops_size", "crops.local_crops_size",
                  "dino.head_n_prototypes", "ibot.head_n_prototypes", "checkpoint.keep_last")


# What to say when a key whose default has a value is null (other keys: "give it a value").
_REQUIRED_HINTS = {
    "train.dataset_path": "set it to your ImageFolder directory (or `tiny` / `tiny-shapes` for a built-in dataset): "
                          "the full-scale recipes ship no dataset on purpose",
    "train.output_dir": "give --output-dir",
    "distillation.teacher": "set it to the teacher: a dinotrain run directory, a full export (.safetensors with heads) "
                            "or backbone weights (with train.head_warmup_iterations > 0), e.g. distillation.teacher=runs/g14",
}
_POSITIVE_FLOATS = ("optim.base_lr", "teacher.teacher_temp", "teacher.warmup_teacher_temp", "optim.epochs")
_NON_NEGATIVE_FLOATS = ("optim.weight_decay", "optim.weight_decay_end", "optim.min_lr", "optim.clip_grad",
                        "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs",
                        "dino.loss_weight", "dino.koleo_loss_weight", "ibot.loss_weight", "optim.patch_embed_lr_mult",
                        "train.saveckp_freq")
_UNIT_INTERVAL = ("teacher.momentum_teacher", "teacher.final_momentum_teacher", "optim.layerwise_decay")


def _check_required(cfg: DictConfig, defaults: dict) -> None:
    """A key whose default has a value must not be null (a recipe may blank one to force the user to set it)."""
    for key, value in _leaves(OmegaConf.to_container(cfg)):
        if value is None and defaults.get(key) is not None:
            hint = _REQUIRED_HINTS.get(key, f"give it a value (default: {defaults[key]!r})")
            raise ConfigError(f"config key '{key}' is required but is null: {hint}")


def _check_values(cfg: DictConfig) -> None:
    """Semantic checks that a type check cannot express."""
    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key)

    depth = get("student.depth")  # default null, so the type check lets anything through: check it here
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ConfigError("config key 'student.depth' must be null (the arch's own depth) or a positive int "
                          f"(number of transformer blocks); got {depth!r} ({_type_name(depth)})")
    if not isinstance(get("distillation.teacher"), str):
        raise ConfigError("config key 'distillation.teacher' must be a path (a string, '' for none); "
                          f"got {get('distillation.teacher')!r}")
    for key in _POSITIVE_FLOATS:
        if not get(key) > 0:
            raise ConfigError(f"config key '{key}' must be > 0; got {get(key)}")
    for key in _NON_NEGATIVE_FLOATS:
        if not get(key) >= 0:
            raise ConfigError(f"config key '{key}' must be >= 0; got {get(key)}")
    for key in _UNIT_INTERVAL:
        if not 0 <= get(key) <= 1:
            raise ConfigError(f"config key '{key}' must be within [0, 1]; got {get(key)}")
    if not 0 <= get("student.drop_path_rate") < 1:
        raise ConfigError(f"config key 'student.drop_path_rate' must be within [0, 1); got {get('student.drop_path_rate')}")
    if get("student.layerscale") < 0:
        raise ConfigError(f"config key 'student.layerscale' must be >= 0 (0 disables LayerScale); got {get('student.layerscale')}")
    if get("train.saveckp_freq") == 0 and get("checkpoint.period_iterations") is None:
        raise ConfigError("config key 'train.saveckp_freq' is 0 and checkpoint.period_iterations is null: the run "
                          "would never save a checkpoint; set one of them")

    for key, choices in _CHOICES.items():
        if get(key) not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {get(key)!r}")
    for key in _POSITIVE_INTS:
        if get(key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive; got {get(key)}")
    for key in ("train.num_workers", "crops.local_crops_number", "student.num_register_tokens", "train.nan_tolerance",
                "train.head_warmup_iterations", "launch.max_requeues"):
        if get(key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0; got {get(key)}")
    for key in ("crops.global_crops_scale", "crops.local_crops_scale", "ibot.mask_ratio_min_max"):
        lo, hi = get(key)
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"config key '{key}' must be [min, max] with 0 <= min <= max <= 1; got {[lo, hi]}")
    if not 0 <= get("ibot.mask_sample_probability") <= 1:
        raise ConfigError("config key 'ibot.mask_sample_probability' must be within [0, 1]")
    patch = get("student.patch_size")
    for key in ("crops.global_crops_size", "crops.local_crops_size"):
        if get(key) % patch:
            raise ConfigError(f"config key '{key}' = {get(key)} must be a multiple of student.patch_size = {patch}")
    if get("crops.blur_kernel_size") % 2 == 0 or get("crops.blur_kernel_size") < 1:
        raise ConfigError(f"config key 'crops.blur_kernel_size' must be a positive odd number; got {get('crops.blur_kernel_size')}")
    blur_p = list(get("crops.blur_probabilities"))  # a list of 3 (type check); null itself is refused above
    if not all(p is not None and 0 <= p <= 1 for p in blur_p):
        raise ConfigError("config key 'crops.blur_probabilities' must be 3 probabilities within [0, 1] (global view 1, "
                          f"global view 2, local views), e.g. [1.0, 0.1, 0.5] (paper) or [0.0, 0.9, 0.5] (official code); got {blur_p}")
    jitter = list(get("crops.color_jitter"))
    if len(jitter) != 4 or not all(v is not None and v >= 0 for v in jitter) or (jitter[3] or 0) > 0.5:
        raise ConfigError("config key 'crops.color_jitter' must be [brightness, contrast, saturation, hue] strengths "
                          f">= 0 with hue <= 0.5, e.g. [0.4, 0.4, 0.2, 0.1] (official); got {jitter}")
    for key in ("crops.color_jitter_probability", "crops.grayscale_probability"):
        if not 0 <= get(key) <= 1:
            raise ConfigError(f"config key '{key}' must be a probability within [0, 1]; got {get(key)}")
    for key in ("train.max_iterations", "checkpoint.period_iterations"):
        if get(key) is not None and get(key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive or null; got {get(key)}")


def load_config(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults, then the file, then `key=value` overrides; validated; read-only afterwards."""
    defaults = _load_yaml(configs_dir() / "default.yaml")
    layers = [defaults]
    if config_file is not None:
        path = resolve_config_path(config_file)
        user = _load_yaml(path)
        _check_known_keys(defaults, user, str(path))
        layers.append(user)
    overrides = list(overrides)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value; got {bad}")
        try:
            cli = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc
        _check_known_keys(defaults, cli, "command line")
        layers.append(cli)
    cfg = OmegaConf.merge(*layers)
    default_leaves = dict(_leaves(OmegaConf.to_container(defaults)))
    _validate(_without_students(cfg), default_leaves)
    if _entries(cfg) is not None:
        for name, student_cfg in student_configs(cfg).items():
            try:
                _validate(student_cfg, default_leaves)
            except ConfigError as exc:
                raise ConfigError(f"distillation student '{name}' ({_STUDENTS}.{name} over the top-level "
                                  f"sections): {exc}") from None
    return cfg


def _validate(cfg: DictConfig, default_leaves: dict) -> None:
    """Types, required keys and values of one whole config (without `distillation.students` entries)."""
    for key, value in _leaves(OmegaConf.to_container(cfg)):
        _check_type(key, default_leaves[key], value)
    _check_required(cfg, default_leaves)
    _check_values(cfg)


def _entries(cfg: DictConfig) -> DictConfig | None:
    students = OmegaConf.select(cfg, _STUDENTS)
    return students if isinstance(students, DictConfig) and len(students) else None


def _without_students(cfg: DictConfig) -> DictConfig:
    """A plain (writable, unflagged) copy of `cfg` with `distillation.students` = {}."""
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    if not isinstance(out.get("distillation"), DictConfig):
        out.distillation = {}
    out.distillation.students = {}
    return out


def student_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Name -> effective config of each distillation student, in the order the entries were written.

    A student's config is the whole `cfg` with its entry's sections (student, optim, dino, ibot) merged
    over the top-level ones, and `distillation.students` = {}. Without entries: {"student": a copy of
    `cfg` with `distillation.students` = {}}. The results are fresh plain DictConfigs (not read-only;
    changing one changes neither `cfg` nor the others).
    """
    base = _without_students(cfg)
    entries = _entries(cfg)
    if entries is None:
        return {_DEFAULT_STUDENT: base}
    out: dict[str, DictConfig] = {}
    for name in entries.keys():
        entry = entries._get_node(name)  # null (`name:` with nothing): the top-level settings
        sections = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) and not entry._is_none() else {}
        out[str(name)] = OmegaConf.merge(base, sections)  # type: ignore[assignment]
    return out


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (what the run really used) as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
