"""`dinotrain serve` as a real process on 127.0.0.1: the managed-endpoint format, the same features as
`dinotrain embed`, concurrent clients batched together, every bad input a 4xx while the server keeps serving,
and image URLs that may not reach internal addresses."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request

import pytest
import torch
from PIL import Image

from dinotrain.cli import main
from dinotrain.serve.fetch import BadImageInput, UrlPolicy, address_is_internal, fetch_url
from serving import IMAGES, b64 as _b64, post, score_request as _request, start_image_server, start_server, tiny_weights
from trainruns import kill_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_server():
    url, server = start_image_server()
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w") / "backbone.pth")


def _start(weights, *flags):
    server = start_server(weights, *flags, log=weights.parent / f"serve-{time.monotonic_ns()}.log")
    return server.proc, server.url


@pytest.fixture(scope="module")
def server(weights):
    proc, url = _start(weights, "--allow-private-urls", "--max-images-per-request", "4", "--max-body-bytes", "300000",
                       "--max-image-bytes", "100000", "--max-image-pixels", "250000", "--url-timeout-s", "1",
                       "--max-batch-size", "8", "--max-wait-ms", "50")
    yield url
    kill_tree(proc.pid)


def _post(url, payload, raw: bytes | None = None):
    return post(url, payload, raw)[:2]


def _embed(weights, paths, tmp_path) -> torch.Tensor:
    out = tmp_path / "emb.json"
    assert main(["embed", *map(str, paths), "--weights", str(weights), "--image-size", "32", "--output", str(out)]) == 0
    return torch.tensor([row["image_features"] for row in json.loads(out.read_text())])


def test_base64_and_urls_give_the_features_of_dinotrain_embed(server, image_server, weights, tmp_path):
    paths = IMAGES[:4]
    status, b64 = _post(server, _request([_b64(p) for p in paths]))
    assert status == 200 and len(b64) == 4 and set(b64[0]) == {"image_features"}
    status, urls = _post(server, _request([f"{image_server}/img/{p.name}" for p in paths]))
    assert status == 200
    expected = _embed(weights, paths, tmp_path)
    for got in (b64, urls):
        torch.testing.assert_close(torch.tensor([r["image_features"] for r in got]), expected, rtol=1e-5, atol=1e-5)


def test_concurrent_clients_each_get_their_own_answers_in_order(server, weights, tmp_path):
    expected = _embed(weights, IMAGES, tmp_path)
    results, errors = {}, []

    def client(c):
        order = [(c + k) % len(IMAGES) for k in range(3)]
        try:
            for _ in range(3):
                status, body = _post(server, _request([_b64(IMAGES[i]) for i in order], index=[100 * c + i for i in order]))
                assert status == 200
                results.setdefault(c, []).append((order, torch.tensor([r["image_features"] for r in body])))
        except Exception as exc:  # reported below, with the client's number
            errors.append((c, exc))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    before = json.loads(urllib.request.urlopen(server + "/health").read())
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for c, answers in results.items():
        for order, got in answers:
            torch.testing.assert_close(got, expected[order], rtol=1e-5, atol=1e-5)
    after = json.loads(urllib.request.urlopen(server + "/health").read())
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 8 * 3 * 3 and batches < images / 2, f"{images} images in {batches} batches: not batched together"


def _png(width, height) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 40, 60)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_bad_input_is_a_4xx_and_the_server_keeps_serving(server, image_server):
    good = _request([_b64(IMAGES[0])])
    noise = base64.b64encode(torch.randint(0, 255, (150_000,), dtype=torch.uint8).numpy().tobytes()).decode()
    cases = {
        "bad base64": (_request(["not base64 at all!"]), None, 400, "base64"),
        "not an image": (_request([base64.b64encode(b"hello, not an image").decode()]), None, 400, "not a readable image"),
        "too many pixels": (_request([_png(600, 500)]), None, 413, "pixels"),
        "too many bytes": (_request([noise]), None, 413, "limit"),
        "wrong schema": ({"inputs": [1, 2]}, None, 422, "input_data"),
        "wrong columns": ({"input_data": {"columns": ["text"], "index": [0], "data": [["x"]]}}, None, 422, "columns"),
        "index vs data": (_request([_b64(IMAGES[0])], index=[0, 1]), None, 422, "must match"),
        "too many images": (_request([_b64(IMAGES[0])] * 5), None, 413, "more than the limit of 4"),
        "oversized body": (None, b"{" + b" " * 400_000 + b"}", 413, "request body"),
        "not JSON": (None, b"{not json", 422, ""),
        "URL 404": (_request([f"{image_server}/missing.png"]), None, 400, "HTTP 404"),
        "URL timeout": (_request([f"{image_server}/slow"]), None, 408, "timed out"),
        "URL refusing connections": (_request(["http://127.0.0.1:1/a.png"]), None, 400, "cannot fetch"),
    }
    for name, (payload, raw, status, words) in cases.items():
        got, body = _post(server, payload, raw)
        assert got == status, (name, got, body)
        assert words in json.dumps(body), (name, body)
        ok, answer = _post(server, good)
        assert ok == 200 and len(answer) == 1, f"the server must keep serving after {name}"


def test_urls_may_not_reach_internal_addresses_without_the_flag(weights, image_server):
    proc, url = _start(weights)
    try:
        status, body = _post(url, _request([f"{image_server}/img/{IMAGES[0].name}"]))
        assert status == 403 and "forbidden address 127.0.0.1" in body["detail"], body
        status, body = _post(url, _request(["http://169.254.169.254/latest/meta-data/"]))
        assert status == 403 and "169.254.169.254" in body["detail"]
        assert _post(url, _request([_b64(IMAGES[0])]))[0] == 200
    finally:
        kill_tree(proc.pid)


def test_a_redirect_to_a_forbidden_address_is_refused(image_server):
    only_127_0_0_1 = UrlPolicy(allow_private=False, timeout_s=5)
    only_127_0_0_1.allowed = lambda ip: ip == "127.0.0.1"  # the first hop is allowed, its redirect target is not
    assert len(fetch_url(f"{image_server}/img/{IMAGES[0].name}", only_127_0_0_1)) > 100
    with pytest.raises(BadImageInput, match="forbidden address 127.0.0.2") as info:
        fetch_url(f"{image_server}/redirect-internal", only_127_0_0_1)
    assert info.value.status == 403


def test_resolution_failures_and_slow_resolvers():
    def fails(host, port):
        raise OSError("Name or service not known")

    def hangs(host, port):
        time.sleep(5)
        return ["93.184.216.34"]

    with pytest.raises(BadImageInput, match="cannot resolve nowhere.test") as info:
        fetch_url("http://nowhere.test/a.png", UrlPolicy(resolve=fails))
    assert info.value.status == 400
    t0 = time.time()
    with pytest.raises(BadImageInput, match="timed out") as info:
        fetch_url("http://slow-dns.test/a.png", UrlPolicy(resolve=hangs, timeout_s=0.5))
    assert info.value.status == 408 and time.time() - t0 < 2


@pytest.mark.parametrize("ip, internal", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.5.4", True), ("192.168.0.10", True), ("169.254.169.254", True),
    ("0.0.0.0", True), ("::1", True), ("fe80::1", True), ("fd00:ec2::254", True), ("::ffff:127.0.0.1", True),
    ("93.184.216.34", False), ("8.8.8.8", False), ("2606:4700:4700::1111", False)])
def test_internal_addresses(ip, internal):
    assert address_is_internal(ip) is internal


def test_openapi_page(server):
    spec = json.loads(urllib.request.urlopen(server + "/openapi.json").read())
    assert "/score" in spec["paths"] and "/health" in spec["paths"]
    assert urllib.request.urlopen(server + "/docs").status == 200
