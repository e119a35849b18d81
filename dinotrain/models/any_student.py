"""Students of any architecture (timm / torchvision CNNs, ConvNeXt, small ViTs) behind the ViT backbones' forward API.

`student.arch: timm/<name>` or `torchvision/<name>` builds `AnyStudent`, which the distillation step reads like a
`DinoVisionTransformer` (`forward(crops, masks, is_training=True)` -> dicts with `x_norm_clstoken`,
`x_norm_patchtokens`, `masks`):

- the global embedding (`x_norm_clstoken`, into the DINO head and KoLeo) is the model's own pooled features, exactly
  what `timm.create_model(name, num_classes=0)(x)` (or torchvision's model up to its classifier) returns, so an
  exported student gives its users the features we trained;
- the patch tokens (`x_norm_patchtokens`, into the iBOT head) are the last stage's feature map, resampled
  bilinearly (antialiased when shrinking) to the teacher's patch grid (crop size // `patch_size`) and put through
  a learned LayerNorm (as the official dinov3 ConvNeXt normalises its patch tokens). A ViT's patch tokens (timm)
  are laid out on their grid first. The channel count is the model's feature width (`embed_dim`): the heads'
  first linear layer is the learned projection, so no extra 1x1 projection is added;
- iBOT masks (pretraining only: distillation feeds unmasked crops and compares the patch tokens with the
  teacher's at the mask positions, as official dinov3 does for ConvNeXt students, whose forward ignores masks)
  replace the masked patches' pixels by a learned colour `mask_token`, since a CNN has no token to swap.

Any input size the model accepts: `check_input_size` runs it once on each crop size and turns a failure into one
line. FSDP2 shards each stage (`blocks`, a plain list so that state-dict names stay the model's own).
"""

from __future__ import annotations

import dataclasses
import difflib

import torch
import torch.nn.functional as F
from torch import Tensor, nn



class StudentArchError(ValueError):
    """A `student.*` / `crops.*` setting this student cannot take; one line, as `dinotrain.config.ConfigError` (not
    imported: the config's schema reads weights, whose reader builds these students)."""

SOURCES = ("timm", "torchvision")
KEY = "config key 'student.arch'"
PROBE_SIZE = 224  # an input every ImageNet model takes, to read its widths


def is_any_student(arch: str) -> bool:
    """`student.arch` names a timm / torchvision model rather than one of our ViT sizes."""
    return isinstance(arch, str) and arch.split("/", 1)[0] in SOURCES and "/" in arch


def _timm():
    try:
        import timm
    except ImportError:
        raise StudentArchError(f"{KEY} = timm/...: timm is not installed (pip install 'dinotrain[students]' or "
                               "pip install timm)") from None
    return timm


def _available(source: str) -> list[str]:
    if source == "timm":
        return _timm().list_models()
    import torchvision

    return torchvision.models.list_models()


def _unknown(source: str, name: str) -> StudentArchError:
    close = difflib.get_close_matches(name, _available(source), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(f'{source}/{c}' for c in close)}?" if close else ""
    return StudentArchError(f"{KEY} = {source}/{name}: {source} has no model of that name{hint}")


def _build_timm(name: str) -> nn.Module:
    timm = _timm()
    if name not in timm.list_models():
        raise _unknown("timm", name)
    try:  # ViTs take any multiple of their patch (timm's flag; CNNs have no such argument)
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=0)


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise _unknown("torchvision", name)
    return torchvision.models.get_model(name, weights=None)


@dataclasses.dataclass(frozen=True)
class AnySpec:
    """What builds a student of another architecture again: its `student.arch` and the patch grid it was trained
    on (exports carry it; the widths come from the library's model)."""

    arch: str
    patch_size: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class AnyStudent(nn.Module):
    """A timm / torchvision model as a distillation student (see the module docstring). The wrapped model is
    `self.model`, with its own parameter names (`model.` prefixed), what `export_state_dict` gives back."""

    def __init__(self, arch: str, patch_size: int):
        super().__init__()
        if not is_any_student(arch):
            raise StudentArchError(f"{KEY} = {arch}: expected timm/<name> or torchvision/<name>")
        self.arch = arch
        self.source, self.name = arch.split("/", 1)
        self.model = _build_timm(self.name) if self.source == "timm" else _build_torchvision(self.name)
        if self.source == "torchvision":
            self._tv_stages = _torchvision_stages(self.model, arch)
            for p in _torchvision_classifier(self.model).parameters():  # kept for torchvision's load_state_dict,
                p.requires_grad_(False)  # never run: not trained
        self.patch_size = patch_size
        pooled, fmap = self._probe(PROBE_SIZE)
        self.embed_dim = pooled.shape[1]
        self.has_feature_map = fmap is not None
        self.stride = PROBE_SIZE // fmap.shape[-1] if fmap is not None else 1  # the total stride of the last map
        # a learned 1x1 projection only where the map is not as wide as the pooled features (e.g. MobileNetV4's
        # pooled features pass a conv head): the iBOT head reads embed_dim-wide tokens
        width = fmap.shape[1] if fmap is not None else self.embed_dim
        self.patch_proj = nn.Linear(width, self.embed_dim) if width != self.embed_dim else None
        self.patch_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))

    # ---- what the rest of dinotrain reads -------------------------------------------------------------------
    @property
    def spec(self) -> AnySpec:
        return AnySpec(self.arch, self.patch_size)

    @property
    def blocks(self) -> list[nn.Module]:
        """The stages FSDP2 shards one by one (not registered: the model's own names stay the state dict's)."""
        m = self.model
        if self.source == "torchvision":  # the registered ones (resnet's stem is a wrapper of its first layers)
            registered = {id(mod) for mod in m.modules()}
            return [stage for stage in self._tv_stages if id(stage) in registered]
        for attr in ("stages", "blocks"):
            if isinstance(getattr(m, attr, None), (nn.Sequential, nn.ModuleList)):
                return list(getattr(m, attr))
        return [getattr(m, f"layer{i}") for i in range(1, 5) if hasattr(m, f"layer{i}")]

    def set_checkpointing(self, enabled: bool) -> bool:
        """Activation checkpointing through timm's own switch (per stage / block); False where the model has none
        (torchvision), so the caller can say so."""
        if self.source == "timm" and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enabled)
            return True
        return not enabled

    def _probe(self, size: int) -> tuple[Tensor, Tensor | None]:
        """The model's outputs on one blank `size`-px image, in eval mode (no batch statistics, no randomness)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.pooled_and_map(torch.zeros(1, 3, size, size))
        finally:
            self.train(was)

    # ---- the model's features ----------------------------------------------------------------------------------
    def pooled_and_map(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, D) pooled features, and the last spatial feature map (B, C, h, w) or None if the model has none."""
        if self.source == "torchvision":
            fmap = self._tv_stages(x)
            return torch.flatten(self.model.avgpool(fmap), 1), fmap
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            return pooled, feats
        if feats.ndim == 3 and hasattr(self.model, "patch_embed"):
            tokens = feats[:, getattr(self.model, "num_prefix_tokens", 0):]
            h, w = _vit_grid(self.model, x.shape[-2:])
            if tokens.shape[1] != h * w:
                return pooled, None
            return pooled, tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return pooled, None

    def _mask_pixels(self, x: Tensor, masks: Tensor) -> Tensor:
        """Masked patches' pixels (masks: (B, h*w) on the patch grid) replaced by the learned mask colour."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        grid = masks.reshape(x.shape[0], 1, h, w).to(x.dtype)
        pixels = F.interpolate(grid, scale_factor=self.patch_size, mode="nearest")
        pixels = F.pad(pixels, (0, x.shape[-1] - pixels.shape[-1], 0, x.shape[-2] - pixels.shape[-2]))
        return x * (1 - pixels) + self.mask_token.to(x.dtype) * pixels

    def patch_tokens(self, fmap: Tensor, size: tuple[int, int]) -> Tensor:
        """The feature map on the teacher's patch grid, (B, N, D), normalised."""
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        if tuple(fmap.shape[-2:]) != grid:
            shrink = fmap.shape[-2] > grid[0] or fmap.shape[-1] > grid[1]
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
        tokens = fmap.flatten(2).transpose(1, 2)
        return self.patch_norm(tokens if self.patch_proj is None else self.patch_proj(tokens))

    def forward_features(self, x: Tensor | list, masks=None) -> dict | list[dict]:
        if isinstance(x, (list, tuple)):
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(one, m) for one, m in zip(x, masks)]
        if masks is not None:
            x = self._mask_pixels(x, masks)
        pooled, fmap = self.pooled_and_map(x)
        out = {"x_norm_clstoken": pooled, "masks": masks}
        if fmap is not None:
            out["x_norm_patchtokens"] = self.patch_tokens(fmap, tuple(x.shape[-2:]))
        return out

    def forward(self, x, masks=None, is_training: bool = False, **_):
        """As the ViT backbones: the training dicts, or the pooled features (what `embed` and k-NN read)."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return out["x_norm_clstoken"]

    # ---- checks and exports -----------------------------------------------------------------------------------
    def check_input_size(self, size: int, what: str) -> None:
        """One line if the model cannot take `size`-px crops (e.g. smaller than its total stride)."""
        try:
            _, fmap = self._probe(size)
        except (RuntimeError, ValueError, AssertionError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StudentArchError(f"{KEY} = {self.arch} cannot take {what} = {size} px crops ({first}); use larger crops"
                              ) from None
        if size < self.stride or (fmap is not None and min(fmap.shape[-2:]) < 1):
            raise StudentArchError(f"{KEY} = {self.arch} cannot take {what} = {size} px crops: smaller than its total "
                              f"stride {self.stride} (its last feature map would be under one pixel); use larger "
                              "crops")

    def load_weights(self, state: dict, where: str) -> None:
        """A checkpoint's or full export's tensors (with our trained iBOT adapter): all of them, strictly; otherwise
        the wrapped model's own weights (`load_model_state`)."""
        if "patch_norm.weight" in state and any(k.startswith("model.") for k in state):
            self.load_state_dict(state, strict=True)
        else:
            self.load_model_state(state, where)

    def load_model_state(self, state: dict, where: str) -> None:
        """The wrapped model's own weights (its library's names, a `model.` prefix or not; a classifier the
        student does not build is left out): every weight of the student must be there (one line otherwise)."""
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            what = (f"{len(missing)} of its weights are missing (e.g. {missing[0]})" if missing else
                    f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}")
            raise StudentArchError(f"{where}: not weights of {self.arch}: {what}")
        self.model.load_state_dict({k: state[k] for k in own}, strict=True)

    def export_state_dict(self, state: dict | None = None) -> dict:
        """The wrapped model's own state dict (see the module-level `export_state_dict`)."""
        return export_state_dict(self.state_dict() if state is None else state)


def export_state_dict(state: dict) -> dict:
    """An `AnyStudent` state dict as the wrapped model's own (no `model.` prefix, none of our iBOT adapter): what
    `timm.create_model(name, num_classes=0, checkpoint_path=...)` or torchvision's `load_state_dict` reads."""
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _vit_grid(model: nn.Module, size) -> tuple[int, int]:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(pe.dynamic_feat_size(tuple(size)))
    p = pe.patch_size if isinstance(pe.patch_size, tuple) else (pe.patch_size, pe.patch_size)
    return size[0] // p[0], size[1] // p[1]


def _torchvision_classifier(model: nn.Module) -> nn.Module:
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return nn.Identity()


def _torchvision_stages(model: nn.Module, arch: str) -> nn.Sequential:
    """The modules from image to last feature map, in order (not registered again: the same module objects)."""
    if hasattr(model, "layer4") and hasattr(model, "avgpool"):  # resnet, resnext, wide_resnet
        stages = [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
                  model.layer1, model.layer2, model.layer3, model.layer4]
    elif hasattr(model, "trunk_output") and hasattr(model, "avgpool"):  # regnet
        stages = [model.stem, *model.trunk_output]
    elif isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "avgpool"):
        stages = list(model.features)  # convnext, mobilenet, efficientnet, vgg, ...
    else:
        raise StudentArchError(f"{KEY} = {arch}: this torchvision model has no feature map dinotrain can read (supported: "
                          "resnet / resnext / wide_resnet / regnet and models with .features + .avgpool such as "
                          "convnext, mobilenet, efficientnet); use its timm counterpart")
    seq = _Unregistered(stages)
    return seq


class _Unregistered:
    """Stages run in order; a plain object, so their parameters are registered once, under the model's names."""

    def __init__(self, stages: list[nn.Module]):
        self.stages = stages

    def __iter__(self):
        return iter(self.stages)

    def __call__(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def build_any_student(cfg) -> AnyStudent:
    """The student `cfg.student.arch` names, checked against the run: every crop size it must take, and a spatial
    feature map when the iBOT loss needs patch tokens (one line each)."""
    model = AnyStudent(cfg.student.arch, cfg.student.patch_size)
    if cfg.ibot.loss_weight > 0 and not model.has_feature_map:
        raise StudentArchError(f"{KEY} = {model.arch} gives no spatial feature map for the iBOT loss: set "
                          "ibot.loss_weight=0 (DINO + KoLeo on its pooled features only)")
    sizes = cfg.crops.global_crops_size
    for size in sizes if isinstance(sizes, (list, tuple)) or hasattr(sizes, "__len__") else [sizes]:
        model.check_input_size(int(size), "crops.global_crops_size")
    if cfg.crops.local_crops_number > 0:
        model.check_input_size(int(cfg.crops.local_crops_size), "crops.local_crops_size")
    return model
