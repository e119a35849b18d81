"""Output files of commands: an existing output is never overwritten silently."""

from __future__ import annotations

from pathlib import Path


def refuse_existing(path: str | Path, force: bool) -> None:
    """Raise FileExistsError (one line naming `path` and `--force`) if `path` exists and `force` is not set."""
    if Path(path).exists() and not force:
        raise FileExistsError(f"output {path} exists; pass --force to overwrite it, or choose another path")
