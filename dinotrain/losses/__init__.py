"""Self-supervised losses (DINO, iBOT, KoLeo) and the teacher centering they share."""

from dinotrain.losses.centering import ema_center_update, sinkhorn_knopp, softmax_center
from dinotrain.losses.dino import DINOLoss, dino_crossview_losses, dino_crossview_targets
from dinotrain.losses.ibot import iBOTPatchLoss
from dinotrain.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss", "KoLeoLoss", "dino_crossview_losses", "dino_crossview_targets", "ema_center_update", "iBOTPatchLoss",
    "sinkhorn_knopp", "softmax_center",
]
