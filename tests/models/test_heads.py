"""DINOHead: shapes, parameter names, weight-normalised prototypes, init, official checkpoint loading."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dinotrain.models.heads import DINOHead


def small_head(**kw):
    args = dict(in_dim=16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    args.update(kw)
    return DINOHead(**args)


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16)])
def test_shapes_and_finite_output(shape):
    head = small_head()
    out = head(torch.randn(*shape) * 10)
    assert out.shape == (*shape[:-1], 32)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1 + 1e-5  # cosine similarities


def test_parameter_names():
    names = [n for n, _ in small_head().named_parameters()]
    assert names == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                     "last_layer.weight_v", "last_layer.weight_g"]
    assert small_head().last_layer.weight_v.shape == (32, 8)
    assert small_head().last_layer.weight_g.shape == (32, 1)
    assert (small_head().last_layer.weight_g == 1).all()
    bn_names = [n for n, _ in small_head(use_bn=True, nlayers=2).named_parameters()]
    assert bn_names[:4] == ["mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias"]
    assert "mlp.3.weight" in bn_names  # Linear, BN, GELU, Linear


def test_nlayers_one_is_a_single_linear():
    head = small_head(nlayers=1)
    assert isinstance(head.mlp, torch.nn.Linear) and head.mlp.weight.shape == (8, 16)
    assert sorted(n for n, _ in head.named_parameters()) == ["last_layer.weight_g", "last_layer.weight_v",
                                                             "mlp.bias", "mlp.weight"]
    assert head(torch.randn(3, 16)).shape == (3, 32)


def test_prototype_rows_are_normalised_in_forward():
    head = small_head()
    x = torch.randn(4, 16)
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight_v
    expected = z @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(head(x), expected)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(32, 1) * 10 + 0.1)  # row scale of v must not matter
    torch.testing.assert_close(head(x), expected)


def test_init_and_no_bias_on_prototypes():
    head = DINOHead(64, 128, hidden_dim=256, bottleneck_dim=64, mlp_bias=True)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    for lin in linears:
        assert (lin.bias == 0).all()
        assert 0.015 < lin.weight.std().item() < 0.025
    assert not any("last_layer.bias" in n for n, _ in head.named_parameters())
    assert all(m.bias is None for m in small_head(mlp_bias=False).mlp if isinstance(m, torch.nn.Linear))


def test_batchnorm_with_token_inputs():
    head = small_head(use_bn=True)
    out = head(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()


def test_gradients_reach_prototypes_and_mlp():
    head = small_head()
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_loads_official_weight_norm_checkpoint():
    head = small_head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = torch.nn.utils.weight_norm(torch.nn.Linear(8, 32, bias=False))
    official.weight_g.data.uniform_(0.2, 3.0)  # a trained gain (!= 1) must be kept
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    sd["last_layer.weight_g"] = official.weight_g.detach()
    sd["last_layer.weight_v"] = official.weight_v.detach()
    head.load_state_dict(sd)  # strict
    z = F.normalize(torch.randn(3, 8), dim=-1)
    torch.testing.assert_close(head.last_layer(z), official(z))


def test_wrong_input_dim_is_a_value_error():
    with pytest.raises(ValueError, match="16"):
        small_head()(torch.randn(3, 15))
    with pytest.raises(ValueError, match="nlayers"):
        small_head(nlayers=0)
