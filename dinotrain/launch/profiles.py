"""Cluster profiles: what a user writes once about their SLURM cluster (`slurm/<name>.yaml`).

A profile holds the settings that every job on a cluster shares (partition, account, qos, constraint,
GPUs and CPUs per node, memory, time limit, signal delay, setup lines such as module loads), so
`dinotrain submit --cluster NAME` replaces the hostname guessing and hard-coded partitions of the
official launchers. Command-line flags override the profile; an unknown profile or key is an error.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from dinotrain.config import ConfigError

_REPO_PROFILES = Path(__file__).resolve().parents[2] / "slurm"

# key -> (accepted Python types, what it is); docs/slurm.md's profile section documents the same keys
PROFILE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "partition": ((str,), "SLURM partition (sbatch --partition)"),
    "account": ((str,), "account to charge (sbatch --account)"),
    "qos": ((str,), "quality of service (sbatch --qos)"),
    "constraint": ((str,), "node features, e.g. a100 (sbatch --constraint)"),
    "gpus_per_node": ((int,), "GPUs per node; one task per GPU (0: CPU processes, see tasks_per_node)"),
    "tasks_per_node": ((int,), "processes per node when gpus_per_node is 0"),
    "cpus_per_task": ((int,), "CPU cores per process (data loading workers + 1 or more)"),
    "cpus_per_gpu": ((int,), "CPU cores per GPU, i.e. per process (used when cpus_per_task is not set)"),
    "mem_gb": ((int, float), "memory per node in GB (sbatch --mem)"),
    "time": ((int,), "time limit of one job run in minutes; the job requeues itself when it is reached"),
    "signal_delay_s": ((int,), "seconds before the time limit at which SLURM signals the job to checkpoint"),
    "setup": ((list,), "shell lines run before the processes start (module load ..., export ...)"),
    "slurm_extra": ((dict,), "more sbatch options, e.g. {exclusive: true, reservation: x}"),
}


def profile_dirs() -> list[Path]:
    """Where `--cluster NAME` looks, in order: $DINOTRAIN_SLURM_PROFILES (':'-separated), the user's
    ~/.config/dinotrain/slurm, then the profiles shipped in the repository's `slurm/`."""
    dirs = [Path(p) for p in os.environ.get("DINOTRAIN_SLURM_PROFILES", "").split(":") if p]
    dirs.append(Path.home() / ".config" / "dinotrain" / "slurm")
    dirs.append(_REPO_PROFILES)
    return dirs


def available_profiles() -> list[str]:
    names = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_profile(name: str) -> Path:
    """A profile file: NAME as a path to a YAML file, or NAME.yaml in one of `profile_dirs()`."""
    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml") or os.sep in name:
        if as_path.is_file():
            return as_path
        raise ConfigError(f"cluster profile file not found: {name}")
    for d in profile_dirs():
        candidate = d / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = available_profiles()
    close = difflib.get_close_matches(name, known, n=1)
    raise ConfigError(f"unknown cluster profile '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                      + f" (known: {', '.join(known) or 'none'}; profiles are looked up in "
                      + ", ".join(str(d) for d in profile_dirs()) + ")")


def check_profile(values: Any, source: str) -> dict[str, Any]:
    """The profile's settings, each key known and of the right type; otherwise a ConfigError naming it."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"cluster profile {source} must be a mapping of keys, not a {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if key not in PROFILE_KEYS:
            close = difflib.get_close_matches(str(key), list(PROFILE_KEYS), n=1)
            raise ConfigError(f"unknown key '{key}' in cluster profile {source}"
                              + (f"; did you mean '{close[0]}'?" if close else "")
                              + f" (known keys: {', '.join(PROFILE_KEYS)})")
        types, what = PROFILE_KEYS[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"cluster profile {source}: '{key}' must be {' or '.join(t.__name__ for t in types)} "
                              f"({what}), got {value!r}")
        if key == "setup" and not all(isinstance(line, str) for line in value):
            raise ConfigError(f"cluster profile {source}: 'setup' must be a list of shell lines (strings)")
        checked[key] = value
    return checked


def load_profile(name: str | None) -> dict[str, Any]:
    """The settings of cluster profile `name` ({} for none)."""
    if not name:
        return {}
    path = find_profile(name)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse cluster profile {path}: {exc}") from exc
    return check_profile(values, str(path))
