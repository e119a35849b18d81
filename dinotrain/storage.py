"""Writes that fail for want of space or permission, said in one line.

A full disk, an exhausted quota or a directory that is not writable is the environment's doing, not a bug:
the user needs the path, what was being written, the free space of that filesystem and what to do next (free
space or write elsewhere; a training run then resumes from its newest complete checkpoint). `writing(path,
what)` turns such a failure into one `StorageError` with that message, whatever form it arrives in: an
OSError's errno, DCP's `CheckpointException` that gathers each rank's own error, torch's zip writer that
reports a short write only as "unexpected pos" (then a 1 MiB probe write beside the path tells the errno, or
the filesystem has almost no space left), or safetensors' IoError text. It measures the free space before it removes the partial output.

One module, so that checkpoints, metrics, the log and every export say it alike; it imports nothing of
dinotrain (the lowest layer: `distributed/`, `train/` and `weights/` all use it).
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# errno -> (what the message starts with, the reason in words, what frees the way besides writing elsewhere)
_CAUSES = {
    errno.ENOSPC: ("disk full", "no space left on device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "disk quota exceeded", "free space in your quota or have it raised"),
    errno.EROFS: ("not writable", "read-only file system", "remount it writable"),
    errno.EACCES: ("not writable", "permission denied", "make it writable"),
}
# torch's zip writer (PytorchStreamWriter) loses the errno of a short write and says only this.
_ZIP_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")
# Below this much free space, a write that failed without an errno is taken as the disk being full.
ALMOST_FULL = 64 * 2**20

Resume = Callable[[], "str | None"]


class StorageError(RuntimeError):
    """A write failed for want of space or permission; the message names the path, what, the free space and
    what to do."""


def no_checkpoint() -> None:
    """`resume` of a run that has no checkpoint yet (the head warm-up): a rerun starts from the beginning."""
    return None


def human(n: float) -> str:
    """Bytes in human units: 0 B, 512 B, 1.5 KiB, 23.0 MiB, 1.2 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    path = Path(os.path.realpath(path))  # the filesystem a link points into is the one written
    while not os.path.exists(path) and path != path.parent:  # False also where a parent is not searchable
        path = path.parent
    return path


def free_space(path: str | os.PathLike) -> tuple[int, Path] | None:
    """(bytes a user may still write, the mount point) of the filesystem that holds (or would hold) `path`."""
    where = _existing(Path(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    mount = where if where.is_dir() else where.parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return free, mount


def tree_size(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (a checkpoint directory), 0 if it is gone."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the errors it wraps (cause, context, each rank's failure in a DCP CheckpointException)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo.extend(f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items(), key=lambda kv: kv[0]))
        todo.extend((e.__cause__, e.__context__))


def cause(exc: BaseException, path: str | os.PathLike) -> int | None:
    """The errno (one of `_CAUSES`) that made writing `path` fail with `exc`, or None for another failure."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return e.errno
    for e in chain:  # errors that carry the cause only as text (safetensors: `IoError(Os { code: 28, kind:
        for code in _CAUSES:  # StorageFull, message: "No space left on device" })`)
            if os.strerror(code) in str(e):
                return code
    if any(marker in str(e) for e in chain for marker in _ZIP_WRITER_FAILURES):
        code = _probe(path)
        if code is not None:
            return code
        space = free_space(path)
        if space is not None and space[0] < ALMOST_FULL:
            return errno.ENOSPC
    return None


def _probe(path: str | os.PathLike) -> int | None:
    """The errno a write of 1 MiB beside `path` fails with (one of `_CAUSES`), or None if it succeeds: what a
    writer that swallowed the errno met (a quota shows in no free-space figure)."""
    where = _existing(Path(path))
    probe = (where if where.is_dir() else where.parent) / f".dinotrain-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc.errno if exc.errno in _CAUSES else None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def _free(path: str | os.PathLike) -> str:
    space = free_space(path)
    return f"{human(space[0])} free on {space[1]}" if space else "free space unknown"


def circumstances(exc: BaseException, path: str | os.PathLike) -> str:
    """Why writing `path` failed and the free space there, e.g. "no space left on device; 0 B free on /data"."""
    code = cause(exc, path)
    if code is not None:
        reason = _CAUSES[code][1]
    else:
        reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
    return f"{reason}; {_free(path)}"


def message(code: int, path: str | os.PathLike, what: str, resume: Resume | None = None) -> str:
    """The one line: what failed where, why, the free space, what to do (and, in a run, where it resumes)."""
    kind, reason, fix = _CAUSES[code]
    line = f"{kind}: could not write {what} to {path} ({reason}; {_free(path)}). {fix[0].upper()}{fix[1:]} or "
    if resume is None:
        return line + "choose another output path, then run the same command again."
    try:
        point = resume()
    except OSError:  # the checkpoints cannot be listed either: say what a rerun does without naming one
        point = "its newest complete checkpoint"
    then = f"it resumes from {point}" if point else "there is no checkpoint yet, so it starts from the beginning"
    return line + f"point --output-dir elsewhere, then run the same command: {then}."


def storage_error(exc: BaseException, path: str | os.PathLike, what: str,
                  resume: Resume | None = None) -> StorageError | None:
    """A StorageError for `exc` if it is a failure for want of space or permission, else None."""
    code = cause(exc, path)
    return None if code is None else StorageError(message(code, path, what, resume))


def remove(path: str | os.PathLike) -> None:
    """Remove a partial output (file or directory), quietly."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def writing(path: str | os.PathLike, what: str, resume: Resume | None = None,
            partial: str | os.PathLike | None = None):
    """Write `what` to `path` inside this block; a failure for want of space or permission becomes one
    StorageError (other failures pass unchanged). `partial` (a temporary file or directory) is removed on any
    failure, after the free space was measured. `resume`: in a training run, returns what a rerun of the same
    command resumes from (None: no checkpoint yet); leave it out for a command that simply runs again."""
    try:
        yield
    except BaseException as exc:
        error = storage_error(exc, path, what, resume)
        if partial is not None:
            remove(partial)
        if error is None:
            raise
        raise error from exc


@contextmanager
def replacing(dst: str | os.PathLike, what: str, resume: Resume | None = None):
    """Yield a temporary path beside `dst` to write; on success it is renamed to `dst` (atomic on one
    filesystem: `dst` appears complete or not at all), on failure removed (see `writing`)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with writing(dst, what, resume, partial=tmp):
        dst.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, dst)
