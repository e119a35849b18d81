"""The run directory: every path of a run named once (`RunDir`), checked before anything is built, its logs,
and its metrics history.

Layout: `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per logged iteration), `log.txt`,
`resume_history.jsonl`, `checkpoints/<iteration:08d>/` (sharded; a distillation checkpoint holds one part per
student in `students/<name>/`), at the end `teacher_backbone.pth` (pretraining) or `students/<name>.pth`
(distillation, one per student), `head_warmup/` (the head warm-up's full export and metrics), `slurm/`
(the job logs of `dinotrain submit`) and `plots/` (`dinotrain plot`). What one checkpoint holds inside
(DCP shards, `extra.json`) is the checkpoint's own format: `distributed/checkpoint.py`.

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

from dinotrain.storage import circumstances, no_checkpoint, replacing

log = logging.getLogger("dinotrain.train")

_STUDENTS = "students"


class RunDirError(ValueError):
    """An output directory that cannot hold a run; the message says which path and why."""


class RunDir:
    """The paths of one run directory. Nothing else in dinotrain spells them."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- files of the run --------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def resume_history(self) -> Path:
        return self.root / "resume_history.jsonl"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def plots(self) -> Path:
        """Where `dinotrain plot` writes the training curves by default."""
        return self.root / "plots"

    # ---- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / f"{iteration:08d}"

    @staticmethod
    def student_part(name: str) -> str:
        """The part of a distillation checkpoint that holds student `name` (a training-layout checkpoint)."""
        return f"{_STUDENTS}/{name}"

    @staticmethod
    def checkpoint_students(ckpt: str | os.PathLike) -> list[str] | None:
        """The students of a distillation checkpoint, sorted; None for a training checkpoint."""
        parts = Path(ckpt) / _STUDENTS
        if not parts.is_dir():
            return None
        return sorted(d.name for d in parts.iterdir() if d.is_dir())

    # ---- what a finished run leaves ----------------------------------------------------------------
    @property
    def teacher_backbone(self) -> Path:
        return self.root / "teacher_backbone.pth"

    @property
    def students(self) -> Path:
        return self.root / _STUDENTS

    def student(self, name: str) -> Path:
        """A finished student's export, whichever `student_export` wrote."""
        other = self.student_export(name, any_architecture=True)
        return other if other.is_file() else self.student_export(name, any_architecture=False)

    def student_export(self, name: str, any_architecture: bool) -> Path:
        """Where a student's export is written: a ViT's hub `.pth`, or a timm / torchvision student's `.safetensors`
        in its library's layout (`weights/any_student.py`)."""
        return self.students / f"{name}{'.safetensors' if any_architecture else '.pth'}"

    def finished_students(self) -> list[str]:
        """Names of the students a finished distillation run exported, sorted."""
        if not self.students.is_dir():
            return []
        return sorted({p.stem for pattern in ("*.pth", "*.safetensors") for p in self.students.glob(pattern)})

    @property
    def head_warmup(self) -> Path:
        return self.root / "head_warmup"

    @property
    def warmup_full(self) -> Path:
        """The head warm-up's result: backbone + warmed-up heads + config, as a full export."""
        return self.head_warmup / "teacher_full.safetensors"

    @property
    def warmup_metrics(self) -> Path:
        return self.head_warmup / self.metrics.name

    def looks_like_run(self) -> bool:
        """A directory a run wrote into (as opposed to, say, a transformers model directory)."""
        return self.root.is_dir() and (self.checkpoints.is_dir() or self.config.is_file()
                                       or self.teacher_backbone.is_file() or self.students.is_dir())


def prepare_run_dir(run_dir: str | os.PathLike) -> None:
    """Create `run_dir` if needed and check that the run's files can be written there."""
    run = RunDir(run_dir)
    run_dir = run.root
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"output directory {run_dir} exists but is not a directory; choose another --output-dir")
    except OSError as exc:
        raise RunDirError(f"cannot create output directory {run_dir}: {exc.strerror or exc} "
                          "(is a parent a file, or not writable?); choose another --output-dir") from exc
    for path in (run.config, run.log, run.metrics, run.resume_history, run.checkpoints):
        want_dir = path == run.checkpoints
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


class LogFile(logging.FileHandler):
    """`log.txt`, which a full disk or lost permission does not turn into a traceback per record (logging's
    default): the first failed write is said once, in one line on stderr (path, cause, free space), and the
    file is no longer written. The console keeps logging and the run goes on; if the disk stays full, the next
    metrics or checkpoint write stops it with its own one-line error."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            return super().handleError(record)
        self.failed = True
        why = circumstances(exc, self.baseFilename)
        print(f"dinotrain: the log file {self.baseFilename} is no longer written ({why}); the console keeps the log",
              file=sys.stderr, flush=True)
        stream, self.stream = self.stream, None
        try:
            stream.close()  # what it still buffers cannot be written either
        except (OSError, ValueError, AttributeError):
            pass


def setup_logging(run_dir: str | os.PathLike, is_main: bool) -> None:
    """Console + `log.txt` on the main rank; other ranks stay quiet."""
    root = logging.getLogger("dinotrain")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    if not is_main:
        root.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), LogFile(RunDir(run_dir).log)):
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
        resume = (lambda: f"iteration {iteration}") if iteration else no_checkpoint
        with replacing(path, "the metrics history", resume) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def move_aside(run_dir: str | os.PathLike) -> None:
    """`--no-resume`: previous checkpoints and metrics move to `*.old-<time>`; nothing is deleted."""
    run = RunDir(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (run.checkpoints, run.metrics):
        aside = path.with_name(f"{path.stem}.old-{stamp}{path.suffix}")
        if path.exists():
            path.rename(aside)
            log.info("--no-resume: %s moved to %s", path.name, aside)
