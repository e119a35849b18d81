"""`dinotrain serve`: a backbone behind the embeddings endpoint (app.py) on uvicorn, until a signal drains it."""

from __future__ import annotations

import logging
import sys

from dinotrain.serve.app import ServeLimits, create_app


def configure_access_log(enabled: bool) -> None:
    """The access log's JSON lines go to stdout bare (no level or time prefix: the line holds its own time), apart
    from the process's other log lines on stderr, so that a log collector can parse every stdout line as JSON."""
    logger = logging.getLogger("dinotrain.serve.access")
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.CRITICAL + 1)
    if enabled and not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def serve(weights: str | None, model: str | None, limits: ServeLimits, *, host: str = "127.0.0.1", port: int = 8000,
          image_size: int | None = None, device: str = "auto", precision: str = "auto", runtime: str = "auto",
          api_key_env: str | None = None, api_key_file: str | None = None, access_log: str = "json",
          drain_timeout_s: float = 25.0) -> int:
    """Check the limits, sizes, runtime choice and API key, build the backbone, print where it serves, then serve
    until SIGTERM / SIGINT; the exit code says whether every accepted request was answered (shutdown.py)."""
    import uvicorn

    from dinotrain.eval.features import eval_sizes, pick_eval_device
    from dinotrain.inference import choose, open_features
    from dinotrain.serve.auth import load_api_key
    from dinotrain.serve.shutdown import DrainingServer, serve_until_stopped

    api_key = load_api_key(api_key_env, api_key_file)  # before the model: a bad key file fails in a second
    resize, crop = eval_sizes(image_size)
    where = pick_eval_device(device)
    choice = choose(precision, runtime, where, weights)  # a combination this machine cannot run: said before any work
    if limits.max_batch_size < 1 or limits.max_wait_ms < 0 or limits.max_images_per_request < 1:
        raise ValueError("--max-batch-size and --max-images-per-request must be >= 1, --max-wait-ms >= 0")
    if drain_timeout_s <= 0:
        raise ValueError(f"--drain-timeout-s must be > 0, got {drain_timeout_s:g}")
    backbone = open_features(weights, model, where, precision, runtime)
    app = create_app(backbone, where, limits, resize, crop, description=f"Weights: {weights or model}.",
                     api_key=api_key, access_log=access_log == "json")
    configure_access_log(access_log == "json")
    print(f"serving {weights or model} ({backbone.embed_dim}-dim CLS features, crop {crop}) on {where} "
          f"({choice.runtime} {choice.precision}) at "
          f"http://{host}:{port}/score  (docs: /docs, health: /health, metrics: /metrics; batches of up to "
          f"{limits.max_batch_size}, waiting up to {limits.max_wait_ms:g} ms; "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)  # stdout: JSON only
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=drain_timeout_s)
    server = DrainingServer(config, app.state.drain, on_drain=lambda: app.state.metrics.draining.set(1))
    return serve_until_stopped(server)
