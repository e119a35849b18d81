"""`dinotrain serve` in production: the API key (401 without it or with a wrong one, never in any output), the
Prometheus metrics counting exactly the requests sent, one JSON access-log line per request, and SIGTERM under
8-client load (every request that reached the app answered, later ones refused, exit 0 within the drain timeout;
exit 1 when the timeout cuts a request off)."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dinotrain.cli import main
from dinotrain.serve.auth import BearerAuth, bearer_token, load_api_key
from serving import IMAGES, b64, post, score_request, start_image_server, start_server, tiny_weights
from trainruns import kill_tree

pytestmark = pytest.mark.slow
KEY = "k3y-0f-th3-t3st-5f1b2c"  # searched for in every output


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w") / "backbone.pth")


@pytest.fixture(scope="module")
def image_server():
    url, server = start_image_server()
    yield url
    server.shutdown()


def _get(url: str, headers: dict | None = None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


def _access_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith('{"time"')]


def _samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of a Prometheus text page."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- the key: read once, checked in constant time, errors in one line without it --------------------------------

@pytest.mark.parametrize("content, words", [
    ("", "is empty"), ("  \n\n", "is empty"), ("first-key\nsecond-key\n", "whitespace inside the key"),
    ("sekrit1 sekrit2", "whitespace inside the key"), ("k\u00e9y", "printable ASCII")])
def test_a_malformed_key_file_is_one_line_and_exit_2(tmp_path, capsys, content, words):
    path = tmp_path / "key"
    path.write_text(content, encoding="utf-8")
    assert main(["serve", "--model", "dinov2_vits14", "--api-key-file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and str(path) in err, err
    for part in content.split():
        assert part not in err, "the error line must not quote the key file"


def test_a_missing_key_file_or_variable_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DT_NO_SUCH_KEY", raising=False)
    for args, words in ((["--api-key-file", str(tmp_path / "absent")], "no such file"),
                        (["--api-key-env", "DT_NO_SUCH_KEY"], "is not set")):
        assert main(["serve", "--model", "dinov2_vits14", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    if os.geteuid() != 0:  # root reads any file
        (tmp_path / "locked").write_text(KEY)
        (tmp_path / "locked").chmod(0)
        assert main(["serve", "--model", "dinov2_vits14", "--api-key-file", str(tmp_path / "locked")]) == 2
        assert "cannot read it" in capsys.readouterr().err


def test_key_sources_and_the_bearer_check(tmp_path, monkeypatch):
    (tmp_path / "key").write_text(f"  {KEY}\n")
    assert load_api_key(file_path=str(tmp_path / "key")) == KEY
    monkeypatch.setenv("DT_KEY", KEY)
    assert load_api_key(env_name="DT_KEY") == KEY and load_api_key() is None
    auth = BearerAuth(None, KEY)
    assert auth.authorized([(b"authorization", f"Bearer {KEY}".encode())]) is True
    assert auth.authorized([(b"Authorization", f"bearer  {KEY} ".encode())]) is True
    assert auth.authorized([(b"authorization", f"Bearer {KEY}x".encode())]) is False
    assert auth.authorized([(b"authorization", KEY.encode())]) is None  # no scheme
    assert auth.authorized([(b"authorization", f"Basic {KEY}".encode())]) is None
    assert bearer_token([]) is None


def test_each_app_has_its_own_metrics():
    """Two apps in one process (as tests make them): no clash in a global registry, no shared counts."""
    import torch

    from dinotrain.serve.app import ServeLimits, create_app

    first, second = (create_app(torch.nn.Identity(), torch.device("cpu"), ServeLimits(max_batch_size=8))
                     for _ in range(2))
    first.state.metrics.images.inc(5)
    assert _samples(first.state.metrics.render().decode())[("dinotrain_serve_images_embedded_total", frozenset())] == 5
    assert _samples(second.state.metrics.render().decode())[("dinotrain_serve_images_embedded_total", frozenset())] == 0


def _call(app, method: str, path: str) -> tuple[int, dict, dict]:
    """One request straight through the ASGI app (no server): status, headers, JSON body."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-length", b"2"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_while_draining_new_work_gets_503_with_connection_close_and_the_probes_say_so():
    """The moment between SIGTERM and the closing of the listening socket, which a load test rarely hits."""
    import torch

    from dinotrain.serve.app import ServeLimits, create_app

    model = torch.nn.Identity()
    model.embed_dim = 3
    app = create_app(model, torch.device("cpu"), ServeLimits())
    assert _call(app, "GET", "/ready")[0] == 200
    app.state.drain.draining = True
    status, headers, body = _call(app, "POST", "/score")
    assert status == 503 and headers["connection"] == "close" and "shutting down" in body["detail"]
    assert headers["x-request-id"]
    status, _, body = _call(app, "GET", "/health")
    assert status == 200 and body["status"] == "draining"  # liveness: alive, finishing its work
    assert _call(app, "GET", "/ready")[0] == 503
    got = _samples(app.state.metrics.render().decode())
    assert got[("dinotrain_serve_requests_total", frozenset({("route", "/score"), ("status", "503")}))] == 1


# --- a running server: auth, metrics, access log -------------------------------------------------------------------

def test_auth_metrics_and_access_log_count_exactly_the_requests_sent(weights, tmp_path):
    server = start_server(weights, "--api-key-env", "DT_TEST_KEY", "--max-wait-ms", "1", log=tmp_path / "serve.log",
                          extra_env={"DT_TEST_KEY": KEY})
    try:
        good, auth = score_request([b64(IMAGES[0])]), {"Authorization": f"Bearer {KEY}"}
        status, body, headers = post(server.url, good)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and "Authorization" in body["detail"]
        status, body, headers = post(server.url, good, headers={"Authorization": "Bearer not-the-key"})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and body["detail"] == "wrong API key"
        sent_ids = []
        for n in (1, 2, 3):  # 3 OK, with 6 images in all
            status, body, headers = post(server.url, score_request([b64(p) for p in IMAGES[:n]]),
                                         headers={**auth, "X-Request-ID": f"req-{n}"})
            assert status == 200 and len(body) == n and headers["X-Request-ID"] == f"req-{n}"
            sent_ids.append(f"req-{n}")
        assert post(server.url, score_request(["not base64!"]), headers=auth)[0] == 400
        assert post(server.url, {"inputs": []}, headers=auth)[0] == 422
        assert _get(server.url + "/health")[0] == 200  # liveness stays open
        assert _get(server.url + "/metrics")[0] == 401
        for page in ("/docs", "/openapi.json"):
            status, text, _ = _get(server.url + page)
            assert status == 200 and KEY not in text
        assert json.loads(text)["paths"]["/score"]["post"]["security"] == [{"apiKey": []}]  # /docs: "Authorize"

        status, text, headers = _get(server.url + "/metrics", auth)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        got = _samples(text)

        def requests(route, code):
            return got.get(("dinotrain_serve_requests_total", frozenset({("route", route), ("status", code)})), 0)

        assert [requests("/score", c) for c in ("200", "400", "401", "422", "503")] == [3, 1, 2, 1, 0]
        assert requests("/health", "200") >= 2 and requests("/metrics", "401") == 1  # start_server polls /health too
        assert got[("dinotrain_serve_images_embedded_total", frozenset())] == 6
        assert got[("dinotrain_serve_batch_size_sum", frozenset())] == 6
        assert got[("dinotrain_serve_batch_size_count", frozenset())] >= 3  # at least one forward per request
        assert got[("dinotrain_serve_request_duration_seconds_count", frozenset({("route", "/score")}))] == 7
        assert got[("dinotrain_serve_requests_in_flight", frozenset())] == 1  # this scrape
        assert got[("dinotrain_serve_queue_depth", frozenset())] == 0
        assert got[("dinotrain_serve_draining", frozenset())] == 0
    finally:
        kill_tree(server.proc.pid)
    output = server.output()
    assert KEY not in output
    lines = _access_lines(output)
    score = [line for line in lines if line["path"] == "/score"]
    assert collections.Counter(line["status"] for line in score) == {200: 3, 401: 2, 400: 1, 422: 1}
    ok = [line for line in score if line["status"] == 200]
    assert [line["images"] for line in ok] == [1, 2, 3] and [line["request_id"] for line in ok] == sent_ids
    for line in lines:
        assert set(line) == {"time", "method", "path", "status", "latency_ms", "images", "client", "request_id"}
        assert line["client"].startswith("127.0.0.1:") and line["latency_ms"] >= 0 and line["request_id"]


# --- SIGTERM -------------------------------------------------------------------------------------------------------

def _load(url: str, items: list[str], headers: dict, clients: int, stop: threading.Event) -> list[tuple]:
    """`clients` threads posting back to back until `stop`: (sent at, outcome) for each request."""
    outcomes, lock = [], threading.Lock()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status, body, _ = post(url, score_request(items), headers=headers, timeout=30)
                outcome = status if status != 200 or len(body) == len(items) else "wrong answer"
            except urllib.error.URLError as exc:
                outcome = type(exc.reason).__name__
            except OSError as exc:  # the connection closed before an answer
                outcome = type(exc).__name__
            with lock:
                outcomes.append((sent, outcome))
            if outcome != 200:
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return outcomes, threads


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(weights, image_server, tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    server = start_server(weights, "--api-key-file", str(tmp_path / "key"), "--allow-private-urls", "--max-batch-size",
                          "8", "--max-wait-ms", "20", "--drain-timeout-s", "20", log=tmp_path / "serve.log")
    # Each request: an image fetched after 300 ms (so that requests are surely in flight at the signal) + 2 inline.
    items = [f"{image_server}/delay/300/{IMAGES[0].name}", b64(IMAGES[1]), b64(IMAGES[2])]
    stop = threading.Event()
    try:
        outcomes, threads = _load(server.url, items, {"Authorization": f"Bearer {KEY}"}, 8, stop)
        time.sleep(2.0)
        os.kill(server.proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(1.5)  # clients keep trying after the signal
        stop.set()
        for t in threads:
            t.join(30)
        code = server.proc.wait(timeout=25)
        exited = time.monotonic() - signalled
    finally:
        stop.set()
        kill_tree(server.proc.pid)
    output = server.output()
    assert code == 0 and exited < 20, (code, exited, output[-2000:])
    # Sent well before the signal: answered; sent after it: refused. (In between, either: a request sent just before
    # the signal may reach the app after it.)
    before = [o for sent, o in outcomes if sent < signalled - 0.5]
    after = [o for sent, o in outcomes if sent > signalled + 0.05]
    assert before and set(before) == {200}, collections.Counter(before)
    assert after and 200 not in after, collections.Counter(after)
    assert set(o for _, o in outcomes) <= {200, 503, "ConnectionRefusedError", "ConnectionResetError",
                                           "RemoteDisconnected"}, collections.Counter(o for _, o in outcomes)
    in_flight = int(re.search(r"answering the (\d+) in flight", output).group(1))
    assert in_flight >= 1, output[-2000:]
    # Accepted = reached the app = has an access-log line: each of those was a 200 that its client received, or a 503.
    logged = collections.Counter(line["status"] for line in _access_lines(output) if line["path"] == "/score")
    answered = collections.Counter(o for _, o in outcomes if o in (200, 503))
    assert logged == answered, (logged, answered)
    assert "every accepted request answered" in output and KEY not in output


def test_a_drain_longer_than_the_timeout_says_so_and_exits_1(weights, image_server, tmp_path):
    server = start_server(weights, "--allow-private-urls", "--url-timeout-s", "10", "--drain-timeout-s", "0.5",
                          log=tmp_path / "serve.log")
    try:
        result = {}
        client = threading.Thread(target=lambda: result.update(
            answer=_safe_post(server.url, score_request([f"{image_server}/delay/2000/{IMAGES[0].name}"]))))
        client.start()
        time.sleep(0.5)  # the request waits on the 2-s URL
        os.kill(server.proc.pid, signal.SIGTERM)
        code = server.proc.wait(timeout=20)
        client.join(20)
    finally:
        kill_tree(server.proc.pid)
    output = server.output()
    assert code == 1, output[-2000:]
    assert "drain timeout of 0.5 s passed with 1 accepted request(s) unanswered" in output, output[-2000:]
    assert result["answer"] != 200, result  # uvicorn answers what it cancelled with a 500


def _safe_post(url, payload):
    try:
        return post(url, payload, timeout=20)[0]
    except OSError as exc:
        return type(exc).__name__


def test_an_onnx_graph_serves_the_torch_features_behind_the_key(weights, tmp_path):
    """The endpoint on onnxruntime (`--weights x.onnx`): the same CLS features as the torch server within 1e-4, the
    key and metrics as on torch, and the runtime named in its start-up line."""
    pytest.importorskip("onnxruntime")
    graph = tmp_path / "backbone.onnx"
    assert main(["export", str(weights), str(graph), "--to", "onnx", "--example-size", "32"]) == 0
    auth = {"Authorization": f"Bearer {KEY}"}
    request = score_request([b64(p) for p in IMAGES[:3]])
    features = {}
    for name, path in (("torch", weights), ("onnx", graph)):
        server = start_server(path, "--api-key-env", "DT_TEST_KEY", log=tmp_path / f"{name}.log",
                              extra_env={"DT_TEST_KEY": KEY})
        try:
            assert post(server.url, request)[0] == 401
            status, body, _ = post(server.url, request, headers=auth)
            assert status == 200, body
            features[name] = [row["image_features"] for row in body]
            got = _samples(_get(server.url + "/metrics", auth)[1])
            assert got[("dinotrain_serve_images_embedded_total", frozenset())] == 3
        finally:
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=30) == 0, server.output()
        assert f"({name} fp32)" in server.output() and KEY not in server.output()
    worst = max(abs(a - b) for row_t, row_o in zip(features["torch"], features["onnx"]) for a, b in zip(row_t, row_o))
    assert worst <= 1e-4, worst
