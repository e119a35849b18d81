"""The DINOv2 / DINOv3 meta-architecture: a student and its EMA teacher, their heads, the three losses, and
DINOv3's Gram anchoring.

One training step's forward, as data flows: teacher backbone on the 2 global crops (no grad) ->
DINO head on CLS (and iBOT head on the masked patch tokens) -> centering (softmax + EMA center, or
Sinkhorn-Knopp) -> [Gram anchoring: the Gram teacher's patch tokens of the same crops (no grad)] ->
student backbone on global (masked) + local crops -> heads -> DINO loss over crop pairs (never a view with
itself) + iBOT loss on masked patches + KoLeo on student CLS [+ the Gram loss on the global patch tokens].

The backbone is DINOv2's (`student.pos_embed_type: learned`) or DINOv3's (`rope`, `models/dinov3.py`); the step
is the same. DINOv3 backbones have no selected-rows last block: they run in full and the rows are indexed.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from dinotrain.distributed.fsdp import copy_params, ema_update, follow_buffers, reshard, shard_module
from dinotrain.data.resolutions import nominal_global_size
from dinotrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinotrain.losses.centering import teacher_targets
from dinotrain.losses.gram import GramLoss, resize_patch_grid, select_tokens
from dinotrain.models.any_student import AnyStudent, build_any_student, is_any_student
from dinotrain.models.dinov3 import Dinov3Spec, Dinov3VisionTransformer, dinov3_arch, dinov3_from_spec
from dinotrain.models.heads import DINOHead
from dinotrain.models.vision_transformer import DinoVisionTransformer, ViTSpec, build_vit, vit_from_spec
from dinotrain.train.fit_backbone import fit_backbone

N_GLOBAL_CROPS = 2
# The values the official code logs and sums into its displayed `total_loss` (not the backpropagated loss).
OFFICIAL_LOGGED_LOSSES = ("dino_global_crops_loss", "dino_local_crops_loss", "koleo_loss", "ibot_loss")


Backbone = DinoVisionTransformer | Dinov3VisionTransformer | AnyStudent
# `student.*` keys passed as they are to the DINOv3 backbone (official names, as official `build_model` passes them)
DINOV3_KEYS = ("qkv_bias", "proj_bias", "ffn_bias", "mask_k_bias", "norm_layer", "n_storage_tokens", "ffn_layer",
               "untie_cls_and_patch_norms", "untie_global_and_local_cls_norm", "pos_embed_rope_base",
               "pos_embed_rope_min_period", "pos_embed_rope_max_period", "pos_embed_rope_normalize_coords",
               "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords",
               "pos_embed_rope_dtype")


def is_dinov3(cfg: DictConfig) -> bool:
    """The config asks for a DINOv3 backbone (official `student.pos_embed_type: rope`)."""
    return cfg.student.get("pos_embed_type", "learned") == "rope"


def build_backbone(cfg: DictConfig, for_teacher: bool, spec: ViTSpec | Dinov3Spec | None = None) -> Backbone:
    """Backbone from `student.*` (or, given `spec`, with exactly those shapes, e.g. a pretrained teacher's),
    at the global crop size; the teacher gets no stochastic depth (as official)."""
    s = cfg.student
    img_size = nominal_global_size(cfg.crops.global_crops_size)
    drop_path_rate = 0.0 if for_teacher else s.drop_path_rate
    if spec is None and is_any_student(s.arch):
        return build_any_student(cfg)
    if isinstance(spec, Dinov3Spec):
        return dinov3_from_spec(dataclasses.replace(spec, img_size=img_size),
                                drop_path_rate=drop_path_rate)
    if spec is None and is_dinov3(cfg):
        sizes = {k: s[k] for k in ("depth", "ffn_ratio") if s.get(k)}
        return dinov3_arch(s.arch, patch_size=s.patch_size, img_size=img_size, **sizes,
                           drop_path_rate=drop_path_rate, layerscale_init=s.layerscale or None,
                           **{k: s[k] for k in DINOV3_KEYS})
    drop = dict(drop_path_rate=drop_path_rate, drop_path_uniform=s.drop_path_uniform, attn_impl=s.attn_impl)
    if spec is not None:
        return vit_from_spec(dataclasses.replace(spec, img_size=img_size), **drop)
    sizes = {"depth": s.depth} if s.get("depth") else {}
    if s.get("ffn_ratio"):
        sizes["mlp_ratio"] = s.ffn_ratio
    return build_vit(
        s.arch, patch_size=s.patch_size, img_size=img_size, **sizes, **drop,
        init_values=s.layerscale or None, ffn_layer=s.ffn_layer, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias, num_register_tokens=s.num_register_tokens, interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
    )


def backbone_outputs(backbone: nn.Module, crops, masks=None, select=None):
    """The backbone's training forward; with `select` (see `DinoVisionTransformer.forward_features_list`) only the
    rows a step reads leave the last block. DINOv3 backbones and students of other architectures run in full
    (`patch_tokens_at` indexes them)."""
    if select is None or isinstance(backbone, (Dinov3VisionTransformer, AnyStudent)):
        return backbone(crops, masks, is_training=True)
    return backbone(crops, masks, is_training=True, select_patches=select)


def _head(cfg_head: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, cfg_head.head_n_prototypes, nlayers=cfg_head.head_nlayers,
                    hidden_dim=cfg_head.head_hidden_dim, bottleneck_dim=cfg_head.head_bottleneck_dim,
                    norm_last_layer=cfg_head.norm_last_layer)


def _build_networks(cfg: DictConfig, for_teacher: bool, spec: ViTSpec | Dinov3Spec | None = None) -> nn.ModuleDict:
    backbone = build_backbone(cfg, for_teacher, spec)
    nets = nn.ModuleDict({"backbone": backbone, "dino_head": _head(cfg.dino, backbone.embed_dim)})
    if cfg.ibot.loss_weight > 0 and cfg.ibot.separate_head:
        nets["ibot_head"] = _head(cfg.ibot, backbone.embed_dim)
    return nets


class SSLMetaArch(nn.Module):
    """Student + EMA teacher + losses. `compute_losses` runs one (micro-)step's forward and returns its losses;
    `student_losses` is the student's half, given targets (from the EMA teacher, or a frozen one in distillation).

    `with_gram` (pretraining with `gram.use_loss`): also the Gram loss and, unless `gram.ema_teacher`, a Gram
    teacher `gram_teacher.backbone` (official name): a copy of the EMA teacher's backbone, part of the module's
    state (so of every checkpoint), always in eval mode (no drop path, no RoPE augmentation; official)."""

    def __init__(self, cfg: DictConfig, spec: ViTSpec | Dinov3Spec | None = None, with_gram: bool = False):
        super().__init__()
        self.cfg = cfg
        self.student = _build_networks(cfg, for_teacher=False, spec=spec)
        self.teacher = _build_networks(cfg, for_teacher=True, spec=spec)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.gram_teacher = None
        self.gram_loss = None
        if with_gram:
            g = cfg.gram
            self.gram_loss = GramLoss(normalized=g.normalized, img_level=g.img_level, remove_neg=g.remove_neg,
                                      remove_only_teacher_neg=g.remove_only_teacher_neg)
            if not g.ema_teacher:
                self.gram_teacher = nn.ModuleDict({"backbone": build_backbone(cfg, for_teacher=True, spec=spec)})
                self.gram_teacher["backbone"].load_state_dict(self.teacher["backbone"].state_dict())
                self.gram_teacher.requires_grad_(False)
                self.gram_teacher.eval()
        self.n_local_crops = cfg.crops.local_crops_number
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.ibot_separate_head = self.do_ibot and cfg.ibot.separate_head
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()
        # The shared head's rows are scored in one cross-entropy at one temperature (DINOLoss.head_rows_losses)
        assert self.ibot_patch_loss.student_temp == self.dino_loss.student_temp

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ---- set-up ------------------------------------------------------------------------------
    def load_student_backbone(self, weights, heads: dict | None = None, key: str = "student.pretrained_weights",
                              source: str = "", spec: ViTSpec | Dinov3Spec | None = None) -> None:
        """Start student and teacher from pretrained weights (before sharding).

        `weights`: a backbone state dict (with `heads`, optionally), or a `Weights` the caller resolved from
        `cfg.student.pretrained_weights` (`head_warmup.open_pretrained`), whose DINO/iBOT heads, when it holds
        them (a full export, a run), are loaded too, into student and teacher alike, as when the official code
        continues from a full checkpoint. Weights made at another image size (e.g. the official 518-px ones in
        a 224-px run) have their position embeddings resampled to the run's grid (logged), unless
        `student.pretrained_strict` is true. Errors name the config `key` the weights came from (and `source`, a
        plain state dict's path); `spec`: a plain state dict's spec as its files say (what the tensors cannot).
        """
        from dinotrain.weights.state_dict import Weights, WeightsError, strip_to_backbone

        if not source and key == "student.pretrained_weights":
            source = self.cfg.student.pretrained_weights
        if isinstance(weights, Weights):
            weights, heads, source, spec = weights.backbone, weights.heads, weights.source, weights.spec
        where = f"config key '{key}'" + (f" = {source}" if source else "")
        strict = bool(self.cfg.student.pretrained_strict)
        try:
            state_dict = fit_backbone(strip_to_backbone(weights), self.student["backbone"].spec, strict,
                                       what=f"weights of {key}", found=spec)
            if heads is not None:
                self._check_heads(heads)
        except WeightsError as exc:
            hint = (" (in training the model's img_size is crops.global_crops_size; or set "
                    "student.pretrained_strict=false to resample)") if strict and "strict" in str(exc) else ""
            raise WeightsError(f"{where}: {exc}{hint}") from exc
        for nets in (self.student, self.teacher):
            nets["backbone"].load_state_dict(state_dict, strict=True)
            for name, head in (heads or {}).items():
                nets[name].load_state_dict(head, strict=True)

    def load_any_student(self, path: str) -> None:
        """Student and teacher from a timm / torchvision model's own weights file, or from the full export of such a
        student (`dinotrain export --to full`: its backbone with the trained iBOT adapter; heads stay as built)
        (before sharding)."""
        from dinotrain.weights.full import is_full_export
        from dinotrain.weights.state_dict import WeightsError, read_state_dict

        where = f"config key 'student.pretrained_weights' = {path}"
        if is_full_export(path):
            from dinotrain.weights.resolve import open_weights

            found = open_weights(path)
            arch = self.student["backbone"].arch
            if getattr(found.spec, "arch", None) != arch:
                raise WeightsError(f"{where}: a full export of {getattr(found.spec, 'arch', 'a ViT')}, not of the "
                                   f"student's {arch}")
            state = found.backbone
            logging.getLogger("dinotrain.train").info("student %s from the full export %s (with its iBOT adapter)",
                                                      arch, path)
        else:
            state = read_state_dict(path)
        for nets in (self.student, self.teacher):
            nets["backbone"].load_weights(state, where)

    def _check_heads(self, heads: dict) -> None:
        """Pretrained heads must be the heads this config builds (one clear error otherwise)."""
        from dinotrain.models.heads import head_settings
        from dinotrain.weights.state_dict import WeightsError

        if set(heads) != set(k for k in self.student if k != "backbone"):
            raise WeightsError(f"the file has heads {sorted(heads)} but this config builds "
                               f"{sorted(k for k in self.student if k != 'backbone')} (set ibot.separate_head to match)")
        for name, state in heads.items():
            found = head_settings(state, what=name)
            want = head_settings(self.student[name].state_dict(), what=name)
            diff = [f"{k} {found[k]} (config {want[k]})" for k in want if found[k] != want[k]]
            if diff:
                raise WeightsError(f"its {name} does not fit this config: " + ", ".join(diff)
                                   + f" — set the {name.split('_')[0]}.head_* keys to the file's values")

    def load_gram_teacher(self, weights, source: str) -> None:
        """The first Gram teacher from `gram.ckpt` (a backbone state dict, or a resolved `Weights`)."""
        from dinotrain.weights.state_dict import Weights, WeightsError, strip_to_backbone

        if isinstance(weights, Weights):
            weights = weights.backbone
        try:
            self.gram_teacher["backbone"].load_state_dict(strip_to_backbone(weights), strict=True)
        except (RuntimeError, WeightsError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise WeightsError(f"config key 'gram.ckpt' = {source}: its backbone does not fit this run's "
                               f"student.* architecture ({first})") from exc

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """The Gram teacher takes the EMA teacher's backbone weights (shard by shard; both sharded alike)."""
        copy_params(self.gram_teacher["backbone"], self.teacher["backbone"])

    def shard(self, dtype: torch.dtype, plain_if_unneeded: bool = True) -> None:
        """FSDP2 on every network, student, teacher and Gram teacher alike (so EMA and Gram refresh pair shards
        one to one); one process in fp32 keeps plain modules (`fsdp_needed`) unless `plain_if_unneeded` is False."""
        f = self.cfg.fsdp
        backbone = self.student["backbone"]
        if isinstance(backbone, AnyStudent) and not backbone.set_checkpointing(bool(f.activation_checkpointing)):
            logging.getLogger("dinotrain.train").warning(
                "fsdp.activation_checkpointing: %s has no checkpointing switch; it runs without", backbone.arch)
        for nets in (self.student, self.teacher) + ((self.gram_teacher,) if self.gram_teacher is not None else ()):
            for name, module in nets.items():
                shard_module(module, dtype, reshard_after_forward=f.reshard_after_forward,
                             activation_checkpointing=f.activation_checkpointing and name == "backbone" and nets is self.student,
                             compile_blocks=f.compile, plain_if_unneeded=plain_if_unneeded)

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_targets(self, batch: dict, teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities for the global CLS tokens (view order kept) and the masked patches."""
        cls_logits, patch_logits = teacher_logits(self.teacher, batch, self.do_ibot)
        reshard(self.teacher)
        return teacher_targets(self.cfg.train.centering, self.dino_loss, self.ibot_patch_loss, cls_logits,
                               patch_logits, teacher_temp)

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

    @torch.no_grad()
    def _gram_targets(self, batch: dict) -> Tensor:
        """The Gram teacher's normalised patch tokens of the global crops (or of `collated_gram_teacher_crops`,
        when the data gives it separate crops: their grid resampled to the student's), (2B, N, D)."""
        g = self.cfg.gram
        backbone = self.teacher["backbone"] if g.ema_teacher else self.gram_teacher["backbone"]
        crops = batch.get("collated_gram_teacher_crops")
        crops = batch["collated_global_crops"] if crops is None else crops
        patches = backbone_outputs(backbone, crops)["x_norm_patchtokens"]
        reshard(backbone)
        p = self.cfg.student.patch_size
        student_grid = tuple(s // p for s in batch["collated_global_crops"].shape[-2:])
        return resize_patch_grid(patches, tuple(s // p for s in crops.shape[-2:]), student_grid,
                                 g.global_teacher_resize_method, g.global_teacher_resize_antialias)

    def compute_losses(self, batch: dict, teacher_temp: float, gram=None) -> tuple[Tensor, dict[str, Tensor]]:
        """One SSL step: the EMA teacher's targets, then the student's losses against them. `gram`: this
        iteration's Gram anchoring (`train/gram_schedule.py` `GramIteration`), None without it."""
        teacher_cls, teacher_patch = self._teacher_targets(batch, teacher_temp)
        if gram is None or not gram.active:
            return self.student_losses(batch, teacher_cls, teacher_patch)
        return self.student_losses(batch, teacher_cls, teacher_patch, gram=(self._gram_targets(batch), gram.weight))

    def _gram_terms(self, student_patches: Tensor, teacher_patches: Tensor, weight: float,
                    masks: Tensor) -> dict[str, Tensor]:
        """The Gram loss of the student's global-crop patch tokens (masked crops, as official), its weighted term,
        its weight, and with `gram.compute_stats` the loss over the masked / unmasked patches (no gradient)."""
        g = self.cfg.gram
        student, teacher = select_tokens(student_patches, teacher_patches, masks, g.tokens_used)
        loss = self.gram_loss(student, teacher)
        out = {"gram_loss": loss, "gram_term": weight * loss, "gram_loss_weight": loss.new_tensor(weight)}
        if g.compute_stats:
            with torch.no_grad():  # a rank whose crops drew no mask logs 0 (an empty mean is NaN)
                for name, keep in (("gram_masked_loss", masks), ("gram_unmasked_loss", ~masks)):
                    out[name] = torch.nan_to_num(self.gram_loss(student_patches[keep], teacher_patches[keep],
                                                                img_level=False), nan=0.0)
        return out

    def student_losses(self, batch: dict, teacher_cls: Tensor, teacher_patch: Tensor | None,
                       mask_inputs: bool = True, gram: tuple[Tensor, float] | None = None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss that is backpropagated, and what to log about it, given the teacher's targets.

        `mask_inputs=False` (distillation): the student sees its global crops unmasked, and the iBOT
        loss compares its patch tokens with the teacher's at the sampled mask positions.

        Logged, so curves lay over the official DINOv2 logs: `dino_global_crops_loss` and
        `dino_local_crops_loss` unweighted, `koleo_loss` (weighted) and `ibot_loss` (unweighted) halved,
        exactly as the official code displays them; and each term as it enters the backpropagated loss:
        `dino_global_term`, `dino_local_term`, `koleo_term`, `ibot_term` (these sum to it).

        `gram` = (the Gram teacher's patch tokens, the weight): the student's global crops then run in full (the
        loss reads every patch token) and `gram_loss` (unweighted, as official), `gram_loss_weight` and
        `gram_term` (in the backpropagated loss) are logged.
        """
        # Every rank runs every sharded module every step, also when its crops drew no masked patch:
        # the iBOT head then sees an empty (0, D) input and adds exactly 0 to the loss. Skipping it
        # on one rank would leave the other ranks waiting in the head's FSDP collectives forever.

        crops, masks = [batch["collated_global_crops"]], [batch["collated_masks"] if mask_inputs else None]
        patches = [selected_patches(batch, self.do_ibot)]
        if self.n_local_crops:
            crops.append(batch["collated_local_crops"])
            masks.append(None)
            patches.append(patches[0][:0])  # CLS only
        # the last block computes only the rows the losses read: CLS tokens and the masked patches (all with Gram)
        outs = backbone_outputs(self.student["backbone"], crops, masks, None if gram else patches)
        g_cls = outs[0]["x_norm_clstoken"]
        l_cls = outs[1]["x_norm_clstoken"] if self.n_local_crops else g_cls[:0]
        head_in = [l_cls, g_cls]
        if self.do_ibot:
            g_patch = patch_tokens_at(outs[0], batch["mask_indices_list"])
            if not self.ibot_separate_head:
                head_in.append(g_patch)
        # the logits are the head's output, read by this loss only: its backward may overwrite them
        logits = at_least_fp32(self.student["dino_head"](torch.cat(head_in)))
        dino_global, dino_local, patch_ce = self.dino_loss.head_rows_losses(
            logits, teacher_cls, l_cls.shape[0], teacher_patch if len(head_in) == 3 else None, N_GLOBAL_CROPS)
        w = self.cfg.dino.loss_weight
        terms = {"dino_global_term": w * dino_global, "dino_local_term": w * dino_local}
        logged = {"dino_global_crops_loss": dino_global, "dino_local_crops_loss": dino_local}
        if self.do_koleo:
            terms["koleo_term"] = self.cfg.dino.koleo_loss_weight * self._koleo(at_least_fp32(g_cls))
            logged["koleo_loss"] = terms["koleo_term"] / 2
        if self.do_ibot:
            if self.ibot_separate_head:  # its own head's output, read by this loss alone (as the shared head's above)
                patch_ce = self.ibot_patch_loss.head_rows_ce(at_least_fp32(self.student["ibot_head"](g_patch)),
                                                             teacher_patch)
            ibot = self.ibot_patch_loss.weighted_sum(patch_ce, batch["collated_masks"],
                                                     masks_weight=batch["masks_weight"])
            terms["ibot_term"] = self.cfg.ibot.loss_weight * ibot
            logged["ibot_loss"] = ibot / 2
        if gram is not None:
            gram_out = self._gram_terms(outs[0]["x_norm_patchtokens"], *gram, batch["collated_masks"])
            terms["gram_term"] = gram_out.pop("gram_term")
            logged.update(gram_out)
        total = sum(terms.values())
        return total, {**logged, **terms}

    @torch.no_grad()
    def update_teacher(self, momentum: float, heads_only: bool = False) -> None:
        """EMA of the student into the teacher; `heads_only` during the head warm-up (frozen backbones)."""
        if not heads_only:
            ema_update(self.teacher, self.student, momentum)
            if isinstance(self.student["backbone"], AnyStudent):  # BatchNorm statistics (ViTs have none to follow)
                follow_buffers(self.teacher["backbone"], self.student["backbone"], momentum)
            return
        for name in self.student:
            if name != "backbone":
                ema_update(self.teacher[name], self.student[name], momentum)


def ssl_losses(learner, batch: dict, gram=None):
    """The SSL step's losses of a learner (`train/learner.py`) against its own EMA teacher, as an objective
    yields them to the loop (pretraining, head warm-up); `gram`: this iteration's Gram anchoring, or None."""
    yield (learner, *learner.model.compute_losses(batch, learner.sched["teacher_temp"], gram))


def ssl_log_line(last: dict, prefix: str = "") -> str:
    """The log line of an SSL step's metrics (the official displayed terms)."""
    return (f"loss {last[prefix + 'total_loss']:.4f} (dino g {last.get(prefix + 'dino_global_crops_loss', 0):.4f} "
            f"l {last.get(prefix + 'dino_local_crops_loss', 0):.4f}, ibot {last.get(prefix + 'ibot_loss', 0):.4f}, "
            f"koleo {last.get(prefix + 'koleo_loss', 0):.4f}"
            + (f", gram {last[prefix + 'gram_loss']:.4f}" if prefix + "gram_loss" in last else "")
            + f")  lr {last[prefix + 'lr']:.2e}")


@torch.no_grad()
def teacher_logits(nets: nn.ModuleDict, batch: dict, do_ibot: bool) -> tuple[Tensor, Tensor | None]:
    """Head logits (fp32) of a teacher's global-crop CLS tokens and, with iBOT, of its patch tokens at
    the sampled mask positions; a shared head (no `ibot_head`) scores both in one call (official).
    The backbone's last block computes those tokens only."""
    out = backbone_outputs(nets["backbone"], batch["collated_global_crops"],
                           select=selected_patches(batch, do_ibot))
    cls = out["x_norm_clstoken"]
    masked = patch_tokens_at(out, batch["mask_indices_list"]) if do_ibot else None
    if do_ibot and "ibot_head" not in nets:
        logits = at_least_fp32(nets["dino_head"](torch.cat((cls, masked))))
        return logits[: cls.shape[0]], logits[cls.shape[0]:]
    cls_logits = at_least_fp32(nets["dino_head"](cls))
    return cls_logits, at_least_fp32(nets["ibot_head"](masked)) if do_ibot else None


def at_least_fp32(x: Tensor) -> Tensor:
    """Logits for losses over many prototypes: half precision read in float32, float64 kept (tests)."""
    return x if x.dtype == torch.float64 else x.float()


def selected_patches(batch: dict, do_ibot: bool) -> Tensor:
    """The global crops' patch tokens a step reads: the iBOT-masked ones (none without iBOT)."""
    return batch["mask_indices_list"] if do_ibot else torch.zeros(0, dtype=torch.long)


def patch_tokens_at(out: dict, mask_indices: Tensor) -> Tensor:
    """Normalised patch tokens at the flat mask indices, from a full or a selected-rows forward."""
    if "x_norm_selected_patchtokens" in out:
        return out["x_norm_selected_patchtokens"]
    return out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
