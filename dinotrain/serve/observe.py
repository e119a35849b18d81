"""What every request goes through first: its id, the refusal of new work while draining, the metrics, and the
access log line.

One ASGI middleware, outside auth and the app, so that it sees every answer, 401s and 503s included. The access log
is one JSON object per line on the logger `dinotrain.serve.access` (time, method, path, status, latency, images,
client, request id): the path without its query string, never a header, never a body, so neither the API key nor
image data can reach it. A request that is cancelled before its answer (the client went away, or the drain timeout
passed) is logged and counted with status 499, the code proxies use for an answer nobody received.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from dinotrain.serve.metrics import ServeMetrics, route_of

access_log = logging.getLogger("dinotrain.serve.access")

# Answered while draining: liveness / readiness (so probes see "draining") and the last metrics scrape.
DRAIN_OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
CANCELLED = 499
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass
class DrainState:
    """Shared by the middleware and the server: whether SIGTERM came, what is still being answered."""

    draining: bool = False
    in_flight: int = 0
    cancelled: int = 0


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` when it is a plain token (echoed), else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _client(scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


async def _send_json(send, status: int, payload: dict, extra_headers=()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class Observe:
    """ASGI middleware: request id, 503 while draining, Prometheus metrics, one access log line per request."""

    def __init__(self, app, metrics: ServeMetrics, drain: DrainState, log_requests: bool = True):
        self.app, self.metrics, self.drain, self.log_requests = app, metrics, drain, log_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        rid = request_id(scope["headers"])
        scope["dinotrain"] = info = {"images": 0}
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        self.drain.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            if self.drain.draining and scope["path"] not in DRAIN_OPEN_PATHS:
                await _send_json(send_with_id, 503, {"detail": "the server is shutting down and takes no new "
                                                               "requests: retry on another replica"},
                                 [(b"connection", b"close"), (b"retry-after", b"1")])
            else:
                await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: no whole answer went out
                status = CANCELLED
                self.drain.cancelled += 1
            elif status is None:
                status = 500
            raise
        finally:
            self.drain.in_flight -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = route_of(scope["path"])
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(elapsed)
            if self.log_requests:
                access_log.info(json.dumps({
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "latency_ms": round(1000 * elapsed, 2), "images": info["images"], "client": _client(scope),
                    "request_id": rid}))
