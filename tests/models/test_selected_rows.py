"""The last block on the rows a step reads (CLS + iBOT-masked patches) equals the full forward at those rows.

Checked in float64 at the backbone (outputs and parameter gradients, with registers, both stochastic-depth
paths, activation checkpointing); the SSL step with and without it in tests/train/test_fast_paths.py.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinotrain.models.vision_transformer import DinoVisionTransformer


def _backbone(drop_path: float = 0.0, registers: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                  num_register_tokens=registers, drop_path_rate=drop_path,
                                  drop_path_uniform=True, init_values=0.5)
    return model.double().train()


def _crops():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=gen)
    local = torch.randn(12, 3, 16, 16, dtype=torch.float64, generator=gen)
    masks = torch.rand(6, 16, generator=gen) < 0.3
    return [g, local], [masks, None], masks.flatten().nonzero().flatten()


def _outputs_and_grads(model, select: bool, seed: int = 3):
    crops, masks, index = _crops()
    model.zero_grad()
    torch.manual_seed(seed)
    picked = [index, index[:0]] if select else None
    outs = model(crops, masks, is_training=True, select_patches=picked)
    if select:
        cls = [o["x_norm_clstoken"] for o in outs]
        patches = outs[0]["x_norm_selected_patchtokens"]
    else:
        cls = [o["x_norm_clstoken"] for o in outs]
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[index]
    weights = torch.linspace(-1, 1, patches.numel(), dtype=torch.float64).reshape(patches.shape)
    loss = sum((c ** 2).sum() for c in cls) + (patches * weights).sum()
    loss.backward()
    return [*cls, patches], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("drop_path,registers,checkpointing", [
    (0.0, 0, False), (0.0, 4, False), (0.1, 0, False), (0.4, 2, False), (0.4, 0, True)])
def test_selected_rows_equal_the_full_forward(drop_path, registers, checkpointing):
    model = _backbone(drop_path, registers)
    for blk in model.blocks:
        blk.checkpointing = checkpointing
    full_out, full_grads = _outputs_and_grads(model, select=False)
    sel_out, sel_grads = _outputs_and_grads(model, select=True)
    assert full_out[2].shape[0] > 0  # some patches were selected
    for a, b in zip(full_out, sel_out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert full_grads.keys() == sel_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(full_grads[name], sel_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_single_tensor_and_empty_selection():
    model = _backbone().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    full = model(x, is_training=True)
    out = model(x, is_training=True, select_patches=torch.tensor([1, 17, 31]))
    torch.testing.assert_close(out["x_norm_clstoken"], full["x_norm_clstoken"])
    torch.testing.assert_close(out["x_norm_selected_patchtokens"], full["x_norm_patchtokens"].flatten(0, 1)[[1, 17, 31]])
    none = model(x, is_training=True, select_patches=torch.zeros(0, dtype=torch.long))
    assert none["x_norm_selected_patchtokens"].shape == (0, 32)


def test_bad_selection_is_a_clear_error():
    model = _backbone()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="1-D integer index"):
        model(x, is_training=True, select_patches=torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="entries for 2 crop groups"):
        model([x, x], is_training=True, select_patches=[torch.tensor([1])])


def test_last_block_work_shrinks():
    model = _backbone().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    def flops(select):
        with FlopCounterMode(display=False) as counter:
            model(x, is_training=True, select_patches=torch.tensor([0]) if select else None)
        return counter.get_total_flops()

    # 4 images x 17 tokens; the last of 3 blocks keeps its qkv and attention but projects 5 rows of 68
    assert flops(True) < 0.87 * flops(False)
