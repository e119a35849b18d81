"""Peak memory of `dinotrain export` on a sharded training checkpoint: full consolidation vs backbone only.

Builds a checkpoint with the structure `Checkpointer.save_parts` writes (`{"model": ..., "optim": ...}` through
DCP, one process): the SSL meta-architecture of a recipe (student + EMA teacher, each a backbone, a DINO
head and an iBOT head, plus the loss centers) and AdamW state (step, exp_avg, exp_avg_sq for every student
parameter, faked: zeros of the right sizes). Then, each in a fresh subprocess, measures the peak RSS
during the call (VmHWM reset before it; `ru_maxrss` of the process is reported too) and the time of
  old: `dcp_to_torch_save` of the whole checkpoint to a temporary file, `torch.load`, keep the teacher
       backbone (what `consolidate_teacher_backbone` did);
  new: `checkpoint_files.read_tensors` of the teacher backbone (formerly `read_teacher_backbone`): only its
       byte ranges are read.

    python tools/bench/export_memory.py                         # ViT-L/14 recipe (~7 GB on disk, ~8 GB RAM)
    python tools/bench/export_memory.py --config smoke/cpu_tiny # seconds
    python tools/bench/export_memory.py measure new CKPT_DIR    # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "model.teacher.backbone."


def build_checkpoint(ckpt: Path, config: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dinotrain.config import load_config
    from dinotrain.train.optim import build_optimizer
    from dinotrain.train.ssl import SSLMetaArch

    cfg = load_config(config, overrides)
    with torch.device("meta"):  # shapes only; materialised as zeros below (init is not what we measure)
        model = SSLMetaArch(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
    optimizer = build_optimizer(model.student, cfg)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    ckpt.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "extra.json").write_text(json.dumps({"iteration": 1, "config": OmegaConf.to_container(cfg)}))


def old_path(ckpt: Path, prefix: str):
    """What `consolidate_teacher_backbone` did: the whole checkpoint through a temporary torch.save file."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt), str(out))
        temp_bytes = out.stat().st_size
        full = torch.load(out, map_location="cpu", weights_only=True)
    flat = {}

    def walk(d, path):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{path}{k}.")
            else:
                flat[f"{path}{k}"] = v

    walk(full, "")
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, temp_bytes


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(which: str, ckpt: Path, prefix: str) -> dict:
    """Peak RSS of one path in this (fresh) process.

    The peak is VmHWM reset just before the call, so neither the imports nor the parent count:
    ru_maxrss alone is not enough, Linux carries the parent's RSS at fork into a child's ru_maxrss
    (a pytest parent holding a checkpoint shows up there). ru_maxrss is reported too.
    """
    import torch  # noqa: F401  (imports before the baseline)

    from dinotrain.distributed.checkpoint_files import read_tensors

    reset = _reset_peak()
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "old":
            state, temp_bytes = old_path(ckpt, prefix)
        else:
            state, temp_bytes = read_tensors(ckpt, prefix), 0
    seconds = time.perf_counter() - t
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = _status_kib("VmHWM") if reset else None
    if before is None or peak is None:  # no /proc: ru_maxrss (includes imports, and a parent's RSS at fork)
        before, peak = 0, maxrss
    return {"which": which, "seconds": seconds, "rss_before_kib": before, "peak_rss_kib": peak,
            "ru_maxrss_kib": maxrss, "tensors": len(state),
            "exported_bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "temp_file_bytes": temp_bytes}


def run_measure(which: str, ckpt: Path, prefix: str = PREFIX) -> dict:
    """`measure` in a fresh process (so ru_maxrss is this path's own peak)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "measure", which, str(ckpt), "--prefix", prefix],
                          env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"measure {which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "build", "measure"])
    p.add_argument("args", nargs="*", help="measure: old|new CKPT_DIR; build: CKPT_DIR")
    p.add_argument("--config", default="train/vitl14")
    p.add_argument("--override", action="append", default=[], help="extra key=value config overrides")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument("--prefix", default=PREFIX)
    a = p.parse_args()
    overrides = ["train.dataset_path=tiny", *a.override]
    if a.mode == "measure":
        print(json.dumps(measure(a.args[0], Path(a.args[1]), a.prefix)))
        return
    if a.mode == "build":
        build_checkpoint(Path(a.args[0]), a.config, overrides)
        return

    root = Path(a.dir or tempfile.mkdtemp(prefix="export_memory_"))
    ckpt = root / "checkpoints" / "00000001"
    try:
        if not ckpt.is_dir():
            t = time.perf_counter()
            env = dict(os.environ, PYTHONPATH=str(REPO))
            subprocess.run([sys.executable, __file__, "build", str(ckpt), "--config", a.config,
                            *[f"--override={o}" for o in a.override]], env=env, check=True, cwd=REPO)
            print(f"built {a.config} checkpoint in {time.perf_counter() - t:.0f} s: {ckpt}", flush=True)
        size = dir_bytes(ckpt)
        rows = [run_measure(w, ckpt, a.prefix) for w in ("old", "new")]
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    gib = 1024 ** 3
    print(f"\n{a.config}: checkpoint {size / gib:.2f} GiB on disk; torch {__import__('torch').__version__}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| path | exported tensors | exported size | peak RSS | RSS before the call | peak - before "
          "| ru_maxrss | temp file | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = ("old: dcp_to_torch_save + torch.load" if r["which"] == "old"
                else "new: read_tensors of the backbone (byte ranges)")
        print(f"| {name} | {r['tensors']} | {r['exported_bytes'] / gib:.2f} GiB | {r['peak_rss_kib'] / 1024**2:.2f} GiB "
              f"| {r['rss_before_kib'] / 1024**2:.2f} GiB | {(r['peak_rss_kib'] - r['rss_before_kib']) / 1024**2:.2f} GiB "
              f"| {r['ru_maxrss_kib'] / 1024**2:.2f} GiB | {r['temp_file_bytes'] / gib:.2f} GiB | {r['seconds']:.1f} s |")
    old, new = rows
    print(f"\npeak RSS ratio old/new: {old['peak_rss_kib'] / new['peak_rss_kib']:.1f}x; "
          f"checkpoint size / exported size: {size / new['exported_bytes']:.1f}x")
    print(json.dumps({"config": a.config, "checkpoint_bytes": size, "rows": rows}))


if __name__ == "__main__":
    main()
