"""`dinotrain serve`: the HTTP embeddings endpoint (`serve/`)."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_backbone_arguments, add_inference_arguments, inference_options


def add_parser(subparsers) -> None:
    sv = subparsers.add_parser("serve", help="HTTP embeddings endpoint in the managed online-endpoint format "
                                             "(POST /score, GET /health, /docs)")
    add_backbone_arguments(sv)
    add_inference_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch-size", type=int, default=32, help="images per forward, across concurrent requests "
                                                                   "(1: no batching)")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more images")
    sv.add_argument("--allow-private-urls", action="store_true",
                    help="let image URLs reach loopback, private, link-local and metadata addresses")
    sv.add_argument("--image-size", type=int, help="centre crop after a bicubic resize (default 224, as embed)")
    sv.add_argument("--max-images-per-request", type=int, default=64)
    sv.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    sv.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    sv.add_argument("--max-image-pixels", type=int, default=40_000_000)
    sv.add_argument("--url-timeout-s", type=float, default=10.0)
    sv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinotrain.serve.app import ServeLimits
    from dinotrain.serve.run import serve

    limits = ServeLimits(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         max_images_per_request=args.max_images_per_request, max_body_bytes=args.max_body_bytes,
                         max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                         url_timeout_s=args.url_timeout_s, allow_private_urls=args.allow_private_urls)
    serve(args.weights, args.model, limits, host=args.host, port=args.port, image_size=args.image_size,
          device=getattr(args, "device", "auto"), **inference_options(args))
    return 0
