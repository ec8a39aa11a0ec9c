"""`mnist-cnn serve`: a draw-a-digit page and its JSON API, on Starlette + uvicorn.

    GET  /             the page (static/index.html, app.js, style.css; no CDN, works offline)
    POST /api/predict  multipart field "image" -> predict --json's object + the 28x28 input
    GET  /api/model    model name, parameters, classes, recorded test accuracy
    GET  /healthz      {"status": "ok"}
    GET  /openapi.json the OpenAPI 3.1 contract of all of these (serving/openapi.py)
    GET  /docs         the same as a page

The page only uses the API, and the API only uses inference.predict: an upload is
decoded, checked and preprocessed exactly as `mnist-cnn predict` does a file,
and a refusal is the CLI's own one-line message, with HTTP 400. Nothing from a
request touches the disk: bodies over BODY_LIMIT are refused with 413 before
they are read whole, and what is read stays in memory. At most WORK_SLOTS
uploads are decoded and classified at once (a small PNG may decode to 40 Mpx,
about 0.8 GB while it is read); a request that waits SLOT_WAIT_S for a slot is
answered 503 with a Retry-After header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from torch import nn

from mnist_cnn.data.datasets import Dataset
from mnist_cnn.errors import ConfigError, ImageError
from mnist_cnn.inference.predict import answer, load_digit, predict_probs
from mnist_cnn.networks.builtin import count_parameters
from mnist_cnn.serving.openapi import NAME_LIMIT, document, render

log = logging.getLogger("mnist_cnn")
BODY_LIMIT = 10 * 1024 * 1024  # bytes: a phone photo fits, a flood does not
FIELD = "image"  # the multipart field /api/predict reads
PIXEL_DECIMALS = 4  # the 28x28 input sent back: 4 decimals are finer than its 8-bit source
# uploads decoded and classified at once: each runs on one core (SERVE_THREADS), and one at the
# 40 Mpx limit takes about 0.8 GB and 2.5 s on the 2-core EPYC (benchmarks/serve.py --large)
WORK_SLOTS = max(1, min(4, os.cpu_count() or 1))
SLOT_WAIT_S = 5.0  # a request waits this long for a slot, then gets 503: twice a 40 Mpx image's time
RETRY_AFTER_S = 1  # the 503's Retry-After: a drawn digit takes milliseconds, so a slot is soon free
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "docs.css": "text/css; charset=utf-8",  # the /docs page's
}
# everything comes from this server: no CDN, no inline script; the drawn and dropped images are data:/blob: URLs;
# and no other site may show the page in a frame (clickjacking)
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "frame-ancestors 'none'"
)


class TooLarge(Exception):
    """A request body over BODY_LIMIT."""


class Busy(Exception):
    """No work slot came free within the wait."""


class InMemoryParser(MultiPartParser):
    """Starlette's multipart parser with uploads kept in memory: a part rolls over to a
    temporary file past spool_max_size, and no accepted body is that large."""

    spool_max_size = BODY_LIMIT + 1


def classify(model: nn.Module, dataset: Dataset, data: bytes, name: str) -> dict[str, Any]:
    """Upload bytes -> predict --json's object plus the preprocessed input (runs in a worker thread)."""
    digit = load_digit(data, dataset.preprocessing, source=name)  # (28, 28) in [0, 1]; ImageError if unusable
    probs = predict_probs(model, [digit], (dataset.mean, dataset.std))[0]  # (classes,)
    result = answer(name, probs, dataset.classes)
    result["probabilities"] = [float(q) for q in probs]  # every class, for the page's bar chart
    result["preprocessed"] = np.round(digit, PIXEL_DECIMALS).tolist()  # 28 rows of 28
    return result


def fixed(files: dict[str, bytes], name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of a response made once, from memory: a file of the page, or the API's contract."""

    async def endpoint(request: Request) -> Response:
        return Response(files[name], media_type=media_type, headers={"Cache-Control": "no-cache"})

    return endpoint


def predict_endpoint(
    model: nn.Module, dataset: Dataset, slots: int, wait_s: float
) -> Callable[[Request], Awaitable[Response]]:
    """POST /api/predict: at most `slots` uploads are decoded and classified at once; a request waits `wait_s`."""
    work = asyncio.Semaphore(slots)

    async def classify_in_turn(data: bytes, name: str) -> dict[str, Any]:
        """classify() in a worker thread once a slot is free; Busy if none is within wait_s. A client
        that hangs up does not cancel its request, so the slot stays taken until classify() returns."""
        try:
            await asyncio.wait_for(work.acquire(), wait_s)
        except TimeoutError:
            raise Busy from None
        try:
            return await run_in_threadpool(classify, model, dataset, data, name)
        finally:
            work.release()

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        try:
            name, data = await read_image(request)
            result = await classify_in_turn(data, name)
        except TooLarge:
            return error(413, f"request body larger than the {BODY_LIMIT // 2**20} MB limit")
        except Busy:
            return error(
                503,
                f"server busy: all {slots} image slots stayed taken for {wait_s:g} s; try again in {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        except ImageError as e:
            return error(400, str(e))
        server_ms = 1000 * (time.perf_counter() - start)
        return JSONResponse(result, headers={"Server-Timing": f"predict;dur={server_ms:.2f}"})

    return predict


def create_app(
    model: nn.Module, dataset: Dataset, about: dict[str, Any], *, slots: int = WORK_SLOTS, wait_s: float = SLOT_WAIT_S
) -> Starlette:
    """The ASGI app for one model in eval mode; `about` is what /api/model reports. At most
    `slots` uploads are decoded and classified at once; a request waits `wait_s` for one."""
    files = {name: resources.files("mnist_cnn.serving").joinpath("static", name).read_bytes() for name in ASSETS}

    async def model_info(request: Request) -> Response:
        return JSONResponse(about)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [  # in the order the contract lists them: the API first
        Route("/api/predict", predict_endpoint(model, dataset, slots, wait_s), methods=["POST"]),
        Route("/api/model", model_info),
        Route("/healthz", healthz),
        # the contract describes every route, these two included: their bodies are filled in below
        Route("/openapi.json", fixed(files, "openapi.json", "application/json")),
        Route("/docs", fixed(files, "docs", "text/html; charset=utf-8")),
        Route("/", fixed(files, "index.html", ASSETS["index.html"])),
        *(Route(f"/{name}", fixed(files, name, media)) for name, media in ASSETS.items()),
    ]
    contract = document(
        routes, dataset, ASSETS, field=FIELD, body_limit=BODY_LIMIT, slots=slots, retry_after_s=RETRY_AFTER_S
    )
    files["openapi.json"] = json.dumps(contract).encode()
    files["docs"] = render(contract).encode()
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(SecurityHeaders)
    return app


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405) in the API's shape: {"error": "..."}."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only; Starlette types handlers as Exception
    return JSONResponse(
        {"error": f"{exc.detail}: {request.method} {request.url.path}"},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing one over `limit` bytes: at once when its Content-Length says so,
    otherwise as soon as the streamed chunks pass the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def read_image(request: Request) -> tuple[str, bytes]:
    """(file name, bytes) of the multipart field FIELD; an ImageError says what is wrong."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ImageError(f"send the image as a multipart/form-data field named '{FIELD}'")
    body = await read_body(request, BODY_LIMIT)

    async def chunks():
        yield body

    try:
        form = await InMemoryParser(Headers(raw=request.headers.raw), chunks(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise ImageError(f"malformed multipart body: {e.message}") from None
    upload = form.get(FIELD)
    if upload is None:
        raise ImageError(f"no '{FIELD}' field in the form")
    if not isinstance(upload, UploadFile):
        raise ImageError(f"'{FIELD}' must be a file, not a text field")
    data = await upload.read()
    # the client's file name only names the answer (nothing is written): printable, one line, bounded
    name = "".join(c for c in (upload.filename or FIELD) if c.isprintable())[:NAME_LIMIT] or FIELD
    return name, data


class SecurityHeaders:
    """Pure ASGI middleware: CSP and friends on every response, so the page cannot load
    anything from elsewhere (which is also how the offline test can trust it)."""

    HEADERS = [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.HEADERS
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def describe_model(model: nn.Module, cfg, info: dict[str, Any], dataset: Dataset, checkpoint: str) -> dict[str, Any]:
    """What /api/model reports: the checkpoint's own record, nothing re-measured."""
    final = (info.get("metrics") or [{}])[-1]
    test_acc = final.get("test_acc")
    return {
        "model": cfg.model,
        "parameters": count_parameters(model),
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "checkpoint": checkpoint,
        "epochs": info.get("epoch"),
        "test_accuracy": test_acc if test_acc is not None and np.isfinite(test_acc) else None,
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a one-line ConfigError (port taken, unknown host)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0..65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(app: Starlette, host: str, port: int, banner: str) -> None:
    """Run until Ctrl+C. Binds before printing, so the printed address is the real one (port 0 -> a free port)."""
    import uvicorn

    sock = listen(host, port)
    if not is_loopback(host):
        log.warning(
            "serving on %s: the page and API are reachable from the network by anyone who can reach this machine", host
        )
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"{banner} at http://{shown}:{bound}/  (Ctrl+C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then passes the Ctrl+C on: the normal way to stop
        print("stopped", file=sys.stderr)
