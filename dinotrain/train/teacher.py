"""The frozen teacher of distillation: where its weights come from, their fingerprint, its targets.

Three sources, in the order of what users have, all read by the weights resolver
(`dinotrain.weights.resolve`): (a) a dinotrain run or checkpoint directory (the EMA teacher's backbone
and heads, read in bounded memory), (b) a full export (`dinotrain export --to full`: backbone + heads +
config), (c) backbone-only weights (hub `.pth`, `.safetensors`, Hugging Face directory), whose heads
the head warm-up makes (`train/head_warmup.py`). A distillation checkpoint
never holds the teacher: it records the resolved source and a fingerprint of the weights, and a
resume with other weights is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinotrain.config import ConfigError
from dinotrain.distributed.fsdp import reshard, shard_module
from dinotrain.losses import DINOLoss, iBOTPatchLoss
from dinotrain.losses.centering import teacher_targets
from dinotrain.models.dinov3 import Dinov3Spec
from dinotrain.models.presets import backbone_from_spec
from dinotrain.train.ssl import teacher_logits
from dinotrain.weights.resolve import CHECKPOINT, FULL, open_weights, resolve
from dinotrain.weights.state_dict import Weights, WeightsError

KEY = "distillation.teacher"


# What the teacher's source offered, in the words a distillation checkpoint records (and logs).
_RECORDED_KIND = {CHECKPOINT: "run", FULL: "full"}  # anything else: "backbone" (heads from the warm-up)


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes: equal exactly when the weights are bitwise equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def all_tensors(weights: Weights) -> dict[str, Tensor]:
    out = {f"backbone.{k}": v for k, v in weights.backbone.items()}
    for head, state in (weights.heads or {}).items():
        out.update({f"{head}.{k}": v for k, v in state.items()})
    return out


def _named(exc: BaseException) -> str:
    message = str(exc)
    return message if message.startswith(KEY) else f"{KEY}: {message}"


def resolve_source(given: str) -> str:
    """What `distillation.teacher` names, pinned by the weights resolver: a run directory becomes its newest
    complete checkpoint (so every rank, and every resume, reads the same weights even while the teacher run
    goes on)."""
    if not given:
        raise ConfigError(f"{KEY} is empty: give a dinotrain run directory, a full export (.safetensors with "
                          "heads) or backbone weights (.pth, .safetensors, Hugging Face directory)")
    path = Path(given)
    if not path.exists():
        raise FileNotFoundError(f"{KEY}: {path} does not exist")
    try:
        return str(resolve(path, "teacher", heads=True)[0])
    except FileNotFoundError as exc:
        raise FileNotFoundError(_named(exc)) from exc


def read_teacher(given: str) -> Weights:
    """The teacher's weights (backbone, heads where the source holds them, config) from what
    `distillation.teacher` names; errors name the key. Its `kind` is one of "run", "full", "backbone"."""
    path = resolve_source(given)
    try:
        weights = open_weights(path, "teacher", heads=True)
    except (WeightsError, FileNotFoundError) as exc:
        raise type(exc)(_named(exc)) from exc
    except ValueError as exc:  # a distillation checkpoint: its frozen teacher is not stored there
        raise ConfigError(_named(exc)) from exc
    return dataclasses.replace(weights, kind=_RECORDED_KIND.get(weights.kind, "backbone"))


def check_student_fits(weights: Weights, name: str, cfg: DictConfig) -> None:
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

    def __init__(self, weights: Weights, cfg: DictConfig, do_ibot: bool = True):
        super().__init__()
        from dinotrain.models.heads import head_from_state_dict

        assert weights.heads is not None, "a backbone-only teacher needs the head warm-up first"
        # either family (a DINOv3 teacher: RoPE, storage tokens); the student's attention kernel for a DINOv2 one
        dinov2 = {} if isinstance(weights.spec, Dinov3Spec) else {"attn_impl": cfg.student.attn_impl}
        backbone = backbone_from_spec(weights.spec, **dinov2)
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

    def shard(self, dtype: torch.dtype, reshard_after_forward: bool = True, compile_blocks: bool = False) -> None:
        for module in self.nets.values():
            shard_module(module, dtype, reshard_after_forward=reshard_after_forward, compile_blocks=compile_blocks,
                         plain_if_unneeded=True)

    @torch.no_grad()
    def targets(self, batch: dict, teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Target probabilities for the global CLS tokens and the sampled patch positions (one forward)."""
        self.n_forward += 1
        cls_logits, patch_logits = teacher_logits(self.nets, batch, self.do_ibot)
        reshard(self.nets)
        return teacher_targets(self.centering, self.centers["dino_loss"], self.centers["ibot_patch_loss"],
                               cls_logits, patch_logits, teacher_temp)
