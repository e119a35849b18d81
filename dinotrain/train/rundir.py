"""The run directory: checked before anything is built, its logs, and its metrics history.

Every rank runs the checks (same shared filesystem, same answer), so a bad output directory stops
all ranks with one clear line instead of leaving some waiting in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("dinotrain.train")

RUN_FILES = ("config.yaml", "log.txt", "metrics.jsonl", "resume_history.jsonl")


class RunDirError(ValueError):
    """An output directory that cannot hold a run; the message says which path and why."""


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and check that the run's files can be written there."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"output directory {run_dir} exists but is not a directory; choose another --output-dir")
    except OSError as exc:
        raise RunDirError(f"cannot create output directory {run_dir}: {exc.strerror or exc} "
                          "(is a parent a file, or not writable?); choose another --output-dir") from exc
    for name in RUN_FILES + ("checkpoints",):
        path = run_dir / name
        want_dir = name == "checkpoints"
        if path.exists() and path.is_dir() != want_dir:
            kind = "a directory" if path.is_dir() else "a file"
            raise RunDirError(f"{path} is {kind}, but the run needs it to be {'a directory' if want_dir else 'a file'}; "
                              "move it away or choose another --output-dir")
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"output directory {run_dir} is not writable: {exc.strerror or exc}; "
                          "fix its permissions or choose another --output-dir") from exc


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Console + `log.txt` on the main rank; other ranks stay quiet."""
    root = logging.getLogger("dinotrain")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    if not is_main:
        root.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Records of a `metrics.jsonl` and how many lines were unreadable (a crash mid-write leaves a partial one)."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def rewind_metrics(path: Path, iteration: int) -> None:
    """Keep the history up to the resumed `iteration`; drop only what a crashed run logged past it."""
    records, bad = read_metrics(path)
    kept = [r for r in records if r["iteration"] <= iteration]
    if bad:
        log.warning("%s: %d unreadable line(s) (a partial write from a crash) dropped", path, bad)
    if len(kept) < len(records):
        log.info("%s: %d record(s) after iteration %d dropped (the run continues from there)",
                 path, len(records) - len(kept), iteration)
    if bad or len(kept) < len(records):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)


def move_aside(run_dir: Path) -> None:
    """`--no-resume`: previous checkpoints and metrics move to `*.old-<time>`; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, aside in (("checkpoints", f"checkpoints.old-{stamp}"), ("metrics.jsonl", f"metrics.old-{stamp}.jsonl")):
        if (run_dir / name).exists():
            (run_dir / name).rename(run_dir / aside)
            log.info("--no-resume: %s moved to %s", name, run_dir / aside)
