"""`dinotrain serve`: a backbone behind the embeddings endpoint (app.py) on uvicorn, until stopped."""

from __future__ import annotations

from dinotrain.serve.app import ServeLimits, create_app


def serve(weights: str | None, model: str | None, limits: ServeLimits, *, host: str = "127.0.0.1", port: int = 8000,
          image_size: int | None = None, device: str = "auto", precision: str = "auto", runtime: str = "auto") -> None:
    """Check the limits and sizes, build the backbone, print where it serves, then serve (blocks)."""
    import uvicorn

    from dinotrain.eval.features import eval_sizes, pick_eval_device
    from dinotrain.inference import choose, open_features

    resize, crop = eval_sizes(image_size)
    where = pick_eval_device(device)
    choice = choose(precision, runtime, where, weights)  # a combination this machine cannot run: said before any work
    if limits.max_batch_size < 1 or limits.max_wait_ms < 0 or limits.max_images_per_request < 1:
        raise ValueError("--max-batch-size and --max-images-per-request must be >= 1, --max-wait-ms >= 0")
    backbone = open_features(weights, model, where, precision, runtime)
    app = create_app(backbone, where, limits, resize, crop, description=f"Weights: {weights or model}.")
    print(f"serving {weights or model} ({backbone.embed_dim}-dim CLS features, crop {crop}) on {where} "
          f"({choice.runtime} {choice.precision}) at "
          f"http://{host}:{port}/score  (docs: /docs, health: /health; batches of up to "
          f"{limits.max_batch_size}, waiting up to {limits.max_wait_ms:g} ms)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
