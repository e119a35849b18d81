"""ONNX parity at full size: onnxruntime (CPU) vs our torch forward, max abs difference of CLS and patch tokens.

    OMP_NUM_THREADS=2 python tools/bench/onnx_parity.py [--models ...] [--output parity.json]

Full-depth random-weight models (the tests use 1 block: tests/weights/test_onnx_export.py), each exported once by
`write_onnx` (checked by onnx.checker) and run at 224x224, 280x196 and 518x518 (height x width), batch 1 and 7.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SIZES = [(224, 224), (280, 196), (518, 518)]


def main() -> None:
    import onnxruntime as ort

    from dinotrain.models.presets import build_preset
    from dinotrain.weights.onnx_export import write_onnx

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dinov2_vits14", "dinov2_vitb14_reg", "dino_vits16",
                                                        "dinov3_vits16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rows = []
    print("| model | H x W | batch | CLS max abs diff | patch max abs diff |\n|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = build_preset(name).eval()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            path = write_onnx(model, Path(tmp) / "m.onnx")
            seconds = time.perf_counter() - start
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for h, w in SIZES:
            for batch in (1, 7):
                x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h + w + batch))
                with torch.inference_mode():
                    ref = model.forward_features(x)
                got = dict(zip(names, session.run(None, {"pixel_values": x.numpy()})))
                row = {"model": name, "height": h, "width": w, "batch": batch, "export_s": round(seconds, 2),
                       "cls": float(abs(got["cls_token"] - ref["x_norm_clstoken"].numpy()).max()),
                       "patch": float(abs(got["patch_tokens"] - ref["x_norm_patchtokens"].numpy()).max())}
                rows.append(row)
                print(f"| {name} | {h} x {w} | {batch} | {row['cls']:.2e} | {row['patch']:.2e} |", flush=True)
    worst = max(max(r["cls"], r["patch"]) for r in rows)
    print(f"\nworst {worst:.2e} ({'<=' if worst <= 1e-4 else '>'} 1e-4)")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
