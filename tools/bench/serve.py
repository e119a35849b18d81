"""`dinotrain serve` under a bounded concurrent load on loopback: dynamic batching on vs off vs direct embedding.

The same ViT-S/14 (random init, official preset, our export) and the same 224-px JPEGs (built-in digits upscaled
to 320x256, sent as base64) in every phase. `--clients` threads each send one-image requests back to back for
`--seconds`; throughput (images/s) and latency p50/p99 are measured per phase: the server with batching
(`--max-batch-size 32 --max-wait-ms 10`), without (`--max-batch-size 1`), and, as the ceiling, direct in-process
embedding of the same images in batches of 32 (no HTTP, no JSON). Ratios are to the direct figure.

    python tools/bench/serve.py --clients 8 --seconds 30
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from dinotrain.data.augmentations import make_eval_transform  # noqa: E402
from dinotrain.data.datasets import load_rgb  # noqa: E402
from dinotrain.data.tiny import ensure_tiny_dataset  # noqa: E402
from dinotrain.models import build_preset  # noqa: E402
from dinotrain.weights.convert import load_backbone, save_backbone  # noqa: E402


def make_images(n: int) -> list[bytes]:
    from PIL import Image

    out = []
    for path in sorted((ensure_tiny_dataset() / "val").rglob("*.png"))[:n]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").resize((320, 256), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def start_server(weights: Path, port: int, batch: int, wait_ms: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "dinotrain", "serve", "--weights", str(weights), "--port", str(port),
                             "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def load(url: str, images: list[str], clients: int, seconds: float) -> dict:
    latencies, lock = [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        i = c
        while time.perf_counter() < stop:
            body = json.dumps({"input_data": {"columns": ["image"], "index": [0], "data": [[images[i % len(images)]]]}})
            t0 = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body.encode(),
                                                               headers={"Content-Type": "application/json"}),
                                        timeout=120) as resp:
                resp.read()
            with lock:
                latencies.append(time.perf_counter() - t0)
            i += clients

    elapsed = run_clients(client, clients)
    return {"images_per_s": len(latencies) / elapsed, "requests": len(latencies), **latency_ms(latencies)}


def run_clients(client, clients: int) -> float:
    """`client(c)` for c in range(clients), each on its own thread, until all return; the seconds it took."""
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def latency_ms(latencies: list[float]) -> dict:
    """p50 and p99 (nearest rank) of request latencies in seconds, in milliseconds."""
    lat = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def direct(weights: Path, jpegs: list[bytes], seconds: float) -> dict:
    from PIL import Image

    model = load_backbone(weights)
    transform = make_eval_transform()
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            batch = torch.stack([transform(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs[:32]])
            model(batch)
            done += len(batch)
    return {"images_per_s": done / (time.perf_counter() - start)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--port", type=int, default=8971)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    jpegs = make_images(64)
    images = [base64.b64encode(j).decode() for j in jpegs]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = save_backbone(build_preset("dinov2_vits14"), Path(tmp) / "vits14.pth", "hub")
        results = {}
        for name, batch, wait in (("batching on (32, 10 ms)", 32, 10.0), ("batching off (1)", 1, 0.0)):
            proc = start_server(weights, args.port, batch, wait)
            try:
                load(f"http://127.0.0.1:{args.port}/score", images, args.clients, 3)  # warm-up
                results[name] = load(f"http://127.0.0.1:{args.port}/score", images, args.clients, args.seconds)
            finally:
                proc.kill()
                proc.wait()
        results["direct in-process (batch 32)"] = direct(weights, jpegs, args.seconds)
    ceiling = results["direct in-process (batch 32)"]["images_per_s"]
    print(f"{'phase':<30} {'img/s':>7} {'/direct':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        print(f"{name:<30} {r['images_per_s']:>7.1f} {r['images_per_s'] / ceiling:>7.2f}x "
              f"{r.get('p50_ms', float('nan')):>8.0f} {r.get('p99_ms', float('nan')):>8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"clients": args.clients, "seconds": args.seconds, "torch": torch.__version__,
                                               "threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
