"""`dinotrain submit`: check everything, submit a `train` / `distill` run as a SLURM job, then follow it.

The config is resolved and checked, the request built from the cluster profile and the command line
(`slurm.py`) and SLURM asked whether it can run it, all before anything is submitted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dinotrain.config import ConfigError, load_config
from dinotrain.launch.slurm import (build_request, check_gpus_available, job_name, parse_slurm_extra, require_slurm,
                                    sbatch_script, submit)
from dinotrain.launch.watch import follow
from dinotrain.train.objectives import OBJECTIVES
from dinotrain.train.rundir import RunDir, move_aside, prepare_run_dir

# The command-line settings of the SLURM request (`build_request`'s flags), beside the cluster profile's.
REQUEST_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "partition", "account", "qos", "time", "mem_gb",
                 "cpus_per_task", "constraint", "signal_delay_s")


def check_any_students(cfg) -> None:
    """The timm / torchvision students' one-line errors (an unknown model, crops smaller than its total stride, no
    feature map for iBOT) here rather than minutes later in the job. Built on the meta device (no weights: a big model
    costs no memory on a login node); an error found there is confirmed on the CPU, so an op the meta device lacks
    never refuses a job that would run (the job checks again at start-up in any case; other failures are its to
    report)."""
    import torch

    from dinotrain.config import student_configs
    from dinotrain.models.any_student import StudentArchError, build_any_student, is_any_student

    for name, scfg in student_configs(cfg).items():
        if not is_any_student(scfg.student.arch):
            continue
        try:
            with torch.device("meta"):
                build_any_student(scfg)
        except Exception:  # a StudentArchError, or an op the meta device lacks: the CPU decides
            try:
                build_any_student(scfg)
            except StudentArchError as exc:
                raise ConfigError(f"student {name!r}: {exc}") from None
            except Exception:  # not a setting's fault: the job reports it
                pass


def submit_run(command: str, config: str | None, overrides: list[str], output_dir: str | None, *,
               cluster: str | None, flags: dict, slurm_extra: list[str] | None = None, dry_run: bool = False,
               no_resume: bool = False, no_wait: bool = False, allow_config_change: bool = False) -> int:
    """Submit `command` (a name of `train.objectives.OBJECTIVES`) and follow the job to its end unless `no_wait`;
    `dry_run` prints the sbatch script instead. Returns the exit code (130: stopped following, job still runs)."""
    if command not in OBJECTIVES:
        raise ConfigError(f"cannot submit '{command}': a job runs one of {', '.join(OBJECTIVES)}")
    if not output_dir:
        raise ConfigError("give --output-dir DIR: the run directory, on a filesystem the compute nodes share")
    run_dir = Path(output_dir).resolve()
    cfg = load_config(config, [*overrides, f"train.output_dir={run_dir}"])  # checked before submitting
    if command == "distill":
        check_any_students(cfg)
    flags = {key: flags.get(key) for key in REQUEST_FLAGS}
    flags["slurm_extra"] = parse_slurm_extra(slurm_extra)
    request = build_request(cluster, flags)
    name = job_name(command, run_dir)
    if dry_run:
        print(sbatch_script(request, RunDir(run_dir).slurm, name))
        return 0
    require_slurm()
    check_gpus_available(request)
    prepare_run_dir(run_dir)
    if no_resume:
        move_aside(run_dir)
    job = submit(command, cfg, run_dir, request, allow_config_change=allow_config_change)
    where = f"partition {request.partition}" if request.partition else "the default partition"
    per_node = f"{request.gpus_per_node} GPU(s)" if request.gpus_per_node else f"{request.tasks_per_node} CPU process(es)"
    print(f"submitted job {job.job_id} ({name}): {request.nodes} node(s) x {per_node} on {where}, "
          f"time limit {request.time} min, up to {cfg.launch.max_requeues} requeues")
    print(f"  run directory {run_dir}; job logs {RunDir(run_dir).slurm}/{job.job_id}_<task>_log.out|err")
    print(f"  watch: squeue -j {job.job_id}; tail -f {RunDir(run_dir).log}   cancel: scancel {job.job_id}")
    sys.stdout.flush()
    if no_wait:
        return 0
    try:
        result = follow(job, run_dir, print_fn=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"stopped following job {job.job_id}; it keeps running (scancel {job.job_id} to stop it)", file=sys.stderr)
        return 130
    metrics = result.get("metrics") or {}
    # one total_loss, or each student's (`<name>/total_loss`) in a distillation of several
    loss = "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k == "total_loss" or k.endswith("/total_loss"))
    print(f"job {job.job_id} completed: iteration {result.get('iteration')}{loss}; run directory {result.get('run_dir')}")
    return 0
