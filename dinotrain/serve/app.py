"""The embeddings endpoint: the managed "image embeddings" online-endpoint format on FastAPI + uvicorn.

Why FastAPI + uvicorn: a well-kept ASGI stack whose request models give schema errors as 422 with the field named,
an OpenAPI page (`/docs`, `/openapi.json`) for free, and an event loop on which a few lines of asyncio batch
concurrent requests; the serving libraries with built-in batching (Ray Serve, LitServe, TorchServe) each bring a
runtime of their own for what is here one model on one device.

    POST /score   {"input_data": {"columns": ["image"], "index": [0, 1], "data": [["<base64 or URL>"], [...]]}}
             ->   [{"image_features": [... D floats ...]}, ...]     one per row, in the order of `index`
    GET /health   {"status": "ok" | "draining", ...}      liveness; GET /ready: 200, or 503 while draining
    GET /metrics  Prometheus text (metrics.py)

Optional API-key auth (auth.py), request ids, metrics and JSON access logs (observe.py), graceful shutdown on
SIGTERM (shutdown.py).

Features: the CLS token after the final norm, not normalised (as `dinotrain embed`). Images of concurrent requests
are batched together (`max_batch_size`, waiting at most `max_wait_ms` for more); decoding and fetching run in a
thread pool, the model in one worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import time
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import to_rgb
from dinotrain.serve.auth import BearerAuth
from dinotrain.serve.fetch import BadImageInput, UrlPolicy, image_bytes
from dinotrain.serve.metrics import ServeMetrics
from dinotrain.serve.observe import DrainState, Observe

log = logging.getLogger("dinotrain.serve")


@dataclass
class ServeLimits:
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_images_per_request: int = 64
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    url_timeout_s: float = 10.0
    allow_private_urls: bool = False


class InputData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    columns: list[str] = Field(description='must be ["image"]')
    index: list[int]
    data: list[list[str]] = Field(description="one row per image: [base64 string or http(s) URL]")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_data: InputData


class ImageFeatures(BaseModel):
    image_features: list[float]


def decode_image(data: bytes, limits: ServeLimits) -> Image.Image:
    """Bytes -> RGB image, refusing what is not an image or has more pixels than allowed (checked before decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise BadImageInput(f"image of {width}x{height} = {width * height} pixels is more than the limit of "
                                    f"{limits.max_image_pixels}", 413)
            img.load()
            return to_rgb(img)
    except BadImageInput:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImageInput(f"image too large: {exc}", 413) from exc
    except Exception as exc:  # PIL's many decoder errors
        raise BadImageInput(f"not a readable image: {type(exc).__name__}: {exc}") from exc


class Batcher:
    """Collects images of concurrent requests into batches of at most `max_batch_size`, waiting at most
    `max_wait_ms` after the first; the model runs in one worker thread, so the event loop stays free."""

    def __init__(self, model, device: torch.device, limits: ServeLimits, metrics: ServeMetrics | None = None):
        self.model, self.device, self.limits = model, device, limits
        self.metrics = metrics or ServeMetrics(limits.max_batch_size)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0
        self.images = 0
        self.waiting = 0  # images accepted and not yet in a forward: the queue + the batch being collected

    async def embed(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in tensors]
        for tensor, future in zip(tensors, futures):
            self.queue.put_nowait((tensor, future))
        self._waiting(len(tensors))
        return list(await asyncio.gather(*futures))

    def _waiting(self, change: int) -> None:
        self.waiting += change
        self.metrics.queue_depth.set(self.waiting)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until every queued image went through the model: at shutdown, after the
        server has stopped taking requests, so that no accepted request loses its answer to a cancelled worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.waiting and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while len(items) < self.limits.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self._waiting(-len(items))
            items = [(t, f) for t, f in items if not f.done()]  # a cancelled request's images need no forward
            if not items:
                continue
            started = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self._forward, torch.stack([t for t, _ in items]))
            except Exception as exc:  # a model error fails this batch's requests, not the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(items)
            self.metrics.forward.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(items))
            self.metrics.images.inc(len(items))
            for row, (_, future) in zip(out, items):
                if not future.done():
                    future.set_result(row)


def create_app(model, device: torch.device, limits: ServeLimits, resize: int = 256, crop: int = 224,
               description: str = "", api_key: str | None = None, access_log: bool = True) -> FastAPI:
    """The app; `app.state.metrics` (ServeMetrics) and `app.state.drain` (DrainState) are what the server and
    tests reach. With `api_key`, every path but the probes and the API docs needs `Authorization: Bearer <key>`."""
    transform = make_eval_transform(resize_size=resize, crop_size=crop)
    policy = UrlPolicy(allow_private=limits.allow_private_urls, max_bytes=limits.max_image_bytes,
                       timeout_s=limits.url_timeout_s)
    decoders = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="decode")
    metrics, drain = ServeMetrics(limits.max_batch_size), DrainState()
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["batcher"] = Batcher(model, device, limits, metrics)
        task = asyncio.create_task(state["batcher"].run())
        yield
        await state["batcher"].drain(timeout_s=30)
        task.cancel()

    app = FastAPI(title="dinotrain embeddings endpoint", version="1", lifespan=lifespan,
                  description="Image embeddings in the managed online-endpoint format. " + description
                  + (" Needs the header `Authorization: Bearer <key>`." if api_key else ""))
    app.state.metrics, app.state.drain = metrics, drain

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and not (length and length.isdigit()):
            return JSONResponse({"detail": "send the request body with a Content-Length header"}, status_code=411)
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return JSONResponse({"detail": f"request body of {length} bytes is more than the limit of "
                                           f"{limits.max_body_bytes}"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(BadImageInput)
    async def _bad_input(_request: Request, exc: BadImageInput):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def _prepare(item: str) -> torch.Tensor:
        return transform(decode_image(image_bytes(item, policy), limits))

    @app.get("/health")
    async def health() -> dict:
        """Liveness: 200 while the process serves, also while it drains (then "status": "draining")."""
        batcher = state.get("batcher")
        return {"status": "draining" if drain.draining else "ok", "device": str(device),
                "embedding_dim": int(model.embed_dim),
                "batches": batcher.batches if batcher else 0, "images": batcher.images if batcher else 0}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 when new requests are taken, 503 once SIGTERM came (load balancers stop sending)."""
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/score", response_model=list[ImageFeatures])
    async def score(request: ScoreRequest, http: Request) -> list[dict]:
        data = request.input_data
        if data.columns != ["image"]:
            raise BadImageInput(f'input_data.columns must be ["image"], got {data.columns}', 422)
        if len(data.index) != len(data.data):
            raise BadImageInput(f"input_data.index has {len(data.index)} entries but input_data.data has "
                                f"{len(data.data)} rows; they must match", 422)
        if not data.data:
            raise BadImageInput("input_data.data is empty", 422)
        if len(data.data) > limits.max_images_per_request:
            raise BadImageInput(f"{len(data.data)} images in one request, more than the limit of "
                                f"{limits.max_images_per_request}", 413)
        for i, row in enumerate(data.data):
            if len(row) != 1:
                raise BadImageInput(f"input_data.data[{i}] must hold exactly one image (base64 or URL), "
                                    f"got {len(row)} values", 422)
        http.scope.get("dinotrain", {})["images"] = len(data.data)  # for the access log
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        prepared = await asyncio.gather(*(loop.run_in_executor(decoders, _prepare, row[0]) for row in data.data),
                                        return_exceptions=True)
        for i, result in enumerate(prepared):
            if isinstance(result, BadImageInput):
                raise BadImageInput(f"input_data.data[{i}] (index {data.index[i]}): {result}", result.status)
            if isinstance(result, BaseException):
                raise result
        tensors = list(prepared)
        features = await state["batcher"].embed(tensors)
        log.debug("%d image(s) embedded in %.0f ms", len(tensors), 1000 * (time.perf_counter() - started))
        return [{"image_features": f.tolist()} for f in features]

    if api_key:
        _document_bearer_key(app)
    # Added last = outermost: Observe sees every answer (the 401s too), auth runs before any body is read.
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(Observe, metrics=metrics, drain=drain, log_requests=access_log)
    return app


def _document_bearer_key(app: FastAPI) -> None:
    """/docs shows that /score needs a Bearer key (and offers its "Authorize" button); the key itself is not in it."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["paths"]["/score"]["post"]["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
