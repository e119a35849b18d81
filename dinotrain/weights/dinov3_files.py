"""DINOv3 weights on disk: which layout a file or directory holds, read into our tensors + `Dinov3Spec`, and written
in each layout. The renaming itself is `dinov3_layouts.py` (pure functions); this module adds the files around it.

- ours (= the official `.pth`): read from a `.pth` (official torch.hub, ours, a training checkpoint's teacher)
  or our `.safetensors`; written as a hub `.pth` or `.safetensors` (+ spec) by `convert.py`.
- transformers: a directory, `config.json` (`model_type` `dinov3_vit`) + `model.safetensors` (or shards, or a
  `.bin`); written the same, + `preprocessor_config.json`.
- timm (`Eva`): a `.pth` / `.safetensors` state dict, or timm's Hub directory (`config.json` with its
  `architecture`); written as `.safetensors` (+ spec) or `.pth`.

Our safetensors files (any layout) record the spec in their metadata, so what a layout has no room for (timm: the
head width; transformers: the local-crop CLS norm; both: the RoPE table dtype, training-time coordinate
augmentations) survives a round trip. Without it, the settings come from `config.json`, timm's model name or the
official preset of that shape (`dinov3_layouts.infer_timm_spec`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.storage import replacing
from dinotrain.weights.dinov3_layouts import (HF_MODEL_TYPE, from_timm, from_transformers, infer_dinov3_spec,
                                              infer_timm_spec, spec_from_transformers_config, to_timm, to_transformers,
                                              transformers_config)
from dinotrain.weights.hf import (CONFIG_NAME, read_hf_tensors, reconcile_spec, spec_from_metadata,
                                  spec_to_metadata, write_model_dir)
from dinotrain.weights.state_dict import WeightsError, check_compatible

log = logging.getLogger("dinotrain.weights")

OURS, TIMM = "ours", "timm"
# Settings that change what a backbone computes at evaluation but that a bare state dict cannot say: whoever builds
# a model for the official `.pth` (torch.hub's `dinov3_*`) or timm's file (timm's `Eva`) builds the released
# models' values (`infer_dinov3_spec`).
_EVAL_SETTINGS_NOT_IN_TENSORS = ("norm_layer", "pos_embed_rope_normalize_coords", "pos_embed_rope_dtype")
# What timm's tensors (and transformers' config) do not hold, taken from our recorded spec when there is one.
_UNSTORED_IN_TIMM = ("num_heads", "untie_global_and_local_cls_norm")


# ---- which layout ---------------------------------------------------------------------------------------
def is_dinov3_config(config: Mapping) -> bool:
    """A transformers `config.json` of a DINOv3 ViT."""
    return config.get("model_type") == HF_MODEL_TYPE or any(
        str(a).startswith("DINOv3ViT") for a in config.get("architectures") or [])


def is_timm_config(config: Mapping) -> bool:
    """timm's Hub `config.json` (`architecture`, `pretrained_cfg`, no transformers `model_type`)."""
    return "model_type" not in config and isinstance(config.get("architecture"), str)


def looks_like_ours(state_dict: Mapping[str, Tensor]) -> bool:
    """Our (= official) DINOv3 names: the RoPE periods buffer is stored."""
    return "rope_embed.periods" in state_dict


def looks_like_timm(state_dict: Mapping[str, Tensor]) -> bool:
    """timm's dinov3 `Eva` names: a CLS token but no position table, and a tensor only timm names so."""
    timm_only = ("reg_token", "blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.mlp.fc1_g.weight")
    return ("cls_token" in state_dict and "pos_embed" not in state_dict and not looks_like_ours(state_dict)
            and any(k in state_dict for k in timm_only))


def is_dinov3_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    return looks_like_ours(state_dict) or looks_like_timm(state_dict)


# ---- reading --------------------------------------------------------------------------------------------
def _with_unstored(inferred: Dinov3Spec, saved, fields: tuple[str, ...]) -> Dinov3Spec:
    """`inferred` with the `fields` its source cannot hold taken from our recorded spec (if it is a DINOv3 one)."""
    if not isinstance(saved, Dinov3Spec):
        return inferred
    return dataclasses.replace(inferred, **{f: getattr(saved, f) for f in fields})


def read_dinov3_tensors(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str],
                        timm_name: str | None = None) -> tuple[str, dict[str, Tensor], Dinov3Spec]:
    """(layout, our tensors, spec) of a DINOv3 state dict in our or timm's layout (wrappers already stripped).

    `metadata`: the safetensors metadata (our recorded spec, if any); `timm_name`: timm's model name from the
    `config.json` beside the file, if any.
    """
    saved = spec_from_metadata(dict(metadata))
    if looks_like_ours(state_dict):
        return OURS, dict(state_dict), reconcile_spec(saved, infer_dinov3_spec(state_dict))
    inferred = infer_timm_spec(state_dict, timm_name)
    unstored = _UNSTORED_IN_TIMM + (() if "blocks.0.attn.q_bias" in state_dict else ("qkv_bias", "mask_k_bias"))
    spec = reconcile_spec(saved, _with_unstored(inferred, saved, unstored))
    return TIMM, from_timm(state_dict, spec), spec


def from_transformers_tensors(config: Mapping, tensors: Mapping[str, Tensor],
                              metadata: Mapping[str, str]) -> tuple[dict[str, Tensor], Dinov3Spec]:
    """Our tensors and spec of a `DINOv3ViTModel` checkpoint: the spec from `config.json`, or from our recorded
    one when it agrees with the config (it also holds what the config cannot)."""
    spec = spec_from_transformers_config(config)
    saved = spec_from_metadata(dict(metadata))
    if saved is not None:
        try:
            check_compatible(saved, _with_unstored(spec, saved, ("untie_global_and_local_cls_norm",)), "config.json")
        except WeightsError as exc:
            raise WeightsError(f"the spec recorded in the weights' metadata contradicts {CONFIG_NAME}: {exc}") from exc
        spec = saved
    return from_transformers(tensors, spec), spec


def read_transformers_dir(src: str | Path, config: Mapping) -> tuple[dict[str, Tensor], Dinov3Spec]:
    """A transformers `DINOv3ViTModel` directory (its `config.json` already read) -> our tensors and spec."""
    return from_transformers_tensors(config, *read_hf_tensors(Path(src)))


def read_timm_dir(src: str | Path, config: Mapping) -> tuple[dict[str, Tensor], Dinov3Spec]:
    """timm's Hub directory of a dinov3 model (`config.json` with its `architecture`) -> our tensors and spec."""
    tensors, metadata = read_hf_tensors(Path(src))
    if not looks_like_timm(tensors):
        raise WeightsError(f"{src}: {CONFIG_NAME} names timm model {config['architecture']!r} but its weights are "
                           "not a timm dinov3 ViT")
    _, state_dict, spec = read_dinov3_tensors(tensors, metadata, config["architecture"])
    return state_dict, spec


# ---- writing --------------------------------------------------------------------------------------------
def warn_unrecorded_settings(state_dict: Mapping[str, Tensor], spec: Dinov3Spec, dst: Path, layout: str) -> None:
    """Warn (one line) when `spec` computes otherwise than the released models' settings a consumer of a bare
    `layout` file assumes. Why: a run trained with `norm_layer: layernorm` (eps 1e-6, the official default config)
    exported as a `.pth` gives torch.hub's / timm's model (eps 1e-5) another CLS token (measured 3e-2 on a tiny run)."""
    assumed = infer_dinov3_spec(state_dict)
    differ = [f"{f}={getattr(spec, f)!r} (they assume {getattr(assumed, f)!r})" for f in _EVAL_SETTINGS_NOT_IN_TENSORS
              if getattr(spec, f) != getattr(assumed, f)]
    if differ:
        log.warning("%s: the %s file cannot record this backbone's %s: build its consumer with them (e.g. "
                    "torch.hub.load(..., norm_layer='layernorm'); timm: norm_layer=partial(LayerNorm, eps=1e-6)) or "
                    "its features differ; --to hf / --to safetensors record them", dst, layout, ", ".join(differ))


def _single_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"weights mix dtypes {sorted(map(str, dtypes))}; cast them to one dtype before exporting")
    return dtypes.pop()


def _own_storage(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_transformers(state_dict: Mapping[str, Tensor], spec: Dinov3Spec, dst: str | Path) -> Path:
    """A directory `transformers.AutoModel.from_pretrained(dst)` loads as `DINOv3ViTModel`: `config.json`,
    `model.safetensors` (the Hub's names, our spec in the metadata) and the evaluation transform's
    `preprocessor_config.json` (as our DINOv2 exports)."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"transformers export target {dst} exists and is not a directory; pass a directory path")
    tensors = _own_storage(to_transformers(state_dict, spec))
    dtype = str(_single_dtype(tensors)).removeprefix("torch.")
    config = {**transformers_config(spec), "torch_dtype": dtype, "dtype": dtype}
    return write_model_dir(dst, tensors, config, spec_to_metadata(spec), "transformers")


def save_timm(state_dict: Mapping[str, Tensor], spec: Dinov3Spec, dst: str | Path) -> Path:
    """timm's dinov3 `Eva` state dict at `dst`: `.safetensors` (our spec in the metadata) or a torch `.pth`.
    timm loads it with `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=dst))`."""
    dst = Path(dst)
    if dst.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"timm output {dst} must be a .safetensors or .pth file")
    tensors = _own_storage(to_timm(state_dict, spec))
    with replacing(dst, "the timm weights") as tmp:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=spec_to_metadata(spec))
        else:
            torch.save(tensors, tmp)
    return dst
