"""The frozen teacher of distillation: where its weights come from, their fingerprint, its targets.

Three sources, in the order of what users have: (a) a dinotrain run or checkpoint directory (the EMA
teacher's backbone and heads, read in bounded memory), (b) a full export (`dinotrain export --to
full`: backbone + heads + config), (c) backbone-only weights (hub `.pth`, `.safetensors`, Hugging Face
directory), whose heads the head warm-up makes (`train/head_warmup.py`). A distillation checkpoint
never holds the teacher: it records the resolved source and a fingerprint of the weights, and a
resume with other weights is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinotrain.config import ConfigError
from dinotrain.distributed.fsdp import reshard, shard_module
from dinotrain.losses import DINOLoss, iBOTPatchLoss
from dinotrain.models.state_dict import WeightsError
from dinotrain.models.vision_transformer import ViTSpec, vit_from_spec
from dinotrain.losses.centering import teacher_targets
from dinotrain.train.ssl import teacher_logits

KEY = "distillation.teacher"
HEADS = ("dino_head", "ibot_head")


@dataclass
class TeacherWeights:
    source: str  # resolved: the checkpoint directory, or the file / directory given
    kind: str  # "run" | "full" | "backbone"
    backbone: dict[str, Tensor]  # official hub names
    spec: ViTSpec
    heads: dict[str, dict[str, Tensor]] | None  # None: backbone only (heads come from the warm-up)
    config: dict  # the source's recipe config ({} for backbone-only weights)


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes: equal exactly when the weights are bitwise equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def all_tensors(weights: TeacherWeights) -> dict[str, Tensor]:
    out = {f"backbone.{k}": v for k, v in weights.backbone.items()}
    for head, state in (weights.heads or {}).items():
        out.update({f"{head}.{k}": v for k, v in state.items()})
    return out


def _split_heads(tensors: dict[str, Tensor]) -> tuple[dict, dict]:
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    heads = {h: {k[len(h) + 1:]: v for k, v in tensors.items() if k.startswith(h + ".")} for h in HEADS}
    return backbone, {h: sd for h, sd in heads.items() if sd}


def resolve_source(given: str) -> str:
    """What `distillation.teacher` names, pinned: a run directory becomes its newest complete checkpoint
    (so every rank, and every resume, reads the same weights even while the teacher run goes on)."""
    from dinotrain.distributed.checkpoint import complete_checkpoints

    if not given:
        raise ConfigError(f"{KEY} is empty: give a dinotrain run directory, a full export (.safetensors with "
                          "heads) or backbone weights (.pth, .safetensors, Hugging Face directory)")
    path = Path(given)
    if not path.exists():
        raise FileNotFoundError(f"{KEY}: {path} does not exist")
    if path.is_dir() and not (path / "extra.json").is_file() and (path / "checkpoints").is_dir():
        found = complete_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{KEY}: the run directory {path} has no complete checkpoint yet")
        return str(found[-1])
    return str(path)


def _from_checkpoint(ckpt: Path) -> TeacherWeights:
    """The EMA teacher (backbone + heads) of a training checkpoint."""
    from dinotrain.distributed.checkpoint import read_extra
    from dinotrain.distributed.checkpoint_files import read_tensors
    from dinotrain.models.state_dict import infer_spec

    if (ckpt / "students").is_dir():
        raise ConfigError(f"{KEY}: {ckpt} is a distillation checkpoint (its frozen teacher is not stored there); "
                          "export a student with `dinotrain export RUN OUT.safetensors --to full --which NAME` "
                          "and use that file as the teacher")
    extra = read_extra(ckpt)
    backbone, heads = _split_heads(read_tensors(ckpt, "model.teacher.", what="EMA teacher"))
    config = extra.get("config", {})
    spec = infer_spec(backbone)
    s = config.get("student", {})
    if "interpolate_offset" in s:  # not in the weights: the run's settings
        spec = dataclasses.replace(spec, interpolate_offset=float(s["interpolate_offset"]),
                                   interpolate_antialias=bool(s["interpolate_antialias"]))
    return TeacherWeights(str(ckpt), "run", backbone, spec, heads, config)


def read_teacher(given: str) -> TeacherWeights:
    """The teacher's weights from what `distillation.teacher` names (see the module docstring)."""
    from dinotrain.export.convert import read_weights
    from dinotrain.export.full import is_full_export, read_full

    path = Path(resolve_source(given))
    try:
        if path.is_dir() and (path / "extra.json").is_file():
            return _from_checkpoint(path)
        if path.is_file() and path.suffix == ".safetensors" and is_full_export(path):
            full = read_full(path)
            return TeacherWeights(str(path), "full", full.backbone, full.spec, full.heads, full.config)
        backbone, spec = read_weights(path)
    except WeightsError as exc:
        message = str(exc)
        raise WeightsError(message if message.startswith(KEY) else f"{KEY}: {message}") from exc
    return TeacherWeights(str(path), "backbone", backbone, spec, None, {})


def check_student_fits(weights: TeacherWeights, name: str, cfg: DictConfig) -> None:
    """A student can learn from this teacher: same patch size, prototype counts equal to the teacher heads'."""
    from dinotrain.models.heads import head_settings

    where = f"student {name!r}"
    if cfg.student.patch_size != weights.spec.patch_size:
        raise ConfigError(f"{where} has student.patch_size={cfg.student.patch_size} but the teacher ({weights.source}) "
                          f"has patch size {weights.spec.patch_size}: they must match (iBOT compares patch tokens "
                          "position by position)")
    if weights.heads is None:
        return
    dino = head_settings(weights.heads["dino_head"], what="teacher dino_head")["out_dim"]
    if cfg.dino.head_n_prototypes != dino:
        raise ConfigError(f"{where} has dino.head_n_prototypes={cfg.dino.head_n_prototypes} but the teacher's DINO "
                          f"head has {dino} prototypes: set dino.head_n_prototypes={dino}")
    if cfg.ibot.loss_weight <= 0:
        return
    separate = "ibot_head" in weights.heads
    if bool(cfg.ibot.separate_head) != separate:
        raise ConfigError(f"{where} has ibot.separate_head={bool(cfg.ibot.separate_head)} but the teacher "
                          f"{'has' if separate else 'has no'} separate iBOT head: set ibot.separate_head={separate}")
    if separate:
        ibot = head_settings(weights.heads["ibot_head"], what="teacher ibot_head")["out_dim"]
        if cfg.ibot.head_n_prototypes != ibot:
            raise ConfigError(f"{where} has ibot.head_n_prototypes={cfg.ibot.head_n_prototypes} but the teacher's "
                              f"iBOT head has {ibot} prototypes: set ibot.head_n_prototypes={ibot}")


class FrozenTeacher(nn.Module):
    """Backbone + DINO/iBOT heads, frozen and in eval mode; `targets` gives every student's targets.

    The centering state (softmax centering's EMA centers) lives in `centers`, the only part of the
    teacher a distillation checkpoint stores.
    """

    def __init__(self, weights: TeacherWeights, cfg: DictConfig, do_ibot: bool = True):
        super().__init__()
        from dinotrain.models.heads import head_from_state_dict

        assert weights.heads is not None, "a backbone-only teacher needs the head warm-up first"
        backbone = vit_from_spec(weights.spec, attn_impl=cfg.student.attn_impl)
        backbone.load_state_dict(weights.backbone, strict=True)
        self.nets = nn.ModuleDict({"backbone": backbone})
        for name, state in weights.heads.items():
            self.nets[name] = head_from_state_dict(state, what=f"teacher {name}")
        self.nets.requires_grad_(False)
        self.nets.eval()
        self.do_ibot = do_ibot  # patch targets are computed when any student has an iBOT loss
        self.centering = cfg.train.centering
        ibot_head = self.nets["ibot_head"] if "ibot_head" in self.nets else self.nets["dino_head"]
        self.centers = nn.ModuleDict({"dino_loss": DINOLoss(self.nets["dino_head"].out_dim),
                                      "ibot_patch_loss": iBOTPatchLoss(ibot_head.out_dim)})
        self.n_forward = 0

    def shard(self, dtype: torch.dtype, reshard_after_forward: bool = True) -> None:
        for module in self.nets.values():
            shard_module(module, dtype, reshard_after_forward=reshard_after_forward, plain_if_unneeded=True)

    @torch.no_grad()
    def targets(self, batch: dict, teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Target probabilities for the global CLS tokens and the sampled patch positions (one forward)."""
        self.n_forward += 1
        cls_logits, patch_logits = teacher_logits(self.nets, batch, self.do_ibot)
        reshard(self.nets)
        return teacher_targets(self.centering, self.centers["dino_loss"], self.centers["ibot_patch_loss"],
                               cls_logits, patch_logits, teacher_temp)
