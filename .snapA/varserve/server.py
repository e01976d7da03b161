"""HTTP serving: an OpenAI-compatible image API on the async engine (`varserve serve`).

Endpoints
  POST /v1/images/generations  OpenAI's Images API (https://platform.openai.com/docs/api-reference/images/create):
      prompt (required), n (1..8), size, response_format, model, user (accepted, ignored); varserve's
      extensions: seed, cfg, tau, top_p, negative_prompt (see `SamplingParams`). The KV budget is the server's.
      size: 'WIDTHxHEIGHT' from varserve's size table or 'W:H@BUDGET'; OpenAI's sizes map to the table entry
      of the same aspect ratio at the 1024 budget (1792x1024 -> 1344x768, 1536x1024 -> 1248x832, ...) and
      'auto' (or no size) to the engine's default (the model's recommended size, else 1024x1024); `usage.size`
      reports the size made.
      response_format: 'b64_json' (default) or 'png': the raw PNG as the response body (n must be 1; headers
      x-varserve-seed and x-varserve-latency-s). OpenAI's 'url' is not supported.
      seed: image i of the request uses seed + i; without one, each image draws a random seed.
      Answer: {"created": unix time, "data": [{"b64_json": ..., "revised_prompt": null}, ...],
               "usage": {"images": n, "size": made size, "seeds": [...], "latency_s": server time}}.
  GET /v1/models  the served model, in OpenAI's list format.
  GET /health     200 {"status": "ok"}; 503 while shutting down or after the engine loop died.
  GET /metrics    Prometheus text format.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad input, 404 for another
model, 500 when an image failed, 503 with Retry-After when more than --max-queue images would be waiting or
running, 503 while shutting down. A client that disconnects has its images aborted and their pages freed (its
request counts as status 499 in the metrics).

Shutdown (first SIGINT/SIGTERM, or the app's lifespan end): new requests get 503, running ones get up to
--shutdown-timeout seconds to finish, the rest are aborted and answered 503 saying so; then uvicorn exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import logging
import math
import time
import uuid
from collections import Counter, deque
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, AsyncIterator, Callable, Iterable, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from varserve.async_engine import AsyncEngine
from varserve.cli import UsageError, _engine, _engine_args, one_line
from varserve.models.schedule import get_schedule, parse_size, supported_sizes
from varserve.outputs import ImageOutput
from varserve.params import MAX_SEED, SamplingParams

try:  # the `serve` extra; without it the rest of the CLI works and `varserve serve` says what to install
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as exc:
    _MISSING_EXTRA: str | None = exc.name
else:
    _MISSING_EXTRA = None

logger = logging.getLogger("varserve")

IMAGES_PATH = "/v1/images/generations"
MAX_IMAGES = 8  # n at most
OPENAI_SIZES = {"1792x1024", "1024x1792", "1536x1024", "1024x1536"}  # not in the table: mapped by aspect ratio
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0
DEFAULT_MAX_QUEUE = 128
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


# ---- request ----------------------------------------------------------------------------------------------
def resolve_size(size: str) -> str | None:
    """A requested size as a name of varserve's size table, None for 'auto' (the engine's default size);
    ValueError listing what is supported."""
    if size == "auto":
        return None
    if size in OPENAI_SIZES:
        width, height = (int(v) for v in size.split("x"))
        return get_schedule(height / width, 1024).name
    try:
        return parse_size(size).name
    except ValueError:
        raise ValueError(
            f"unsupported size {size!r}; supported: {', '.join(supported_sizes())}, OpenAI's "
            f"{', '.join(sorted(OPENAI_SIZES))} (mapped by aspect ratio), 'auto', or 'W:H@BUDGET' with "
            "BUDGET in 256/512/768/1024"
        ) from None


class ImageGenerationRequest(BaseModel):
    """Body of POST /v1/images/generations: OpenAI's fields, then varserve's sampling extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = None  # None: the engine's default (the model's recommended size, else 1024x1024)
    response_format: Literal["b64_json", "png"] = "b64_json"
    model: str | None = None
    user: str | None = None  # OpenAI's end-user id: accepted and ignored
    seed: int | None = Field(None, ge=0, le=MAX_SEED - (MAX_IMAGES - 1))  # image i uses seed + i
    cfg: float | None = None
    tau: float | None = None
    top_p: float | None = None
    negative_prompt: str | None = None

    @field_validator("size")
    @classmethod
    def _table_size(cls, size: str | None) -> str | None:
        return None if size is None else resolve_size(size)

    @field_validator("response_format", mode="before")
    @classmethod
    def _no_url(cls, value: Any) -> Any:
        if value == "url":
            raise ValueError("'url' is not supported (images are not stored): use 'b64_json' or 'png'")
        return value

    @field_validator("cfg", "tau", "top_p")
    @classmethod
    def _sampling_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None:
            try:
                SamplingParams(**{info.field_name: value})
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"]) from None
        return value

    @model_validator(mode="after")
    def _png_is_one_image(self) -> "ImageGenerationRequest":
        if self.response_format == "png" and self.n != 1:
            raise ValueError(f"response_format 'png' returns one image: n must be 1, got {self.n}")
        return self

    def sampling_params(self, defaults: SamplingParams) -> list[SamplingParams]:
        """One SamplingParams per image, unset fields from `defaults` (the engine's): seeds seed, seed+1, ... (or
        each drawn at random)."""
        given = {k: v for k in ("cfg", "tau", "top_p", "negative_prompt", "size") if (v := getattr(self, k)) is not None}
        return [defaults.updated(**given, seed=None if self.seed is None else self.seed + i) for i in range(self.n)]


# ---- errors -----------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def parse_request(body: bytes) -> ImageGenerationRequest:
    """The JSON body (whatever its Content-Type); a 400 naming every problem, the first bad field as param."""
    try:
        return ImageGenerationRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        raise APIError(400, f"the body is not valid JSON: {detail}", code="invalid_json")
    fields = [".".join(map(str, e["loc"])) for e in errors]
    parts = [f"{f or 'body'}: {e['msg'].removeprefix('Value error, ')}" for f, e in zip(fields, errors)]
    raise APIError(400, "; ".join(parts), param=fields[0] or None)


# ---- metrics ----------------------------------------------------------------------------------------------
class Metrics:
    """Counters of the image endpoint, written in Prometheus' text format by `render`."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests: Counter[int] = Counter()  # by HTTP status
        self.images = 0
        self._finished: deque[float] = deque()  # finish times of the last RATE_WINDOW_S seconds
        self._latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last is +Inf
        self._latency_sum = 0.0

    def count_request(self, status: int, latency_s: float) -> None:
        """One answered request; the latency of successful ones goes to the histogram."""
        self.requests[status] += 1
        if status == 200:
            self._latency_counts[sum(latency_s > b for b in LATENCY_BUCKETS)] += 1
            self._latency_sum += latency_s

    def count_images(self, n: int) -> None:
        self.images += n
        self._finished.extend([time.monotonic()] * n)

    def images_per_second(self) -> float:
        now = time.monotonic()
        while self._finished and self._finished[0] < now - RATE_WINDOW_S:
            self._finished.popleft()
        return len(self._finished) / max(min(RATE_WINDOW_S, now - self.started), 1.0)

    def render(self, cache: dict[str, Any]) -> str:
        cumulative = [sum(self._latency_counts[: i + 1]) for i in range(len(self._latency_counts))]
        buckets = [(f'{{le="{b:g}"}}', c) for b, c in zip(LATENCY_BUCKETS, cumulative)]
        latency = [*buckets, ('{le="+Inf"}', cumulative[-1])]
        lines = [
            *_metric("varserve_requests_total", "counter", "Image generation requests by HTTP status.",
                     [(f'{{status="{s}"}}', c) for s, c in sorted(self.requests.items())]),
            *_metric("varserve_images_generated_total", "counter", "Images generated and answered.",
                     [("", self.images)]),
            *_metric("varserve_images_per_second", "gauge", f"Images per second over the last {RATE_WINDOW_S:g} s.",
                     [("", self.images_per_second())]),
            *_metric("varserve_kv_pages_used", "gauge", "KV cache pages in use.", [("", cache["used_pages"])]),
            *_metric("varserve_kv_pages_total", "gauge", "KV cache pages in the pool.", [("", cache["total_pages"])]),
            *_metric("varserve_num_requests_waiting", "gauge", "Images waiting to start.", [("", cache["waiting"])]),
            *_metric("varserve_num_requests_running", "gauge", "Images running.", [("", cache["running"])]),
            *_metric("varserve_num_requests_decoding", "gauge", "Images decoded and on their way to the host.",
                     [("", cache["decoding"])]),
            *_metric("varserve_request_latency_seconds", "histogram",
                     "Latency of successful image generation requests.",
                     [(f"_bucket{labels}", c) for labels, c in latency]
                     + [("_sum", self._latency_sum), ("_count", cumulative[-1])]),
        ]
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    """One metric family; a sample's first element is its name suffix and/or labels."""
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *(f"{name}{s} {v}" for s, v in samples)]


class _CountRequests:
    """ASGI middleware: counts image requests by status and times them."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != IMAGES_PATH:
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.count_request(status, time.monotonic() - start)


# ---- service ----------------------------------------------------------------------------------------------
def check_limits(max_queue: int, shutdown_timeout: float) -> None:
    if max_queue < 1:
        raise ValueError(f"max_queue (--max-queue) must be >= 1, got {max_queue}")
    if not 0 <= shutdown_timeout < math.inf:
        raise ValueError(f"shutdown_timeout (--shutdown-timeout) must be >= 0 and finite, got {shutdown_timeout}")


class ImageService:
    """Admission, generation and shutdown of image requests, on one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, *, model_name: str, max_queue: int, shutdown_timeout: float):
        check_limits(max_queue, shutdown_timeout)
        self.engine, self.model_name = engine, model_name
        self.max_queue, self.shutdown_timeout = max_queue, shutdown_timeout
        self.metrics = Metrics()
        self.created = int(time.time())
        self.in_flight = 0  # images admitted and not answered yet
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set at startup; signals schedule the drain on it
        self._tasks: set[asyncio.Task[list[ImageOutput]]] = set()
        self._drain: asyncio.Task[None] | None = None

    async def generate(self, request: Request) -> Response:
        start = time.monotonic()
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise APIError(499, "the client closed the request while sending it", code="client_disconnected") from None
        body = parse_request(raw)
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        params = body.sampling_params(self.engine.engine.default_params)
        self._admit(len(params))
        self.in_flight += len(params)
        try:
            outputs = await self._generate_unless_gone(request, body.prompt, params)
        finally:
            self.in_flight -= len(params)
        self.metrics.count_images(len(outputs))
        return await _answer(body.response_format, outputs, start)

    def _admit(self, n: int) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if n > self.max_queue:
            raise APIError(400, f"n={n} is more than this server's queue of {self.max_queue} images", param="n")
        if self.in_flight + n > self.max_queue:
            rate = self.metrics.images_per_second()
            retry = 1 if rate <= 0 else min(60, math.ceil(n / rate))
            raise APIError(503, f"the queue is full ({self.in_flight} of {self.max_queue} images waiting or "
                                f"running); retry later", type="server_error", code="queue_full",
                           headers={"Retry-After": str(retry)})

    async def _generate_unless_gone(self, request: Request, prompt: str,
                                    params: list[SamplingParams]) -> list[ImageOutput]:
        """The images; aborted (their pages freed) when the client disconnects or the drain's grace ends."""
        images = asyncio.create_task(self._generate_all(prompt, params))
        self._tasks.add(images)
        images.add_done_callback(self._tasks.discard)
        disconnect = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({images, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not images.done():
                images.cancel()
                await asyncio.wait({images})
        if images not in done:  # the client went first
            raise APIError(499, "the client closed the request", code="client_disconnected")
        if images.cancelled():  # by the drain
            raise APIError(503, f"the server is shutting down: request aborted after the "
                                f"{self.shutdown_timeout:g} s grace period", type="server_error", code="shutting_down")
        try:
            return images.result()
        except ValueError as exc:  # the engine refused the input (e.g. a prompt over the token limit)
            message = one_line(exc)
            field = next((f for f in ("negative_prompt", "prompt") if message.startswith(f + " ")), None)
            raise APIError(400, message, param=field) from None
        except RuntimeError as exc:  # a failed image
            raise APIError(500, one_line(exc), type="server_error") from None

    async def _generate_all(self, prompt: str, params: list[SamplingParams]) -> list[ImageOutput]:
        """All images of one request, or none: one failing (or a cancel) aborts the others."""
        rid = f"img-{uuid.uuid4().hex}"
        tasks = [asyncio.create_task(self.engine.generate(prompt, p, request_id=f"{rid}-{i}"))
                 for i, p in enumerate(params)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # no-op when all finished; else abort the rest (cancelled once) and wait until they are
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:
            raise errors[0]
        return [t.result() for t in tasks]

    def start_drain(self) -> asyncio.Task[None]:
        """Begin the shutdown (idempotent; on the event loop): from now on new requests get 503."""
        if self._drain is None:
            self.draining = True
            self._drain = asyncio.get_running_loop().create_task(self._drain_requests())
        return self._drain

    async def drain(self) -> None:
        await asyncio.shield(self.start_drain())

    async def _drain_requests(self) -> None:
        if self._tasks:
            logger.info("shutting down: waiting up to %g s for %d request(s)", self.shutdown_timeout, len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
            if late:
                logger.warning("shutting down: aborting %d request(s) still running", len(late))
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
        logger.info("shut down: %d KV pages in use", self.engine.engine.cache_stats()["used_pages"])

    def health(self) -> JSONResponse:
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": str(self.engine.error)}, status_code=503)
        if self.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})


async def _answer(response_format: str, outputs: list[ImageOutput], start: float) -> Response:
    pngs = await asyncio.to_thread(lambda: [_png(o.image) for o in outputs])
    latency = round(time.monotonic() - start, 4)
    if response_format == "png":
        headers = {"x-varserve-seed": str(outputs[0].seed), "x-varserve-latency-s": str(latency)}
        return Response(pngs[0], media_type="image/png", headers=headers)
    data = [{"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None} for png in pngs]
    usage = {"images": len(outputs), "size": outputs[0].size, "seeds": [o.seed for o in outputs], "latency_s": latency}
    return JSONResponse({"created": int(time.time()), "data": data, "usage": usage})


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- app --------------------------------------------------------------------------------------------------
def create_app(engine: AsyncEngine, *, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> FastAPI:
    """The ASGI app; `app.state.service` is its ImageService. Serve it with `make_server`."""
    service = ImageService(engine, model_name=model_name, max_queue=max_queue, shutdown_timeout=shutdown_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.loop = asyncio.get_running_loop()
        yield
        await service.drain()

    app = FastAPI(title="varserve", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_CountRequests, metrics=service.metrics)
    _add_error_handlers(app)

    body_schema = {"content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}

    @app.post(IMAGES_PATH, openapi_extra={"requestBody": {**body_schema, "required": True}})
    async def create_images(request: Request) -> Response:
        return await service.generate(request)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": service.created, "owned_by": "varserve"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> JSONResponse:
        return service.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        text = service.metrics.render(engine.engine.cache_stats())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, f"internal error: {one_line(exc)}", type="server_error").response()


# ---- server -----------------------------------------------------------------------------------------------
def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server whose first SIGINT/SIGTERM (or `server.handle_exit`) drains the service before uvicorn
    shuts down; a later signal goes straight to uvicorn (a second Ctrl+C during its shutdown exits at once)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level.lower()))
    server.handle_exit = _drain_then_exit(app.state.service, server)  # what uvicorn's handlers call
    return server


def _drain_then_exit(service: ImageService, server: uvicorn.Server) -> Callable[[int, FrameType | None], None]:
    exit_now = server.handle_exit

    def handle_exit(sig: int, frame: FrameType | None) -> None:
        if service.draining or service.loop is None:
            server.force_exit = service.draining  # a signal during the drain: uvicorn stops waiting at once
            exit_now(sig, frame)
            return

        def drained(_: asyncio.Future) -> None:
            if not server.should_exit:  # unless a later signal already ended the server
                exit_now(sig, frame)

        service.loop.call_soon_threadsafe(lambda: service.start_drain().add_done_callback(drained))

    return handle_exit


# ---- command line -----------------------------------------------------------------------------------------
def add_serve_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Registers `varserve serve` (`common`: the options every command shares)."""
    p = subparsers.add_parser(
        "serve", parents=[common], help="serve an OpenAI-compatible image API over HTTP",
        description="Serve POST /v1/images/generations (OpenAI's Images API), GET /v1/models, /health and "
                    "/metrics (see varserve/server.py). SIGINT/SIGTERM drains: new requests get 503, running "
                    "ones get --shutdown-timeout seconds, then the rest are aborted.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--served-model-name", help="model id of /v1/models and of requests' `model` (default: --model)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"images waiting or running at most; requests beyond get 503 + Retry-After "
                        f"(default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help=f"seconds running requests get to finish on shutdown (default: {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    _engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if _MISSING_EXTRA is not None:
        raise UsageError(f"{_MISSING_EXTRA} is not installed: pip install 'varserve[serve]'")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    check_limits(args.max_queue, args.shutdown_timeout)  # before the (slow) engine build
    engine = AsyncEngine(_engine(args))
    app = create_app(engine, model_name=args.served_model_name or args.model, max_queue=args.max_queue,
                     shutdown_timeout=args.shutdown_timeout)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl+C it handled, after draining
        make_server(app, args.host, args.port, args.log_level).run()
    return 0
