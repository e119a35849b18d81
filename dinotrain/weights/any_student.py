"""The export of a student of another architecture (`models/any_student.py`): one `.safetensors` file holding the
wrapped model's own tensors, under its library's names, so that

    timm.create_model("resnet18", num_classes=0, checkpoint_path="students/cnn.safetensors")   # timm students
    torchvision.models.get_model("resnet18").load_state_dict(safetensors.torch.load_file(...))  # torchvision

give the features we trained; its header's metadata names the architecture and patch grid (`dinotrain_arch`,
`dinotrain_patch_size`), which is how `open_weights` tells it from a ViT's weights. Our iBOT adapter (the patch
tokens' LayerNorm / projection) is not part of it: it only fed the iBOT head during training.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dinotrain.models.any_student import AnySpec
from dinotrain.weights.state_dict import WeightsError

ARCH_KEY, PATCH_KEY = "dinotrain_arch", "dinotrain_patch_size"


def any_student_metadata(path: Path) -> dict | None:
    """The header metadata of an any-architecture student export, None for any other safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file: the readers after this say so
        return None
    return metadata if ARCH_KEY in metadata else None


def any_spec_metadata(spec: AnySpec) -> dict[str, str]:
    """The header entries that name a student's architecture (this export's, and a full export's)."""
    return {ARCH_KEY: spec.arch, PATCH_KEY: str(spec.patch_size)}


def any_spec_from_metadata(metadata: dict, where: str | Path) -> AnySpec:
    try:
        return AnySpec(metadata[ARCH_KEY], int(metadata[PATCH_KEY]))
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{where}: corrupt {PATCH_KEY!r} metadata ({exc}); export the run again") from exc


def write_any_student(tensors: dict[str, Tensor], spec: AnySpec, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={**any_spec_metadata(spec), "format": "pt"})


def read_any_student(path: Path) -> tuple[dict[str, Tensor], AnySpec]:
    from safetensors.torch import load_file

    metadata = any_student_metadata(path)
    if metadata is None:
        raise WeightsError(f"{path} is not a dinotrain export of a timm / torchvision student (no {ARCH_KEY} in its "
                           "header)")
    return load_file(str(path)), any_spec_from_metadata(metadata, path)
