"""Hugging Face `transformers` directories (`config.json` + `model.safetensors`) <-> our backbones.

We write the *legacy public Hub layout* (`encoder.layer.N.attention.attention.query`, fused SwiGLU
`mlp.weights_in`, ViT's `intermediate.dense` ...), which is what the `facebook/dinov2-*` and
`facebook/dino-vit*` repositories hold: transformers 4.x loads it directly (`Dinov2WithRegistersModel`
needs >= 4.48) and 5.x converts it on load. We read that layout and the renamed 5.x one (`attention.q_proj`, `mlp.gate_proj`, ViT's
`layers.N`), since `save_file(model.state_dict())` of a 5.x model produces the latter.

Architectures: `Dinov2Model` (LayerScale, no registers), `Dinov2WithRegistersModel` (registers) and
`ViTModel` (DINO v1: no LayerScale, no mask token).

Interpolation of position embeddings is not part of the weights. `transformers` resizes to the exact
new grid (our `interpolate_offset=0`), with antialiasing only in the register model, so a directory
without our metadata is imported with that convention and gives the same outputs as `transformers`.
Our own exports also record the full `ViTSpec` in the safetensors metadata, so a round trip keeps the
original convention (official DINOv2: offset 0.1).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.vision_transformer import ViTSpec
from dinotrain.storage import replacing
from dinotrain.weights.state_dict import WeightsError, check_compatible, infer_spec, read_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SPEC_METADATA_KEY = "dinotrain_spec"
DINOV3_SPEC_METADATA_KEY = "dinotrain_dinov3_spec"  # its own key: readers that predate DINOv3 ignore it
LAYER_NORM_EPS = 1e-6

DINOV2, DINOV2_REG, VIT = "dinov2", "dinov2_with_registers", "vit"
ARCHITECTURES = {DINOV2: "Dinov2Model", DINOV2_REG: "Dinov2WithRegistersModel", VIT: "ViTModel"}
_MODEL_TYPE_OF_ARCH = {
    "Dinov2Model": DINOV2, "Dinov2Backbone": DINOV2, "Dinov2ForImageClassification": DINOV2,
    "Dinov2WithRegistersModel": DINOV2_REG, "Dinov2WithRegistersBackbone": DINOV2_REG,
    "Dinov2WithRegistersForImageClassification": DINOV2_REG,
    "ViTModel": VIT, "ViTForImageClassification": VIT,
}


# ---- which HF model type a spec maps to ---------------------------------------------------------
def hf_model_type(spec: ViTSpec) -> str:
    """`dinov2`, `dinov2_with_registers` or `vit`; ValueError when HF has no class for the spec.

    Two near misses are still exported, losslessly for our own import: a register model without a
    mask token (transformers then initialises one it never uses without masks) and a LayerScale-free
    model with one (written as ViT's (1, 1, D) `embeddings.mask_token`, ignored by ViTModel).
    """
    if spec.layerscale:
        return DINOV2_REG if spec.num_register_tokens else DINOV2
    problems = []
    if spec.num_register_tokens:
        problems.append("register tokens need Dinov2WithRegistersModel, which always has LayerScale")
    if spec.ffn_layer != "mlp":
        problems.append("a SwiGLU FFN needs Dinov2Model, which always has LayerScale")
    if problems:
        raise ValueError(
            "this backbone has no LayerScale, so it would export as HF ViTModel, but " + "; ".join(problems)
            + "; export it to the `hub` or `safetensors` format instead"
        )
    return VIT


def hf_config(spec: ViTSpec, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` contents `transformers` needs to build the same network as `spec`."""
    model_type = hf_model_type(spec)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "patch_size": spec.patch_size,
        "image_size": spec.img_size,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,  # read by transformers 4.x
        "dtype": dtype_name,  # read by transformers 5.x
    }
    ratio = int(spec.mlp_ratio) if float(spec.mlp_ratio).is_integer() else spec.mlp_ratio
    if model_type == VIT:
        config.update(intermediate_size=int(spec.embed_dim * spec.mlp_ratio), encoder_stride=spec.patch_size)
    else:
        config.update(mlp_ratio=ratio, layerscale_value=1.0, use_swiglu_ffn=spec.ffn_layer != "mlp", drop_path_rate=0.0)
    if model_type == DINOV2:
        config["use_mask_token"] = spec.use_mask_token
    if model_type == DINOV2_REG:
        config["num_register_tokens"] = spec.num_register_tokens
    return config


# ---- key mapping: official -> legacy HF ---------------------------------------------------------
# Per-block official suffix -> legacy HF suffix, for each HF model type (qkv handled separately).
_BLOCK_TO_HF = {
    DINOV2: {
        "norm1.": "norm1.", "norm2.": "norm2.", "attn.proj.": "attention.output.dense.",
        "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.", "mlp.w12.": "mlp.weights_in.", "mlp.w3.": "mlp.weights_out.",
    },
    VIT: {
        "norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.output.dense.",
        "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense.",
    },
}
_BLOCK_TO_HF[DINOV2_REG] = _BLOCK_TO_HF[DINOV2]
_QKV_HF = ("attention.attention.query.", "attention.attention.key.", "attention.attention.value.")
_TOP_TO_HF = {
    "cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def to_hf_state_dict(state_dict: dict[str, Tensor], spec: ViTSpec) -> dict[str, Tensor]:
    """Official-named backbone tensors -> legacy Hub names (qkv split into query/key/value)."""
    model_type = hf_model_type(spec)
    block_table = _BLOCK_TO_HF[model_type]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _TOP_TO_HF:
            if key == "mask_token" and model_type == VIT:
                value = value.reshape(1, 1, -1)  # ViTEmbeddings keeps it as (1, 1, D)
            out[_TOP_TO_HF[key]] = value
            continue
        match = _BLOCK_KEY.match(key)
        if not match:
            raise WeightsError(f"cannot export parameter {key!r}: it is not part of a ViT backbone")
        prefix, rest = f"encoder.layer.{match.group(1)}.", match.group(2)
        if rest.startswith("attn.qkv."):
            param = rest[len("attn.qkv."):]
            for name, part in zip(_QKV_HF, value.chunk(3, dim=0)):
                out[prefix + name + param] = part.clone()  # own storage: safetensors refuses shared views
            continue
        renamed = _rename(rest, block_table)
        if renamed is None:
            raise WeightsError(f"cannot export parameter {key!r} to HF {ARCHITECTURES[model_type]}")
        out[prefix + renamed] = value
    return out


# ---- key mapping: legacy or 5.x HF -> official --------------------------------------------------
# Block-relative HF name prefixes (both layouts, both model families) -> official names. Checked in
# order, so `attention.output.dense.` is matched before ViT's `output.dense.`.
_BLOCK_FROM_HF = {
    "norm1.": "norm1.", "layernorm_before.": "norm1.",
    "norm2.": "norm2.", "layernorm_after.": "norm2.",
    "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.", "intermediate.dense.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.", "output.dense.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.", "mlp.down_proj.": "mlp.w3.",
}
# Tensors that are concatenated (dim 0) into one official tensor: prefix -> (official, position).
_CONCAT_FROM_HF = {
    "attention.attention.query.": ("attn.qkv.", 0), "attention.attention.key.": ("attn.qkv.", 1),
    "attention.attention.value.": ("attn.qkv.", 2),
    "attention.q_proj.": ("attn.qkv.", 0), "attention.k_proj.": ("attn.qkv.", 1), "attention.v_proj.": ("attn.qkv.", 2),
    "mlp.gate_proj.": ("mlp.w12.", 0), "mlp.up_proj.": ("mlp.w12.", 1),
}
_CONCAT_PARTS = {"attn.qkv.": 3, "mlp.w12.": 2}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_HF_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_IGNORED_HF = ("pooler.", "classifier.")


def _strip_hf_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a task-model prefix (`dinov2.`, `vit.` ...) so keys start at `embeddings.`."""
    anchor = "embeddings.cls_token"
    prefixes = [k[: -len(anchor)] for k in state_dict if k.endswith(anchor)]
    if not prefixes:
        sample = ", ".join(sorted(state_dict)[:5]) or "(empty)"
        raise WeightsError(f"not a transformers DINOv2/ViT state dict: no `embeddings.cls_token`; first keys: {sample}")
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def from_hf_state_dict(hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors in the legacy Hub or the transformers 5.x layout -> official backbone names."""
    hf_state_dict = _strip_hf_prefix(hf_state_dict)
    out: dict[str, Tensor] = {}
    pieces: dict[str, dict[int, Tensor]] = {}
    unknown = []
    for key, value in hf_state_dict.items():
        if key in _TOP_FROM_HF:
            name = _TOP_FROM_HF[key]
            out[name] = value.reshape(1, -1) if name == "mask_token" else value  # ViT stores (1, 1, D)
            continue
        if key.startswith(_IGNORED_HF):
            continue
        match = _HF_BLOCK_KEY.match(key)
        rest = match.group(2) if match else ""
        concat = next(((src, tgt) for src, tgt in _CONCAT_FROM_HF.items() if rest.startswith(src)), None)
        if match and concat:
            (src, (target, position)) = concat
            full = f"blocks.{match.group(1)}.{target}{rest[len(src):]}"
            pieces.setdefault(full, {})[position] = value
            continue
        renamed = _rename(rest, _BLOCK_FROM_HF) if match else None
        if renamed is None:
            unknown.append(key)
            continue
        out[f"blocks.{match.group(1)}.{renamed}"] = value
    if unknown:
        raise WeightsError(f"unexpected parameters in a transformers DINOv2/ViT checkpoint: {sorted(unknown)[:8]}")
    for full, parts in pieces.items():
        expected = _CONCAT_PARTS[next(t for t in _CONCAT_PARTS if t in full)]
        if sorted(parts) != list(range(expected)):
            raise WeightsError(f"incomplete checkpoint: {full} has {len(parts)} of its {expected} parts")
        out[full] = torch.cat([parts[i] for i in range(expected)], dim=0)
    return out


# ---- spec metadata (our exports record the exact spec next to the tensors) --------------------------
_METADATA_KEYS = ((SPEC_METADATA_KEY, ViTSpec), (DINOV3_SPEC_METADATA_KEY, Dinov3Spec))


def spec_to_metadata(spec: ViTSpec | Dinov3Spec) -> dict[str, str]:
    key = DINOV3_SPEC_METADATA_KEY if isinstance(spec, Dinov3Spec) else SPEC_METADATA_KEY
    return {"format": "pt", key: json.dumps(spec.to_dict(), sort_keys=True)}


def spec_from_metadata(metadata: dict[str, str]) -> ViTSpec | Dinov3Spec | None:
    """The ViTSpec (or Dinov3Spec) our exports store in safetensors metadata, or None for files from elsewhere."""
    for key, spec_class in _METADATA_KEYS:
        if key not in metadata:
            continue
        try:
            fields = json.loads(metadata[key])
            known = {f.name for f in dataclasses.fields(spec_class)}
            return spec_class(**{k: v for k, v in fields.items() if k in known})
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise WeightsError(f"corrupt {key!r} metadata ({exc}); re-export the weights") from exc
    return None


def reconcile_spec(saved: ViTSpec | Dinov3Spec | None, inferred: ViTSpec | Dinov3Spec) -> ViTSpec | Dinov3Spec:
    """The spec recorded in our metadata (it also holds settings the tensors cannot), once checked against
    the spec the tensors imply; without metadata, the inferred one."""
    if saved is None:
        return inferred
    try:
        check_compatible(saved, inferred, what="tensors")
    except WeightsError as exc:
        raise WeightsError(f"the spec recorded in the metadata contradicts the tensors: {exc}") from exc
    return saved


# ---- spec <-> config ---------------------------------------------------------------------------
def _config_model_type(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        model_type = next((_MODEL_TYPE_OF_ARCH[a] for a in config.get("architectures", []) if a in _MODEL_TYPE_OF_ARCH), None)
    if model_type not in ARCHITECTURES:
        raise WeightsError(
            f"unsupported transformers model_type {model_type!r}: only DINOv2 ({DINOV2!r}, {DINOV2_REG!r}), "
            f"DINO v1 ({VIT!r}) and DINOv3 ('dinov3_vit') ViTs can be imported"
        )
    return model_type


def spec_from_hf(config: dict, state_dict: dict[str, Tensor], saved_spec: ViTSpec | None = None) -> ViTSpec:
    """The ViTSpec of imported weights: shapes from the weights, checked against `config.json`.

    `saved_spec` (our own metadata) restores the interpolation convention; without it the
    `transformers` convention is used so outputs match the HF model at every input size.
    """
    model_type = _config_model_type(config)
    if config.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"hidden_act {config['hidden_act']!r} is not supported; DINO backbones use 'gelu'")
    if not config.get("qkv_bias", True):
        raise WeightsError("qkv_bias=False is not supported; DINO backbones have query/key/value biases")
    eps = config.get("layer_norm_eps", LAYER_NORM_EPS)
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        warnings.warn(f"config layer_norm_eps={eps}, our backbone uses {LAYER_NORM_EPS}: outputs will differ slightly",
                      stacklevel=3)
    spec = infer_spec(state_dict)
    fields = {"hidden_size": spec.embed_dim, "num_hidden_layers": spec.depth, "patch_size": spec.patch_size}
    diffs = [f"{k}: config {config[k]!r}, weights {v!r}" for k, v in fields.items() if k in config and config[k] != v]
    if diffs:
        raise WeightsError("config.json does not match the weights: " + "; ".join(diffs))
    spec = dataclasses.replace(
        spec, num_heads=int(config.get("num_attention_heads", spec.num_heads)),
        interpolate_offset=0.0, interpolate_antialias=model_type == DINOV2_REG,
    )
    return reconcile_spec(saved_spec, spec)


# ---- reading and writing directories ------------------------------------------------------------
def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def save_hf(state_dict: dict[str, Tensor], spec: ViTSpec, dst: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` (legacy Hub names) loadable by `from_pretrained(dst)`."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"HF export target {dst} exists and is not a directory; pass a directory path")
    dtypes = {v.dtype for v in state_dict.values()}
    if len(dtypes) != 1:
        raise ValueError(f"weights mix dtypes {sorted(map(str, dtypes))}; cast them to one dtype before exporting")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(state_dict, spec).items()}
    return write_model_dir(dst, tensors, hf_config(spec, dtypes.pop()), spec_to_metadata(spec), "Hugging Face")


def write_model_dir(dst: Path, tensors: dict[str, Tensor], config: dict, metadata: dict, what: str) -> Path:
    """A transformers model directory (DINOv2 or DINOv3): weights, preprocessor config, then `config.json`.

    Each file under a temporary name until complete; `config.json` (what marks a model directory) last."""
    from safetensors.torch import save_file

    with replacing(dst / WEIGHTS_NAME, f"the {what} weights") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_preprocessor_config(dst)
    with replacing(dst / CONFIG_NAME, f"the {what} config") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def write_preprocessor_config(dst: Path, resize_size: int = 256, crop_size: int = 224) -> None:
    """`preprocessor_config.json` of the DINO evaluation transform (bicubic resize of the shorter side, centre
    crop, ImageNet mean/std; what the facebook/dinov2-* repositories ship), so `AutoImageProcessor` loads."""
    from dinotrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD  # the transform our own evaluation uses

    with replacing(Path(dst) / "preprocessor_config.json", "the Hugging Face preprocessor config") as tmp:
        tmp.write_text(json.dumps({
            "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": resize_size}, "resample": 3,  # bicubic
            "do_center_crop": True, "crop_size": {"height": crop_size, "width": crop_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        }, indent=2) + "\n")


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as exc:
        raise WeightsError(f"{path} is not a valid safetensors file ({exc})") from exc


def read_hf_tensors(src: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors (and safetensors metadata) of an HF directory: single file, shards, or a .bin."""
    single, index, legacy = src / WEIGHTS_NAME, src / f"{WEIGHTS_NAME}.index.json", src / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        tensors, metadata = {}, {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            part, meta = read_safetensors(src / shard)
            tensors.update(part)
            metadata.update(meta)
        return tensors, metadata
    if legacy.is_file():
        return read_state_dict(legacy), {}
    raise FileNotFoundError(f"{src} has a config.json but no {WEIGHTS_NAME}, shard index or pytorch_model.bin")


def read_config_json(src: str | Path) -> dict:
    """The `config.json` of a model directory (transformers' or timm's), as a dict."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"HF model directory not found: {src}")
    if not is_hf_dir(src):
        raise FileNotFoundError(f"{src} is not a transformers model directory: it has no {CONFIG_NAME}")
    try:
        config = json.loads((src / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{src / CONFIG_NAME} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{src / CONFIG_NAME} is not a JSON object")
    return config


def read_hf_config(src: str | Path) -> dict:
    """The `config.json` of an HF directory, checked to describe a DINOv2 / DINO v1 model we can import."""
    config = read_config_json(src)
    _config_model_type(config)  # fail on a non-ViT config before reading gigabytes of weights
    return config


def from_hf_tensors(config: dict, tensors: dict[str, Tensor], metadata: dict) -> tuple[dict[str, Tensor], ViTSpec]:
    """Official-named state dict and ViTSpec from HF tensors already read, with their config."""
    state_dict = from_hf_state_dict(tensors)
    return state_dict, spec_from_hf(config, state_dict, spec_from_metadata(metadata))


def load_hf(src: str | Path) -> tuple[dict[str, Tensor], ViTSpec]:
    """Official-named backbone state dict and its ViTSpec from an HF directory (either layout)."""
    config = read_hf_config(src)
    return from_hf_tensors(config, *read_hf_tensors(Path(src)))
