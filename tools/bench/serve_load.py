"""Load on one `dinotrain serve`: N concurrent clients posting images for T seconds -> img/s, p50/p99 latency.

Either against a server that runs already (`--url`), or one it starts itself (`--weights` / `--model`; by default a
ViT-S/14 at random init exported like the project's own, `dinov2_vits14`), with any further `dinotrain serve`
arguments after `--`, so that two settings compare by two runs of one command:

    python tools/bench/serve_load.py --clients 8 --seconds 20
    python tools/bench/serve_load.py --clients 8 --seconds 20 -- --max-batch-size 1
    python tools/bench/serve_load.py --url http://10.0.0.5:8000 --api-key-env DT_KEY

Each client sends requests of `--images-per-request` 224-px-ready JPEGs (built-in digits upscaled to 320x256, base64)
back to back; latency is per request, as a client sees it. A warm-up of `--warmup-s` runs first and is not counted.
The figures come with the server's own view from `/metrics` (images per forward) and, for a server started here,
its exit code after SIGTERM (the graceful drain).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from serve import latency_ms, make_images, run_clients  # noqa: E402  (tools/bench/serve.py: its JPEGs and client threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: str | None, model: str | None, extra: list[str], log: Path):
    port = free_port()
    source = ["--weights", weights] if weights else ["--model", model]
    command = [sys.executable, "-m", "dinotrain", "serve", *source, "--port", str(port), "--access-log", "off", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"dinotrain serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("dinotrain serve did not come up in 120 s")


def load(url: str, bodies: list[bytes], headers: dict, clients: int, seconds: float) -> dict:
    latencies, errors, lock = [], {}, threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        i = c
        while time.perf_counter() < stop:
            request = urllib.request.Request(url + "/score", data=bodies[i % len(bodies)], headers=headers)
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=300) as resp:
                    resp.read()
                ok = True
            except (urllib.error.URLError, OSError) as exc:
                ok, key = False, str(getattr(exc, "code", None) or type(exc).__name__)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1
            i += clients

    elapsed = run_clients(client, clients)
    if not latencies:
        raise SystemExit(f"no request succeeded: {errors}")
    return {"requests": len(latencies), "seconds": round(elapsed, 2), "requests_per_s": len(latencies) / elapsed,
            **latency_ms(latencies), "errors": errors}


def server_batches(url: str, headers: dict) -> dict:
    """Images and forwards so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=10) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError:  # a server without /metrics (older), or a key it does not take
        return {"images": 0.0, "forwards": 0.0}
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return {"images": values.get("dinotrain_serve_batch_size_sum", 0.0),
            "forwards": values.get("dinotrain_serve_batch_size_count", 0.0)}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="arguments after -- go to the dinotrain serve this starts")
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--weights", help="weights for the server started here")
    parser.add_argument("--model", default="dinov2_vits14",
                        help="without --weights: this preset at random init, exported first (default dinov2_vits14)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup-s", type=float, default=3)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="send this environment variable's value as the Bearer key (and pass the flag on to the "
                             "server started here)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(own)

    api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    images = [base64.b64encode(j).decode() for j in make_images(64)]
    n = args.images_per_request
    bodies = [json.dumps({"input_data": {"columns": ["image"], "index": list(range(n)),
                                         "data": [[images[(i + k) % len(images)]] for k in range(n)]}}).encode()
              for i in range(len(images))]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, weights = None, args.url, args.weights
        if url is None:
            if weights is None:
                import torch

                from dinotrain.models import build_preset
                from dinotrain.weights.convert import save_backbone

                torch.manual_seed(0)
                weights = str(save_backbone(build_preset(args.model), Path(tmp) / f"{args.model}.pth", "hub"))
            key_flag = ["--api-key-env", args.api_key_env] if args.api_key_env else []
            proc, url = start_server(weights, None, key_flag + extra, Path(tmp) / "serve.log")
        try:
            load(url, bodies, headers, args.clients, args.warmup_s)
            before = server_batches(url, headers)
            result = load(url, bodies, headers, args.clients, args.seconds)
            after = server_batches(url, headers)
        finally:
            exit_code = None
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                exit_code = proc.wait(timeout=60)
    result["images_per_s"] = result["requests_per_s"] * n
    forwards = after["forwards"] - before["forwards"]
    result["images_per_forward"] = (after["images"] - before["images"]) / forwards if forwards else None
    result.update(clients=args.clients, images_per_request=n, server_args=extra, server_exit_code=exit_code,
                  weights=args.weights or (None if args.url else f"{args.model} (random init)"))
    print(f"{args.clients} clients, {n} image(s)/request, {result['seconds']:.0f} s: {result['images_per_s']:.1f} img/s, "
          f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
          f"{result['images_per_forward'] or float('nan'):.1f} images/forward, errors {result['errors'] or 0}"
          + (f"; server exit after SIGTERM: {exit_code}" if exit_code is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
