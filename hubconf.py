"""torch.hub entry points with the official DINOv2 / DINO v1 / DINOv3 names.

    model = torch.hub.load("path/to/dinotrain", "dinov2_vitb14", source="local", weights="vitb14.pth")
    model = torch.hub.load("path/to/dinotrain", "dinov3_vits16", source="local", weights="dinov3_vits16.pth")

Nothing is ever downloaded: `weights=PATH` loads local weights, whatever the weights resolver takes (a hub
`.pth`, `.safetensors`, full export, `transformers` directory, or a dinotrain run / checkpoint directory);
`pretrained=True` alone is an error rather than a silent random model. Extra keyword
arguments go to the backbone constructor (e.g. `img_size=224`, `drop_path_rate=0.1`, `depth=1`).

Weights of any image size load. Without `img_size`, a model with `weights` is built at the weights'
own size (a 224-px export gives the 224-px model, the official 518-px weights the 518-px one), so
nothing is resampled. With an `img_size` other than the weights', their position embeddings are
resampled bicubically to the new grid (logged as a warning; the method of the model's own forward,
see `dinotrain.weights.state_dict.resample_pos_embed`); `strict_pos_embed=True` refuses instead.
DINOv3 models (RoPE) take any image size and their weights in any layout: the official `.pth`, a
`transformers` `DINOv3ViTModel` directory, timm's dinov3 weights. Weights of the other family (DINOv2 into a
`dinov3_*` entry or the reverse) are a one-line WeightsError naming both.
"""

dependencies = ["torch"]

# Imported here, while torch.hub has the repository on sys.path; private names stay out of hub.list().
from dinotrain.models.dinov3 import DINOV3_PRESETS as _DINOV3_PRESETS  # noqa: E402
from dinotrain.models.presets import PRESETS as _PRESETS  # noqa: E402
from dinotrain.models.presets import build_preset as _build_preset  # noqa: E402
from dinotrain.weights.convert import load_weights_into as _load_weights_into  # noqa: E402
from dinotrain.weights.resolve import open_weights as _open_weights  # noqa: E402
from dinotrain.weights.state_dict import WeightsError as _WeightsError  # noqa: E402


def _load(name: str, pretrained: bool, weights, kwargs: dict, strict_pos_embed: bool = False):
    if pretrained and weights is None:
        raise ValueError(
            f"{name}(pretrained=True) would need a download, which dinotrain never does; "
            f"pass weights=PATH to a local .pth, .safetensors or transformers directory (or pretrained=False)"
        )
    if weights is None:
        return _build_preset(name, **kwargs)
    found = _open_weights(weights, family="dinov3" if name in _DINOV3_PRESETS else "dinov2")
    if name in _PRESETS and "img_size" not in kwargs and found.spec.patch_size == _PRESETS[name]["patch_size"]:
        kwargs["img_size"] = found.spec.img_size  # the weights' own grid: no resampling
    model = _build_preset(name, **kwargs)
    try:
        _load_weights_into(model, found, strict_pos_embed=strict_pos_embed)
    except _WeightsError as exc:
        raise _WeightsError(f"{weights} cannot be loaded into {name}: {exc}") from exc
    return model


def _entry_point(name: str):
    def entry(pretrained: bool = False, weights=None, strict_pos_embed: bool = False, **kwargs):
        return _load(name, pretrained, weights, kwargs, strict_pos_embed)

    entry.__name__ = entry.__qualname__ = name
    if name in _DINOV3_PRESETS:
        spec = _DINOV3_PRESETS[name]
        entry.__doc__ = (
            f"{name}: DINOv3 ViT, width {spec['embed_dim']}, depth {spec['depth']}, patch 16, RoPE, "
            f"{spec['n_storage_tokens']} storage tokens (official settings); random init unless `weights`.\n\n"
            "weights: path to local weights (official .pth, .safetensors, transformers DINOv3ViTModel directory, "
            "timm dinov3 weights, run directory) to load.\n"
            "pretrained: must come with `weights`; nothing is downloaded.\n"
            "kwargs: constructor overrides, e.g. drop_path_rate=0.1 (any image size runs as it is)."
        )
        return entry
    spec = _PRESETS[name]
    entry.__doc__ = (
        f"{name}: {spec['arch']} with patch size {spec['patch_size']}"
        f"{', 4 register tokens' if spec.get('num_register_tokens') else ''} (official settings).\n\n"
        "weights: path to local weights (hub .pth, .safetensors, transformers directory, run directory) to load.\n"
        "pretrained: must come with `weights`; nothing is downloaded.\n"
        "strict_pos_embed: refuse weights made at another img_size instead of resampling their positions.\n"
        "kwargs: constructor overrides, e.g. img_size=224 (default: the weights' own size, else 518/224)."
    )
    return entry


dinov2_vits14 = _entry_point("dinov2_vits14")
dinov2_vitb14 = _entry_point("dinov2_vitb14")
dinov2_vitl14 = _entry_point("dinov2_vitl14")
dinov2_vitg14 = _entry_point("dinov2_vitg14")
dinov2_vits14_reg = _entry_point("dinov2_vits14_reg")
dinov2_vitb14_reg = _entry_point("dinov2_vitb14_reg")
dinov2_vitl14_reg = _entry_point("dinov2_vitl14_reg")
dinov2_vitg14_reg = _entry_point("dinov2_vitg14_reg")
dino_vits16 = _entry_point("dino_vits16")
dino_vits8 = _entry_point("dino_vits8")
dino_vitb16 = _entry_point("dino_vitb16")
dino_vitb8 = _entry_point("dino_vitb8")
dinov3_vits16 = _entry_point("dinov3_vits16")
dinov3_vits16plus = _entry_point("dinov3_vits16plus")
dinov3_vitb16 = _entry_point("dinov3_vitb16")
dinov3_vitl16 = _entry_point("dinov3_vitl16")
dinov3_vitl16plus = _entry_point("dinov3_vitl16plus")
dinov3_vith16plus = _entry_point("dinov3_vith16plus")
dinov3_vit7b16 = _entry_point("dinov3_vit7b16")


def dinotrain_vit(weights, strict_pos_embed: bool = False, **kwargs):
    """Any dinotrain backbone, built as its weights say (architecture inferred: a smoke run's ViT-Tiny/8, a
    distilled student of custom depth, a DINOv3 model, ...), in eval mode.

    weights: local hub .pth, .safetensors, full export, transformers directory, timm dinov3 weights, or run /
    checkpoint directory (nothing is downloaded).
    kwargs: settings the weights do not fix, e.g. img_size=224 (resamples the position embeddings, see above).
    """
    from dinotrain.weights.convert import backbone_from_weights

    return backbone_from_weights(_open_weights(weights), strict_pos_embed=strict_pos_embed, **kwargs)
