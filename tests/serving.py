"""`dinotrain serve` for real in tests: a tiny random backbone, the server as a subprocess (its output in a file, so
that a full pipe can never block it), a local image server, and the request format."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.models.vision_transformer import ViTSpec, vit_from_spec
from trainruns import REPO, env, free_port

IMAGES = sorted((ensure_tiny_dataset() / "val" / "5").glob("*.png"))[:8]


def tiny_weights(path: Path) -> Path:
    """A 2-block ViT at 32 px, patch 8, random init (seeded): seconds to start, milliseconds per forward."""
    torch.manual_seed(0)
    torch.save(vit_from_spec(ViTSpec(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)).state_dict(), path)
    return path


class Server:
    """A `dinotrain serve` process; `output()` is its stdout + stderr so far."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(weights: Path, *flags: str, log: Path, extra_env: dict | None = None) -> Server:
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dinotrain", "serve", "--weights", str(weights), "--image-size",
                                 "32", "--port", str(port), *flags], env={**env(), **(extra_env or {})}, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2):
                return server
        except OSError:
            assert proc.poll() is None, server.output()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)


def post(url: str, payload=None, raw: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, JSON body, response headers) of a POST to /score; HTTP errors are answers too."""
    body = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json",
                                                                    **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text or b"{}"), err.headers
        except ValueError:  # e.g. uvicorn's own plain-text 500
            return err.code, {"text": text.decode(errors="replace")}, err.headers


def score_request(items, index=None) -> dict:
    return {"input_data": {"columns": ["image"], "index": index or list(range(len(items))), "data": [[x] for x in items]}}


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


class _Images(BaseHTTPRequestHandler):
    """/img/<name>: a tiny-dataset image; /delay/<ms>/<name>: the same after a pause; /slow: 3 s, then nothing;
    /redirect-internal: a redirect to 127.0.0.2."""

    port = 0

    def _image(self, name: str) -> None:
        body = (ensure_tiny_dataset() / "val" / "5" / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/img/"):
            self._image(self.path[5:])
        elif self.path.startswith("/delay/"):
            ms, name = self.path[7:].split("/", 1)
            time.sleep(int(ms) / 1000)
            self._image(name)
        elif self.path == "/slow":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/redirect-internal":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.port}/img/{IMAGES[0].name}")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


def start_image_server() -> tuple[str, ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("0.0.0.0", 0), _Images)
    _Images.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{_Images.port}", server
