"""DINOv3 backbone state dicts in three layouts: ours (= the official `.pth` names), transformers'
`DINOv3ViTModel` and timm's `Eva` dinov3 models. Pure functions over dicts of tensors; nothing is read or written.

Tensors are renamed, split or concatenated, never recomputed, so conversions are bitwise. What the other
layouts have no room for is dropped on the way out and rebuilt on the way in:

| ours                          | transformers                 | timm                        | rebuilt as                  |
|-------------------------------|------------------------------|-----------------------------|-----------------------------|
| `rope_embed.periods`          | (recomputed, fp32)           | (recomputed, fp32)          | the official formula        |
| `blocks.N.attn.qkv.bias_mask` | (no key bias at all)         | (key bias: a zero buffer)   | 1 on q and v, 0 on k        |
| key third of `attn.qkv.bias`  | dropped when masked          | dropped (must be masked)    | zeros                       |
| `mask_token`                  | `embeddings.mask_token`      | dropped                     | zeros (official init)       |
| `local_cls_norm` (7B)         | dropped (training only)      | dropped (training only)     | a copy of `norm`            |

So theirs -> ours -> theirs is bitwise on every tensor, and ours -> theirs -> ours is bitwise on every tensor
but those rebuilt (equal too for weights that keep the official invariants: key bias 0, periods from the
formula in the spec's dtype; released checkpoints may hold bf16-rounded periods, see `_check_periods`).

transformers keys are written in the layout `save_pretrained` writes and the Hub holds (`layer.N.`); both that
and the 5.x module layout (`model.layer.N.`) are read. Configurations the targets cannot express (an untied
CLS norm, RoPE by min/max period, no LayerScale for transformers, an unmasked key bias for timm, ...) are a
WeightsError naming the setting.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from typing import Mapping

import torch
from torch import Tensor

from dinotrain.models.dinov3 import DINOV3_PRESETS, ROPE_DTYPES, Dinov3Spec, dinov3_from_spec
from dinotrain.models.dinov3_layers import FFN_ALIGN, NORM_EPS, ffn_hidden_features
from dinotrain.models.rope import rope_periods
from dinotrain.weights.state_dict import DINOV2, DINOV3, WeightsError, family_mismatch

log = logging.getLogger("dinotrain.weights")

HF_ARCHITECTURE = "DINOv3ViTModel"
HF_MODEL_TYPE = "dinov3_vit"
# Our presets -> timm's model names holding the same tensors (the `_qkvb` ones keep the q/v biases).
TIMM_MODEL_NAMES = {
    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb",
    "dinov3_vitl16": "vit_large_patch16_dinov3_qkvb",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_REQUIRED = ("cls_token", "mask_token", "patch_embed.proj.weight", "rope_embed.periods", "norm.weight",
             "blocks.0.attn.qkv.weight")


# ---- what a state dict in our layout is -----------------------------------------------------------
def _ffn_settings(embed_dim: int, hidden: int, gated: bool) -> tuple[str, float]:
    """(ffn_layer, ffn_ratio) giving an FFN of width `hidden` (official names and sizing rule)."""
    if not gated:
        ratio = hidden / embed_dim
        if ffn_hidden_features(embed_dim, ratio, "mlp") == hidden:
            return "mlp", ratio
    else:
        ratios = [hidden * 3 / (2 * embed_dim)] + [k / 4 for k in range(1, 65)]
        for layer in ("swiglu", "swiglu32", "swiglu64", "swiglu128"):
            for ratio in ratios:
                if ffn_hidden_features(embed_dim, ratio, layer) == hidden:
                    return layer, ratio
    raise WeightsError(f"no {'SwiGLU' if gated else 'MLP'} ratio gives a hidden width of {hidden} at width {embed_dim}")


def _rope_settings(periods: Tensor, head_dim: int) -> dict:
    """The RoPE parametrisation the stored periods come from: base 100 (every released model), another base,
    or min/max periods; matched to bf16 precision since released checkpoints hold bf16-rounded periods."""
    p = periods.float()

    def close(candidate: Tensor) -> bool:
        return bool(torch.allclose(p, candidate, rtol=1e-2, atol=0))

    if close(rope_periods(head_dim, 100.0)):
        return dict(pos_embed_rope_base=100.0)
    if p.numel() > 1:
        base = round(float(p[-1] ** (head_dim / (4 * (p.numel() - 1)))), 3)
        if close(rope_periods(head_dim, base)):
            return dict(pos_embed_rope_base=base)
        lo, hi = float(p[0]), float(p[-1])
        if close(rope_periods(head_dim, None, lo, hi)):
            return dict(pos_embed_rope_base=None, pos_embed_rope_min_period=lo, pos_embed_rope_max_period=hi)
    raise WeightsError(f"rope_embed.periods {p.tolist()} fit neither a RoPE base nor min/max periods")


def infer_dinov3_spec(state_dict: Mapping[str, Tensor]) -> Dinov3Spec:
    """The architecture of a DINOv3 backbone state dict in our (= official) layout.

    The head dimension is read from `rope_embed.periods` (head_dim / 4 of them), so 7B's 128-wide heads are
    found too. Settings weights do not hold get the released models' values: LayerNorm eps 1e-5, LayerScale
    init 1e-5, img_size 224, "separate" coordinates, training rescale 2, fp32 RoPE.
    """
    if "pos_embed" in state_dict:
        raise family_mismatch(DINOV2, DINOV3)
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        sample = ", ".join(sorted(state_dict)[:5]) or "(empty)"
        raise WeightsError(f"not a DINOv3 backbone state dict: missing {missing}; its first keys are: {sample}")
    embed_dim = state_dict["cls_token"].shape[-1]
    head_dim = 4 * state_dict["rope_embed.periods"].numel()
    if embed_dim % head_dim:
        raise WeightsError(f"rope_embed.periods imply {head_dim}-wide heads, which do not divide width {embed_dim}")
    conv = state_dict["patch_embed.proj.weight"]
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    gated = "blocks.0.mlp.w1.weight" in state_dict
    fc_in = "blocks.0.mlp.w1" if gated else "blocks.0.mlp.fc1"
    ffn_layer, ffn_ratio = _ffn_settings(embed_dim, state_dict[fc_in + ".weight"].shape[0], gated)
    return Dinov3Spec(
        embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim, patch_size=conv.shape[-1],
        in_chans=conv.shape[1], ffn_ratio=ffn_ratio, ffn_layer=ffn_layer,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict, proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=fc_in + ".bias" in state_dict, mask_k_bias="blocks.0.attn.qkv.bias_mask" in state_dict,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state_dict else None, norm_layer="layernormbf16",
        n_storage_tokens=state_dict["storage_tokens"].shape[1] if "storage_tokens" in state_dict else 0,
        untie_cls_and_patch_norms="cls_norm.weight" in state_dict,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in state_dict,
        pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32",
        **_rope_settings(state_dict["rope_embed.periods"], head_dim),
    )


def _expected_shapes(spec: Dinov3Spec) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in dinov3_from_spec(spec).state_dict().items()}


def _checked(out: dict[str, Tensor], spec: Dinov3Spec, source: str) -> dict[str, Tensor]:
    """`out` if it has exactly the tensors a backbone of `spec` has, else a WeightsError listing what differs."""
    expected = _expected_shapes(spec)
    problems = [f"missing {sorted(set(expected) - set(out))}"] if set(expected) - set(out) else []
    if set(out) - set(expected):
        problems.append(f"unexpected {sorted(set(out) - set(expected))}")
    problems += [f"{k}: {tuple(out[k].shape)} where the spec needs {tuple(s)}"
                 for k, s in expected.items() if k in out and out[k].shape != s]
    if problems:
        raise WeightsError(f"{source} weights do not fit this DINOv3 architecture: " + "; ".join(problems)[:2000])
    return out


def _check_periods(state_dict: Mapping[str, Tensor], spec: Dinov3Spec, target: str) -> None:
    """Warn when the stored periods are not those `target` recomputes (fp32 formula): its outputs then differ."""
    expected = rope_periods(spec.head_dim, spec.pos_embed_rope_base, spec.pos_embed_rope_min_period,
                            spec.pos_embed_rope_max_period)
    got = state_dict["rope_embed.periods"].float()
    if not torch.equal(got, expected):
        rel = ((got - expected).abs() / expected).max().item()
        log.warning("the RoPE periods of these weights differ from those %s recomputes (fp32, from the base) by up "
                    "to %.2g relative (e.g. bf16-rounded periods); %s's outputs differ from ours accordingly",
                    target, rel, target)


def _rebuilt_tensors(spec: Dinov3Spec, norm: Mapping[str, Tensor], qkv_biases: dict) -> dict:
    """The tensors of ours that the other layouts do not hold (see the module docstring)."""
    out = {"rope_embed.periods": rope_periods(
        spec.head_dim, spec.pos_embed_rope_base, spec.pos_embed_rope_min_period, spec.pos_embed_rope_max_period,
        ROPE_DTYPES[spec.pos_embed_rope_dtype])}
    if spec.untie_global_and_local_cls_norm:
        out.update({f"local_cls_norm.{p}": norm[f"norm.{p}"].clone() for p in ("weight", "bias") if f"norm.{p}" in norm})
    if spec.qkv_bias and spec.mask_k_bias:
        for i, bias in qkv_biases.items():
            mask = torch.ones_like(bias)
            mask[spec.embed_dim : 2 * spec.embed_dim] = 0
            out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    return out


def _qkv_bias(q: Tensor, k: Tensor | None, v: Tensor) -> Tensor:
    return torch.cat((q, torch.zeros_like(q) if k is None else k, v))


# ---- transformers DINOv3ViTModel ---------------------------------------------------------------------
def _hf_unsupported(spec: Dinov3Spec) -> list[str]:
    problems = []
    if spec.layerscale_init is None:
        problems.append("no LayerScale (DINOv3ViTModel always has it)")
    if spec.untie_cls_and_patch_norms:
        problems.append("an untied CLS norm (untie_cls_and_patch_norms)")
    if spec.pos_embed_rope_base is None:
        problems.append("RoPE by min/max period (transformers takes a base, rope_theta)")
    if spec.pos_embed_rope_normalize_coords != "separate":
        problems.append(f"RoPE coordinates normalised by {spec.pos_embed_rope_normalize_coords!r} (only 'separate')")
    return problems


def _float(value: float | None) -> float | None:
    """A float field as a float: a run's config may give `2` for 2.0, which transformers' strict config refuses."""
    return None if value is None else float(value)


def transformers_config(spec: Dinov3Spec) -> dict:
    """The `config.json` contents of a `DINOv3ViTModel` computing what a backbone of `spec` computes (eval)."""
    problems = _hf_unsupported(spec)
    if problems:
        raise WeightsError("transformers' DINOv3ViTModel cannot hold this backbone: " + "; ".join(problems))
    gated = FFN_ALIGN[spec.ffn_layer] is not None
    return {
        "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
        "hidden_size": spec.embed_dim, "num_hidden_layers": spec.depth, "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.ffn_hidden, "use_gated_mlp": gated, "hidden_act": "silu" if gated else "gelu",
        "patch_size": spec.patch_size, "image_size": spec.img_size, "num_channels": spec.in_chans,
        "num_register_tokens": spec.n_storage_tokens, "layer_norm_eps": NORM_EPS[spec.norm_layer],
        "layerscale_value": _float(spec.layerscale_init),
        "query_bias": spec.qkv_bias, "key_bias": spec.qkv_bias and not spec.mask_k_bias, "value_bias": spec.qkv_bias,
        "proj_bias": spec.proj_bias, "mlp_bias": spec.ffn_bias,
        "rope_theta": _float(spec.pos_embed_rope_base), "pos_embed_shift": _float(spec.pos_embed_rope_shift_coords),
        "pos_embed_jitter": _float(spec.pos_embed_rope_jitter_coords),
        "pos_embed_rescale": _float(spec.pos_embed_rope_rescale_coords),
        "attention_dropout": 0.0, "drop_path_rate": 0.0, "initializer_range": 0.02,
    }


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise WeightsError(f"a non-square {what} {list(value)} is not supported")
        value = value[0]
    return int(value)


def spec_from_transformers_config(config) -> Dinov3Spec:
    """The spec of a `DINOv3ViTConfig` (or its `config.json` dict). RoPE tables are fp32, as transformers'."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if cfg.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        raise WeightsError(f"not a DINOv3 ViT config: model_type is {cfg.get('model_type')!r}, not {HF_MODEL_TYPE!r}")
    embed_dim, gated = int(cfg["hidden_size"]), bool(cfg.get("use_gated_mlp", False))
    act = cfg.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu") and not (gated and act == "swish"):
        raise WeightsError(f"hidden_act {act!r} with use_gated_mlp={gated}: ours computes "
                           f"{'SwiGLU (silu)' if gated else 'exact GELU'}")
    eps = float(cfg.get("layer_norm_eps", 1e-5))
    norm = next((name for name, e in NORM_EPS.items() if e == eps), None)
    if norm is None:
        raise WeightsError(f"layer_norm_eps {eps} is neither official value ({sorted(NORM_EPS.values())})")
    qkv_bias = bool(cfg.get("query_bias", True))
    key_bias = bool(cfg.get("key_bias", False))
    if qkv_bias != bool(cfg.get("value_bias", True)) or (key_bias and not qkv_bias):
        raise WeightsError(f"query/key/value biases {qkv_bias}/{key_bias}/{cfg.get('value_bias')}: ours has q and v "
                           "biases together (and a key bias, possibly masked, with them)")
    ffn_layer, ffn_ratio = _ffn_settings(embed_dim, int(cfg["intermediate_size"]), gated)
    return Dinov3Spec(
        embed_dim=embed_dim, depth=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
        patch_size=_square(cfg.get("patch_size", 16), "patch_size"),
        img_size=_square(cfg.get("image_size", 224), "image_size"), in_chans=int(cfg.get("num_channels", 3)),
        ffn_ratio=ffn_ratio, ffn_layer=ffn_layer, qkv_bias=qkv_bias, mask_k_bias=qkv_bias and not key_bias,
        proj_bias=bool(cfg.get("proj_bias", True)), ffn_bias=bool(cfg.get("mlp_bias", True)),
        layerscale_init=float(cfg.get("layerscale_value", 1.0)), norm_layer=norm,
        n_storage_tokens=int(cfg.get("num_register_tokens", 0)),
        pos_embed_rope_base=float(cfg.get("rope_theta", 100.0)), pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_shift_coords=cfg.get("pos_embed_shift"), pos_embed_rope_jitter_coords=cfg.get("pos_embed_jitter"),
        pos_embed_rope_rescale_coords=cfg.get("pos_embed_rescale"), pos_embed_rope_dtype="fp32",
    )


_HF_TOP = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "storage_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
_HF_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.proj.": "attention.o_proj.",
             "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
_HF_MLP = {"mlp.fc1.": "mlp.up_proj.", "mlp.fc2.": "mlp.down_proj."}
_HF_SWIGLU = {"mlp.w1.": "mlp.gate_proj.", "mlp.w2.": "mlp.up_proj.", "mlp.w3.": "mlp.down_proj."}
_HF_QKV = ("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")
_DROPPED_OUT = ("rope_embed.periods", "local_cls_norm.weight", "local_cls_norm.bias")


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
    return next((dst + rest[len(src):] for src, dst in table.items() if rest.startswith(src)), None)


def _block_table(spec: Dinov3Spec, common: dict, mlp: dict, swiglu: dict, reverse: bool = False) -> dict:
    """Per-block name prefixes, ours -> theirs (or theirs -> ours), for this spec's FFN."""
    table = {**common, **(swiglu if FFN_ALIGN[spec.ffn_layer] else mlp)}
    return {v: k for k, v in table.items()} if reverse else table


def to_transformers(state_dict: Mapping[str, Tensor], spec: Dinov3Spec) -> dict[str, Tensor]:
    """Our (= official) tensors -> a `DINOv3ViTModel` state dict, keys as the Hub holds them (`layer.N.`)."""
    transformers_config(spec)  # refuses what transformers cannot hold
    _check_periods(state_dict, spec, "transformers")
    block = _block_table(spec, _HF_BLOCK, _HF_MLP, _HF_SWIGLU)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _DROPPED_OUT:
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value.reshape(1, 1, -1) if key == "mask_token" else value
            continue
        match = _BLOCK.match(key)
        if not match:
            raise WeightsError(f"cannot convert {key!r}: not a parameter of a DINOv3 backbone")
        prefix, rest = f"layer.{match.group(1)}.", match.group(2)
        if rest.startswith("attn.qkv."):
            param = rest[len("attn.qkv."):]
            if param == "bias_mask":
                continue
            for name, part in zip(_HF_QKV, value.chunk(3, dim=0)):
                if not (param == "bias" and name == _HF_QKV[1] and spec.mask_k_bias):
                    out[prefix + name + param] = part.clone()  # own storage: safetensors refuses shared views
            continue
        renamed = _rename(rest, block)
        if renamed is None:
            raise WeightsError(f"cannot convert {key!r} to transformers' DINOv3ViTModel")
        out[prefix + renamed] = value
    if not spec.n_storage_tokens:  # DINOv3ViTModel keeps an empty (1, 0, D) parameter
        out["embeddings.register_tokens"] = state_dict["cls_token"].new_zeros(1, 0, spec.embed_dim)
    return out


def from_transformers(hf_state_dict: Mapping[str, Tensor], spec: Dinov3Spec) -> dict[str, Tensor]:
    """A `DINOv3ViTModel` state dict (Hub `layer.N.` or module `model.layer.N.` keys, any task-model prefix)
    -> our (= official) tensors for a backbone of `spec` (see `spec_from_transformers_config`)."""
    anchors = [k[: -len("embeddings.cls_token")] for k in hf_state_dict if k.endswith("embeddings.cls_token")]
    if not anchors:
        raise WeightsError("not a transformers DINOv3 state dict: no `embeddings.cls_token`")
    strip = min(anchors, key=len)
    hf = {k[len(strip):]: v for k, v in hf_state_dict.items() if k.startswith(strip)}
    top = {v: k for k, v in _HF_TOP.items()}
    block = _block_table(spec, _HF_BLOCK, _HF_MLP, _HF_SWIGLU, reverse=True)
    layer_key = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, Tensor]] = {}
    for key, value in hf.items():
        if key in top:
            if key == "embeddings.register_tokens" and not spec.n_storage_tokens:
                continue
            out[top[key]] = value.reshape(1, -1) if key == "embeddings.mask_token" else value
            continue
        match = layer_key.match(key)
        if not match:
            raise WeightsError(f"unexpected transformers DINOv3 tensor {key!r}")
        i, rest = int(match.group(1)), match.group(2)
        part = next((n for n, name in enumerate(_HF_QKV) if rest.startswith(name)), None)
        if part is not None:
            qkv.setdefault((i, rest[len(_HF_QKV[part]):]), {})[part] = value
            continue
        renamed = _rename(rest, block)
        if renamed is None:
            raise WeightsError(f"unexpected transformers DINOv3 tensor {key!r}")
        out[f"blocks.{i}.{renamed}"] = value
    biases = {}
    for (i, param), parts in qkv.items():
        if param == "bias":
            if 0 not in parts or 2 not in parts:
                raise WeightsError(f"layer {i} has key/value biases without a query bias, which ours cannot hold")
            out[f"blocks.{i}.attn.qkv.bias"] = biases[i] = _qkv_bias(parts[0], parts.get(1), parts[2])
        elif sorted(parts) != [0, 1, 2]:
            raise WeightsError(f"layer {i} lacks some of its q/k/v projection {param}s")
        else:
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat((parts[0], parts[1], parts[2]))
    out.update(_rebuilt_tensors(spec, out, biases))
    return _checked(out, spec, "transformers")


# ---- timm Eva (vit_*_patch16_dinov3*) ---------------------------------------------------------------
def preset_of_timm_name(name: str) -> str | None:
    """Our preset holding the tensors of timm model `name` (with or without `_qkvb` or a `.tag`), else None."""
    base = name.split(".")[0]
    return next((ours for ours, theirs in TIMM_MODEL_NAMES.items() if base in (theirs, theirs.removesuffix("_qkvb"))),
                None)


def _timm_preset(embed_dim: int, ffn_layer: str, ffn_hidden: int, model_name: str | None) -> dict | None:
    """The official preset these timm tensors come from: by timm's model name, else by width and FFN."""
    if model_name is not None:
        name = preset_of_timm_name(model_name)
        if name is None:
            raise WeightsError(f"timm model {model_name!r} is not one of timm's DINOv3 ViTs "
                               f"({', '.join(TIMM_MODEL_NAMES.values())})")
        return DINOV3_PRESETS[name]
    gated = FFN_ALIGN[ffn_layer] is not None  # (SwiGLU alignments giving the same width are one and the same)
    return next((p for p in DINOV3_PRESETS.values() if p["embed_dim"] == embed_dim
                 and (FFN_ALIGN[p["ffn_layer"]] is not None) == gated
                 and ffn_hidden_features(embed_dim, p["ffn_ratio"], p["ffn_layer"]) == ffn_hidden), None)


def infer_timm_spec(timm_state_dict: Mapping[str, Tensor], model_name: str | None = None) -> Dinov3Spec:
    """The architecture of a timm dinov3 `Eva` state dict.

    timm's tensors do not hold the head width (no RoPE periods), whether the local-crop CLS norm was untied
    (training only), nor q/v biases in its non-`_qkvb` models: those come from the official preset named by
    `model_name` (timm's, as in its `config.json`) or of the same width and FFN, else 64-wide heads (every
    official size but 7B) and no biases. Other settings as `infer_dinov3_spec`.
    """
    sd = timm_state_dict
    required = ("cls_token", "patch_embed.proj.weight", "norm.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise WeightsError(f"not a timm dinov3 state dict: missing {missing}")
    embed_dim = sd["cls_token"].shape[-1]
    conv = sd["patch_embed.proj.weight"]
    gated = "blocks.0.mlp.fc1_g.weight" in sd
    fc_in = "blocks.0.mlp.fc1_g" if gated else "blocks.0.mlp.fc1"
    if fc_in + ".weight" not in sd:
        raise WeightsError(f"not a timm dinov3 state dict: no {fc_in}.weight")
    hidden = sd[fc_in + ".weight"].shape[0]
    ffn_layer, ffn_ratio = _ffn_settings(embed_dim, hidden, gated)
    preset = _timm_preset(embed_dim, ffn_layer, hidden, model_name)
    if preset is not None and preset["embed_dim"] != embed_dim:
        raise WeightsError(f"timm model {model_name!r} is {preset['embed_dim']} wide, these tensors {embed_dim}")
    has_qv = "blocks.0.attn.q_bias" in sd
    qkv_bias = has_qv or bool(preset and preset["qkv_bias"])
    num_heads = preset["num_heads"] if preset else max(1, embed_dim // 64)
    return Dinov3Spec(
        embed_dim=embed_dim, depth=len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}), num_heads=num_heads,
        patch_size=conv.shape[-1], in_chans=conv.shape[1], ffn_ratio=ffn_ratio, ffn_layer=ffn_layer,
        qkv_bias=qkv_bias, mask_k_bias=qkv_bias, proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=fc_in + ".bias" in sd, layerscale_init=1e-5 if "blocks.0.gamma_1" in sd else None,
        norm_layer="layernormbf16", n_storage_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
        untie_global_and_local_cls_norm=bool(preset and preset.get("untie_global_and_local_cls_norm")),
        pos_embed_rope_base=100.0, pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32",
    )


def timm_model_kwargs(spec: Dinov3Spec) -> dict:
    """Keyword arguments of `timm.models.eva.Eva` for a network computing what a backbone of `spec` computes
    (features: `forward_features`, CLS first, then the storage tokens, then the patches)."""
    problems = []
    if spec.untie_cls_and_patch_norms:
        problems.append("an untied CLS norm (untie_cls_and_patch_norms)")
    if spec.qkv_bias and not spec.mask_k_bias:
        problems.append("a key bias that is not masked (timm's key bias is a zero buffer)")
    if not spec.proj_bias or not spec.ffn_bias:
        problems.append("attention-projection or FFN layers without bias")
    if spec.pos_embed_rope_base is None:
        problems.append("RoPE by min/max period (timm's Eva takes a base, rope_temperature)")
    if spec.pos_embed_rope_normalize_coords != "separate":
        problems.append(f"RoPE coordinates normalised by {spec.pos_embed_rope_normalize_coords!r} (only 'separate')")
    if problems:
        raise WeightsError("timm's dinov3 Eva cannot hold this backbone: " + "; ".join(problems))
    align = FFN_ALIGN[spec.ffn_layer]
    # timm's SwiGLU width: int(dim * mlp_ratio) rounded up to `align`; the ratio of the final width gives it back
    mlp_ratio = spec.ffn_hidden / spec.embed_dim if align else spec.ffn_ratio
    return dict(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, num_classes=0,
        global_pool="token", embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
        qkv_bias=spec.qkv_bias, mlp_ratio=mlp_ratio, swiglu_mlp=align is not None, swiglu_align_to=align or 0,
        init_values=spec.layerscale_init, num_reg_tokens=spec.n_storage_tokens, use_abs_pos_emb=False,
        use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=spec.pos_embed_rope_base, rope_rotate_half=True,
        rope_shift_coords=spec.pos_embed_rope_shift_coords, rope_jitter_coords=spec.pos_embed_rope_jitter_coords,
        rope_rescale_coords=spec.pos_embed_rope_rescale_coords, use_fc_norm=False, dynamic_img_size=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=NORM_EPS[spec.norm_layer]),
    )


_TIMM_TOP = {"cls_token": "cls_token", "storage_tokens": "reg_token", "norm.weight": "norm.weight",
             "norm.bias": "norm.bias", "patch_embed.proj.weight": "patch_embed.proj.weight",
             "patch_embed.proj.bias": "patch_embed.proj.bias"}
_TIMM_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.qkv.weight": "attn.qkv.weight",
               "attn.proj.": "attn.proj.", "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}
_TIMM_MLP = {"mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
_TIMM_SWIGLU = {"mlp.w1.": "mlp.fc1_g.", "mlp.w2.": "mlp.fc1_x.", "mlp.w3.": "mlp.fc2."}


def to_timm(state_dict: Mapping[str, Tensor], spec: Dinov3Spec) -> dict[str, Tensor]:
    """Our (= official) tensors -> the state dict of `Eva(**timm_model_kwargs(spec))`."""
    timm_model_kwargs(spec)  # refuses what timm cannot hold
    _check_periods(state_dict, spec, "timm")
    block = _block_table(spec, _TIMM_BLOCK, _TIMM_MLP, _TIMM_SWIGLU)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _DROPPED_OUT or key == "mask_token":
            continue
        if key in _TIMM_TOP:
            out[_TIMM_TOP[key]] = value
            continue
        match = _BLOCK.match(key)
        if not match:
            raise WeightsError(f"cannot convert {key!r}: not a parameter of a DINOv3 backbone")
        prefix, rest = f"blocks.{match.group(1)}.", match.group(2)
        if rest == "attn.qkv.bias_mask":
            continue
        if rest == "attn.qkv.bias":
            q, _, v = value.chunk(3, dim=0)
            out[prefix + "attn.q_bias"], out[prefix + "attn.v_bias"] = q.clone(), v.clone()
            continue
        renamed = _rename(rest, block)
        if renamed is None:
            raise WeightsError(f"cannot convert {key!r} to timm's dinov3 Eva")
        out[prefix + renamed] = value
    return out


def from_timm(timm_state_dict: Mapping[str, Tensor], spec: Dinov3Spec) -> dict[str, Tensor]:
    """A timm dinov3 `Eva` state dict -> our (= official) tensors for a backbone of `spec`.

    timm's models without `_qkvb` hold no q/v biases (the released distilled models' are all zero); for a spec
    with qkv biases they become zeros, as timm's own loader assumes in the other direction.
    """
    top = {v: k for k, v in _TIMM_TOP.items()}
    block = _block_table(spec, _TIMM_BLOCK, _TIMM_MLP, _TIMM_SWIGLU, reverse=True)
    out: dict[str, Tensor] = {}
    qv: dict[int, dict[str, Tensor]] = {}
    for key, value in timm_state_dict.items():
        if key.startswith(("head.", "fc_norm.")):  # a classifier, not the backbone
            continue
        if key in top:
            out[top[key]] = value
            continue
        match = _BLOCK.match(key)
        if not match:
            raise WeightsError(f"unexpected timm dinov3 tensor {key!r}")
        i, rest = int(match.group(1)), match.group(2)
        if rest in ("attn.q_bias", "attn.v_bias"):
            qv.setdefault(i, {})[rest] = value
            continue
        renamed = _rename(rest, block)
        if renamed is None:
            raise WeightsError(f"unexpected timm dinov3 tensor {key!r}")
        out[f"blocks.{i}.{renamed}"] = value
    if qv and not spec.qkv_bias:
        raise WeightsError("these timm weights have q/v biases but the spec has qkv_bias=False")
    biases = {}
    for i in range(spec.depth if spec.qkv_bias else 0):
        weight = out.get(f"blocks.{i}.attn.qkv.weight")
        if weight is not None:  # (else reported as missing by _checked)
            zeros = weight.new_zeros(spec.embed_dim)
            parts = qv.get(i, {})
            bias = _qkv_bias(parts.get("attn.q_bias", zeros), None, parts.get("attn.v_bias", zeros))
            out[f"blocks.{i}.attn.qkv.bias"] = biases[i] = bias
    if "cls_token" in out:
        out["mask_token"] = out["cls_token"].new_zeros(1, spec.embed_dim)
    out.update(_rebuilt_tensors(spec, out, biases))
    return _checked(out, spec, "timm")
