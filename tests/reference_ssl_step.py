"""The DINOv2 step's losses written the plain way, as a reference for `SSLMetaArch.compute_losses`.

Every token through the last block, each head's output split into its parts, and the losses' official-API
functions (`dino_crossview_losses`, `iBOTPatchLoss.forward_masked`): what the product step did before it learned
to compute only the rows the losses read and to score the shared head's rows in one cross-entropy. The tests
check the product against it (tests/train/test_fast_paths.py); tools/bench/previous.py times it as "before".
"""

from __future__ import annotations

import torch

from dinotrain.losses.centering import teacher_targets
from dinotrain.train.ssl import N_GLOBAL_CROPS, at_least_fp32


def _masked_patches(out: dict, mask_indices: torch.Tensor) -> torch.Tensor:
    return out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]


@torch.no_grad()
def reference_teacher_targets(model, batch: dict, teacher_temp: float):
    nets = model.teacher
    out = nets["backbone"](batch["collated_global_crops"], is_training=True)
    cls = out["x_norm_clstoken"]
    patch_logits = None
    if model.do_ibot:
        masked = _masked_patches(out, batch["mask_indices_list"])
        head = nets["ibot_head"] if "ibot_head" in nets else nets["dino_head"]
        patch_logits = at_least_fp32(head(masked))
    cls_logits = at_least_fp32(nets["dino_head"](cls))
    return teacher_targets(model.cfg.train.centering, model.dino_loss, model.ibot_patch_loss, cls_logits,
                           patch_logits, teacher_temp)


def reference_compute_losses(model, batch: dict, teacher_temp: float):
    """(backpropagated loss, logged terms) of one step, as `SSLMetaArch.compute_losses` returns them."""
    teacher_cls, teacher_patch = reference_teacher_targets(model, batch, teacher_temp)
    crops, masks = [batch["collated_global_crops"]], [batch["collated_masks"]]
    if model.n_local_crops:
        crops.append(batch["collated_local_crops"])
        masks.append(None)
    outs = model.student["backbone"](crops, masks, is_training=True)
    g_cls = outs[0]["x_norm_clstoken"]
    l_logits = at_least_fp32(model.student["dino_head"](outs[1]["x_norm_clstoken"])) if model.n_local_crops else None
    g_logits = at_least_fp32(model.student["dino_head"](g_cls))
    dino_global, dino_local = model.dino_loss.dino_crossview_losses(g_logits, l_logits, teacher_cls,
                                                                    n_global=N_GLOBAL_CROPS)
    w = model.cfg.dino.loss_weight
    terms = {"dino_global_term": w * dino_global, "dino_local_term": w * dino_local}
    logged = {"dino_global_crops_loss": dino_global, "dino_local_crops_loss": dino_local}
    if model.do_koleo:
        terms["koleo_term"] = model.cfg.dino.koleo_loss_weight * model._koleo(at_least_fp32(g_cls))
        logged["koleo_loss"] = terms["koleo_term"] / 2
    if model.do_ibot:
        head = model.student["ibot_head"] if model.ibot_separate_head else model.student["dino_head"]
        patch_logits = at_least_fp32(head(_masked_patches(outs[0], batch["mask_indices_list"])))
        ibot = model.ibot_patch_loss.forward_masked(patch_logits, teacher_patch,
                                                    student_masks_flat=batch["collated_masks"],
                                                    masks_weight=batch["masks_weight"])
        terms["ibot_term"] = model.cfg.ibot.loss_weight * ibot
        logged["ibot_loss"] = ibot / 2
    return sum(terms.values()), {**logged, **terms}
