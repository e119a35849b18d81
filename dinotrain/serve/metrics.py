"""The endpoint's Prometheus metrics, served at `/metrics`.

Each app owns its registry (not prometheus_client's global one), so that a process, or a test, can hold several
apps whose counts do not mix. Images per second is not a metric of its own: it is `rate()` of the images counter,
which Prometheus computes over the window it is asked for (a gauge here would show one arbitrary window).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The paths the app answers; any other path is counted as "other", so that a scan of random URLs cannot grow
# the number of time series without bound.
ROUTES = ("/score", "/health", "/ready", "/metrics", "/docs", "/openapi.json")

# Seconds: a tiny model on a GPU answers in milliseconds, a ViT-g on a CPU in seconds, a slow image URL in tens.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def route_of(path: str) -> str:
    return path if path in ROUTES else "other"


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch the batcher makes, and that batch size itself."""
    edges, b = [], 1
    while b < max_batch_size:
        edges.append(float(b))
        b *= 2
    edges.append(float(max_batch_size))
    return tuple(edges)


class ServeMetrics:
    """The endpoint's counters, histograms and gauges, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int = 32):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dinotrain_serve_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("dinotrain_serve_request_duration_seconds",
                                 "time from a request's arrival to the end of its answer, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("dinotrain_serve_requests_in_flight", "HTTP requests being answered now", registry=r)
        self.queue_depth = Gauge("dinotrain_serve_queue_depth",
                                 "images accepted for embedding that wait for a model forward", registry=r)
        self.batch_size = Histogram("dinotrain_serve_batch_size", "images per model forward",
                                    buckets=batch_buckets(max_batch_size), registry=r)
        self.forward = Histogram("dinotrain_serve_forward_duration_seconds", "time of one model forward (one batch)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("dinotrain_serve_images_embedded", "images embedded; images/s = rate() of it",
                              registry=r)
        self.draining = Gauge("dinotrain_serve_draining", "1 after SIGTERM while in-flight requests are finished",
                              registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
