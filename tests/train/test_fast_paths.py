"""The SSL step's fast paths change nothing that is learned: the same loss terms and the same gradient of every
student parameter, in float64, as the plain reference step (tests/reference_ssl_step.py), across head and crop layouts:

- the backbone's last block computes only the rows the losses read (CLS, masked patches);
- the shared head's rows are scored in one cross-entropy call against target segments.
"""

import copy

import pytest
import torch

from dinotrain.config import load_config
from dinotrain.data.collate import GlobalMaskCollator
from dinotrain.train.ssl import SSLMetaArch
from reference_ssl_step import reference_compute_losses


def _ssl(overrides):
    cfg = load_config(None, ["student.arch=vit_tiny", "student.patch_size=8", "crops.global_crops_size=32",
                             "crops.local_crops_size=16", "dino.head_n_prototypes=64", "dino.head_hidden_dim=32",
                             "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=48", "ibot.head_hidden_dim=32",
                             "ibot.head_bottleneck_dim=16", "compute_precision.dtype=fp32", *overrides])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).double()
    n_local = cfg.crops.local_crops_number
    items = [(i, ({"global_crops": [torch.randn(3, 32, 32, dtype=torch.float64) for _ in range(2)],
                   "local_crops": [torch.randn(3, 16, 16, dtype=torch.float64) for _ in range(n_local)]}, 0), 0)
             for i in range(4)]
    batch = GlobalMaskCollator(4, 16, 4, (0.1, 0.5), 1.0, seed=0)(items)
    return model, batch


def _run(base, batch, reference: bool):
    model = copy.deepcopy(base)  # the centre EMA is state: every run starts from the same one
    torch.manual_seed(7)
    if reference:
        total, logged = reference_compute_losses(model, batch, teacher_temp=0.05)
    else:
        total, logged = model.compute_losses(batch, teacher_temp=0.05)
    total.backward()
    grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
    return total.detach(), {k: v.detach() for k, v in logged.items()}, grads


@pytest.mark.parametrize("overrides", [
    [],  # shared DINO/iBOT head, softmax centring
    ["ibot.separate_head=true", "student.drop_path_rate=0.3", "train.centering=sinkhorn_knopp"],
    ["crops.local_crops_number=0", "ibot.loss_weight=0.0"],
    ["crops.local_crops_number=3", "dino.koleo_loss_weight=0.0", "student.drop_path_rate=0.1"],
])
def test_fast_paths_leave_losses_and_gradients_unchanged(overrides):
    base, batch = _ssl(overrides)
    assert batch["mask_indices_list"].numel() > 0
    t0, l0, g0 = _run(base, batch, reference=True)
    assert g0
    t1, l1, g1 = _run(base, batch, reference=False)
    torch.testing.assert_close(t0, t1, rtol=1e-12, atol=0)
    assert l0.keys() == l1.keys()
    for k in l0:
        torch.testing.assert_close(l0[k], l1[k], rtol=1e-12, atol=1e-14, msg=k)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-9, atol=1e-13, msg=name)
