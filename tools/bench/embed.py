"""`dinotrain embed` throughput vs a plain transformers loop, same weights, same images, batch 32, in one run.

Images: the built-in digits upscaled to 320x256 and re-encoded as JPEG (quality 90), so decoding and resizing
cost what photos of ImageNet size cost. Model: ViT-S/14 (random init, official 518-px preset) exported to a
Hugging Face directory, which both sides load. Ours: `dinotrain.embed.embed_to_directory` (decode workers,
batches, chunked `.npy` output), the same code as the command. Theirs: the loop people write —
`AutoImageProcessor` + `AutoModel`, PIL decode in the main process, `pooler_output` per batch of 32. The two
alternate `--rounds` times; the median images/s of each and their ratio are reported, and the CLS features of
the two are compared (they differ only by the resize implementations: torchvision vs the HF processor).

    python tools/bench/embed.py --images 256 --rounds 3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from dinotrain.data.tiny import ensure_tiny_dataset  # noqa: E402
from dinotrain.embed import EmbedSettings, embed_to_directory, list_images  # noqa: E402
from dinotrain.models import build_preset  # noqa: E402
from dinotrain.weights.convert import load_backbone, save_backbone  # noqa: E402


def make_jpegs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    src = sorted((ensure_tiny_dataset() / "train").rglob("*.png"))[:n]
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(src):
        Image.open(path).convert("RGB").resize((320, 256), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return list_images([folder])


def ours(model_dir: Path, images: list[Path], out: Path, workers: int, device: torch.device) -> tuple[float, np.ndarray]:
    model = load_backbone(model_dir).to(device)
    settings = EmbedSettings(weights=str(model_dir), resize=256, crop=224, batch_size=32)
    start = time.perf_counter()
    embed_to_directory(model, images, out, settings, device, workers, force=True, progress=False)
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, np.load(out / "embeddings.npy")


def theirs(model_dir: Path, images: list[Path], device: torch.device) -> tuple[float, np.ndarray]:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    feats = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            batch = [Image.open(p).convert("RGB") for p in images[i:i + 32]]
            inputs = processor(images=batch, return_tensors="pt").to(device)
            feats.append(model(**inputs).pooler_output.float().cpu().numpy())
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, np.concatenate(feats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decode workers of dinotrain embed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_jpegs(tmp / "jpegs", args.images)
        torch.manual_seed(0)
        model_dir = save_backbone(build_preset("dinov2_vits14"), tmp / "hf", "hf")
        rates = {"dinotrain embed": [], "transformers loop": []}
        for _ in range(args.rounds):  # alternate, so background load hits both alike
            rate, a = ours(model_dir, images, tmp / "out", args.workers, device)
            rates["dinotrain embed"].append(rate)
            rate, b = theirs(model_dir, images, device)
            rates["transformers loop"].append(rate)
        median = {k: statistics.median(v) for k, v in rates.items()}
        diff = float(np.abs(a - b).max())
        result = {"device": str(device), "images": args.images, "rounds": args.rounds, "workers": args.workers,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "images_per_s": rates,
                  "median_images_per_s": median, "ratio": median["dinotrain embed"] / median["transformers loop"],
                  "max_abs_feature_diff": diff, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{'side':<20} {'img/s (median)':>15}   runs")
    for k, v in rates.items():
        print(f"{k:<20} {median[k]:>15.1f}   " + " ".join(f"{r:.1f}" for r in v))
    print(f"ratio dinotrain / transformers: {result['ratio']:.2f}x on {device}; max |CLS diff| {diff:.3g} "
          "(torchvision vs HF resize)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
