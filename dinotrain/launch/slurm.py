"""`dinotrain submit`: a `train` or `distill` run as a SLURM job through submitit.

One task per GPU (or `tasks_per_node` CPU processes), rank / world size / master address taken from
SLURM inside the job (`distributed/env.py`), the job's stdout/stderr in `RunDir.slurm`. Settings
come from a cluster profile (`launch/profiles.py`) and the command line, in that order; everything a
user can get wrong is checked before anything is submitted. What runs inside the job, including the
checkpoint-and-requeue on preemption and at the time limit, is `launch/job.py`.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dinotrain.config import ConfigError
from dinotrain.launch.profiles import load_profile
from dinotrain.train.rundir import RunDir

DEFAULT_TIME_MIN = 2800  # the official DINOv2 launcher's default time limit (minutes)
DEFAULT_SIGNAL_DELAY_S = 120  # SLURM signals this long before the limit: time for a sharded checkpoint


class SubmitError(RuntimeError):
    """SLURM refused the job (its own message included), or SLURM is not available here."""


@dataclasses.dataclass
class SlurmRequest:
    """What the job asks SLURM for, after profile and command line are merged and checked."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time: int = DEFAULT_TIME_MIN
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = dataclasses.field(default_factory=list)
    slurm_extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def sbatch_parameters(self, job_name: str) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters (sbatch names)."""
        params: dict[str, Any] = {
            "job_name": job_name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node, "time": self.time,
            "signal_delay_s": self.signal_delay_s,
            # one task failing (a crash, an OOM kill) ends the whole step instead of leaving the others
            # waiting in a collective until the NCCL/gloo timeout
            "srun_args": ["--kill-on-bad-exit=1"],
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.mem_gb is not None:
            params["mem"] = f"{int(self.mem_gb)}GB" if float(self.mem_gb).is_integer() else f"{int(self.mem_gb * 1024)}MB"
        if self.setup:
            params["setup"] = list(self.setup)
        if self.slurm_extra:
            params["additional_parameters"] = dict(self.slurm_extra)
        return params


def parse_slurm_extra(items: list[str] | None) -> dict[str, Any]:
    """`--slurm-extra k=v ...` -> {k: v}; a bare `k` is a flag without value (`#SBATCH --k`)."""
    extra: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"--slurm-extra {item!r}: expected KEY=VALUE (an sbatch option without its dashes)")
        extra[key.replace("-", "_")] = value if sep else True
    return extra


def build_request(profile_name: str | None, flags: dict[str, Any]) -> SlurmRequest:
    """Merge the cluster profile with command-line `flags` (None = not given) and check the result."""
    merged: dict[str, Any] = dict(load_profile(profile_name))
    extra = dict(merged.pop("slurm_extra", None) or {})
    extra.update(flags.pop("slurm_extra", None) or {})
    cpus_per_gpu = merged.pop("cpus_per_gpu", None)
    merged.update({k: v for k, v in flags.items() if v is not None})
    unknown = set(merged) - {f.name for f in dataclasses.fields(SlurmRequest)}
    if unknown:  # a programming error: flags and profile keys are fixed lists
        raise AssertionError(f"unexpected submit settings {sorted(unknown)}")
    req = SlurmRequest(**{k: v for k, v in merged.items() if k != "tasks_per_node"}, slurm_extra=extra)
    if req.nodes < 1:
        raise ConfigError(f"--nodes {req.nodes}: a job needs at least 1 node")
    if req.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node {req.gpus_per_node}: must be 0 (CPU processes) or more")
    tasks = merged.get("tasks_per_node")
    if req.gpus_per_node:
        if flags.get("tasks_per_node") is not None and flags["tasks_per_node"] != req.gpus_per_node:
            raise ConfigError(f"--tasks-per-node {flags['tasks_per_node']} with --gpus-per-node {req.gpus_per_node}: dinotrain runs one "
                              "process per GPU; leave --tasks-per-node out")
        req.tasks_per_node = req.gpus_per_node
        if req.cpus_per_task is None and cpus_per_gpu is not None:
            req.cpus_per_task = cpus_per_gpu
    else:
        req.tasks_per_node = 1 if tasks is None else tasks
        if req.tasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node {req.tasks_per_node}: must be at least 1")
    if req.cpus_per_task is not None and req.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {req.cpus_per_task}: must be at least 1")
    if req.mem_gb is not None and req.mem_gb <= 0:
        raise ConfigError(f"--mem-gb {req.mem_gb}: must be positive")
    if req.time < 1:
        raise ConfigError(f"--time {req.time}: the time limit is in minutes and must be at least 1")
    if not 0 <= req.signal_delay_s < req.time * 60:
        raise ConfigError(f"signal_delay_s {req.signal_delay_s}: must be between 0 and the time limit "
                          f"({req.time} min = {req.time * 60} s)")
    return req


def job_command(command: str, config: dict, run_dir: Path, request: SlurmRequest, allow_config_change: bool):
    """The callable every task of the job runs (pickled by submitit)."""
    from dinotrain.launch.job import SlurmRun

    return SlurmRun(command, config, str(run_dir), request.signal_delay_s, allow_config_change)


def sbatch_script(request: SlurmRequest, folder: Path, job_name: str) -> str:
    """The sbatch script submitit would submit (for `--dry-run`; needs no SLURM installed)."""
    import sys

    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **request.sbatch_parameters(job_name))


def require_slurm() -> None:
    missing = [cmd for cmd in ("sbatch", "srun", "scontrol") if shutil.which(cmd) is None]
    if missing:
        raise SubmitError(f"SLURM is not available here ({', '.join(missing)} not found on PATH): submit from a "
                          "login node of your cluster, or use --dry-run to see the sbatch script")


def check_gpus_available(request: SlurmRequest) -> None:
    """`--gpus-per-node` on a partition whose nodes have no GPU: say so before SLURM gives a vaguer error."""
    if not request.gpus_per_node:
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return  # cannot tell: sbatch will say
    if out.returncode != 0:
        return
    gres_by_partition: dict[str, list[str]] = {}
    default = None
    for line in out.stdout.splitlines():
        part, _, gres = line.partition("|")
        if part.endswith("*"):
            part = part[:-1]
            default = part
        gres_by_partition.setdefault(part, []).append(gres)
    partition = request.partition or default
    if partition not in gres_by_partition:
        return  # an unknown partition: sbatch's own message names it
    if not any("gpu" in g for g in gres_by_partition[partition]):
        raise SubmitError(f"--gpus-per-node {request.gpus_per_node}: the nodes of partition '{partition}' have no "
                          f"GPUs (sinfo reports GRES {', '.join(sorted(set(gres_by_partition[partition])))}); "
                          "use --gpus-per-node 0 --tasks-per-node T for T CPU processes per node, or another partition")


def submit(command: str, cfg, run_dir: Path, request: SlurmRequest, allow_config_change: bool = False):
    """Submit the job; returns the submitit job. SLURM's refusal becomes a SubmitError with its message.

    The caller checks first that SLURM is here (`require_slurm`) and has the GPUs asked for (`check_gpus_available`).
    """
    import submitit

    folder = RunDir(run_dir).slurm
    folder.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    max_requeues = int(cfg.launch.max_requeues)
    # submitit counts requeues after a time limit itself; ours (launch.max_requeues) must be the one that binds
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues + 1)
    executor.update_parameters(**request.sbatch_parameters(job_name(command, run_dir)))
    try:
        return executor.submit(job_command(command, config, run_dir, request, allow_config_change))
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
        raise SubmitError(f"sbatch refused the job: {_sbatch_message(exc)}") from exc


def job_name(command: str, run_dir: Path) -> str:
    return f"dinotrain-{command}-{run_dir.name}"


def _sbatch_message(exc: Exception) -> str:
    """SLURM's own words from a failed sbatch call (submitit wraps them in its own text)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and "sbatch" in ln.lower()]
    return " / ".join(lines) if lines else text.strip()
