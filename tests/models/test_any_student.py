"""Students of other architectures (`models/any_student.py`): the ViT forward API, their features equal the wrapped
model's own (timm / torchvision as the reference), gradients, masks, and the one-line errors."""

import pytest
import torch
from omegaconf import OmegaConf

from dinotrain.models.any_student import StudentArchError  # a ValueError: one line from the CLI
from dinotrain.models.any_student import AnyStudent, build_any_student

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

ARCHS = ["timm/resnet18", "timm/convnext_atto", "timm/mobilenetv4_conv_small", "timm/vit_tiny_patch16_224",
         "torchvision/resnet18"]


@pytest.fixture(scope="module", params=ARCHS)
def student(request):
    torch.manual_seed(0)
    return AnyStudent(request.param, patch_size=16).eval()


def test_training_outputs_have_the_vit_layout(student):
    """Two crop groups (global 64 px, local 32 px): pooled (B, D) and tokens on the patch grid (B, (size/16)^2, D)."""
    outs = student([torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32)], [None, None], is_training=True)
    assert [o["x_norm_clstoken"].shape for o in outs] == [(2, student.embed_dim), (3, student.embed_dim)]
    assert [o["x_norm_patchtokens"].shape for o in outs] == [(2, 16, student.embed_dim), (3, 4, student.embed_dim)]
    # non-square crops too
    out = student(torch.randn(1, 3, 64, 96), is_training=True)
    assert out["x_norm_patchtokens"].shape == (1, 4 * 6, student.embed_dim)


def test_pooled_features_are_the_models_own(student):
    """The global embedding is what the library's own model returns for features (the exported student's)."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = student(x)
        if student.source == "timm":
            ref = student.model(x)  # num_classes=0: pooled pre-logits features
        else:
            m = student.model
            h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
            ref = torch.flatten(m.avgpool(h), 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_a_gradient_reaches_every_trained_parameter():
    torch.manual_seed(0)
    s = AnyStudent("timm/resnet18", patch_size=16).train()
    out = s(torch.randn(2, 3, 64, 64), is_training=True)
    (out["x_norm_clstoken"].square().mean() + out["x_norm_patchtokens"].square().mean()).backward()
    missing = [n for n, p in s.named_parameters() if p.requires_grad and n != "mask_token" and p.grad is None]
    assert missing == []
    assert s.model.conv1.weight.grad.abs().sum() > 0


def test_masks_change_only_the_masked_pixels():
    """A mask replaces the masked patches' pixels by the mask colour: the output changes, an all-False mask
    changes nothing, and the pixels outside the masked patch are kept."""
    torch.manual_seed(0)
    s = AnyStudent("timm/resnet18", patch_size=16).eval()
    with torch.no_grad():
        s.mask_token.fill_(0.5)
    x = torch.randn(1, 3, 64, 64)
    none = torch.zeros(1, 16, dtype=torch.bool)
    one = none.clone()
    one[0, 5] = True  # row 1, column 1 of the 4x4 grid
    masked = s._mask_pixels(x, one)
    assert torch.equal(masked[..., 16:32, 16:32], torch.full_like(masked[..., 16:32, 16:32], 0.5))
    keep = torch.ones(64, 64, dtype=torch.bool)
    keep[16:32, 16:32] = False
    assert torch.equal(masked[..., keep], x[..., keep])
    with torch.no_grad():
        assert torch.equal(s(x, none), s(x))
        assert not torch.allclose(s(x, one), s(x))


def test_patch_tokens_are_the_resampled_last_map():
    """The tokens are the last feature map resampled bilinearly to the grid, then the LayerNorm (reference: the
    map computed by timm's forward_features, interpolated here)."""
    torch.manual_seed(0)
    s = AnyStudent("timm/resnet18", patch_size=8).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = s.model.forward_features(x)  # (1, 512, 2, 2)
        up = torch.nn.functional.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False)
        ref = torch.nn.functional.layer_norm(up.flatten(2).transpose(1, 2), (512,), eps=1e-6)
        torch.testing.assert_close(s(x, is_training=True)["x_norm_patchtokens"], ref)


def _cfg(arch, ibot=1.0, global_size=64, local_size=32, local_number=2):
    return OmegaConf.create({"student": {"arch": arch, "patch_size": 16}, "ibot": {"loss_weight": ibot},
                             "crops": {"global_crops_size": global_size, "local_crops_size": local_size,
                                       "local_crops_number": local_number}})


def test_unknown_names_are_one_line_with_a_did_you_mean():
    with pytest.raises(StudentArchError, match=r"timm has no model of that name; did you mean timm/resnet18") as e:
        AnyStudent("timm/resnet81", 16)
    assert "\n" not in str(e.value)
    with pytest.raises(StudentArchError, match=r"did you mean torchvision/resnet50"):
        AnyStudent("torchvision/resnet05", 16)


def test_crops_smaller_than_the_stride_are_refused():
    with pytest.raises(StudentArchError, match=r"timm/resnet18 cannot take crops.local_crops_size = 16 px crops: smaller "
                                          r"than its total stride 32"):
        build_any_student(_cfg("timm/resnet18", local_size=16))
    with pytest.raises(StudentArchError, match=r"vit_tiny_patch16_224 cannot take crops.global_crops_size = 72 px"):
        build_any_student(_cfg("timm/vit_tiny_patch16_224", global_size=72))
    build_any_student(_cfg("timm/resnet18", local_size=16, local_number=0))  # no local crops: not checked


def test_no_spatial_map_with_ibot_is_one_line(monkeypatch):
    """A model that gives pooled features only (here timm's resnet18 with a patched forward_features) cannot
    feed the iBOT head; without iBOT it is a fine student."""
    import timm.models.resnet as tr

    monkeypatch.setattr(tr.ResNet, "forward_features", lambda self, x: x.mean((-2, -1)))
    monkeypatch.setattr(tr.ResNet, "forward_head", lambda self, x, pre_logits=False: x)
    with pytest.raises(StudentArchError, match=r"gives no spatial feature map for the iBOT loss: set ibot.loss_weight=0"):
        build_any_student(_cfg("timm/resnet18"))
    assert not build_any_student(_cfg("timm/resnet18", ibot=0.0)).has_feature_map


def test_export_state_dict_loads_in_timm_with_equal_features(tmp_path):
    torch.manual_seed(0)
    s = AnyStudent("timm/resnet18", patch_size=16).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(s.export_state_dict(), path)
    loaded = timm.create_model("resnet18", num_classes=0, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), s(x), rtol=0, atol=1e-5)


def test_activation_checkpointing_uses_timms_switch_and_keeps_the_gradients():
    torch.manual_seed(0)
    s = AnyStudent("timm/convnext_atto", patch_size=16).train()
    x = torch.randn(2, 3, 64, 64)

    def grad():
        s.zero_grad()
        out = s(x, is_training=True)
        (out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].sum()).backward()
        return s.model.stem[0].weight.grad.clone()

    plain = grad()
    assert s.set_checkpointing(True) and s.model.stages[0].grad_checkpointing
    torch.testing.assert_close(grad(), plain)
    assert not AnyStudent("torchvision/resnet18", 16).set_checkpointing(True)  # no switch: the caller warns


def test_export_state_dict_loads_in_torchvision_strictly_with_equal_features():
    torch.manual_seed(0)
    s = AnyStudent("torchvision/resnet18", patch_size=16).eval()
    theirs = torchvision.models.get_model("resnet18")
    theirs.load_state_dict(s.export_state_dict(), strict=True)  # the classifier is kept (frozen, untrained)
    theirs.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), s(x), rtol=0, atol=1e-5)


def test_pretrained_weights_are_the_models_own_file():
    """timm's own state dict (with its classifier, which the student does not build) loads; another model's is one
    line naming what is missing."""
    torch.manual_seed(1)
    theirs = timm.create_model("resnet18").eval()  # with its 1000-class fc
    s = AnyStudent("timm/resnet18", patch_size=16).eval()
    s.load_model_state(theirs.state_dict(), "config key 'student.pretrained_weights' = r18.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(s(x), theirs.forward_head(theirs.forward_features(x), pre_logits=True))
    where = "config key 'student.pretrained_weights' = r18d.pth"
    with pytest.raises(StudentArchError, match=r"r18d.pth: not weights of timm/resnet18: 16 of its weights are "
                                               r"missing \(e.g. conv1.weight\)") as e:
        s.load_model_state(timm.create_model("resnet18d").state_dict(), where)
    assert "\n" not in str(e.value)
