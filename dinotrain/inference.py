"""How features are computed on this machine: the runtime (torch, onnxruntime) and precision (fp32, bf16, int8)
behind `embed`, `eval` and `serve` (`--runtime`, `--precision`), decided once and logged once.

| runtime / precision | what runs                                                              | CLS cosine to fp32 |
|---------------------|------------------------------------------------------------------------|--------------------|
| torch fp32          | the backbone as it is                                                  | 1                  |
| torch bf16          | the backbone under CPU/CUDA bf16 autocast (matmuls bf16, norms fp32)   | 0.99995            |
| onnx fp32           | the backbone exported (`weights/onnx_export.py`) on onnxruntime's CPU  | 1.000000           |
| onnx int8           | that graph, its MLP MatMuls dynamically quantized to int8 (onnxruntime) | 0.9989 (< 0.999)   |

(worst over 32-256 images, random-weight ViT-S/14 and ViT-B/14 at 224 px: BENCHMARKS.md)

`auto` picks the fastest path measured to stay within 0.999 CLS cosine of fp32 on the machine it runs on: bf16 only
where the CPU multiplies bf16 natively with AMX (`amx_bf16` in /proc/cpuinfo), torch fp32 otherwise. Measured
(BENCHMARKS.md) on this project's AMD EPYC (neither AMX nor AVX512-BF16): bf16 autocast runs at ~0.15x of fp32
(every bf16 product emulated); onnxruntime fp32 at 0.94-1.21x of torch fp32 for ViT-S/14 and 0.99-1.01x for ViT-B/14,
not worth exporting a graph in memory by default; int8 at 1.2-1.8x but below 0.999 cosine, so never automatic.
`--precision bf16` on a CPU without native bf16 (`amx_bf16` or `avx512_bf16`) is a one-line error rather than a silent ~6x slowdown. An `.onnx` file as weights
runs on onnxruntime (`--runtime torch` with it is an error); other weights with `--runtime onnx` are exported to
ONNX in memory first (2.5-7 s for ViT-S/B on this 2-core machine).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger("dinotrain.inference")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
RUNTIMES = ("auto", "torch", "onnx")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> str | None:
    """What multiplies bf16 natively on `device` ("amx_bf16", "avx512_bf16", "cuda"), or None."""
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else None
    flags = cpu_flags() if flags is None else flags
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def is_onnx_file(weights: str | None) -> bool:
    return bool(weights) and str(weights).endswith(".onnx")


@dataclass(frozen=True)
class Choice:
    """The runtime and precision features are computed with, and why (logged once)."""

    runtime: str
    precision: str
    why: str


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def choose(precision: str = "auto", runtime: str = "auto", device: torch.device | str = "cpu",
           weights: str | None = None, flags: set[str] | None = None) -> Choice:
    """The runtime and precision for these options on this machine; a one-line ValueError for a combination it
    cannot run (`flags`: the CPU's, for tests)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    onnx_weights = is_onnx_file(weights)
    if runtime == "torch" and onnx_weights:
        raise ValueError(f"--weights {weights} is an ONNX graph: it runs with --runtime onnx (or auto), not torch")
    if runtime == "auto":
        runtime = "onnx" if onnx_weights or precision == "int8" else "torch"
    if runtime == "onnx":
        if device.type != "cpu":
            raise ValueError("--runtime onnx runs on the CPU here (onnxruntime's CPU provider): add --device cpu")
        if not _has_onnxruntime():
            raise ValueError("--runtime onnx needs onnxruntime: pip install 'dinotrain[onnx]'")
        if precision == "bf16":
            raise ValueError("--precision bf16 runs in the torch runtime: use --runtime torch, "
                             "or fp32 / int8 with onnx")
        if precision == "int8":
            return Choice("onnx", "int8", "asked for: onnxruntime dynamic int8 quantization of the MatMuls")
        return Choice("onnx", "fp32", "asked for" if precision == "fp32" else "onnxruntime, fp32")
    if precision == "int8":
        raise ValueError("--precision int8 runs in onnxruntime: use --runtime onnx (or auto)")
    if precision == "fp32" or (precision == "auto" and device.type != "cpu"):
        return Choice("torch", "fp32", "asked for" if precision == "fp32" else "auto: fp32 on a GPU (pass --precision "
                                                                                "bf16 for autocast)")
    native = native_bf16(device, flags)
    if precision == "bf16":
        if native is None:
            where = "this GPU" if device.type == "cuda" else "this CPU (no amx_bf16 or avx512_bf16 flag)"
            raise ValueError(f"--precision bf16: {where} has no native bf16; it would be emulated (measured ~6x "
                             "slower than fp32): use --precision fp32 or auto")
        return Choice("torch", "bf16", f"asked for ({native})")
    if native == "amx_bf16":
        return Choice("torch", "bf16", "auto: the CPU has AMX (native bf16 matmul), CLS cosine to fp32 >= 0.999")
    return Choice("torch", "fp32", "auto: bf16 is used on CPUs with AMX only"
                  + (f"; this one has {native}" if native else "; this one has no native bf16"))


class TorchFeatures(nn.Module):
    """The backbone with the chosen precision applied to every call (bf16: autocast; outputs float32)."""

    def __init__(self, backbone: nn.Module, precision: str = "fp32"):
        super().__init__()
        self.backbone, self.precision = backbone, precision

    def _autocast(self, device_type: str):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def forward(self, images: Tensor) -> Tensor:
        with self._autocast(images.device.type):
            return self.backbone(images).float()

    def forward_features(self, images: Tensor) -> dict:
        with self._autocast(images.device.type):
            out = self.backbone.forward_features(images)
        return {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in out.items()}

    def get_intermediate_layers(self, images: Tensor, *args, **kwargs):
        with self._autocast(images.device.type):
            out = self.backbone.get_intermediate_layers(images, *args, **kwargs)
        return tuple(tuple(t.float() for t in o) if isinstance(o, tuple) else o.float() for o in out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            backbone = self._modules.get("backbone")
            backbone = self.__dict__.get("backbone") if backbone is None else backbone
            if backbone is None:
                raise
            return getattr(backbone, name)  # embed_dim, spec, patch_size, ...


def _mlp_matmuls(graph: bytes) -> list[str]:
    """The MatMul nodes of the blocks' MLPs (a weight operand, `/mlp/` in the name the exporter gives)."""
    import onnx

    proto = onnx.load_from_string(graph)
    weights = {i.name for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and "/mlp/" in n.name and any(i in weights for i in n.input)]


def _quantized(graph: bytes) -> bytes:
    """`graph` with onnxruntime's dynamic int8 quantization of the MLP MatMuls (int8 weights, activations quantized
    per batch at run time). Measured on ViT-S/14 (random weights, 32 images): every weight MatMul quantized gave a
    worst CLS cosine of 0.9989 to fp32, the MLPs only 0.9990 (the attention projections stay fp32)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = _mlp_matmuls(graph)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph)
        logging.disable(logging.WARNING)  # the quantizer logs a line per activation it leaves dynamic, and advice
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=nodes or None)
        finally:
            logging.disable(logging.NOTSET)
        return dst.read_bytes()


class OnnxFeatures(nn.Module):
    """An ONNX graph of ours on onnxruntime's CPU provider, called like the torch backbone (`model(images)` ->
    CLS, `forward_features(images)` -> the `x_norm_*` dict), so embed / eval / serve do not tell them apart."""

    def __init__(self, graph: bytes | str, metadata: dict[str, str], threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.patch_size = int(metadata.get("patch_size", 0)) or None
        self.embed_dim = int(metadata.get("embed_dim") or self.session.get_outputs()[0].shape[-1])
        self.metadata = metadata

    @property
    def spec(self):
        """The architecture recorded in the file (ViTSpec or Dinov3Spec)."""
        import json

        from dinotrain.models.dinov3 import Dinov3Spec
        from dinotrain.models.vision_transformer import ViTSpec

        if "spec" not in self.metadata:
            raise ValueError("this ONNX file records no dinotrain spec (it was not written by dinotrain export)")
        cls = Dinov3Spec if self.metadata.get("family") == "dinov3" else ViTSpec
        return cls(**json.loads(self.metadata["spec"]))

    def _run(self, images: Tensor, names: list[str]) -> list[Tensor]:
        if self.patch_size and min(images.shape[-2:]) < self.patch_size:
            raise ValueError(f"images of {tuple(images.shape[-2:])} pixels are smaller than one "
                             f"{self.patch_size}x{self.patch_size} patch")
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(a) for a in self.session.run(names, {"pixel_values": pixels})]

    def forward(self, images: Tensor) -> Tensor:
        return self._run(images, ["cls_token"])[0]

    def forward_features(self, images: Tensor) -> dict:
        found = dict(zip(self.outputs, self._run(images, self.outputs)))
        cls, patches = found["cls_token"], found["patch_tokens"]
        extra = found.get("register_tokens", found.get("storage_tokens", cls[:, None, :0]))
        return {"x_norm_clstoken": cls, "x_norm_regtokens": extra, "x_norm_patchtokens": patches, "masks": None}


def _read_onnx(path: str) -> tuple[str, dict[str, str]]:
    """The graph's path (onnxruntime reads weights stored beside it from there) and its metadata."""
    from dinotrain.weights.onnx_export import read_onnx_metadata

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    return str(path), read_onnx_metadata(path)


def features_model(backbone: nn.Module, choice: Choice, threads: int | None = None) -> nn.Module:
    """`backbone` (a torch backbone of either family) run as `choice` says."""
    if choice.runtime == "torch":
        return TorchFeatures(backbone, choice.precision)
    from dinotrain.weights.onnx_export import onnx_bytes, onnx_metadata

    graph = onnx_bytes(backbone.eval())
    if choice.precision == "int8":
        graph = _quantized(graph)
    return OnnxFeatures(graph, {k.split(".", 1)[1]: v for k, v in onnx_metadata(backbone, 0, False, "").items()},
                        threads)


def open_features(weights: str | None, model: str | None, device: torch.device, precision: str = "auto",
                  runtime: str = "auto", seed: int = 0) -> nn.Module:
    """The backbone of `--weights` / `--model` (see `weights/backbone.py`), or an ONNX file of ours, computing
    features as `--precision` / `--runtime` ask on `device`; logs the choice once."""
    choice = choose(precision, runtime, device, weights)
    if is_onnx_file(weights):
        if model:
            raise ValueError(f"--model does not apply to an ONNX file (--weights {weights}): its graph is fixed")
        graph, metadata = _read_onnx(weights)
        if choice.precision == "int8":
            if Path(graph + ".data").exists():
                raise ValueError(f"--precision int8: {weights} keeps its weights beside the graph (over 2 GB); "
                                 "int8 is done in memory for graphs under 2 GB only: use fp32")
            graph = _quantized(Path(graph).read_bytes())
        features = OnnxFeatures(graph, metadata)
    else:
        from dinotrain.weights.backbone import open_backbone

        features = features_model(open_backbone(weights, model, seed).eval().to(device), choice)
    log.info("features: %s %s on %s (%s)", choice.runtime, choice.precision, device, choice.why)
    return features.eval()
