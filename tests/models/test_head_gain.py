"""Prototype gain of the DINO head: official weight-norm parametrisation (`last_layer.weight_g/weight_v`),
`norm_last_layer` (frozen gain, DINO v1), state-dict compatibility, parameter groups and FSDP2."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinotrain.config import load_config
from dinotrain.models.heads import DINOHead
from dinotrain.models.vision_transformer import build_vit
from dinotrain.train.optim import apply_schedules, build_optimizer, build_param_groups
from dinotrain.train.schedules import build_schedules
from dinotrain.train.ssl import SSLMetaArch
from trainruns import FAST

IN, K, HID, BOT = 16, 32, 24, 8


def small_head(**kw):
    return DINOHead(IN, K, hidden_dim=HID, bottleneck_dim=BOT, **kw)


def official_style_head():
    """An independent head with the official structure: an MLP and `weight_norm(nn.Linear)` (weight_g, weight_v)."""
    head = nn.Module()
    head.mlp = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, HID), nn.GELU(), nn.Linear(HID, BOT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, but it is what the official head uses
        head.last_layer = nn.utils.weight_norm(nn.Linear(BOT, K, bias=False))
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.3, 2.5)  # a trained gain, != 1
    return head


def closed_form(head_sd, x):
    """float64: z/||z|| @ (g * v/||v||).T with z the MLP output, computed from the state dict alone."""
    sd = {k: v.double() for k, v in head_sd.items()}
    z = x.double()
    for i in (0, 2, 4):
        z = F.linear(z, sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"])
        if i < 4:
            z = F.gelu(z)
    z = z / z.norm(dim=-1, keepdim=True)
    v, g = sd["last_layer.weight_v"], sd["last_layer.weight_g"]
    return z @ (g * v / v.norm(dim=1, keepdim=True)).t()


def test_state_dict_keys_and_shapes_are_official():
    sd = small_head().state_dict()
    assert [k for k in sd if k.startswith("last_layer.")] == ["last_layer.weight_v", "last_layer.weight_g"]
    assert sd["last_layer.weight_v"].shape == (K, BOT) and sd["last_layer.weight_g"].shape == (K, 1)
    assert set(sd) == set(official_style_head().state_dict())


def test_official_head_loads_strictly_and_gives_the_official_logits():
    official = official_style_head()
    assert not torch.allclose(official.last_layer.weight_g, torch.ones(K, 1))
    head = small_head()
    head.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(6, IN) * 3
    out = head(x)
    expected = closed_form(official.state_dict(), x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        z = F.normalize(official.mlp(x), dim=-1)
        torch.testing.assert_close(out, official.last_layer(z))  # torch's own weight_norm
    # the gain matters: the same head with g = 1 gives other logits
    assert not torch.allclose(out, F.normalize(head.mlp(x), dim=-1) @ F.normalize(head.last_layer.weight_v, dim=1).t())
    # and the state dict goes back out unchanged
    back = head.state_dict()
    assert all(torch.equal(back[k], v) for k, v in official.state_dict().items())


def test_official_head_loads_into_a_frozen_gain_head_and_keeps_its_gain():
    official = official_style_head()
    head = small_head(norm_last_layer=True)
    head.load_state_dict(official.state_dict(), strict=True)
    assert not head.last_layer.weight_g.requires_grad
    x = torch.randn(4, IN)
    torch.testing.assert_close(head(x).double(), closed_form(official.state_dict(), x), rtol=1e-5, atol=1e-6)


def test_former_dinotrain_weight_key_loads_with_unit_gain():
    """Old dinotrain heads saved one `last_layer.weight` whose rows were normalised in forward."""
    src = small_head()
    old_sd = {k: v for k, v in src.state_dict().items() if not k.startswith("last_layer.")}
    w = torch.randn(K, BOT) * 5
    old_sd["last_layer.weight"] = w
    head = small_head()
    head.load_state_dict(old_sd, strict=True)
    assert torch.equal(head.last_layer.weight_v, w) and torch.equal(head.last_layer.weight_g, torch.ones(K, 1))
    x = torch.randn(3, IN)
    old_logits = F.normalize(src.mlp(x), dim=-1) @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(head(x), old_logits)


def test_torch_parametrizations_weight_norm_keys_load():
    official = official_style_head()
    sd = {k: v for k, v in official.state_dict().items() if not k.startswith("last_layer.")}
    sd["last_layer.parametrizations.weight.original0"] = official.last_layer.weight_g.detach()
    sd["last_layer.parametrizations.weight.original1"] = official.last_layer.weight_v.detach()
    head = small_head()
    head.load_state_dict(sd, strict=True)
    x = torch.randn(3, IN)
    torch.testing.assert_close(head(x).double(), closed_form(official.state_dict(), x), rtol=1e-5, atol=1e-6)


def test_gain_is_trained_by_default():
    head = small_head()
    assert head.last_layer.weight_g.requires_grad
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    head(torch.randn(8, IN)).logsumexp(-1).sum().backward()
    grad = head.last_layer.weight_g.grad
    assert grad is not None and grad.shape == (K, 1) and grad.abs().sum() > 0
    before = head.last_layer.weight_g.detach().clone()
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    assert not torch.equal(head.last_layer.weight_g, before)


def test_prototype_gradients_match_the_explicit_formula_in_float64():
    """The fused weight-norm op against g * v / ||v|| written out (autograd through plain ops), float64."""
    head = small_head().double()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.3, 2.5)
    v = head.last_layer.weight_v.detach().clone().requires_grad_()
    g = head.last_layer.weight_g.detach().clone().requires_grad_()
    z = torch.randn(7, BOT, dtype=torch.float64)
    upstream = torch.randn(7, K, dtype=torch.float64)
    head.last_layer(z).backward(upstream)
    F.linear(z, g * v / v.norm(dim=1, keepdim=True)).backward(upstream)
    torch.testing.assert_close(head.last_layer.weight_v.grad, v.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.last_layer.weight_g.grad, g.grad, rtol=1e-12, atol=1e-12)


def test_norm_last_layer_freezes_the_gain_at_one():
    head = small_head(norm_last_layer=True)
    g = head.last_layer.weight_g
    assert not g.requires_grad and torch.equal(g, torch.ones(K, 1))
    student = nn.ModuleDict({"backbone": build_vit("vit_tiny", patch_size=4, img_size=16, depth=2), "dino_head": head})
    groups = build_param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    assert not any("weight_g" in n for grp in groups for n in grp["names"])
    assert not any(p is g for grp in groups for p in grp["params"])
    opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
    apply_schedules(opt, lr=0.1, wd=0.5, last_layer_lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(8, IN)).logsumexp(-1).sum().backward()
        assert g.grad is None and head.last_layer.weight_v.grad is not None
        opt.step()
    assert torch.equal(g, torch.ones(K, 1))
    x = torch.randn(3, IN)  # cosine logits
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(head.last_layer.weight_v, dim=1).t()
    torch.testing.assert_close(head(x), expected)


def test_gain_param_group_is_the_last_layer_group():
    student = nn.ModuleDict({"backbone": build_vit("vit_tiny", patch_size=4, img_size=16, depth=3),
                             "dino_head": small_head()})
    groups = build_param_groups(student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    for name in ("dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v"):
        assert by_name[name]["lr_multiplier"] == 1.0, name  # outside the backbone: layer_id = num_layers + 1
        assert by_name[name]["wd_multiplier"] == 1.0, name  # official: only bias/norm/gamma skip wd
        assert by_name[name]["is_last_layer"] is True, name
    assert by_name["dino_head.mlp.0.weight"]["is_last_layer"] is False
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


@pytest.mark.parametrize("dino_norm,ibot_norm", [(False, False), (True, False), (False, True)])
def test_config_keys_reach_both_heads_and_their_param_groups(dino_norm, ibot_norm):
    cfg = load_config("smoke/cpu_tiny", FAST + ["ibot.separate_head=true", f"dino.norm_last_layer={dino_norm}",
                                                f"ibot.norm_last_layer={ibot_norm}", "optim.freeze_last_layer_epochs=1"])
    model = SSLMetaArch(cfg)
    for head_name, frozen in (("dino_head", dino_norm), ("ibot_head", ibot_norm)):
        assert model.student[head_name].last_layer.weight_g.requires_grad is (not frozen)
        assert not model.teacher[head_name].last_layer.weight_g.requires_grad  # teacher: never trained
    opt = build_optimizer(model.student, cfg)
    names = {n: g for g in opt.param_groups for n in g["names"]}
    for head_name, frozen in (("dino_head", dino_norm), ("ibot_head", ibot_norm)):
        key = f"{head_name}.last_layer.weight_g"
        assert (key not in names) if frozen else names[key]["is_last_layer"]
    # during freeze_last_layer_epochs the gain's lr is 0, afterwards it follows the lr schedule
    sched = build_schedules(cfg, lr=1e-3)
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    for it, frozen_phase in ((0, True), (epoch - 1, True), (epoch + 1, False)):
        apply_schedules(opt, **{k: v for k, v in sched.at(it).items() if k in ("lr", "wd", "last_layer_lr")})
        for n, g in names.items():
            if n.endswith("weight_g"):
                assert (g["lr"] == 0.0) is frozen_phase, (n, it)


def test_default_config_trains_the_gain():
    cfg = load_config("smoke/cpu_tiny", FAST)
    assert cfg.dino.norm_last_layer is False and cfg.ibot.norm_last_layer is False


@pytest.fixture
def dist_env():
    from dinotrain.distributed.env import destroy_distributed, init_distributed

    env = init_distributed()
    yield env
    destroy_distributed()


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_fsdp2_shards_gain_and_direction_as_plain_parameters(dist_env, norm_last_layer):
    from torch.distributed.tensor import DTensor

    from dinotrain.distributed.fsdp import ema_update, shard_module

    torch.manual_seed(0)
    ref = small_head(norm_last_layer=norm_last_layer)
    with torch.no_grad():
        ref.last_layer.weight_g.uniform_(0.5, 2.0)
    head = small_head(norm_last_layer=norm_last_layer)
    head.load_state_dict(ref.state_dict())
    teacher = small_head(norm_last_layer=norm_last_layer)
    teacher.load_state_dict(ref.state_dict())
    teacher.requires_grad_(False)
    shard_module(head, torch.float32)
    shard_module(teacher, torch.float32)
    assert isinstance(head.last_layer.weight_g, DTensor) and isinstance(head.last_layer.weight_v, DTensor)
    x = torch.randn(5, IN)
    out = head(x)
    torch.testing.assert_close(out, ref(x))
    out.logsumexp(-1).sum().backward()
    g = head.last_layer.weight_g
    if norm_last_layer:
        assert g.grad is None
    else:
        assert g.grad is not None and g.grad.full_tensor().abs().sum() > 0
    assert head.last_layer.weight_v.grad is not None
    ema_update(teacher, head, 0.992)
    torch.testing.assert_close(teacher.last_layer.weight_g.full_tensor(), ref.last_layer.weight_g)
