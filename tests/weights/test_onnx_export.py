"""ONNX export: onnxruntime (CPU) gives our torch forward's tokens at any batch and image size, for DINOv2 with and
without registers, DINO v1 and DINOv3; its resampling matches F.interpolate; bad input is one line.

Random-weight models at reduced depth (the resampling, registers and RoPE do not depend on depth); the full-size
figures (ViT-S/14, ViT-B/14 reg, DINO ViT-S/16, DINOv3 ViT-S/16 at 12 blocks) come from tools/bench/onnx_parity.py.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinotrain.cli import main
from dinotrain.models import build_preset
from dinotrain.models.resample_matrix import resample_table
from dinotrain.weights.convert import save_backbone

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dinotrain.weights.onnx_export import OPSET, read_onnx_metadata, write_onnx  # noqa: E402

SIZES = [(224, 224), (280, 196), (518, 518)]


def _model(name: str, **overrides):
    torch.manual_seed(0)
    return build_preset(name, depth=1, **overrides).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (torch model, onnxruntime session), each exported once."""
    out = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for name in ("dinov2_vits14", "dinov2_vitb14_reg", "dino_vits16", "dinov3_vits16"):
        model = _model(name)
        path = write_onnx(model, tmp_path_factory.mktemp("onnx") / f"{name}.onnx")
        out[name] = model, ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), path
    return out


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14_reg", "dino_vits16", "dinov3_vits16"])
def test_onnxruntime_matches_torch_at_every_size(exported, name):
    model, session, _ = exported[name]
    names = [o.name for o in session.get_outputs()]
    for (h, w), batch in zip(SIZES + [(280, 196)], (7, 1, 1, 3)):
        x = torch.randn(batch, 3, h, w)
        with torch.inference_mode():
            ref = model.forward_features(x)
        got = dict(zip(names, session.run(None, {"pixel_values": x.numpy()})))
        assert got["cls_token"].shape == tuple(ref["x_norm_clstoken"].shape)
        assert got["patch_tokens"].shape == tuple(ref["x_norm_patchtokens"].shape)
        assert np.abs(got["cls_token"] - ref["x_norm_clstoken"].numpy()).max() <= 1e-4, (h, w, batch)
        assert np.abs(got["patch_tokens"] - ref["x_norm_patchtokens"].numpy()).max() <= 1e-4, (h, w, batch)
        extra = {"dinov2_vitb14_reg": "register_tokens", "dinov3_vits16": "storage_tokens"}.get(name)
        assert names == ["cls_token", *([extra] if extra else []), "patch_tokens"]
        if extra:
            assert np.abs(got[extra] - ref["x_norm_regtokens"].numpy()).max() <= 1e-4


def test_metadata_states_opset_outputs_and_spec(exported):
    model, _, path = exported["dinov2_vitb14_reg"]
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == OPSET
    meta = read_onnx_metadata(path)
    assert meta["opset"] == str(OPSET) and meta["outputs"] == "cls_token,register_tokens,patch_tokens"
    assert meta["family"] == "dinov2" and meta["patch_size"] == "14" and '"num_register_tokens": 4' in meta["spec"]
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]


def test_fp16_weights_halve_the_file_and_compute_the_rounded_model(tmp_path):
    model = _model("dinov2_vits14")
    path = write_onnx(model, tmp_path / "half.onnx", fp16=True)
    full = write_onnx(model, tmp_path / "full.onnx")
    assert path.stat().st_size < 0.55 * full.stat().st_size
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    x = torch.randn(2, 3, 280, 196)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cls = session.run(["cls_token"], {"pixel_values": x.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(cls - model(x).numpy()).max() <= 1e-4


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_matrix_resampling_is_pytorch_bicubic(offset, antialias):
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 6)
    patch = table[:, 1:].reshape(1, 37, 37, 6).permute(0, 3, 1, 2).double()
    for grid in ((16, 16), (20, 14), (50, 40), (37, 20), (1, 3)):
        got = resample_table(table, torch.tensor(grid[0]), torch.tensor(grid[1]), offset, antialias)
        how = dict(scale_factor=tuple((g + offset) / 37 for g in grid)) if offset else dict(size=grid)
        ref = F.interpolate(patch, mode="bicubic", align_corners=False, antialias=antialias, **how)
        ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 6).float()
        assert torch.equal(got[:, :1], table[:, :1])
        assert (got[:, 1:] - ref).abs().max() <= 3e-5, grid
    assert torch.equal(resample_table(table, torch.tensor(37), torch.tensor(37), offset, antialias), table)


def test_command_line_export_and_bad_sizes(tmp_path, capsys):
    weights = save_backbone(_model("dinov3_vits16"), tmp_path / "v3.pth", "hub")
    assert main(["export", str(weights), str(tmp_path / "v3.onnx"), "--to", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "opset 17" in out and "storage_tokens" in out and (tmp_path / "v3.onnx").is_file()
    for size in ("0", "-16", "8"):
        assert main(["export", str(weights), str(tmp_path / "x.onnx"), "--to", "onnx", "--example-size", size]) == 2
        err = capsys.readouterr().err.strip()
        assert "at least one 16x16 patch" in err and "\n" not in err
    assert main(["export", str(weights), str(tmp_path / "x.pth"), "--to", "hub", "--fp16"]) == 2
    assert "--to onnx only" in capsys.readouterr().err
    assert main(["export", str(weights), str(tmp_path / "x.bin"), "--to", "onnx"]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_weights_over_the_message_limit_go_beside_the_graph(tmp_path, monkeypatch, capsys):
    """ViT-g/14 (4.5 GB in float32) cannot be one protobuf message: its weights go into `<name>.onnx.data`. The
    same path, forced here on a small model by lowering the limit: the graph loads from its folder in onnxruntime
    and in `embed`-style use (open_features), with the features of the inline export."""
    from dinotrain import inference
    from dinotrain.weights import onnx_export

    model = _model("dinov2_vits14")
    inline = write_onnx(model, tmp_path / "inline.onnx")
    monkeypatch.setattr(onnx_export, "INLINE_LIMIT", 0)
    path = write_onnx(model, tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and path.stat().st_size < 0.1 * inline.stat().st_size
    assert data.stat().st_size > 0.9 * inline.stat().st_size
    write_onnx(model, path)  # again: the data file is replaced, not appended to
    assert data.stat().st_size < 1.1 * inline.stat().st_size
    assert read_onnx_metadata(path)["family"] == "dinov2"
    x = torch.randn(2, 3, 224, 168)
    want = ort.InferenceSession(str(inline), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    features = inference.open_features(str(path), None, torch.device("cpu"))
    assert torch.equal(features(x), torch.from_numpy(want[0]))
    with pytest.raises(ValueError, match="over 2 GB"):
        inference.open_features(str(path), None, torch.device("cpu"), precision="int8")
    with pytest.raises(ValueError, match="export it to a file"):
        onnx_export.onnx_bytes(model)
