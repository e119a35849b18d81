"""The one answer to "what does this path hold": `open_weights(path)` for every path a user can give.

Every reader of weights calls it (training's `student.pretrained_weights`, distillation's teacher, the head
warm-up, eval, embed, serve, visualize, `dinotrain export` / `convert`, the torch.hub entry points).

| path                                            | kind            | source (what is read)                    |
|-------------------------------------------------|-----------------|------------------------------------------|
| a checkpoint directory (`checkpoints/<it>/`)    | `checkpoint`    | itself                                   |
| a run directory, training or distillation       | `checkpoint`    | its newest complete checkpoint           |
|   ... finished, when only a backbone is asked   | `hub`           | `teacher_backbone.pth` / the only student |
| a full export (backbone + heads + config)       | `full`          | the file (a ViT's or a CNN student's)    |
| a `.safetensors` file                           | `safetensors`   | the file                                 |
| a Hugging Face directory (or its weights file)  | `hf`            | the directory (the file)                 |
| timm's Hub directory (`config.json` architecture) | `timm`        | the directory                            |
| a file in timm's dinov3 layout (.pth, .safetensors) | `timm`      | the file                                 |
| any other file: a torch-saved state dict        | `hub`           | the file                                 |
| a timm / torchvision student's `.safetensors`   | `any-student`   | the file (`weights/any_student.py`)      |

Both backbone families are recognised in every format: DINOv2 / DINO v1 (`ViTSpec`) and DINOv3 (`Dinov3Spec`:
the official `.pth` = our layout, transformers' `DINOv3ViTModel` directories, timm's dinov3 `Eva` weights; see
`dinov3_files.py`). `family="dinov2"` / `"dinov3"` makes weights of the other family a one-line WeightsError.

`which` picks a network of a checkpoint: 'teacher' (the EMA, default) or 'student' of a training run, a
student's name of a distillation (default: its only student). A run directory is pinned to one checkpoint
(`resolve`), so that every rank, and every resume, reads the same weights while the run goes on. Heads are
read only when asked for (`heads=True`) and held (a checkpoint, a full export). Files never run code.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dinotrain.distributed.checkpoint import complete_checkpoints, is_checkpoint
from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.train.rundir import RunDir
from dinotrain.weights.any_student import any_student_metadata, read_any_student
from dinotrain.weights.checkpoint import read_checkpoint, run_spec
from dinotrain.weights.dinov3_files import (TIMM, from_transformers_tensors, is_dinov3_config, is_dinov3_state_dict,
                                            is_timm_config, read_dinov3_tensors, read_timm_dir, read_transformers_dir)
from dinotrain.weights.full import backbone_of_full, is_full_export, read_full
from dinotrain.weights.hf import (CONFIG_NAME, from_hf_tensors, is_hf_dir, load_hf, read_config_json, read_hf_config,
                                  read_safetensors, reconcile_spec, spec_from_metadata)
from dinotrain.weights.state_dict import (DINOV2, DINOV3, Weights, WeightsError, family_mismatch, infer_spec,
                                          read_state_dict, spec_family, strip_to_backbone)

CHECKPOINT, FULL, HUB, SAFETENSORS, HF = "checkpoint", "full", "hub", "safetensors", "hf"
ANY = "any-student"  # a timm / torchvision student's export (`weights/any_student.py`)
KINDS = (CHECKPOINT, FULL, HUB, SAFETENSORS, HF, TIMM, ANY)


def _finished_export(run: RunDir) -> Path | None:
    """What a finished run exported: its teacher backbone, or its only student's; None before the end."""
    if run.teacher_backbone.is_file():
        return run.teacher_backbone
    students = run.finished_students()
    if len(students) > 1:
        raise ValueError(f"{run} is a distillation run with students {', '.join(students)}: pass one of them, "
                         f"e.g. --weights {run.student(students[0])}")
    return run.student(students[0]) if students else None


def _export_kind(exported: Path) -> str:
    return ANY if exported.suffix == ".safetensors" else HUB


def _pin_run(run: RunDir, which: str | None, heads: bool, checkpoint: bool) -> tuple[Path, str]:
    """A run directory's newest complete checkpoint; or its finished export, when that holds what is asked
    (a backbone, no particular network, not the checkpoint explicitly) or when there is no checkpoint."""
    export_first = which is None and not heads and not checkpoint
    if export_first and (exported := _finished_export(run)) is not None:
        return exported, _export_kind(exported)
    found = complete_checkpoints(run)
    if found:
        return found[-1], CHECKPOINT
    if which is None and not checkpoint and (exported := _finished_export(run)) is not None:
        return exported, _export_kind(exported)  # heads asked for, but the checkpoints are gone: the backbone alone
    first = "a run writes its first one after checkpoint.period_iterations"
    if checkpoint:
        raise FileNotFoundError(f"{run} is neither a checkpoint directory nor a run directory with a complete "
                                f"checkpoint ({first})")
    raise FileNotFoundError(f"{run} is a run directory without a complete checkpoint ({first}) and without "
                            f"{run.teacher_backbone.name} or {run.students.name}/*.pth (written when the run finishes)")


def resolve(path: str | Path, which: str | None = None, *, heads: bool = False,
            checkpoint: bool = False) -> tuple[Path, str]:
    """(what will be read, its kind) for `path`, looking at names and headers only (no tensors read).

    `checkpoint=True` reads a run directory's newest checkpoint even when the run has finished (`dinotrain
    export`: the checkpoint holds the student, the heads and the run's interpolation settings).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_dir():
        if is_checkpoint(path):
            return path, CHECKPOINT
        run = RunDir(path)
        if run.looks_like_run():
            return _pin_run(run, which, heads, checkpoint)
        if not is_hf_dir(path):
            raise FileNotFoundError(f"{path} is neither a run or checkpoint directory nor a transformers model "
                                    f"directory (it has no {CONFIG_NAME})")
        return path, TIMM if is_timm_config(read_config_json(path)) else HF
    if path.suffix == ".safetensors":
        if is_full_export(path):  # a timm / torchvision student's full export too (its header names the arch)
            return path, FULL
        return path, ANY if any_student_metadata(path) is not None else SAFETENSORS
    return path, HUB


def _looks_like_hf(tensors: dict[str, Tensor]) -> bool:
    return any(k.endswith("embeddings.cls_token") for k in tensors)


def _read_model_dir(path: Path) -> tuple[dict[str, Tensor], ViTSpec | Dinov3Spec]:
    """A transformers directory of either family."""
    config = read_config_json(path)
    if not is_dinov3_config(config):
        return load_hf(path)
    try:
        return read_transformers_dir(path, config)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from exc


def _timm_name_beside(path: Path) -> str | None:
    """timm's model name from the `config.json` of timm's Hub directory `path` sits in, if it does."""
    if is_hf_dir(path.parent):
        config = read_config_json(path.parent)
        if is_timm_config(config):
            return config["architecture"]
    return None


def _read_file(path: Path, kind: str) -> tuple[str, dict[str, Tensor], ViTSpec | Dinov3Spec]:
    """(kind, official-named backbone, spec) of a `.pth` / `.safetensors` file; HF-named tensors need the
    `config.json` of the directory they sit in (then the kind is `hf`); timm's dinov3 tensors give kind `timm`."""
    if kind == SAFETENSORS:
        tensors, metadata = read_safetensors(path)
    else:
        tensors, metadata = read_state_dict(path), {}
    if _looks_like_hf(tensors):
        if is_hf_dir(path.parent):  # e.g. the model.safetensors of an HF directory
            config = read_config_json(path.parent)
            if is_dinov3_config(config):
                return HF, *from_transformers_tensors(config, tensors, metadata)
            return HF, *from_hf_tensors(read_hf_config(path.parent), tensors, metadata)
        raise WeightsError(
            f"{path} holds transformers-named weights but has no config.json beside it; "
            "pass the transformers model directory (with its config.json) instead"
        )
    state_dict = strip_to_backbone(tensors)
    try:
        if is_dinov3_state_dict(state_dict):
            layout, state_dict, spec = read_dinov3_tensors(state_dict, metadata, _timm_name_beside(path))
            return (TIMM if layout == TIMM else kind), state_dict, spec
        spec = reconcile_spec(spec_from_metadata(metadata), infer_spec(state_dict))
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    return kind, state_dict, spec


def expect_family(weights: Weights, family: str) -> Weights:
    """`weights` if they are a backbone of `family` ("dinov2": DINOv2 / DINO v1, "dinov3"), else the one-line
    WeightsError naming both families."""
    if family not in (DINOV2, DINOV3):
        raise ValueError(f"unknown backbone family {family!r}; choose {DINOV2!r} or {DINOV3!r}")
    found = spec_family(weights.spec)
    if found != family:
        raise family_mismatch(found, family, weights.source)
    return weights


def open_weights(path: str | Path, which: str | None = None, *, heads: bool = False,
                 checkpoint: bool = False, family: str | None = None) -> Weights:
    """What `path` holds: backbone (official names), spec, heads (with `heads=True`, where held), the recipe
    config ({} if unknown), the resolved source and its kind. See the module docstring for the paths taken.
    `family` ("dinov2" or "dinov3"): the backbone family the caller expects (see `expect_family`)."""
    weights = _open(path, which, heads, checkpoint)
    return expect_family(weights, family) if family else weights


def _open(path: str | Path, which: str | None, heads: bool, checkpoint: bool) -> Weights:
    source, kind = resolve(path, which, heads=heads, checkpoint=checkpoint)
    if kind == CHECKPOINT:
        return read_checkpoint(source, which, heads=heads)
    if which not in (None, "teacher"):
        raise ValueError(f"--which {which!r}: {source} holds one backbone ({kind}); --which picks a network of a "
                         "run or checkpoint directory")
    if kind == ANY:
        if heads:
            raise WeightsError(f"{source} holds a timm / torchvision student's backbone, without heads (the head "
                               "warm-up does not take these students yet): give its full export, `dinotrain export RUN "
                               "OUT.safetensors --to full --which NAME`")
        backbone, spec = read_any_student(source)
        return Weights(source=str(source), kind=kind, backbone=backbone, spec=spec)
    if kind == FULL and heads:
        full = read_full(source)
        return Weights(source=str(source), kind=kind, backbone=full.backbone, spec=full.spec, heads=full.heads,
                       config=full.config)
    if kind == FULL:
        backbone, spec = backbone_of_full(source)
    elif kind == HF:
        backbone, spec = _read_model_dir(source)
    elif kind == TIMM and source.is_dir():
        backbone, spec = read_timm_dir(source, read_config_json(source))
    else:
        kind, backbone, spec = _read_file(source, kind)
    if isinstance(spec, Dinov3Spec) and (config := _run_config(path)):
        spec = run_spec(backbone, config)  # what the tensors do not say (norm eps, RoPE settings): the run's config
    return Weights(source=str(source), kind=kind, backbone=backbone, spec=spec)


def _run_config(path: str | Path) -> dict:
    """The resolved config of the run directory `path` ({} for anything else)."""
    run = RunDir(path)
    if not (Path(path).is_dir() and run.config.is_file()):
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run.config), resolve=True)


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], ViTSpec | Dinov3Spec]:
    """Official-named backbone state dict and its spec (ViTSpec or Dinov3Spec) of any path `open_weights` takes."""
    weights = open_weights(path)
    return weights.backbone, weights.spec
