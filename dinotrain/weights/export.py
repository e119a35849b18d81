"""`dinotrain export`: a backbone (teacher by default) of a run or checkpoint, consolidated in this one process
(no GPU), written as hub `.pth`, Hugging Face, safetensors, `full` (backbone + DINO/iBOT heads + config), or an
ONNX graph (`onnx_export.py`; also from any weights file or directory `open_weights` takes)."""

from __future__ import annotations

from pathlib import Path

from dinotrain.models.any_student import AnySpec, export_state_dict
from dinotrain.outputs import refuse_existing
from dinotrain.weights.any_student import write_any_student
from dinotrain.weights.convert import write_weights
from dinotrain.weights.full import FullExport, write_full
from dinotrain.weights.resolve import open_weights


def export_run(src: str | Path, dst: str | Path, to: str, which: str | None = None, force: bool = False, *,
               fp16: bool = False, opset: int | None = None, example_size: int = 224) -> Path:
    """Write the `which` backbone of `src` to `dst` in format `to`; prints what went where, returns the output.
    `fp16`, `opset`, `example_size`: ONNX only."""
    refuse_existing(dst, force)
    if to != "onnx" and (fp16 or opset is not None):
        raise ValueError("--fp16 and --opset apply to --to onnx only")
    found = open_weights(src, which, heads=to == "full", checkpoint=True)
    if isinstance(found.spec, AnySpec) and to != "full":  # a timm / torchvision student: its library's layout
        if to not in ("timm", "safetensors"):
            raise ValueError(f"{found.source}: {found.label} is a {found.spec.arch} student; it exports --to timm (or "
                             "safetensors): a .safetensors file in its library's layout (weights/any_student.py), "
                             "or --to full (with its heads and iBOT adapter)")
        out = Path(dst)
        write_any_student(export_state_dict(found.backbone), found.spec, out)
        print(f"{found.label} backbone ({found.spec.arch}) of {found.source} -> {out}")
        return out
    if to == "onnx":
        from dinotrain.weights.convert import backbone_from_weights
        from dinotrain.weights.onnx_export import OPSET, output_names, write_onnx

        model = backbone_from_weights(found)
        opset = OPSET if opset is None else opset
        out = write_onnx(model, dst, opset=opset, fp16=fp16, example_size=example_size, source=found.source)
        at = "" if found.iteration is None else f" (iteration {found.iteration})"
        print(f"{found.label} backbone of {found.source}{at} -> {out} (onnx, opset {opset}, "
              f"{'float16' if fp16 else 'float32'} weights; input pixel_values: dynamic batch, height, width in "
              f"multiples of {model.patch_size}; outputs {', '.join(output_names(model))})".replace("  ", " ").strip())
        return out
    if to == "full":
        heads = found.heads or {}
        out = write_full(dst, FullExport(found.backbone, found.spec, heads, found.config))
        what = f"{found.label} backbone + {' + '.join(heads)} + config".strip()
    else:
        out = write_weights(found.backbone, found.spec, dst, to)
        what = f"{found.label} backbone".strip()
    at = "" if found.iteration is None else f" (iteration {found.iteration})"
    print(f"{what} of {found.source}{at} -> {out} ({to})")
    return out
