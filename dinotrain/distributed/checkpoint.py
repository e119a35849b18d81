"""Sharded checkpoints with torch.distributed.checkpoint (DCP): exact resume, on any world size.

Layout: one checkpoint (`RunDir.checkpoint(iteration)`: where checkpoints live is the run directory's
business) holds the DCP shards of the model (student, teacher, loss centers) and the optimizer's
per-parameter state (keyed by parameter name; param groups come from the config), plus `EXTRA`
(iteration, sample-stream position, grad-scaler state, world size, skipped-image count, config): the
inside of a checkpoint is this module's format. A distillation checkpoint has one such part per student
(`RunDir.student_part(name)`) and the frozen teacher's centering state at the top (see `Parts`).
Loading validates first (see `checkpoint_files.py`) and never leaves a half-loaded model. It is written
as `.tmp-<iteration>` and renamed only when every rank has finished, so an interrupted save never looks
complete; a save that fails for want of space or permission removes it and stops every rank with one line
(`storage.py`). RNG states need no saving: every step
reseeds from (seed, iteration, rank) and every sample from its stream position.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dinotrain.distributed.checkpoint_files import CheckpointError, SafeFileSystemReader, validate_checkpoint
from dinotrain.distributed.env import PeerFailed, from_main
from dinotrain.storage import StorageError, free_space, human, remove, storage_error, tree_size
from dinotrain.train.rundir import RunDir

log = logging.getLogger("dinotrain.checkpoint")
EXTRA = "extra.json"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary, partial ones are ignored)."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name))


def is_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint directory (its `extra.json` is written last)."""
    return (Path(path) / EXTRA).is_file()


def resume_point(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint of a run and its iteration, as a rerun would resume from it; None if none."""
    done = complete_checkpoints(run_dir)
    return f"{done[-1]} (iteration {int(done[-1].name)})" if done else None


def _on_main(fn) -> BaseException | None:
    """Run `fn()` on rank 0 only; its error, if any (to be shared with the other ranks, not raised alone)."""
    if _is_main():
        try:
            fn()
        except Exception as exc:
            return exc
    return None


def read_extra(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / EXTRA).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable {EXTRA}: {exc}") from exc


def describe_failure(exc: BaseException) -> str:
    """The real cause of a failed DCP call: its inner exception, not `CheckpointException ranks:...`."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = sorted(failures.items(), key=lambda kv: kv[0])[0]
        inner = inner[0] if isinstance(inner, tuple) else inner
        return f"{describe_failure(inner)} (rank {rank})"
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch's weights-only refusal: keep the cause, not its advice
        from dinotrain.weights.state_dict import unpickling_refusal

        return f"{type(exc).__name__}: {unpickling_refusal(exc)}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1][:400] if lines else ''}".rstrip(": ")


def _optimizer_options() -> StateDictOptions:
    # Flat keys: the optimizer state of a parameter is `state.<parameter name>.<exp_avg|exp_avg_sq|step>`.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _requested(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer per-parameter state, live param-group settings), as flat name -> value.

    Only the per-parameter optimizer state (AdamW moments and step) is saved and loaded, matched to
    parameters by name. The param groups (lr/wd multipliers, layout, betas) are not: they come from
    the config of the run that resumes, and the schedules set lr and wd again every iteration, so a
    change of `optim.layerwise_decay` or of the group layout never makes a checkpoint unloadable.
    A part without an optimizer (e.g. the centering state of a frozen teacher) has only model tensors.
    """
    if optimizer is None:
        return get_model_state_dict(model), {}, {}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_optimizer_options())
    state = {k: v for k, v in optim_sd.items() if k.startswith("state.")}
    groups = {k: v for k, v in optim_sd.items() if not k.startswith("state.")}
    return model_sd, state, groups


def _check_against_metadata(ckpt: Path, request: dict[str, dict], metadata) -> None:
    """Every tensor this run needs is in the checkpoint with the same shape (else a clear error, before loading)."""
    stored = metadata.state_dict_metadata
    missing, mismatched = [], []
    for top, entries in request.items():
        for key, value in entries.items():
            item = stored.get(f"{top}.{key}")
            if item is None:
                missing.append(f"{top}.{key}")
            elif isinstance(value, torch.Tensor) and hasattr(item, "size") and tuple(item.size) != tuple(value.shape):
                mismatched.append(f"{top}.{key} (checkpoint {tuple(item.size)}, this run {tuple(value.shape)})")
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} entries this run needs are missing, e.g. {', '.join(missing[:3])}")
        if mismatched:
            parts.append(f"{len(mismatched)} have another shape, e.g. {', '.join(mismatched[:3])}")
        raise CheckpointError(f"checkpoint {ckpt} does not fit this run: " + "; ".join(parts))


def _empty_like(entries: dict) -> dict:
    return {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in entries.items()}


# A checkpoint holds one or more parts, each its own DCP directory: "" is the checkpoint directory
# itself (a training run: student, EMA teacher, centers and optimizer), other names are sub-directories
# (a distillation run: `RunDir.student_part(name)` per student, "" for the frozen teacher's centering state).
Parts = dict[str, tuple[nn.Module, "torch.optim.Optimizer | None"]]


class Checkpointer:
    """Save/load a training state; keeps the last `keep_last` complete checkpoints."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run = RunDir(run_dir)
        self.root = self.run.checkpoints
        self.keep_last = keep_last

    def save_parts(self, iteration: int, parts: Parts, extra: dict[str, Any]) -> Path:
        """Write checkpoint `iteration`: every rank its shards into `.tmp-<iteration>`, then rank 0 `extra.json`
        and the rename that makes it complete.

        A failure for want of space or permission stops every rank with the same one-line StorageError (the
        path, the free space, the checkpoint a rerun resumes from), and the partial directory is removed; no
        rank is left waiting in a barrier. Before writing, rank 0 warns if the newest checkpoint would not fit.
        """
        final = self.run.checkpoint(iteration)
        tmp = final.with_name(f".tmp-{final.name}")
        what = f"the checkpoint of iteration {iteration}"

        def begin() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._warn_if_low_space()
            tmp.mkdir(parents=True)

        self._settle(_on_main(begin), final, tmp, what)
        try:
            for name, (model, optimizer) in parts.items():
                model_sd, optim_state, _ = _requested(model, optimizer)
                dcp.save({"model": model_sd, "optim": optim_state}, checkpoint_id=str(tmp / name))
        except CheckpointException as exc:  # raised on every rank alike: DCP gathers each rank's own failure
            self._settle(exc, final, tmp, what)
            raise  # unreachable: _settle raises on failure

        def complete() -> None:
            (tmp / EXTRA).write_text(json.dumps({**extra, "iteration": iteration}, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)  # atomic on one filesystem: the checkpoint appears complete or not at all
            self._prune()

        self._settle(_on_main(complete), final, tmp, what)
        return final

    def resume_point(self) -> str | None:
        """What a rerun of the same command resumes from (the newest complete checkpoint), or None."""
        return resume_point(self.run)

    def _settle(self, exc: BaseException | None, final: Path, tmp: Path, what: str) -> None:
        """Every rank learns rank 0's outcome of a step of the save (a broadcast: also the barrier between steps).

        On failure rank 0 measures the free space, removes the partial checkpoint and says whether it was for
        want of space or permission; then every rank raises: that StorageError, its own error, or PeerFailed.
        """
        verdict = None  # rank 0's: None when the step went well, else (a storage error?, its message)
        if _is_main() and exc is not None:
            error = storage_error(exc, final, what, self.resume_point)
            remove(tmp)
            verdict = (error is not None, str(error) if error is not None else describe_failure(exc))
        verdict = from_main(verdict)
        if verdict is None:
            if exc is not None:
                raise exc
            return
        is_storage, text = verdict
        if is_storage:
            raise StorageError(text) from exc
        if exc is not None:
            raise exc
        raise PeerFailed(f"rank 0 could not write {what}: {text}")

    def _warn_if_low_space(self) -> None:
        """A warning, before a save, when the filesystem has less free space than the newest checkpoint takes."""
        done = complete_checkpoints(self.run)
        space = free_space(self.root)
        if not done or space is None:
            return
        need = tree_size(done[-1])
        if space[0] < need:
            log.warning("only %s free on %s, less than the newest checkpoint's %s (%s): saving the next one in %s "
                        "will likely fail; free space there or point --output-dir elsewhere",
                        human(space[0]), space[1], human(need), done[-1], self.root)

    def _prune(self) -> None:
        for old in complete_checkpoints(self.run)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load_parts(self, ckpt: Path, parts: Parts) -> dict:
        """Load one checkpoint into the (sharded) models and optimizers; returns its extra state.

        All or nothing: every part is validated (metadata read without running code, shard sizes,
        every needed tensor present with its shape) and read into fresh buffers; the live models and
        optimizers are only written once every part was read. A failure leaves them untouched.
        """
        extra = read_extra(ckpt)
        loaded = []
        for name, (model, optimizer) in parts.items():
            where = ckpt / name
            if name and not (where / ".metadata").is_file():
                raise CheckpointError(f"checkpoint {ckpt} has no part {name!r} (no {where}/.metadata)")
            metadata = validate_checkpoint(where)
            model_sd, optim_state, optim_groups = _requested(model, optimizer)
            request = {"model": _empty_like(model_sd), "optim": _empty_like(optim_state)}
            _check_against_metadata(where, request, metadata)
            try:
                dcp.load(request, storage_reader=SafeFileSystemReader(where))
            except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
                raise CheckpointError(f"checkpoint {where} could not be read: {describe_failure(exc)}") from exc
            loaded.append((model, optimizer, request, optim_groups))
        for model, optimizer, request, optim_groups in loaded:
            if optimizer is None:
                set_model_state_dict(model, request["model"])
            else:
                set_state_dict(model, optimizer, model_state_dict=request["model"],
                               optim_state_dict={**request["optim"], **optim_groups}, options=_optimizer_options())
        return extra

    def load_latest_parts(self, parts: Parts, candidates: list[Path] | None = None) -> dict | None:
        """Newest checkpoint that loads; a damaged one is reported and the previous one used.

        Returns None only when there is no checkpoint. If there are checkpoints and none loads, raises
        CheckpointError with each one's cause: a run never silently starts over in place.
        """
        candidates = complete_checkpoints(self.run) if candidates is None else candidates
        failures = []
        for ckpt in reversed(candidates):
            try:
                extra = self.load_parts(ckpt, parts)
            except CheckpointError as exc:
                log.error("%s; trying the previous checkpoint", exc)
                failures.append(str(exc))
                continue
            log.info("resumed from %s (iteration %d)", ckpt, extra["iteration"])
            return extra
        if failures:
            raise CheckpointError(
                f"none of the {len(failures)} checkpoint(s) in {self.root} can be loaded, so the run cannot resume. "
                f"Newest: {failures[0]}" + (f"; oldest: {failures[-1]}" if len(failures) > 1 else "")
                + ". Fix the cause, or pass --no-resume to start over (the old checkpoints are moved aside, not deleted).")
        return None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of a (sharded) module; every rank must call it, rank 0 gets the tensors."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
