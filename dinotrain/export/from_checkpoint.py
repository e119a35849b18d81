"""A backbone (and its heads) read straight from a sharded training or distillation checkpoint.

In one process, on the CPU, whatever the number of shards: only the chosen network's byte ranges are read
(never the optimizer state), after the shards are checked; the DCP metadata is unpickled allow-listed and
never runs code. `dinotrain export` writes what this reads; `eval`, `embed` and the hub entry points take a
run or checkpoint directory through it, finished or not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from dinotrain.distributed.checkpoint import complete_checkpoints, read_extra
from dinotrain.distributed.checkpoint_files import read_metadata, read_tensors
from dinotrain.models.state_dict import infer_spec
from dinotrain.models.vision_transformer import ViTSpec


@dataclass
class CheckpointBackbone:
    state: dict[str, Tensor]  # official names
    spec: ViTSpec
    label: str  # what was read, for messages: "teacher", "student 'vits14' (EMA)", ...
    checkpoint: Path
    tensors_dir: Path  # the DCP directory holding it
    prefix: str  # its tensors' prefix there, e.g. "model.teacher."
    config: dict  # the run's (or the student's) recipe config
    iteration: int | str


def newest_checkpoint(src: str | Path) -> Path:
    """`src` itself if it is a checkpoint directory, else the newest complete checkpoint of the run `src`."""
    src = Path(src)
    if (src / "extra.json").is_file():
        return src
    found = complete_checkpoints(src)
    if not found:
        raise FileNotFoundError(f"{src} is neither a checkpoint directory nor a run directory with a complete "
                                "checkpoint (a run writes its first one after checkpoint.period_iterations)")
    return found[-1]


def _source(ckpt: Path, which: str | None) -> tuple[Path, str, str, dict | None]:
    """(DCP directory, tensor prefix, label, config or None = the checkpoint's) of what `which` picks.

    A training checkpoint holds `model.teacher.*` (the EMA, default) and `model.student.*`. A distillation
    checkpoint holds one training-layout checkpoint per student under `students/<name>/`, whose
    `model.teacher.*` is that student's EMA: the exported model. Its frozen teacher is not stored.
    """
    students = ckpt / "students"
    if not students.is_dir():
        which = which or "teacher"
        if which not in ("teacher", "student"):
            raise ValueError(f"--which {which!r}: a training checkpoint holds 'teacher' (the EMA, default) "
                             "and 'student'")
        return ckpt, f"model.{which}.", which, None
    extra = read_extra(ckpt)
    names = sorted(d.name for d in students.iterdir() if d.is_dir())
    if not names:
        raise FileNotFoundError(f"distillation checkpoint {ckpt} has no student under students/")
    if which is None and len(names) > 1:
        raise ValueError(f"distillation checkpoint {ckpt} has students {', '.join(names)}: pick one with --which NAME")
    which = which or names[0]
    if which not in names:
        if which == "teacher":
            source = (extra.get("teacher") or {}).get("source", "see its extra.json")
            raise ValueError(f"the frozen teacher of a distillation run is not stored in its checkpoints "
                             f"(its source: {source}); export a student with --which {names[0]}")
        raise ValueError(f"distillation checkpoint {ckpt} has no student {which!r}; its students: {', '.join(names)}")
    config = ((extra.get("students") or {}).get(which) or {}).get("config") or {}
    return students / which, "model.teacher.", f"student {which!r} (EMA)", config


def read_checkpoint_backbone(src: str | Path, which: str | None = None) -> CheckpointBackbone:
    """The backbone `which` picks (default: the teacher EMA, or a distillation's only student) of a run/checkpoint."""
    ckpt = newest_checkpoint(src)
    tensors_dir, prefix, label, config = _source(ckpt, which)
    state = read_tensors(tensors_dir, prefix + "backbone.", what=f"{label} backbone")
    extra = read_extra(ckpt)
    config = (extra.get("config") or {}) if config is None else config
    student_cfg = config.get("student") or {}
    spec = infer_spec(state)
    if "interpolate_offset" in student_cfg:  # not stored in weights: take it from the run's config
        spec = dataclasses.replace(spec, interpolate_offset=float(student_cfg["interpolate_offset"]),
                                   interpolate_antialias=bool(student_cfg["interpolate_antialias"]))
    return CheckpointBackbone(state, spec, label, ckpt, tensors_dir, prefix, config, extra.get("iteration", ckpt.name))


def read_checkpoint_heads(found: CheckpointBackbone) -> dict[str, dict[str, Tensor]]:
    """The DINO head (and the iBOT head, when the run has a separate one) beside `found`'s backbone."""
    stored = read_metadata(found.tensors_dir).state_dict_metadata
    return {h: read_tensors(found.tensors_dir, f"{found.prefix}{h}.", what=f"{found.label} {h}")
            for h in ("dino_head", "ibot_head")
            if h == "dino_head" or any(k.startswith(f"{found.prefix}{h}.") for k in stored)}
