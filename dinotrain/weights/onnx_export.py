"""`dinotrain export --to onnx`: a backbone of either family as one ONNX graph for any batch, height and width.

The graph takes `pixel_values` (batch, 3, height, width), float32, normalised with the ImageNet mean and std as
our eval transform does; height and width are multiples of the patch size (other sizes are cropped to whole
patches, as the torch forward does). Outputs, after the final norm: `cls_token` (batch, D), `register_tokens`
(DINOv2 with registers) or `storage_tokens` (DINOv3) (batch, R, D) when the model has them, `patch_tokens`
(batch, H/p * W/p, D), row-major over the patch grid.

What is inside the graph: the DINOv2 / DINO v1 position table resampled for the input's grid (bicubic, the
official offset / antialias conventions, as two matrix products built from the grid size: `resample_matrix.py`),
or DINOv3's RoPE tables computed from the grid size; so one file serves 224, 280x196 and 518x518.

Exporter: the TorchScript one (`torch.onnx.export(dynamo=False)`). Measured on torch 2.14 / onnxruntime 1.32
(ViT-S/14, 2 blocks): with `F.interpolate` it cannot export the register models' antialiased bicubic at all, and
the dynamo exporter bakes the traced scale factor of the offset models into the graph (other sizes fail in
onnxruntime); with the matrix resampling the TorchScript exporter keeps H and W dynamic for both families in
about 1 s (2 blocks), the dynamo one still fails DINOv2 and takes ~12 s for DINOv3. `--fp16` stores the weights as float16
with a Cast to float32 in front of each (half the file; the arithmetic stays float32, which onnxruntime's CPU
kernels need).

Weights over protobuf's 2 GB limit for one message (ViT-g/14: 4.5 GB in float32; DINOv3 ViT-7B) go into one file
beside the graph, `<name>.onnx.data` (ONNX external data; onnxruntime reads it from the graph's folder: keep the two
together). Such a model cannot be exported in memory for `--runtime onnx`: export it to a file first.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from dinotrain.models.dinov3 import Dinov3VisionTransformer
from dinotrain.models.resample_matrix import resample_table

OPSET = 17  # LayerNormalization is one node from opset 17; onnxruntime >= 1.14 runs it
INPUT = "pixel_values"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
META_PREFIX = "dinotrain."


def output_names(model: nn.Module) -> list[str]:
    """The graph's outputs for `model`: CLS, its register / storage tokens if it has any, the patch tokens."""
    extra = []
    if model.num_register_tokens:
        extra = ["storage_tokens" if isinstance(model, Dinov3VisionTransformer) else "register_tokens"]
    return ["cls_token", *extra, "patch_tokens"]


class _Graph(nn.Module):
    """The backbone's eval forward as the exported function: pixel values -> the named token outputs."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.with_extra = bool(backbone.num_register_tokens)

    def forward(self, pixel_values: Tensor):
        out = self.backbone.forward_features(pixel_values)
        if self.with_extra:
            return out["x_norm_clstoken"], out["x_norm_regtokens"], out["x_norm_patchtokens"]
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def check_example_size(size: int, patch_size: int) -> int:
    """The traced example's side: positive and at least one patch (a one-line ValueError otherwise)."""
    if not isinstance(size, int) or size < patch_size:
        raise ValueError(f"--example-size {size}: the model takes images of at least one {patch_size}x{patch_size} "
                         f"patch; give a positive multiple of {patch_size}, e.g. {patch_size * 16}")
    return size - size % patch_size


def _graph_positions(model: nn.Module):
    """An `interpolate_pos_encoding` that stays a function of the grid size in the traced graph (DINOv2 / v1)."""
    if model.interpolate_antialias and model.interpolate_offset:
        raise ValueError("ONNX export of a position table resampled with both an offset and antialiasing is not "
                         "supported (no official model uses it)")

    def positions(grid_h, grid_w, dtype):
        return resample_table(model.pos_embed, grid_h, grid_w, model.interpolate_offset,
                              model.interpolate_antialias).to(dtype)

    return positions


# protobuf refuses to serialise a message of 2 GiB or more; what the graph's nodes take besides the weights is small
INLINE_LIMIT = 2**31 - 2**27


def weights_bytes(model: nn.Module) -> int:
    """What `model`'s floating-point weights take in the float32 graph."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


def onnx_bytes(model: nn.Module, example_size: int = 224, opset: int = OPSET) -> bytes:
    """The serialised ONNX graph of `model` (eval forward, dynamic batch / height / width), traced at
    `example_size` (which does not limit the sizes it takes). One message: up to INLINE_LIMIT of weights."""
    if weights_bytes(model) > INLINE_LIMIT:
        raise ValueError(f"the model's weights take {weights_bytes(model) / 1e9:.1f} GB, over protobuf's 2 GB for one "
                         "ONNX message: export it to a file (dinotrain export --to onnx: its weights go beside the "
                         "graph) and pass that .onnx file")
    buffer = io.BytesIO()
    _export(model, buffer, example_size, opset)
    return buffer.getvalue()


def _export(model: nn.Module, f, example_size: int, opset: int) -> None:
    """torch.onnx.export of `model` into `f` (a buffer, or a file path: there the exporter itself puts weights over
    2 GB into files beside it)."""
    side = check_example_size(example_size, model.patch_size)
    graph = _Graph(model).eval()
    names = output_names(model)
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch"} for n in names}}
    axes["patch_tokens"][1] = "patches"
    patched = not isinstance(model, Dinov3VisionTransformer)
    if patched:
        model.interpolate_pos_encoding = _graph_positions(model)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on Python branches, the exporter's deprecation notice
            torch.onnx.export(graph, (torch.zeros(1, 3, side, side),), f, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=names, dynamic_axes=axes, do_constant_folding=True)
    finally:
        if patched:
            del model.interpolate_pos_encoding


def _fp16_weights(proto) -> None:
    """Store every float32 initializer as float16 and cast it back to float32 where it is read."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
        init.CopyFrom(half)
    for node in reversed(casts):
        proto.graph.node.insert(0, node)


def onnx_metadata(model: nn.Module, opset: int, fp16: bool, source: str) -> dict[str, str]:
    """What a reader needs besides the graph: family, spec, input normalisation, outputs, opset, weight dtype."""
    dinov3 = isinstance(model, Dinov3VisionTransformer)
    return {META_PREFIX + k: v for k, v in {
        "family": "dinov3" if dinov3 else "dinov2", "spec": json.dumps(model.spec.to_dict()),
        "patch_size": str(model.patch_size), "embed_dim": str(model.embed_dim), "opset": str(opset),
        "outputs": ",".join(output_names(model)), "weights_dtype": "float16" if fp16 else "float32",
        "input": f"{INPUT} (batch, 3, height, width) float32, RGB in [0, 1] normalised by mean "
                 f"{list(IMAGENET_MEAN)} std {list(IMAGENET_STD)}; height, width multiples of {model.patch_size}",
        "source": source}.items()}


def write_onnx(model: nn.Module, dst: str | Path, *, opset: int = OPSET, fp16: bool = False,
               example_size: int = 224, source: str = "") -> Path:
    """Export `model` (either family) to `dst`, checked by `onnx.checker`; complete or absent."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs the onnx package: pip install 'dinotrain[onnx]'") from exc
    from dinotrain.storage import replacing

    dst = Path(dst)
    if dst.suffix != ".onnx":
        raise ValueError(f"ONNX output {dst} must end in .onnx (that is how it is recognised on load)")
    data = dst.with_name(dst.name + ".data")
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.is_dir() else None) as scratch:
        raw = Path(scratch) / "graph.onnx"
        _export(model.eval(), str(raw), example_size, opset)
        proto = onnx.load(str(raw))  # with the weights the exporter put beside it, if any
    if fp16:
        _fp16_weights(proto)
    for key, value in onnx_metadata(model, opset, fp16, source).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "dinotrain"
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > INLINE_LIMIT
    if not external:
        onnx.checker.check_model(proto, full_check=True)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    with replacing(dst, "the ONNX graph") as tmp:
        if external:  # the graph names `data` relative to its own folder
            onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
            onnx.checker.check_model(str(tmp), full_check=True)
        else:
            onnx.save(proto, str(tmp))
    return dst


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The `dinotrain.*` metadata of an ONNX file we wrote (keys without the prefix); {} for other files.
    A file that is not ONNX is a one-line ValueError."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise ValueError(f"{path} is not an ONNX model file ({type(exc).__name__})") from None
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
