"""A backbone (and its heads) read straight from a sharded training or distillation checkpoint.

In one process, on the CPU, whatever the number of shards: only the chosen network's byte ranges are read
(never the optimizer state), after the shards are checked; the DCP metadata is unpickled allow-listed and
never runs code. The resolver (`resolve.py`) calls this for checkpoint and unfinished run directories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor

from dinotrain.distributed.checkpoint import EXTRA, read_extra
from dinotrain.distributed.checkpoint_files import read_metadata, read_tensors
from dinotrain.models.any_student import AnySpec, is_any_student
from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.train.rundir import RunDir
from dinotrain.weights.dinov3_layouts import infer_dinov3_spec
from dinotrain.weights.state_dict import Weights, infer_spec

HEADS = ("dino_head", "ibot_head")


# DINOv3 settings that weights do not hold, read from a DINOv3 run's `student.*` config
_DINOV3_RUN_KEYS = ("norm_layer", "pos_embed_rope_normalize_coords", "pos_embed_rope_shift_coords",
                    "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords", "pos_embed_rope_dtype")


def run_spec(backbone: dict[str, Tensor], config: dict) -> ViTSpec | Dinov3Spec:
    """The spec of a run's backbone: shapes from the tensors, position-embedding interpolation (not stored in
    weights; for DINOv3 the norm eps and RoPE settings) from the run's `student.*` config when it has one."""
    student = config.get("student") or {}
    if is_any_student(student.get("arch", "")):  # a timm / torchvision student: its library builds it by name
        return AnySpec(student["arch"], int(student["patch_size"]))
    if "rope_embed.periods" in backbone:
        spec = infer_dinov3_spec(backbone)
        if student.get("pos_embed_type") == "rope":
            spec = dataclasses.replace(spec, **{k: student[k] for k in _DINOV3_RUN_KEYS})
        return spec
    spec = infer_spec(backbone)
    if "interpolate_offset" in student:
        spec = dataclasses.replace(spec, interpolate_offset=float(student["interpolate_offset"]),
                                   interpolate_antialias=bool(student["interpolate_antialias"]))
    return spec


def _pick(ckpt: Path, which: str | None, extra: dict) -> tuple[Path, str, str, dict]:
    """(DCP directory, tensor prefix, label, recipe config) of what `which` picks.

    A training checkpoint holds `model.teacher.*` (the EMA, default) and `model.student.*`. A distillation
    checkpoint holds one training-layout checkpoint per student (`RunDir.student_part`), whose
    `model.teacher.*` is that student's EMA: the exported model. Its frozen teacher is not stored.
    """
    names = RunDir.checkpoint_students(ckpt)
    if names is None:
        which = which or "teacher"
        if which not in ("teacher", "student"):
            raise ValueError(f"--which {which!r}: a training checkpoint holds 'teacher' (the EMA, default) "
                             "and 'student'")
        return ckpt, f"model.{which}.", which, extra.get("config") or {}
    if not names:
        raise FileNotFoundError(f"distillation checkpoint {ckpt} has no student under "
                                f"{RunDir.student_part('')}")
    if which is None and len(names) > 1:
        raise ValueError(f"distillation checkpoint {ckpt} has students {', '.join(names)}: pick one with --which NAME")
    which = which or names[0]
    if which not in names:
        if which == "teacher":
            source = (extra.get("teacher") or {}).get("source", f"see its {EXTRA}")
            raise ValueError(f"{ckpt} is a distillation checkpoint: the frozen teacher of a distillation run is not "
                             f"stored in its checkpoints (its source: {source}); export a student instead, e.g. "
                             f"`dinotrain export RUN OUT.safetensors --to full --which {names[0]}`")
        raise ValueError(f"distillation checkpoint {ckpt} has no student {which!r}; its students: {', '.join(names)}")
    config = ((extra.get("students") or {}).get(which) or {}).get("config") or {}
    return ckpt / RunDir.student_part(which), "model.teacher.", f"student {which!r} (EMA)", config


def read_checkpoint(ckpt: str | Path, which: str | None = None, heads: bool = False) -> Weights:
    """The backbone `which` picks (default: the teacher EMA, or a distillation's only student) of one checkpoint,
    and with `heads` its DINO head (and the iBOT head, when the run has a separate one)."""
    ckpt = Path(ckpt)
    extra = read_extra(ckpt)
    tensors_dir, prefix, label, config = _pick(ckpt, which, extra)
    backbone = read_tensors(tensors_dir, prefix + "backbone.", what=f"{label} backbone")
    found = None
    if heads:
        stored = read_metadata(tensors_dir).state_dict_metadata
        found = {h: read_tensors(tensors_dir, f"{prefix}{h}.", what=f"{label} {h}") for h in HEADS
                 if h == "dino_head" or any(k.startswith(f"{prefix}{h}.") for k in stored)}
    return Weights(source=str(ckpt), kind="checkpoint", backbone=backbone, spec=run_spec(backbone, config),
                   heads=found, config=config, label=label, iteration=extra.get("iteration", ckpt.name))
