"""The runtime / precision choice (dinotrain/inference.py): what `auto` picks from the CPU's flags, the one-line
errors for what a machine cannot run, and that every path gives the fp32 torch features within its tolerance."""

import pytest
import torch
import torch.nn.functional as F

from dinotrain import inference
from dinotrain.cli import main
from dinotrain.inference import OnnxFeatures, TorchFeatures, choose, features_model, open_features
from dinotrain.models import build_preset

AMD = {"avx2", "fma"}  # this project's CPU: no avx512 at all
AVX512_BF16 = AMD | {"avx512f", "avx512_bf16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile"}


def _pick(choice):
    return choice.runtime, choice.precision


def test_auto_picks_bf16_only_with_amx():
    assert _pick(choose("auto", "auto", "cpu", None, AMX)) == ("torch", "bf16")
    assert _pick(choose("auto", "auto", "cpu", None, AVX512_BF16)) == ("torch", "fp32")
    assert _pick(choose("auto", "auto", "cpu", None, AMD)) == ("torch", "fp32")
    assert _pick(choose("bf16", "torch", "cpu", None, AVX512_BF16)) == ("torch", "bf16")
    assert _pick(choose("auto", "auto", "cpu", "model.onnx", AMX)) == ("onnx", "fp32")
    assert _pick(choose("int8", "auto", "cpu", None, AMD)) == ("onnx", "int8")


@pytest.mark.parametrize("precision,runtime,weights,says", [
    ("bf16", "auto", None, "no native bf16"),
    ("auto", "torch", "m.onnx", "is an ONNX graph"),
    ("int8", "torch", None, "runs in onnxruntime"),
    ("bf16", "onnx", None, "runs in the torch runtime"),
])
def test_what_the_machine_cannot_run_is_one_line(precision, runtime, weights, says):
    with pytest.raises(ValueError, match=says) as err:
        choose(precision, runtime, "cpu", weights, AMD)
    assert "\n" not in str(err.value)


def test_missing_onnxruntime_is_one_line(monkeypatch):
    monkeypatch.setattr(inference, "_has_onnxruntime", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'dinotrain\[onnx\]'"):
        choose("fp32", "onnx", "cpu")


def _cos(a, b):
    return F.cosine_similarity(a, b).min().item()


def test_every_path_gives_the_fp32_features():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_preset("dinov2_vits14_reg", depth=2).eval()
    x = torch.randn(3, 3, 112, 98)
    with torch.inference_mode():
        ref = model.forward_features(x)
        onnx = features_model(model, inference.Choice("onnx", "fp32", ""), threads=1)
        got = onnx.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
            assert (got[key] - ref[key]).abs().max() <= 1e-4, key
        assert _cos(features_model(model, inference.Choice("onnx", "int8", ""), threads=1)(x), ref["x_norm_clstoken"]) >= 0.99
        assert _cos(TorchFeatures(model, "bf16")(x), ref["x_norm_clstoken"]) >= 0.999
        assert TorchFeatures(model, "bf16")(x).dtype == torch.float32
        with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
            onnx(torch.randn(1, 3, 10, 64))


def test_embed_runs_an_onnx_file_like_its_weights(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from dinotrain.weights.convert import save_backbone

    torch.manual_seed(0)
    weights = save_backbone(build_preset("dino_vits16", depth=1), tmp_path / "b.pth", "hub")
    assert main(["export", str(weights), str(tmp_path / "b.onnx"), "--to", "onnx"]) == 0
    with torch.inference_mode():
        torch_cls = open_features(str(weights), None, torch.device("cpu"), "fp32")(torch.ones(1, 3, 64, 64))
        onnx_model = open_features(str(tmp_path / "b.onnx"), None, torch.device("cpu"))
        assert isinstance(onnx_model, OnnxFeatures) and onnx_model.spec.patch_size == 16
        assert (onnx_model(torch.ones(1, 3, 64, 64)) - torch_cls).abs().max() <= 1e-4
    (tmp_path / "not.onnx").write_bytes(b"not a graph")
    capsys.readouterr()
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    assert main(["embed", str(tmp_path / "a.png"), "--weights", str(tmp_path / "not.onnx")]) == 2
    assert "is not an ONNX model file" in capsys.readouterr().err
    native = inference.native_bf16(torch.device("cpu"))
    code = main(["embed", str(tmp_path / "a.png"), "--weights", str(weights), "--precision", "bf16", "--image-size", "32"])
    assert code == (0 if native else 2)
    if not native:
        assert "no native bf16" in capsys.readouterr().err


def test_eval_linear_and_serve_refuse_what_they_cannot_run(capsys, monkeypatch):
    from dinotrain.eval.run import EvalData, run_linear

    monkeypatch.setattr(inference, "_has_onnxruntime", lambda: True)
    data = EvalData("train", "val", ["a"], 37, 32, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not output: use --runtime torch"):
        run_linear(data, None, "dinov2_vits14", n_last_blocks=[1], avgpool="no", iterations=1, train_batch_size=1,
                   batch_size=1, runtime="onnx")
    if inference.native_bf16(torch.device("cpu")) is None:  # checked before the backbone is built or a port opened
        assert main(["serve", "--model", "dinov2_vits14", "--device", "cpu", "--precision", "bf16"]) == 2
        err = capsys.readouterr().err.strip()
        assert "no native bf16" in err and "\n" not in err
