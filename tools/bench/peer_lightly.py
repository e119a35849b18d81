"""Peer of the training-step benchmark: a DINOv2-style SSL step built from `lightly` losses on a `timm` ViT.

The same work as dinotrain's step (tools/bench/train_step.py): EMA teacher on the 2 global crops,
student on the 2 global (iBOT-masked) + 8 local crops, a DINO head and a separate iBOT head with the
official prototype counts, DINO + iBOT + KoLeo losses, backward, grad clipping, AdamW, EMA update.
It takes the crops in dinotrain's collated layout (view-major: view 0 of every image, then view 1 ...),
so a benchmark can feed both implementations the very same tensors (see `peer_inputs`).

From lightly: DINOLoss (softmax centering with an EMA center), IBOTPatchLoss, KoLeoLoss,
DINOv2ProjectionHead, update_momentum. Written here: the masked timm forward (mask token before the
blocks) and the step itself. lightly has no Sinkhorn-Knopp centering, so the peer always uses the
softmax + EMA-center variant (dinotrain's `train.centering: centering`).

    OMP_NUM_THREADS=1 python tools/bench/peer_lightly.py     # tiny CPU smoke check
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib

import timm
import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOv2ProjectionHead
from lightly.models.utils import update_momentum
from timm.models import checkpoint_seq
from torch import Tensor, nn

TIMM_NAMES = {  # dinotrain arch -> timm model with the same width/depth/heads/LayerScale/FFN (giant2: SwiGLU)
    "vit_small": "vit_small_patch14_dinov2",
    "vit_base": "vit_base_patch14_dinov2",
    "vit_large": "vit_large_patch14_dinov2",
    "vit_giant2": "vit_giant_patch14_dinov2",
}


@dataclass
class Peer:
    """Everything one step needs. student/teacher are ModuleDicts of the same structure (backbone,
    dino_head, ibot_head) so lightly's update_momentum can pair their parameters one to one."""
    student: nn.ModuleDict
    teacher: nn.ModuleDict
    mask_token: nn.Parameter
    dino_loss: DINOLoss
    ibot_loss: IBOTPatchLoss
    koleo_loss: KoLeoLoss
    optimizer: torch.optim.Optimizer
    koleo_weight: float = 0.1
    clip_grad: float = 3.0
    momentum: float = 0.994
    dtype: torch.dtype = torch.float32


def build_peer(arch: str, patch_size: int, global_size: int, n_prototypes: int = 65536, bottleneck: int = 256,
               hidden: int = 2048, device="cpu", drop_path_rate: float = 0.0, lr: float = 1e-4,
               weight_decay: float = 0.04, shared_head: bool = False, dtype: torch.dtype = torch.float32,
               grad_checkpointing: bool = False) -> Peer:
    """Student/teacher ViT + DINO and iBOT heads, lightly's three losses and AdamW over the student.

    `shared_head`: iBOT scores the patches with the DINO head (official ViT-S/B default) instead of its own.
    `dtype` other than fp32: the step runs under autocast in it (weights and optimizer stay fp32, as FSDP's
    mixed precision). `grad_checkpointing`: timm's activation checkpointing of the student's blocks.

    `dynamic_img_size=True` makes timm resample the position embeddings (made for `global_size`) to
    each input's grid, so one backbone takes the global and the local crops, as in DINOv2.
    """
    def nets() -> nn.ModuleDict:
        backbone = timm.create_model(TIMM_NAMES[arch], pretrained=False, img_size=global_size, patch_size=patch_size,
                                     dynamic_img_size=True, num_classes=0, drop_path_rate=drop_path_rate)
        # each head: 3-layer MLP -> L2-normalised bottleneck -> weight-normed prototypes (DINOv2)
        heads = {name: DINOv2ProjectionHead(backbone.embed_dim, hidden_dim=hidden, bottleneck_dim=bottleneck,
                                            output_dim=n_prototypes)
                 for name in (("dino_head",) if shared_head else ("dino_head", "ibot_head"))}
        return nn.ModuleDict({"backbone": backbone, **heads}).to(device)

    # The teacher starts equal to the student, then follows its EMA. Built a second time and loaded rather
    # than deep-copied: lightly's heads use torch.nn.utils.weight_norm, whose modules refuse deepcopy.
    student, teacher = nets(), nets()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    student["backbone"].set_grad_checkpointing(grad_checkpointing)
    dim = student["backbone"].embed_dim
    mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim, device=device))  # DINOv2 inits it to zeros
    params = [p for p in student.parameters() if p.requires_grad] + [mask_token]
    return Peer(
        student=student, teacher=teacher, mask_token=mask_token,
        dino_loss=DINOLoss(output_dim=n_prototypes).to(device),
        ibot_loss=IBOTPatchLoss(output_dim=n_prototypes).to(device),
        koleo_loss=KoLeoLoss(),
        optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999)),
        dtype=dtype,
    )


def vit_tokens(vit: nn.Module, images: Tensor, mask: Tensor | None = None,
               mask_token: Tensor | None = None) -> Tensor:
    """timm's VisionTransformer.forward_features with iBOT masking: masked patch embeddings are
    replaced by the mask token before the position embeddings and the blocks (as DINOv2's
    prepare_tokens_with_masks). timm's ViT has no mask token, hence this function.
    Returns normalised tokens (B, prefix + H*W, D)."""
    x = vit.patch_embed(images)  # (B, H, W, D) with dynamic_img_size
    if mask is not None:
        x = torch.where(mask.view(*x.shape[:3], 1), mask_token.to(x.dtype), x)
    x = vit._pos_embed(x)  # prefix tokens + resampled position embeddings
    x = vit.norm_pre(vit.patch_drop(x))
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


def peer_inputs(batch: dict, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(global_crops (2B,3,G,G), local_crops (8B,3,L,L), masks (2B, N) bool) from a dinotrain batch
    (GlobalMaskCollator's dict); both are view-major, so they are taken as they are."""
    out = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    return tuple(t.to(device, non_blocking=True) for t in out) if device is not None else out


def peer_step(peer: Peer, global_crops: Tensor, local_crops: Tensor, masks: Tensor,
              teacher_temp: float = 0.07) -> dict[str, Tensor]:
    """One full DINOv2-style training step; returns the (detached) loss terms."""
    autocast = (torch.autocast(global_crops.device.type, dtype=peer.dtype) if peer.dtype != torch.float32
                else contextlib.nullcontext())
    with autocast:
        total, terms = _peer_losses(peer, global_crops, local_crops, masks, teacher_temp)
    peer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = [p for group in peer.optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, peer.clip_grad)
    peer.optimizer.step()
    update_momentum(peer.student, peer.teacher, m=peer.momentum)  # teacher = m * teacher + (1 - m) * student
    return terms


def _heads(nets: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 logits of the CLS tokens (DINO head) and of the masked patches (iBOT head, or the DINO head
    when shared: then one call scores both, as dinotrain and the official code do)."""
    if "ibot_head" in nets:
        return nets["dino_head"](cls).float(), nets["ibot_head"](patches).float()
    logits = nets["dino_head"](torch.cat((cls, patches))).float()
    return logits[: cls.shape[0]], logits[cls.shape[0]:]


def _peer_losses(peer: Peer, global_crops: Tensor, local_crops: Tensor, masks: Tensor,
                 teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
    student, teacher = peer.student, peer.teacher
    n_global = 2
    batch = global_crops.shape[0] // n_global
    n_local = local_crops.shape[0] // batch
    prefix = student["backbone"].num_prefix_tokens
    masks = masks.bool()

    # Teacher: CLS -> DINO head, patch tokens at the masked positions -> iBOT head (no grad).
    with torch.no_grad():
        t_tok = vit_tokens(teacher["backbone"], global_crops)
        t_cls, t_patch = _heads(teacher, t_tok[:, 0], t_tok[:, prefix:][masks])

    # Student: masked global crops (CLS + masked patch tokens), local crops (CLS only).
    s_tok = vit_tokens(student["backbone"], global_crops, masks, peer.mask_token)
    g_cls = s_tok[:, 0]
    l_cls = vit_tokens(student["backbone"], local_crops)[:, 0]
    cls_logits, s_patch = _heads(student, torch.cat((g_cls, l_cls)), s_tok[:, prefix:][masks])

    # DINO: every student view against every teacher global view except its own (2x10 - 2 = 18 terms);
    # lightly centers the teacher with its EMA center, then updates the center with this batch.
    dino = peer.dino_loss(list(t_cls.chunk(n_global)), list(cls_logits.chunk(n_global + n_local)),
                          teacher_temp=teacher_temp)
    # iBOT: cross-entropy on masked patches, each image's patches weighted 1/(its masked count), / 2B.
    # Skipped when nothing is masked: lightly would average an empty tensor into a NaN center.
    if t_patch.shape[0]:
        grid = masks.view(masks.shape[0], 1, -1)  # lightly sums the mask over dims (1, 2)
        ibot = peer.ibot_loss(t_patch, s_patch, grid, teacher_temp=teacher_temp)
    else:
        ibot = s_patch.sum() * 0.0
    # KoLeo on the backbone's global CLS tokens, per global view (official DINOv2).
    koleo = peer.koleo_weight * sum(peer.koleo_loss(v) for v in g_cls.float().chunk(n_global))
    total = dino + ibot + koleo
    return total, {"total": total.detach(), "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}


def _smoke() -> None:
    """ViT-S/14 at toy size on CPU: two steps on a batch made by dinotrain's own collator; finite losses."""
    from dinotrain.data.collate import GlobalMaskCollator

    torch.manual_seed(0)
    g, lsz, patch, b, n_local = 56, 28, 14, 2, 8
    grid = g // patch
    items = [(i, ({"global_crops": [torch.randn(3, g, g) for _ in range(2)],
                   "local_crops": [torch.randn(3, lsz, lsz) for _ in range(n_local)]}, 0), 0) for i in range(b)]
    batch = GlobalMaskCollator(b, grid * grid, grid, (0.1, 0.5), 0.5, seed=0)(items)
    peer = build_peer("vit_small", patch, g, n_prototypes=256, bottleneck=64, hidden=256)
    crops = peer_inputs(batch)
    print("shapes", [tuple(t.shape) for t in crops], "masked", int(crops[2].sum()))
    before = next(peer.teacher["backbone"].parameters()).clone()
    for it in range(2):
        losses = peer_step(peer, *crops)
        print(f"step {it}:", {k: round(float(v), 4) for k, v in losses.items()})
        assert all(torch.isfinite(v) for v in losses.values()), losses
    assert not torch.equal(before, next(peer.teacher["backbone"].parameters())), "EMA did not move the teacher"
    print("ok")


if __name__ == "__main__":
    _smoke()
