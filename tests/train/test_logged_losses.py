"""Logged losses follow the official DINOv2 display convention; the `*_term` values sum to the backpropagated loss."""

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.distributed.env import destroy_distributed, init_distributed
from dinotrain.data.loader import build_train_loader, to_device
from dinotrain.train.ssl import SSLMetaArch
from trainruns import FAST


@pytest.fixture
def losses():
    init_distributed()
    cfg = load_config("smoke/cpu_tiny", FAST + ["dino.loss_weight=2.0", "dino.koleo_loss_weight=0.3",
                                                "ibot.loss_weight=3.0", "train.batch_size_per_gpu=6"])
    model = SSLMetaArch(cfg)
    model.shard(torch.float32)
    loader, _ = build_train_loader(cfg, 0, 1, 0)
    batch = to_device(next(iter(loader)), torch.device("cpu"))
    total, logged = model.compute_losses(batch, teacher_temp=0.04)
    yield cfg, total.detach(), {k: float(v.detach()) for k, v in logged.items()}
    destroy_distributed()


def test_terms_sum_to_the_backpropagated_loss(losses):
    _, total, logged = losses
    terms = ("dino_global_term", "dino_local_term", "koleo_term", "ibot_term")
    assert float(total) == pytest.approx(sum(logged[k] for k in terms), rel=1e-6)


def test_official_display_convention(losses):
    cfg, _, logged = losses
    # official: dino terms displayed without the dino loss weight ...
    assert logged["dino_global_crops_loss"] == pytest.approx(logged["dino_global_term"] / cfg.dino.loss_weight)
    assert logged["dino_local_crops_loss"] == pytest.approx(logged["dino_local_term"] / cfg.dino.loss_weight)
    # ... KoLeo weighted but halved, iBOT unweighted and halved
    assert logged["koleo_loss"] == pytest.approx(logged["koleo_term"] / 2)
    assert logged["ibot_loss"] == pytest.approx(logged["ibot_term"] / cfg.ibot.loss_weight / 2)
    assert logged["ibot_loss"] > 0 and logged["dino_local_crops_loss"] > 0
