"""The full export: backbone + DINO/iBOT heads + recipe config of a run, in one `.safetensors` file.

Why it exists: the official project published backbones only, never the heads, so distillation (whose
frozen teacher needs its DINO/iBOT heads) and continued pretraining could not start from a finished run
without its sharded training checkpoint. This file is what they consume instead.

Layout: tensors `backbone.<official name>`, `dino_head.<k>` and optionally `ibot_head.<k>` (the names of
`DINOHead`'s state dict); metadata `format` = FULL_FORMAT, the backbone's ViTSpec (as every export of
ours records it) and `config` = the run's recipe config as JSON. A timm / torchvision student
(`models/any_student.py`) is stored as its checkpoint holds it: `backbone.model.<its library's name>` and our iBOT
adapter `backbone.patch_norm.*` (`backbone.patch_proj.*`, `backbone.mask_token`), its `AnySpec` in the metadata
(`weights/any_student.py`'s keys), so that it distils further as a teacher or continues as a student. The
resolver (`resolve.py`) reads all of it (`read_full`) or, when no heads are asked for, the backbone alone
(`backbone_of_full`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from dinotrain.storage import Resume, replacing
from dinotrain.models.any_student import AnySpec
from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.heads import head_settings
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.weights.any_student import ARCH_KEY, any_spec_from_metadata, any_spec_metadata
from dinotrain.weights.dinov3_layouts import infer_dinov3_spec
from dinotrain.weights.hf import reconcile_spec, spec_from_metadata, spec_to_metadata
from dinotrain.weights.state_dict import WeightsError, infer_spec

__all__ = ["FULL_FORMAT", "FullExport", "backbone_of_full", "config_of_full", "is_full_export", "read_full",
           "write_full"]

FULL_FORMAT = "dinotrain-full"
BACKBONE, DINO_HEAD, IBOT_HEAD = "backbone", "dino_head", "ibot_head"
HEADS = (DINO_HEAD, IBOT_HEAD)


@dataclass
class FullExport:
    """What a run hands to distillation / continued pretraining (all CPU tensors, official backbone names)."""

    backbone: dict[str, Tensor]
    spec: ViTSpec | Dinov3Spec | AnySpec
    heads: dict[str, dict[str, Tensor]]  # "dino_head" and optionally "ibot_head"
    config: dict = field(default_factory=dict)  # the run's recipe config (plain containers), may be {}


def _width(export: FullExport) -> int | None:
    """The backbone's output width: the spec's, or a timm / torchvision student's iBOT LayerNorm's (None if absent)."""
    if not isinstance(export.spec, AnySpec):
        return export.spec.embed_dim
    norm = export.backbone.get("patch_norm.weight")
    return None if norm is None else int(norm.shape[0])


def _spec_metadata(spec) -> dict[str, str]:
    if isinstance(spec, AnySpec):
        return any_spec_metadata(spec)
    return spec_to_metadata(spec)


def _check(export: FullExport, where: str) -> None:
    """Refuse an export the reader would refuse: no backbone, no DINO head, unknown or mismatched heads."""
    if not export.backbone:
        raise WeightsError(f"{where}: no backbone tensors")
    if DINO_HEAD not in export.heads:
        raise WeightsError(f"{where}: no {DINO_HEAD} (a full export needs the DINO head)")
    unknown = sorted(set(export.heads) - set(HEADS))
    if unknown:
        raise WeightsError(f"{where}: unknown heads {unknown}; a full export holds {list(HEADS)}")
    for name, state in export.heads.items():
        in_dim = head_settings(state, f"{where}: {name}")["in_dim"]
        width = _width(export)
        if width is not None and in_dim != width:
            raise WeightsError(f"{where}: {name} takes {in_dim}-dim inputs but the backbone's width is {width}")


def write_full(dst: str | Path, export: FullExport, resume: Resume | None = None) -> Path:
    """Write `export` as one `.safetensors` file at `dst`, atomically (temporary name, then rename); a full disk
    is one StorageError (`resume`: in a training run, what a rerun resumes from; see `storage.py`)."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"full export {dst} must end in .safetensors (one file: backbone, heads and config)")
    if not isinstance(export.config, dict):
        raise ValueError(f"the config of a full export must be a plain dict, got {type(export.config).__name__}")
    _check(export, str(dst))
    groups = {BACKBONE: export.backbone, **export.heads}
    tensors = {f"{group}.{k}": v.detach().to("cpu").contiguous() for group, state in groups.items()
               for k, v in state.items()}
    metadata = {**_spec_metadata(export.spec), "format": FULL_FORMAT, "config": json.dumps(export.config)}
    with replacing(dst, "the full export", resume) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return dst


def _header(path: Path) -> tuple[list[str], dict]:
    """Tensor names and metadata of a safetensors file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is not a valid safetensors file ({exc})") from exc


def is_full_export(path: str | Path) -> bool:
    """True for a `.safetensors` file written by `write_full` (or holding `dino_head.` tensors); reads the header only."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        keys, metadata = _header(path)
    except WeightsError:
        return False
    return metadata.get("format") == FULL_FORMAT or any(k.startswith(DINO_HEAD + ".") for k in keys)


def _config(path: Path, metadata: dict) -> dict:
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: corrupt `config` metadata ({exc}); export the run again") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: its `config` metadata is a {type(config).__name__}, not a mapping")
    return config


def config_of_full(path: str | Path) -> dict:
    """The recipe config a full export records, from its header only (no tensor is read)."""
    path = Path(path)
    return _config(path, _header(path)[1])


def _read_groups(path: Path, groups: tuple[str, ...]) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """The tensors of `groups` (prefix stripped) and the metadata; other tensors are never read."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"full export not found: {path}")
    keys, metadata = _header(path)
    out: dict[str, dict[str, Tensor]] = {g: {} for g in groups}
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            group, _, name = key.partition(".")
            if group in out and name:
                out[group][name] = f.get_tensor(key)
    return out, metadata


def _backbone_spec(path: Path, backbone: dict[str, Tensor], metadata: dict) -> ViTSpec | Dinov3Spec | AnySpec:
    """The recorded spec, checked against the tensors of either family (a DINOv3 backbone stores its RoPE
    periods, in our = the official layout); a timm / torchvision student's recorded AnySpec (its library checks
    the tensors when it loads them)."""
    if not backbone:
        raise WeightsError(f"{path} is not a full export: it has no `{BACKBONE}.*` tensors")
    if ARCH_KEY in metadata:
        if not any(k.startswith("model.") for k in backbone):
            raise WeightsError(f"{path}: a {metadata[ARCH_KEY]} student's full export without `{BACKBONE}.model.*` "
                               "tensors; export the run again")
        return any_spec_from_metadata(metadata, path)
    infer = infer_dinov3_spec if "rope_embed.periods" in backbone else infer_spec
    try:
        return reconcile_spec(spec_from_metadata(metadata), infer(backbone))
    except WeightsError as exc:
        raise WeightsError(f"{path}: backbone: {exc}") from exc


def backbone_of_full(path: str | Path) -> tuple[dict[str, Tensor], ViTSpec | Dinov3Spec]:
    """The backbone state dict and spec of a full export, as `read_weights` returns them (heads not read)."""
    path = Path(path)
    groups, metadata = _read_groups(path, (BACKBONE,))
    return groups[BACKBONE], _backbone_spec(path, groups[BACKBONE], metadata)


def read_full(path: str | Path) -> FullExport:
    """Everything a full export holds; WeightsError (one line naming the file) if it is not a valid one."""
    path = Path(path)
    groups, metadata = _read_groups(path, (BACKBONE, *HEADS))
    if not groups[DINO_HEAD]:
        raise WeightsError(f"{path} is not a full export: it has no `{DINO_HEAD}.*` tensors")
    spec = _backbone_spec(path, groups[BACKBONE], metadata)
    config = _config(path, metadata)
    export = FullExport(groups[BACKBONE], spec, {h: groups[h] for h in HEADS if groups[h]}, config)
    _check(export, str(path))
    return export
