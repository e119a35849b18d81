"""Official-resolution weights (518 px, a 37x37 position table) start a training run at another size,
and the exported teacher comes back through torch.hub with the same features.

The "official" weights are our own random ViT-S/14 init in the official hub layout, so the test needs
no download; what matters is the table size. Training uses 42-px global crops (a 3x3 grid) to stay fast
on 2 CPU cores: the 37x37 table must be resampled into the run's 3x3 grid.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinotrain.models.presets import build_preset
from dinotrain.models.vision_transformer import build_vit
from dinotrain.weights.convert import save_backbone
from tests.trainruns import REPO, run_cli, train_args

VITS14 = ["student.arch=vit_small", "student.depth=12", "student.patch_size=14", "crops.global_crops_size=42",
          "crops.local_crops_size=14", "crops.local_crops_number=1", "train.batch_size_per_gpu=2",
          "train.max_iterations=2", "student.drop_path_rate=0.0", "student.layerscale=1.0"]


def _reference_resample(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The official forward's interpolation (offset 0.1, no antialias), written out independently."""
    side = int(math.sqrt(pos_embed.shape[1] - 1))
    patches = pos_embed[0, 1:].reshape(side, side, -1).permute(2, 0, 1)[None]
    scale = (grid + 0.1) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches[0].permute(1, 2, 0).reshape(1, grid * grid, -1)], dim=1)


def _plain_vits14(state: dict, img_size: int) -> torch.nn.Module:
    model = build_vit("vit_small", patch_size=14, img_size=img_size, init_values=1.0)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.slow
def test_official_518px_weights_train_at_42px_export_and_load_through_hub(tmp_path):
    torch.manual_seed(0)
    official = build_preset("dinov2_vits14")  # img_size 518: a 37x37 table
    assert official.pos_embed.shape == (1, 37 * 37 + 1, 384)
    weights = save_backbone(official, tmp_path / "dinov2_vits14_pretrain.pth", "hub")

    run = tmp_path / "run"
    proc = run_cli(train_args(run, [*VITS14, f"student.pretrained_weights={weights}"]), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "resampling position embeddings" in ln]
    assert len(said) == 1 and "37x37" in said[0] and "3x3" in said[0] and "student.pretrained_weights" in said[0], said
    assert "resampling position embeddings" in (run / "log.txt").read_text()

    out = tmp_path / "teacher.pth"
    proc = run_cli(["export", str(run), str(out), "--to", "hub"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = torch.load(out, weights_only=True)
    assert teacher["pos_embed"].shape == (1, 3 * 3 + 1, 384)
    # two tiny-lr steps away from the resampled official table (lr warms up from 0)
    expected = _reference_resample(official.pos_embed.detach(), 3)
    assert torch.allclose(teacher["pos_embed"], expected, atol=1e-3), (teacher["pos_embed"] - expected).abs().max()
    assert not torch.allclose(expected[:, 1:], official.pos_embed.detach()[:, 1:10], atol=1e-3)  # not a crop

    reference = _plain_vits14(teacher, 42)
    x42, x518 = torch.randn(2, 3, 42, 42), torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        for kwargs in ({}, {"img_size": 42}):
            hub = torch.hub.load(str(REPO), "dinov2_vits14", source="local", trust_repo=True, weights=str(out), **kwargs)
            assert hub.spec.img_size == 42
            assert torch.equal(hub.eval()(x42), reference(x42))
        # at the official size the 3x3 table is resampled to 37x37, by the forward's own method: the same
        # features as the exported teacher gives on 518-px images
        hub518 = torch.hub.load(str(REPO), "dinov2_vits14", source="local", trust_repo=True, weights=str(out),
                                img_size=518).eval()
        assert hub518.pos_embed.shape == (1, 37 * 37 + 1, 384)
        assert torch.equal(hub518.pos_embed, _reference_resample(teacher["pos_embed"], 37))
        assert torch.allclose(hub518(x518), reference(x518), atol=1e-5)
