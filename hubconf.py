"""torch.hub entry points with the official DINOv2 / DINO v1 names.

    model = torch.hub.load("path/to/dinotrain", "dinov2_vitb14", source="local", weights="vitb14.pth")

Nothing is ever downloaded: `weights=PATH` loads a local hub `.pth`, `.safetensors` or `transformers`
directory; `pretrained=True` alone is an error rather than a silent random model. Extra keyword
arguments go to the backbone constructor (e.g. `img_size=224`, `drop_path_rate=0.1`, `depth=1`).
"""

dependencies = ["torch"]

# Imported here, while torch.hub has the repository on sys.path; private names stay out of hub.list().
from dinotrain.export.convert import read_weights as _read_weights  # noqa: E402
from dinotrain.models.presets import PRESETS as _PRESETS  # noqa: E402
from dinotrain.models.presets import build_preset as _build_preset  # noqa: E402
from dinotrain.models.state_dict import WeightsError as _WeightsError  # noqa: E402
from dinotrain.models.state_dict import load_backbone_weights as _load_backbone_weights  # noqa: E402


def _load(name: str, pretrained: bool, weights, kwargs: dict):
    if pretrained and weights is None:
        raise ValueError(
            f"{name}(pretrained=True) would need a download, which dinotrain never does; "
            f"pass weights=PATH to a local .pth, .safetensors or transformers directory (or pretrained=False)"
        )
    model = _build_preset(name, **kwargs)
    if weights is not None:
        state_dict, _ = _read_weights(weights)
        try:
            _load_backbone_weights(model, state_dict)
        except _WeightsError as exc:
            raise _WeightsError(f"{weights} cannot be loaded into {name}: {exc}") from exc
    return model


def _entry_point(name: str):
    def entry(pretrained: bool = False, weights=None, **kwargs):
        return _load(name, pretrained, weights, kwargs)

    spec = _PRESETS[name]
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}: {spec['arch']} with patch size {spec['patch_size']}"
        f"{', 4 register tokens' if spec.get('num_register_tokens') else ''} (official settings).\n\n"
        "weights: path to local weights (hub .pth, .safetensors or transformers directory) to load.\n"
        "pretrained: must come with `weights`; nothing is downloaded.\n"
        "kwargs: constructor overrides, e.g. img_size=224."
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
