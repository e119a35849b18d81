"""The DINOv2 meta-architecture: a student and its EMA teacher, their heads, and the three losses.

One training step's forward, as data flows: teacher backbone on the 2 global crops (no grad) ->
DINO head on CLS (and iBOT head on the masked patch tokens) -> centering (softmax + EMA center, or
Sinkhorn-Knopp) -> student backbone on global (masked) + local crops -> heads -> DINO loss over
crop pairs (never a view with itself) + iBOT loss on masked patches + KoLeo on student CLS.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from dinotrain.distributed.fsdp import ema_update, reshard, shard_module
from dinotrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinotrain.models.heads import DINOHead
from dinotrain.models.vision_transformer import DinoVisionTransformer, build_vit

N_GLOBAL_CROPS = 2
# The values the official code logs and sums into its displayed `total_loss` (not the backpropagated loss).
OFFICIAL_LOGGED_LOSSES = ("dino_global_crops_loss", "dino_local_crops_loss", "koleo_loss", "ibot_loss")


def build_backbone(cfg: DictConfig, for_teacher: bool) -> DinoVisionTransformer:
    """Backbone from `student.*`; the teacher gets no stochastic depth (as official)."""
    s = cfg.student
    return build_vit(
        s.arch, patch_size=s.patch_size, img_size=cfg.crops.global_crops_size,
        drop_path_rate=0.0 if for_teacher else s.drop_path_rate, drop_path_uniform=s.drop_path_uniform,
        init_values=s.layerscale or None, ffn_layer=s.ffn_layer, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias, num_register_tokens=s.num_register_tokens, interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset, attn_impl=s.attn_impl,
    )


def _head(cfg_head: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, cfg_head.head_n_prototypes, nlayers=cfg_head.head_nlayers,
                    hidden_dim=cfg_head.head_hidden_dim, bottleneck_dim=cfg_head.head_bottleneck_dim,
                    norm_last_layer=cfg_head.norm_last_layer)


def _build_networks(cfg: DictConfig, for_teacher: bool) -> nn.ModuleDict:
    backbone = build_backbone(cfg, for_teacher)
    nets = nn.ModuleDict({"backbone": backbone, "dino_head": _head(cfg.dino, backbone.embed_dim)})
    if cfg.ibot.loss_weight > 0 and cfg.ibot.separate_head:
        nets["ibot_head"] = _head(cfg.ibot, backbone.embed_dim)
    return nets


class SSLMetaArch(nn.Module):
    """Student + EMA teacher + losses. `forward_backward` runs one (micro-)step and returns its losses."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.student = _build_networks(cfg, for_teacher=False)
        self.teacher = _build_networks(cfg, for_teacher=True)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.n_local_crops = cfg.crops.local_crops_number
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.ibot_separate_head = self.do_ibot and cfg.ibot.separate_head
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()

    # ---- set-up ------------------------------------------------------------------------------
    def load_student_backbone(self, weights) -> None:
        """Start student and teacher from pretrained backbone weights (before sharding).

        `weights`: a state dict, or a path in any supported format (`cfg.student.pretrained_weights`).
        Weights made at another image size (e.g. the official 518-px ones in a 224-px run) have their
        position embeddings resampled to the run's grid (logged), unless `student.pretrained_strict`
        is true. Errors name the config key `student.pretrained_weights`.
        """
        import os

        from dinotrain.models.state_dict import WeightsError, fit_pos_embed, strip_to_backbone

        key = "student.pretrained_weights"
        source = weights if isinstance(weights, (str, os.PathLike)) else self.cfg.student.pretrained_weights
        where = f"config key '{key}'" + (f" = {source}" if source else "")
        strict = bool(self.cfg.student.pretrained_strict)
        try:
            if isinstance(weights, (str, os.PathLike)):
                from dinotrain.export.convert import read_weights

                weights = read_weights(weights)[0]
            state_dict = fit_pos_embed(strip_to_backbone(weights), self.student["backbone"].spec, strict=strict,
                                       what=f"weights of {key}")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{where}: {exc}") from exc
        except WeightsError as exc:
            hint = (" (in training the model's img_size is crops.global_crops_size; or set "
                    "student.pretrained_strict=false to resample)") if strict and "strict" in str(exc) else ""
            raise WeightsError(f"{where}: {exc}{hint}") from exc
        for nets in (self.student, self.teacher):
            nets["backbone"].load_state_dict(state_dict, strict=True)

    def shard(self, dtype: torch.dtype) -> None:
        """FSDP2 on every network, student and teacher alike (so EMA pairs shards one to one)."""
        f = self.cfg.fsdp
        for nets in (self.student, self.teacher):
            for name, module in nets.items():
                shard_module(module, dtype, reshard_after_forward=f.reshard_after_forward,
                             activation_checkpointing=f.activation_checkpointing and name == "backbone" and nets is self.student,
                             compile_blocks=f.compile)

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_targets(self, batch: dict, teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities for the global CLS tokens (view order kept) and the masked patches."""
        out = self.teacher["backbone"](batch["collated_global_crops"], is_training=True)
        cls = out["x_norm_clstoken"]
        masked = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]] if self.do_ibot else None
        if self.do_ibot and not self.ibot_separate_head:
            logits = self.teacher["dino_head"](torch.cat((cls, masked))).float()
            cls_logits, patch_logits = logits[: cls.shape[0]], logits[cls.shape[0]:]
        else:
            cls_logits = self.teacher["dino_head"](cls).float()
            patch_logits = self.teacher["ibot_head"](masked).float() if self.do_ibot else None
        reshard(self.teacher)

        if self.cfg.train.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_probs = None
            if self.do_ibot:
                patch_probs = self.ibot_patch_loss.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp).squeeze(0)
                self.ibot_patch_loss.update_center(patch_logits.unsqueeze(0))
        else:
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = None
            if self.do_ibot:
                n_masked = torch.tensor([patch_logits.shape[0]], device=patch_logits.device, dtype=torch.long)
                patch_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, n_masked)
        return cls_probs, patch_probs

    def _koleo(self, cls_tokens: Tensor) -> Tensor:
        """KoLeo per global view, over this process's batch (official) or, with `dino.koleo_global`,
        over the global batch: neighbours come from all ranks (gathered with autograd), each rank
        averaging over its own rows, so the mean over ranks is the global-batch KoLeo."""
        views = cls_tokens.chunk(N_GLOBAL_CROPS)
        if not self.cfg.dino.koleo_global or world_size() == 1:
            return sum(self.koleo_loss(view) for view in views)
        from torch.distributed.nn.functional import all_gather

        total = cls_tokens.new_zeros(())
        for view in views:
            pool = torch.cat(all_gather(view))
            total = total + self.koleo_loss(view, pool=pool, offset=dist.get_rank() * view.shape[0])
        return total

    def compute_losses(self, batch: dict, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss that is backpropagated, and what to log about it.

        Logged, so curves lay over the official DINOv2 logs: `dino_global_crops_loss` and
        `dino_local_crops_loss` unweighted, `koleo_loss` (weighted) and `ibot_loss` (unweighted) halved,
        exactly as the official code displays them; and each term as it enters the backpropagated loss:
        `dino_global_term`, `dino_local_term`, `koleo_term`, `ibot_term` (these sum to it).
        """
        teacher_cls, teacher_patch = self._teacher_targets(batch, teacher_temp)
        # Every rank runs every sharded module every step, also when its crops drew no masked patch:
        # the iBOT head then sees an empty (0, D) input and adds exactly 0 to the loss. Skipping it
        # on one rank would leave the other ranks waiting in the head's FSDP collectives forever.

        crops, masks = [batch["collated_global_crops"]], [batch["collated_masks"]]
        if self.n_local_crops:
            crops.append(batch["collated_local_crops"])
            masks.append(None)
        outs = self.student["backbone"](crops, masks, is_training=True)
        g_cls = outs[0]["x_norm_clstoken"]
        l_cls = outs[1]["x_norm_clstoken"] if self.n_local_crops else g_cls[:0]
        head_in = [l_cls, g_cls]
        if self.do_ibot:
            g_patch = outs[0]["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
            if not self.ibot_separate_head:
                head_in.append(g_patch)
        logits = self.student["dino_head"](torch.cat(head_in)).float()
        l_logits, g_logits = logits[: l_cls.shape[0]], logits[l_cls.shape[0]: l_cls.shape[0] + g_cls.shape[0]]

        dino_global, dino_local = self.dino_loss.dino_crossview_losses(
            g_logits, l_logits if self.n_local_crops else None, teacher_cls, n_global=N_GLOBAL_CROPS)
        w = self.cfg.dino.loss_weight
        terms = {"dino_global_term": w * dino_global, "dino_local_term": w * dino_local}
        logged = {"dino_global_crops_loss": dino_global, "dino_local_crops_loss": dino_local}
        if self.do_koleo:
            terms["koleo_term"] = self.cfg.dino.koleo_loss_weight * self._koleo(g_cls.float())
            logged["koleo_loss"] = terms["koleo_term"] / 2
        if self.do_ibot:
            if self.ibot_separate_head:
                patch_logits = self.student["ibot_head"](g_patch).float()
            else:
                patch_logits = logits[l_cls.shape[0] + g_cls.shape[0]:]
            ibot = self.ibot_patch_loss.forward_masked(
                patch_logits, teacher_patch, student_masks_flat=batch["collated_masks"],
                masks_weight=batch["masks_weight"])
            terms["ibot_term"] = self.cfg.ibot.loss_weight * ibot
            logged["ibot_loss"] = ibot / 2
        total = sum(terms.values())
        return total, {**logged, **terms}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
