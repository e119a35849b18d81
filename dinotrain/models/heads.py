"""The DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "PrototypeLinear", "head_from_state_dict", "head_settings"]


class PrototypeLinear(nn.Module):
    """Bias-free prototype layer, weight-normalised: row k of the weight is `g_k * v_k / ||v_k||`.

    The same function and parameter names as the official `nn.utils.weight_norm(nn.Linear(...))`
    (`weight_v` of shape (out, in), `weight_g` of shape (out, 1), g initialised to 1), but as two
    plain parameters with the normalisation done in `forward`: no weight-norm hook or
    parametrization, so FSDP2 shards both like any other parameter and state dicts stay plain.

    `norm_last_layer=True` is DINO v1's option: the gain is frozen (requires_grad False, hence in no
    optimizer group) and the logits are cosine similarities. With False (DINOv2, the default) each
    prototype learns its own gain. A frozen gain is still used in `forward`, so a loaded gain != 1 is
    never silently dropped.

    Older state dicts load too: dinotrain's former single `weight` (rows normalised in forward: g = 1)
    and torch's `parametrizations.weight.original0/1` (g / v) are converted in `_load_from_state_dict`.
    """

    def __init__(self, in_features: int, out_features: int, norm_last_layer: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.norm_last_layer = bool(norm_last_layer)
        # Direction: nn.Linear's default init, as the official layer; the gain starts at 1 (official).
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not self.norm_last_layer)

    def effective_weight(self) -> Tensor:
        """The effective (out, in) weight g * v / ||v|| (norm over each row, as weight_norm's dim=0).

        Through torch's fused weight-norm op (the one `nn.utils.weight_norm` calls): one pass over the
        (out, in) matrix each way, where the same formula as separate ops writes three new (out, in)
        tensors in forward and more in backward (at 65,536 x 256: 67 vs ~300 ms per step on 2 CPU cores).
        """
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        g_key, v_key, old_key = prefix + "weight_g", prefix + "weight_v", prefix + "weight"
        p_g, p_v = prefix + "parametrizations.weight.original0", prefix + "parametrizations.weight.original1"
        if v_key not in state_dict:
            if p_g in state_dict and p_v in state_dict:  # torch.nn.utils.parametrizations.weight_norm
                state_dict[g_key] = state_dict.pop(p_g)
                state_dict[v_key] = state_dict.pop(p_v)
            elif old_key in state_dict and g_key not in state_dict:  # former dinotrain head: g = 1
                weight = state_dict.pop(old_key)
                state_dict[v_key] = weight
                state_dict[g_key] = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        gain = "frozen at 1 (norm_last_layer)" if self.norm_last_layer else "trainable"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm gain {gain}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head shared by the DINO ([CLS]) and iBOT (patch) losses.

    The L2-normalised bottleneck and the weight-normalised prototypes bound each logit by its
    prototype's gain (cosine similarities in [-1, 1] while the gains are 1), which is what lets the
    losses use small temperatures without blowing up. Parameter names (`mlp.*`, `last_layer.weight_g`,
    `last_layer.weight_v`) are the official head's, so official head state dicts load strictly.
    `norm_last_layer=True` freezes the prototype gains at 1 (DINO v1); False trains them (DINOv2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        norm_last_layer: bool = False,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if int(value) != value or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive integer, got {value}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.mlp = _build_mlp(int(nlayers), self.in_dim, int(bottleneck_dim), int(hidden_dim), use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = PrototypeLinear(int(bottleneck_dim), self.out_dim, norm_last_layer=norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim), or (B, N, in_dim) -> (B, N, out_dim)."""
        if x.ndim < 2 or x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects inputs of shape (..., {self.in_dim}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = self.mlp(x.reshape(-1, self.in_dim))  # 2-D so BatchNorm1d normalises features, not tokens
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows to 0 in fp16
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x).reshape(*lead, self.out_dim)


# ---- heads from their weights ---------------------------------------------------------------------
_LAST = "last_layer."


def _prototype_weights(state: dict[str, Tensor], what: str, bad) -> tuple[Tensor, Tensor | None]:
    """(v, g) of the prototype layer in any of the three layouts `PrototypeLinear` loads (g None: old form)."""
    for v_key, g_key in (("weight_v", "weight_g"), ("parametrizations.weight.original1", "parametrizations.weight.original0")):
        if _LAST + v_key in state:
            if _LAST + g_key not in state:
                raise bad(f"it has {_LAST + v_key} but no {_LAST + g_key}")
            return state[_LAST + v_key], state[_LAST + g_key]
    if _LAST + "weight" in state:
        return state[_LAST + "weight"], None
    raise bad(f"no prototype layer ({_LAST}weight_v / weight_g)")


def head_settings(state: dict[str, Tensor], what: str = "head") -> dict:
    """The `DINOHead` constructor arguments a head state dict was made with, inferred from its shapes.

    Why: the official project never published heads and recipes change head sizes, so a consumer of
    saved heads (distillation, continued pretraining) must rebuild them from the weights alone.
    Returns `in_dim, out_dim, nlayers, hidden_dim, bottleneck_dim, mlp_bias`; a 1-layer head has no
    hidden layer, so its `hidden_dim` is DINOHead's (unused) default 2048. Accepts the prototype layer
    as `weight_g`/`weight_v`, torch's `parametrizations.weight.original0/1`, or the former single
    `weight`. Raises WeightsError (one line naming `what`) for anything else, BatchNorm heads included.
    """
    from dinotrain.weights.state_dict import WeightsError

    def bad(why: str) -> WeightsError:
        return WeightsError(f"{what} is not a DINO head state dict: {why}")

    if not isinstance(state, dict) or not state:
        raise bad("it is empty" if isinstance(state, dict) else f"it is a {type(state).__name__}")
    if any(not isinstance(v, Tensor) for v in state.values()):
        raise bad("it holds values that are not tensors")
    if any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in state):
        raise WeightsError(f"{what}: heads with BatchNorm (use_bn=True) are not supported")
    v, g = _prototype_weights(state, what, bad)
    if v.ndim != 2 or (g is not None and tuple(g.shape) != (v.shape[0], 1)):
        raise bad(f"prototype weights of shapes {tuple(v.shape)} / {None if g is None else tuple(g.shape)}")
    out_dim, bottleneck_dim = int(v.shape[0]), int(v.shape[1])
    if "mlp.weight" in state:  # nlayers == 1: mlp is one Linear
        linears = [("mlp.", state["mlp.weight"])]
    else:
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"mlp\.(\d+)\.weight$", k))})
        if not indices:
            raise bad("no MLP (mlp.weight or mlp.N.weight)")
        linears = [(f"mlp.{i}.", state[f"mlp.{i}.weight"]) for i in indices]
    if any(w.ndim != 2 for _, w in linears):
        raise bad("an MLP weight is not a matrix")
    biases = {f"{p}bias" in state for p, _ in linears}
    if len(biases) != 1:
        raise bad("some MLP layers have a bias and others not")
    settings = dict(in_dim=int(linears[0][1].shape[1]), out_dim=out_dim, nlayers=len(linears),
                    hidden_dim=int(linears[0][1].shape[0]) if len(linears) > 1 else 2048,
                    bottleneck_dim=bottleneck_dim, mlp_bias=biases.pop())
    # The head those settings build must have exactly these tensors and shapes (meta: no memory, no init).
    with torch.device("meta"):
        try:
            expected = DINOHead(**settings).state_dict()
        except ValueError as exc:
            raise bad(str(exc)) from exc
    found = {k: tuple(t.shape) for k, t in state.items() if not k.startswith(_LAST)}
    found.update({_LAST + "weight_v": tuple(v.shape), _LAST + "weight_g": (out_dim, 1)})
    wanted = {k: tuple(t.shape) for k, t in expected.items()}
    if found != wanted:
        diff = sorted(set(found) ^ set(wanted)) or sorted(k for k in found if found[k] != wanted[k])
        raise bad(f"it does not fit a {settings['nlayers']}-layer head ({', '.join(diff[:4])})")
    return settings


def head_from_state_dict(state: dict[str, Tensor], what: str = "head", norm_last_layer: bool = False) -> DINOHead:
    """A `DINOHead` built with `head_settings(state)` and loaded strictly from `state` (fp32 parameters)."""
    head = DINOHead(**head_settings(state, what), norm_last_layer=norm_last_layer)
    head.load_state_dict(dict(state), strict=True)
    return head
