"""Inference throughput of our backbones vs `transformers` Dinov2Model with the same weights.

Both models run side by side in one process: the HF model is loaded from our HF export of the
very same weights, the timed iterations alternate between the two (so load from other processes
hits both alike), and the outputs are compared before timing so the figures are for equal work.

    python tools/bench/inference.py --models vits14,vitb14 --batch 32 --iters 5 --threads 2

Both models are the official 518-px presets, fed 224x224 images, so both resample the 37x37
position table to 16x16 on every forward. Ours is built with `interpolate_offset=0` (the HF
convention) so the outputs can be compared exactly; the offset does not change the cost.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from dinotrain.models import build_preset  # noqa: E402
from dinotrain.weights.convert import save_backbone  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vits14,vitb14", help="comma-separated: vits14, vitb14, vitl14, vitg14")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="input height and width in pixels")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pair(name: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """Our backbone and transformers' Dinov2Model holding the same weights (via our HF export)."""
    from transformers import Dinov2Model, logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ours = build_preset(f"dinov2_{name}", interpolate_offset=0.0).eval()
    save_backbone(ours, workdir / name, "hf")
    theirs = Dinov2Model.from_pretrained(workdir / name, attn_implementation="sdpa").eval()
    return ours.to(device, dtype), theirs.to(device, dtype)


def check_outputs(ours, theirs, x) -> float:
    """Max abs difference of all normed tokens (CLS + patches)."""
    with torch.inference_mode():
        out = ours.forward_features(x)
        mine = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)
        return (mine.float() - theirs(pixel_values=x).last_hidden_state.float()).abs().max().item()


def time_pair(ours, theirs, x, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per batch for each model, alternating which runs first in every iteration."""
    runners = {"ours": lambda: ours(x), "hf": lambda: theirs(pixel_values=x).last_hidden_state}
    times = {"ours": [], "hf": []}
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runners.values():
                run()
        for i in range(iters):
            order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
            for key in order:
                sync(device)
                start = time.perf_counter()
                runners[key]()
                sync(device)
                times[key].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["hf"])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, device {device} ({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
          f"{torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, {args.size}x{args.size}, "
          f"median of {args.iters} after {args.warmup} warm-up")
    print("| model | ours (img/s) | transformers (img/s) | ours / HF | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ours, theirs = build_pair(name.strip(), device, dtype, Path(tmp))
            x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
            diff = check_outputs(ours, theirs, x[:2])
            failed |= diff > TOLERANCE[dtype]
            t_ours, t_hf = time_pair(ours, theirs, x, args.iters, args.warmup, device)
            print(f"| {name} | {args.batch / t_ours:.2f} | {args.batch / t_hf:.2f} | {t_hf / t_ours:.3f}x | {diff:.1e} |",
                  flush=True)
            del ours, theirs
    if failed:
        sys.exit(f"outputs differ by more than {TOLERANCE[dtype]} in {args.dtype}: not the same computation")


if __name__ == "__main__":
    main()
