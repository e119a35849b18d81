"""Configuration: `configs/default.yaml` + a YAML file + `key=value` overrides, validated up front.

A typo in a key or a value of the wrong type fails at start-up with a message naming the key,
instead of surfacing as a traceback deep inside training hours later. The defaults come from
`configs/default.yaml`; which keys exist and what each accepts, from `dinotrain.config_schema`.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinotrain import config_schema as schema

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message says which key and why."""


def configs_dir() -> Path:
    """Directory of the shipped configs: the `configs/` beside this code in a source checkout, else the installed
    package data. (The checkout's own first: an editable install elsewhere maps `dinotrain.configs` to ITS tree.)"""
    if (_REPO_CONFIGS / "default.yaml").is_file():
        return _REPO_CONFIGS
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


def _unknown(kind: str, full: str, source: str, known: Iterable[str], prefix: str, why: str = "") -> str:
    """"unknown ... (from ...)", why it is refused, and the closest known name if there is one."""
    close = difflib.get_close_matches(full[len(prefix):], list(known), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"unknown {kind} '{full}' (from {source}){why}{hint}"


def _check_known_keys(section: type, user: DictConfig, source: str, prefix: str = "") -> None:
    """Every key of `user` exists in the schema `section`; sections are given as mappings."""
    known = schema.section_fields(section)
    for key in user.keys():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(_unknown("config key", full, source, known, prefix)
                              + " — see configs/default.yaml for all keys")
        tp = known[key]
        if schema.is_section(tp) or schema.is_entries(tp):
            node = user._get_node(key)
            if not isinstance(node, DictConfig):
                raise ConfigError(f"config key '{full}' (from {source}) is a section; give its sub-keys, "
                                  f"e.g. {full}.<key>=...")
            if schema.is_entries(tp):
                _check_student_entries(schema.entry_section(tp), node, source, full)
            else:
                _check_known_keys(tp, node, source, full + ".")


# `distillation.students`: name -> sections set over the top-level ones for that student. Its keys are
# names, not config keys, so they are checked here; the sections inside are checked against the schema.
_STUDENTS = "distillation.students"
STUDENT_SECTIONS = tuple(schema.section_fields(schema.StudentEntry))
_STUDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEFAULT_STUDENT = "student"


def _check_student_entries(entry_section: type, students: DictConfig, source: str, prefix: str) -> None:
    """Names and sections of the `distillation.students` entries; keys inside checked against the schema."""
    sections = schema.section_fields(entry_section)
    for name in students.keys():
        if not isinstance(name, str):
            raise ConfigError(f"distillation student name {name!r} (from {source}) must be a string; quote it in YAML, "
                              f"e.g. '{name}':")
        where = f"{prefix}.{name}"
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
                              f"({', '.join(sections)}); got {entry._value()!r}")
        for section in entry.keys():
            full = f"{where}.{section}"
            if section not in sections:
                shared = (" (a section all students share: one teacher forward on the same crops feeds them all)"
                          if section in schema.section_fields(schema.Config) else "")
                raise ConfigError(_unknown("section", full, source, sections, where + ".", shared)
                                  + f" — a student entry may set only the sections {', '.join(sections)}")
            node = entry._get_node(section)
            if not isinstance(node, DictConfig):
                raise ConfigError(f"config key '{full}' (from {source}) is a section; give its sub-keys, "
                                  f"e.g. {full}.<key>=...")
            _check_known_keys(sections[section], node, source, full + ".")


def load_config(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults, then the file, then `key=value` overrides, checked against the schema."""
    defaults = _load_yaml(configs_dir() / "default.yaml")
    default_leaves = _check_defaults(defaults)
    layers = [defaults]
    if config_file is not None:
        path = resolve_config_path(config_file)
        user = _load_yaml(path)
        _check_known_keys(schema.Config, user, str(path))
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
        _check_known_keys(schema.Config, cli, "command line")
        layers.append(cli)
    cfg = OmegaConf.merge(*layers)
    _validate(_without_students(cfg), default_leaves)
    if _entries(cfg) is not None:
        for name, student_cfg in student_configs(cfg).items():
            try:
                _validate(student_cfg, default_leaves)
            except ConfigError as exc:
                raise ConfigError(f"distillation student '{name}' ({_STUDENTS}.{name} over the top-level "
                                  f"sections): {exc}") from None
    return cfg


def _check_defaults(defaults: DictConfig) -> dict[str, Any]:
    """default.yaml and the schema hold the same keys (a mismatch is a bug here, not a user error)."""
    _check_known_keys(schema.Config, defaults, "configs/default.yaml")
    default_leaves = dict(_leaves(OmegaConf.to_container(defaults)))
    missing = [leaf.key for leaf in schema.leaves() if leaf.key not in default_leaves]
    if missing:
        raise ConfigError(f"configs/default.yaml has no default for the config keys {', '.join(missing)} of "
                          "dinotrain/config_schema.py: give each a value and a one-line comment")
    return default_leaves


def _validate(cfg: DictConfig, default_leaves: dict) -> None:
    """Every key against the schema, then the rules over several keys (without `distillation.students` entries)."""
    values = OmegaConf.to_container(cfg)
    for leaf in schema.leaves():
        error = schema.problem(leaf, _get(values, leaf.key), default_leaves.get(leaf.key))
        if error:
            raise ConfigError(error)
    for relation in schema.RELATIONS:
        error = relation(values)
        if error:
            raise ConfigError(error)


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


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
