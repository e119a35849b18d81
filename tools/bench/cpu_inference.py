"""CPU embeddings side by side: transformers Dinov2Model fp32 (the anchor) vs our paths (dinotrain/inference.py).

    OMP_NUM_THREADS=2 python tools/bench/cpu_inference.py [--models dinov2_vits14 dinov2_vitb14] [--images 256]

Per model (random weights, the same in every path: transformers gets them through our HF export), batch 32 at
224 px, `--threads` threads: transformers fp32, ours torch fp32, ours torch bf16 (autocast), ours torch bf16
weights (the whole model cast), onnxruntime fp32, onnxruntime int8 (dynamic quantization). The paths take turns
batch by batch (so a load change on the machine hits them alike); img/s is the median over a path's batches
(after a warm-up call of 4 images each); the worst CLS cosine similarity is against ours fp32 over the images that path
ran. Paths a CPU runs emulated (bf16 without amx_bf16 / avx512_bf16) run `--slow-images`
images only; the table says how many each row used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F


def machine() -> dict:
    from dinotrain.inference import cpu_flags

    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    import onnxruntime

    return {"cpu": model, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
            "load_before": os.getloadavg()[0]}


def transformers_anchor(model, tmp: str):
    """Dinov2Model with `model`'s weights, through our HF export (as a user would load them)."""
    from transformers import Dinov2Model

    from dinotrain.weights.convert import save_backbone

    save_backbone(model, tmp, "hf")
    hf = Dinov2Model.from_pretrained(tmp).eval()
    return lambda x: hf(pixel_values=x).pooler_output


def paths(model, threads: int) -> dict:
    """name -> callable(images) -> CLS (float32)."""
    import copy

    from dinotrain.inference import Choice, TorchFeatures, features_model

    half = copy.deepcopy(model).to(torch.bfloat16)
    return {
        "ours torch fp32": TorchFeatures(model, "fp32"),
        "ours torch bf16 (autocast)": TorchFeatures(model, "bf16"),
        "ours torch bf16 (bf16 weights)": lambda x: half(x.to(torch.bfloat16)).float(),
        "ours onnxruntime fp32": features_model(model, Choice("onnx", "fp32", ""), threads),
        "ours onnxruntime int8": features_model(model, Choice("onnx", "int8", ""), threads),
    }


def bench_model(name: str, args, emulated_bf16: bool) -> list[dict]:
    from dinotrain.models.presets import build_preset

    torch.manual_seed(0)
    model = build_preset(name, img_size=224).eval()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"transformers Dinov2Model fp32": transformers_anchor(model, tmp), **paths(model, args.threads)}
    runs = {n: fn for n, fn in runs.items() if not any(s in n for s in args.skip)}
    slow = {n for n in runs if "bf16" in n} if emulated_bf16 else set()
    limit = {n: (args.slow_images if n in slow else args.images) for n in runs}
    generator = torch.Generator().manual_seed(1)
    n_batches = -(-args.images // args.batch_size)
    times = {n: [] for n in runs}
    cls = {n: [] for n in runs}
    with torch.inference_mode():
        warm = torch.randn(4, 3, 224, 224, generator=generator)
        for fn in runs.values():
            fn(warm)
        for i in range(n_batches):
            x = torch.randn(args.batch_size, 3, 224, 224, generator=generator)
            for n, fn in runs.items():
                if i * args.batch_size >= limit[n]:
                    continue
                start = time.perf_counter()
                out = fn(x)
                times[n].append(time.perf_counter() - start)
                cls[n].append(out.float())
            print(f"{name}: batch {i + 1}/{n_batches} done", flush=True)
    ref = torch.cat(cls["ours torch fp32"])
    rows = []
    for n in runs:
        got = torch.cat(cls[n])
        rows.append({"model": name, "path": n, "images": len(got),
                     "img_per_s": args.batch_size / statistics.median(times[n]),
                     "worst_cls_cosine": F.cosine_similarity(got, ref[:len(got)]).min().item(),
                     "max_abs_diff": (got - ref[:len(got)]).abs().max().item()})
    anchor = rows[0]["img_per_s"]
    for row in rows:
        row["ratio_to_transformers"] = row["img_per_s"] / anchor
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dinov2_vits14", "dinov2_vitb14"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--slow-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="leave out the paths whose name contains one of these")
    parser.add_argument("--output", help="also write the rows and the machine as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dinotrain.inference import native_bf16

    info = machine()
    emulated = native_bf16(torch.device("cpu")) is None
    rows = [r for name in args.models for r in bench_model(name, args, emulated)]
    info["load_after"] = os.getloadavg()[0]
    print(f"\n{info}\n")
    print("| model | path | img/s | vs transformers | worst CLS cosine vs fp32 | max abs diff | images |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['path']} | {r['img_per_s']:.2f} | {r['ratio_to_transformers']:.2f}x | "
              f"{r['worst_cls_cosine']:.6f} | {r['max_abs_diff']:.2e} | {r['images']} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
