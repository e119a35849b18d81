"""`dinotrain serve`: the HTTP embeddings endpoint (`serve/`)."""

from __future__ import annotations

import argparse

from dinotrain.cli.common import add_backbone_arguments, add_inference_arguments, inference_options


def add_parser(subparsers) -> None:
    sv = subparsers.add_parser("serve", help="HTTP embeddings endpoint in the managed online-endpoint format "
                                             "(POST /score, GET /health, /ready, /metrics, /docs)")
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
    key = sv.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", metavar="NAME",
                     help="require the header 'Authorization: Bearer <key>' (on all but /health, /ready, /docs), the "
                          "key read from the environment variable NAME (default: no key needed)")
    key.add_argument("--api-key-file", metavar="PATH",
                     help="as --api-key-env, the key read from a file (one line; e.g. a mounted secret)")
    sv.add_argument("--access-log", choices=["json", "off"], default="json",
                    help="one JSON line per request on stdout: time, method, path, status, latency_ms, images, "
                         "client, request_id (default json)")
    sv.add_argument("--drain-timeout-s", type=float, default=25.0,
                    help="on SIGTERM/SIGINT: refuse new requests, answer those accepted, exit 0; exit 1 if that takes "
                         "longer than this (default 25: under Kubernetes' default 30-s terminationGracePeriodSeconds)")
    sv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinotrain.serve.app import ServeLimits
    from dinotrain.serve.run import serve

    limits = ServeLimits(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         max_images_per_request=args.max_images_per_request, max_body_bytes=args.max_body_bytes,
                         max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                         url_timeout_s=args.url_timeout_s, allow_private_urls=args.allow_private_urls)
    return serve(args.weights, args.model, limits, host=args.host, port=args.port, image_size=args.image_size,
                 device=getattr(args, "device", "auto"), api_key_env=args.api_key_env, api_key_file=args.api_key_file,
                 access_log=args.access_log, drain_timeout_s=args.drain_timeout_s,
                 **inference_options(args))
