"""A full disk or a place that is not writable: one line naming the path, what was being written, the free
space and the checkpoint to resume from; no partial file ever taken for a complete one (issue 24).

The must-show trains for real on a tmpfs mounted here (root only; skipped otherwise) that holds the first
checkpoint but not the second; the others are unit tests of `dinotrain/storage.py` and its users.
"""

from __future__ import annotations

import errno
import gc
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from trainruns import REPO, env, max_abs_diff, run_cli, teacher, train_args, train_command

# The FAST smoke run with a 2-block student: 12 iterations, a checkpoint every 3 of 15,318,414 bytes (measured in
# a plain run; the test checks it again): a 22 MiB tmpfs holds the first and half the second.
DEPTH = ["student.depth=2"]
TMPFS_BYTES = 22 * 2**20
TMPFS = f"{TMPFS_BYTES // 2**20}m"
GIB = 2**30


@contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of `size` at `where` (skips the test where mounting is not permitted)."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _one_line_error(proc, command: str = "train") -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dinotrain {command}: error: "), proc.stderr[-3000:]
    return last


def test_disk_full_during_the_second_checkpoint_says_so_and_the_rerun_ends_bitwise_equal(tmp_path):
    """The must-show: a tmpfs that fills during the second checkpoint, then the same command after more space."""
    from dinotrain.distributed.checkpoint import complete_checkpoints

    with tmpfs(tmp_path / "disk", TMPFS) as disk:
        run = disk / "run"
        ref = tmp_path / "ref"  # an undisturbed run, beside it (2 cores)
        with open(tmp_path / "ref.log", "w") as log:
            undisturbed = subprocess.Popen(train_command(ref, DEPTH), env=env(), cwd=REPO, stdout=log, stderr=log)
            full = run_cli(train_args(run, DEPTH), timeout=240)
            assert undisturbed.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-3000:]
        size = max(sum(f.stat().st_size for f in c.iterdir()) for c in complete_checkpoints(ref))
        assert size < TMPFS_BYTES < 2 * size, f"re-size TMPFS: a checkpoint now takes {size} bytes"

        line = _one_line_error(full)
        assert "disk full" in line and "no space left on device" in line, line
        assert str(run / "checkpoints" / "00000006") in line and "iteration 6" in line, line
        assert f" free on {disk})" in line, line
        assert f"it resumes from {run / 'checkpoints' / '00000003'} (iteration 3)" in line, line
        assert [c.name for c in complete_checkpoints(run)] == ["00000003"]
        assert not list((run / "checkpoints").glob(".tmp-*")), "the partial checkpoint is left behind"
        assert not (run / "teacher_backbone.pth").exists()

        subprocess.run(["mount", "-o", f"remount,size={8 * size}", "tmpfs", str(disk)], check=True)
        again = run_cli(train_args(run, DEPTH), timeout=240)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {run / 'checkpoints' / '00000003'} (iteration 3)" in again.stdout
        assert max_abs_diff(teacher(run), teacher(ref)) == 0.0
        assert not [p.name for p in run.rglob("*tmp*")]


def test_metrics_and_log_that_cannot_be_written_in_a_real_run(tmp_path):
    """`metrics.jsonl` stops the run with its line; `log.txt` is said once and the run goes on until then."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "log.txt"):
        (run / name).symlink_to("/dev/full")  # every write fails with ENOSPC
    proc = run_cli(train_args(run, [*DEPTH, "train.max_iterations=2"]), timeout=240)
    line = _one_line_error(proc)
    assert line.startswith(f"dinotrain train: error: disk full: could not write the metrics of iteration 1 to "
                           f"{run / 'metrics.jsonl'} (no space left on device; "), line
    assert line.endswith("then run the same command: there is no checkpoint yet, so it starts from the beginning."), line
    assert proc.stderr.strip().splitlines() == [
        f"dinotrain: the log file {run / 'log.txt'} is no longer written ({line.split(' (', 1)[1].split(')')[0]}); "
        "the console keeps the log", line], proc.stderr
    assert "world size 1" in proc.stdout  # the console kept logging


# ---- the classifier and its message -------------------------------------------------------------------------
def _free(monkeypatch, free: int) -> None:
    usage = shutil._ntuple_diskusage(100 * GIB, 100 * GIB - free, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def _dcp_failure(inner: BaseException):
    """What DCP raises on every rank when one rank's write failed: the rank's error inside, no errno outside."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("dcp save", {0: (inner, traceback.StackSummary())})


def test_enospc_names_the_path_what_free_space_and_the_checkpoint_to_resume_from(tmp_path):
    from dinotrain.storage import StorageError, writing

    where = Path("/dev/full")  # every write fails with ENOSPC
    if not where.exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(StorageError) as caught:
        with writing(where, "the metrics of iteration 7", lambda: "/r/checkpoints/00000006 (iteration 6)"):
            with where.open("a") as f:
                f.write("{}\n")
    line = str(caught.value)
    assert line.startswith("disk full: could not write the metrics of iteration 7 to /dev/full (no space left on "
                           "device; "), line
    assert " free on /dev)" in line and "\n" not in line
    assert line.endswith("point --output-dir elsewhere, then run the same command: it resumes from "
                         "/r/checkpoints/00000006 (iteration 6)."), line
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC

    with pytest.raises(StorageError, match="there is no checkpoint yet, so it starts from the beginning"):
        with writing(tmp_path / "metrics.jsonl", "the metrics", lambda: None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(StorageError, match=r"disk quota exceeded: .* then run the same command again\.$"):
        with writing(tmp_path / "out.pth", "the hub weights"):  # a command, not a run: no resume point
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


def test_dcp_failure_is_a_full_disk_only_with_a_cause_or_almost_no_space(tmp_path, monkeypatch):
    from dinotrain.storage import StorageError, human, storage_error, writing

    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    _free(monkeypatch, 100 * 2**10)  # what a tmpfs shows after it filled: (almost) nothing
    error = storage_error(_dcp_failure(short_write), tmp_path / "00000006", "the checkpoint of iteration 6")
    assert isinstance(error, StorageError) and str(error).startswith("disk full: ") and "100.0 KiB free" in str(error)
    _free(monkeypatch, 500 * GIB)  # plenty of space: a zip writer failure is something else, reported as it is
    assert storage_error(_dcp_failure(short_write), tmp_path, "the checkpoint") is None
    with tmpfs(tmp_path / "quota", "64k") as full:  # ... unless a write there fails (as under an exhausted quota,
        with pytest.raises(OSError):  # where the free space looks plentiful): a probe write tells the errno
            (full / "filler").write_bytes(bytes(2**20))
        error = storage_error(_dcp_failure(short_write), full / "00000006", "the checkpoint of iteration 6")
        assert str(error).startswith("disk full: ") and "500.0 GiB free" in str(error), error
        assert os.listdir(full) == ["filler"]  # the probe cleaned up after itself
    with pytest.raises(type(_dcp_failure(short_write))):
        with writing(tmp_path, "the checkpoint", lambda: None):
            raise _dcp_failure(short_write)
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # with an errno the free space does not matter
    assert "no space left on device; 500.0 GiB free" in str(storage_error(_dcp_failure(enospc), tmp_path, "it"))
    safetensors_style = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
    assert str(storage_error(safetensors_style, tmp_path, "it")).startswith("disk full: ")
    assert storage_error(ValueError("bad value"), tmp_path, "it") is None
    assert [human(n) for n in (0, 1023, 1536, 23 * 2**20, 3 * 2**40)] == ["0 B", "1023 B", "1.5 KiB", "23.0 MiB",
                                                                          "3.0 TiB"]


def test_a_directory_that_is_not_writable_says_so():
    """EACCES for real: a read-only directory, written as an unprivileged user (root may write anywhere)."""
    top = Path(tempfile.mkdtemp(prefix="dinotrain-ro-"))  # not under pytest's tmp_path: that is private to root
    top.chmod(0o755)
    ro = top / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    # the unprivileged user may not read the checkout (a clone under a root-only directory): it gets its own copy of
    # storage.py, which imports nothing but the standard library
    shutil.copy(REPO / "dinotrain" / "storage.py", top / "storage.py")
    code = ("import sys; from pathlib import Path; from storage import StorageError, replacing\n"
            "try:\n"
            f"    with replacing(Path({str(ro / 'out.pth')!r}), 'the hub weights') as tmp: tmp.write_bytes(b'x')\n"
            "except StorageError as exc: print(exc)\n")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to write as an unprivileged user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(top)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"not writable: could not write the hub weights to {ro / 'out.pth'} (permission "
                                  "denied; "), proc.stdout
    assert "Make it writable or choose another output path, then run the same command again." in proc.stdout
    assert os.listdir(ro) == []
    shutil.rmtree(top)


def test_convert_onto_a_read_only_or_full_filesystem_is_one_line_and_leaves_nothing(tmp_path, capsys):
    from dinotrain.cli import main
    from dinotrain.models.vision_transformer import build_vit

    src = tmp_path / "backbone.pth"
    torch.save(build_vit("vit_tiny", patch_size=4, img_size=16, depth=2).state_dict(), src)  # ~2.2 MB
    with tmpfs(tmp_path / "small", "256k") as small:
        assert main(["convert", str(src), str(small / "out.pth"), "--to", "hub"]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"dinotrain convert: error: disk full: could not write the hub weights to "
                               f"{small / 'out.pth'} (no space left on device; ") and "\n" not in line, line
        assert os.listdir(small) == []  # no partial file, under any name
        gc.collect()  # the failed writer's file, deleted, is held open by the frames of the error until collected
        subprocess.run(["mount", "-o", "remount,ro", "tmpfs", str(small)], check=True)
        assert main(["convert", str(src), str(small / "hf"), "--to", "hf"]) == 2
        line = capsys.readouterr().err.strip()
        assert "not writable: could not write the Hugging Face weights" in line and "read-only file system" in line


# ---- the checkpoint ----------------------------------------------------------------------------------------
def _parts():
    torch.manual_seed(0)
    return {"": (nn.Linear(256, 256), None)}  # 257 KiB of tensors


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no process group
def test_a_checkpoint_that_does_not_fit_is_removed_and_the_previous_one_stays(tmp_path):
    from dinotrain.distributed.checkpoint import Checkpointer, complete_checkpoints
    from dinotrain.storage import StorageError

    with tmpfs(tmp_path / "disk", "400k") as disk:
        ckpt = Checkpointer(disk / "run")
        ckpt.save_parts(1, _parts(), {})
        with pytest.raises(StorageError) as caught:
            ckpt.save_parts(2, _parts(), {})
        line = str(caught.value)
        assert line.startswith(f"disk full: could not write the checkpoint of iteration 2 to "
                               f"{disk / 'run' / 'checkpoints' / '00000002'} (no space left on device; "), line
        assert line.endswith(f"it resumes from {disk / 'run' / 'checkpoints' / '00000001'} (iteration 1)."), line
        assert [c.name for c in complete_checkpoints(disk / "run")] == ["00000001"]
        assert os.listdir(disk / "run" / "checkpoints") == ["00000001"]  # the partial one was removed


def _two_rank_saves(rank: int, run: str, store: str) -> None:
    """Rank `rank` of 2: a good save, one whose rank-0-only step fails, one whose shards do not fit."""
    import datetime
    import json
    import types

    import torch.distributed as dist

    from dinotrain.distributed import checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # a rank left waiting fails after 30 s
    outcomes = []
    try:
        ckpt = checkpoint.Checkpointer(run)
        ckpt.save_parts(1, _parts(), {})

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        checkpoint.json = types.SimpleNamespace(dumps=no_space)  # rank 0's extra.json: a step only it takes
        for it in (2, 3):
            try:
                ckpt.save_parts(it, _parts(), {})
                outcomes.append("saved")
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            checkpoint.json = json  # the third: the shards themselves do not fit
    finally:
        Path(run, f"rank{rank}.json").write_text(json.dumps(outcomes))
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_two_ranks_stop_together_with_the_same_line(tmp_path):
    """No rank waits in a barrier for one that failed: every rank raises the same StorageError, at once."""
    import json

    import torch.multiprocessing as mp

    from dinotrain.distributed.checkpoint import complete_checkpoints

    with tmpfs(tmp_path / "disk", "400k") as disk:
        run = disk / "run"
        # forked, not spawned: the ranks start in a fraction of a second with torch and dinotrain imported
        mp.start_processes(_two_rank_saves, args=(str(run), str(tmp_path / "store")), nprocs=2, join=True,
                           start_method="fork")
        ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1], ranks
        rank0_only, shards = ranks[0]
        assert rank0_only.startswith(f"StorageError: disk full: could not write the checkpoint of iteration 2 to "
                                     f"{run / 'checkpoints' / '00000002'} (no space left on device; "), rank0_only
        assert shards.startswith(f"StorageError: disk full: could not write the checkpoint of iteration 3 to "), shards
        assert shards.endswith(f"it resumes from {run / 'checkpoints' / '00000001'} (iteration 1)."), shards
        assert [c.name for c in complete_checkpoints(run)] == ["00000001"]
        assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_low_space_before_a_checkpoint_is_a_warning_not_a_stop(tmp_path, monkeypatch):
    from dinotrain.distributed.checkpoint import Checkpointer, complete_checkpoints

    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save_parts(1, _parts(), {})
    size = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints" / "00000001").iterdir())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dinotrain.checkpoint")
    logger.addHandler(handler)
    try:
        _free(monkeypatch, size + 2**20)
        ckpt.save_parts(2, _parts(), {})
        assert not [r for r in records if r.levelno >= logging.WARNING]
        _free(monkeypatch, size // 2)
        ckpt.save_parts(3, _parts(), {})  # the space is not really short here: the save goes on
    finally:
        logger.removeHandler(handler)
    (warning,) = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert "less than the newest checkpoint's" in warning
    assert str(tmp_path / "run" / "checkpoints" / "00000002") in warning
    assert "free on" in warning and "will likely fail" in warning
    assert [c.name for c in complete_checkpoints(tmp_path / "run")] == ["00000001", "00000002", "00000003"]


# ---- the log file ------------------------------------------------------------------------------------------
def test_a_log_file_that_cannot_be_written_is_said_once_and_the_console_goes_on(tmp_path, capsys):
    from dinotrain.train.rundir import setup_logging

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    (tmp_path / "log.txt").symlink_to("/dev/full")  # every write of the run's log file fails with ENOSPC
    logger = logging.getLogger("dinotrain")
    before = logger.handlers[:], logger.propagate
    try:
        setup_logging(tmp_path, is_main=True)
        for i in range(5):
            logging.getLogger("dinotrain.train").info("record %d", i)
    finally:
        for h in logger.handlers[:]:
            logger.removeHandler(h)
            h.close()
        for h in before[0]:
            logger.addHandler(h)
        logger.propagate = before[1]
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.strip()], err  # exactly one line, no "--- Logging error ---" per record
    assert err.startswith(f"dinotrain: the log file {tmp_path / 'log.txt'} is no longer written (no space left on "
                          "device; "), err
    assert " free on /dev); the console keeps the log" in err
    assert [ln.split(": ", 1)[1] for ln in out.splitlines()] == [f"record {i}" for i in range(5)]
