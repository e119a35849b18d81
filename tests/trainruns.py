"""Run `dinotrain` for real (subprocesses, 1 or N processes) on the built-in tiny dataset."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A few-second pretraining: smoke/cpu_tiny shrunk to 4 blocks, 16-px crops, tiny heads and batches (4 blocks, not
# the recipe's 12: a run costs half the CPU, 3.2 s instead of 6.5 s for 12 iterations in one warm process).
FAST = [
    "student.depth=4",
    "train.batch_size_per_gpu=8", "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=3",
    "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "train.log_every=1",
    "student.patch_size=4", "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "dino.head_n_prototypes=256", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=256", "checkpoint.period_iterations=3",
]


# FAST adapted to DINOv3 (a 2-block ViT-Tiny/16 with RoPE, 2 storage tokens, masked key bias): patch 16 needs
# 64-px global crops (the iBOT masks need more than a 2x2 grid). 8 iterations, a checkpoint every 2.
DINOV3_FAST = [
    "student.pos_embed_type=rope", "student.depth=2", "student.patch_size=16", "student.n_storage_tokens=2",
    "student.mask_k_bias=true", "student.pos_embed_rope_rescale_coords=2", "student.pos_embed_rope_dtype=fp32",
    "student.drop_path_rate=0.1",
    "train.batch_size_per_gpu=4", "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=2",
    "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "train.log_every=1",
    "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "checkpoint.period_iterations=2", "checkpoint.keep_last=10",
]
# Gram anchoring: the Gram teacher takes the EMA teacher's weights before iteration 4 (counted from 0), again before 6.
GRAM = ["gram.use_loss=true", "gram.it_load_ema_teacher=4", "gram.update_frequency=2", "gram.it_first_update=6"]


def dinov3_args(run_dir: Path, overrides=()) -> list[str]:
    """`train` arguments of the few-second DINOv3 run with Gram anchoring (DINOV3_FAST + GRAM) in `run_dir`."""
    return ["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run_dir), *DINOV3_FAST, *GRAM, *overrides]


# 4 iterations of distillation into timm / torchvision students (tests/*/test_any_student_*; add the batch size):
# a 2-block ViT-Tiny teacher at 32 px (patch 8), 32-px local crops (a ResNet's total stride), a checkpoint every 2.
CNN_FAST = [
    "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=1", "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1", "train.log_every=1", "student.patch_size=8", "student.depth=2",
    "crops.global_crops_size=32", "crops.local_crops_size=32", "crops.local_crops_number=2",
    "dino.head_n_prototypes=256", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=256", "checkpoint.period_iterations=2", "checkpoint.keep_last=10",
]


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc` (a `run_cli` / `in_process` result) after checking it exited 0; its output tails otherwise."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# 20 iterations with a checkpoint every 5: long enough to be disturbed mid-way (a signal, a killed worker or rank).
LONG = ["optim.epochs=5", "checkpoint.period_iterations=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads() -> int:
    """This test process's share of the cores (all of them without xdist; pytest.ini runs one worker per core)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.pop("RANK", None)
    return e


def train_command(run_dir: Path, overrides=(), nproc: int = 1, extra=()) -> list[str]:
    args = ["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run_dir), *extra, *FAST, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "dinotrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "dinotrain", *args]


def train(run_dir: Path, overrides=(), nproc: int = 1, extra=(), timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc == 1:
        proc = in_process(train_args(run_dir, overrides, extra))
    else:
        proc = subprocess.run(train_command(run_dir, overrides, nproc, extra), env=env(), capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def start(run_dir: Path, overrides=(), nproc: int = 1, extra=()) -> subprocess.Popen:
    """Start a training run in the background (its output goes to run_dir.log)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(str(run_dir) + ".log", "w")
    return subprocess.Popen(train_command(run_dir, overrides, nproc, extra), env=env(), stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def teacher(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "teacher_backbone.pth", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run_cli(args, nproc: int = 1, timeout: int = 300, extra_env=None,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run `dinotrain ARGS` without raising on failure: in this process when nproc == 1 (`in_process`), else (or
    with `subprocess_`) in a new one, under torchrun when nproc > 1.

    On timeout a subprocess's whole process group is killed and the result has returncode -9 and
    `timed_out = True`, so a hang fails a test instead of hanging the suite.
    """
    if nproc == 1 and not subprocess_:
        return in_process(args, extra_env)
    if nproc == 1:
        cmd = [sys.executable, "-m", "dinotrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "dinotrain", *args]
    proc = subprocess.Popen(cmd, env=dict(env(), **(extra_env or {})), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        result.timed_out = False
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        result = subprocess.CompletedProcess(cmd, -9, out, err)
        result.timed_out = True
    return result


def in_process(args, extra_env=None) -> subprocess.CompletedProcess:
    """`dinotrain ARGS` through `dinotrain.cli.main` in this process, as `python -m dinotrain ARGS` would run it
    (exit code, stdout, stderr; 1 thread, as OMP_NUM_THREADS=1 in `env()`), without the ~4.5 s a new process spends
    importing torch and the rest. Logging, warnings, the environment and torch's thread count are put back after."""
    import contextlib
    import io
    import logging
    import traceback
    import warnings

    import torch

    from dinotrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (extra_env or {})}
    saved_threads = torch.get_num_threads()
    ours, root = logging.getLogger("dinotrain"), logging.getLogger()
    saved_level = root.level
    console = logging.StreamHandler(err)  # what `logging.basicConfig` in main gives a fresh process
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def reset_our_logger():  # a run's `setup_logging` leaves handlers on "dinotrain" that write to its buffers
        for h in list(ours.handlers):
            ours.removeHandler(h)
            h.close()
        ours.propagate = True
        ours.setLevel(logging.NOTSET)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    reset_our_logger()
    os.environ.update(extra_env or {})
    torch.set_num_threads(1)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # each run shows its warnings once, as a new process would
            warnings.showwarning = show_warning
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what an uncaught exception does to a process
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(console)
        root.setLevel(saved_level)
        reset_our_logger()
        torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result = subprocess.CompletedProcess(["dinotrain", *map(str, args)], code, out.getvalue(), err.getvalue())
    result.timed_out = False
    return result


def train_args(run_dir: Path, overrides=(), extra=()) -> list[str]:
    """`train` arguments of the few-second smoke run (FAST) in `run_dir`."""
    return ["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run_dir), *extra, *FAST, *overrides]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in new sessions)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children(p))
    for p in seen:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def wait_for(path: Path, proc, timeout: int = 120) -> None:
    """Wait until `path` exists while `proc` (a run to kill mid-way) is still running."""
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def wait_for_iteration(run_dir: Path, iteration: int, proc, timeout: int = 120) -> int:
    """Wait until `run_dir`'s metrics reach `iteration` while `proc` runs; returns the iteration reached."""
    import time

    deadline = time.time() + timeout
    while True:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        done = json.loads(lines[-1])["iteration"] if lines and lines[-1].endswith("}") else 0
        if done >= iteration:
            return done
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before iteration {iteration}"
        assert time.time() < deadline, f"iteration {iteration} not reached in {timeout} s"
        time.sleep(0.02)
