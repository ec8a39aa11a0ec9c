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
they are read whole, and what is read stays in memory. What a request may take
is a Limits (serving/limits.py): a body (over 64 kB) is read only once the budget
for bodies in memory has room for it, within a deadline (408); at most `slots` uploads are
decoded and classified at once; a request that waits wait_s for either is
answered 503 with a Retry-After header. A refused upload keeps nothing: its
error crosses back from the worker thread as a message, not as an exception
whose traceback holds the decoded arrays. A client that hangs up is one log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import sys
import time
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from torch import nn

from mnist_cnn.checkpoint import Checkpoint
from mnist_cnn.data.datasets import Dataset
from mnist_cnn.errors import ConfigError, ImageError
from mnist_cnn.inference.predict import answer, load_digit, predict_probs
from mnist_cnn.networks.builtin import count_parameters
from mnist_cnn.serving.limits import BODY_LIMIT, RETRY_AFTER_S, UNBUDGETED, Budget, Limits, server_protocol
from mnist_cnn.serving.openapi import NAME_LIMIT, document, render

log = logging.getLogger("mnist_cnn")
FIELD = "image"  # the multipart field /api/predict reads
PIXEL_DECIMALS = 4  # the 28x28 input sent back: 4 decimals are finer than its 8-bit source
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


class Refused(Exception):
    """A request answered with an error: its status, one-line message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


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


def classify_or_refuse(model: nn.Module, dataset: Dataset, data: bytes, name: str) -> dict[str, Any] | str:
    """classify() for a worker thread; a refusal comes back as its message (a str). An exception
    that crossed the thread would sit in a reference cycle with the future that carried it, its
    traceback holding every full-size array of the request (150 MB for a 12 Mpx photo) until the
    garbage collector's next full pass; returned here, it is freed as this function returns."""
    try:
        return classify(model, dataset, data, name)
    except ImageError as e:
        return str(e)
    except Exception as e:  # a bug: uvicorn answers 500 and logs where it happened, without the arrays
        traceback.clear_frames(e.__traceback__)
        raise


def fixed(files: dict[str, bytes], name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of a response made once, from memory: a file of the page, or the API's contract."""

    async def endpoint(request: Request) -> Response:
        return Response(files[name], media_type=media_type, headers={"Cache-Control": "no-cache"})

    return endpoint


def busy(reason: str) -> Refused:
    return Refused(503, f"server busy: {reason}; try again in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})


async def acquired(work: asyncio.Semaphore, wait_s: float) -> bool:
    """A work slot within wait_s, or False (the TimeoutError ends here, holding nothing of the request)."""
    try:
        await asyncio.wait_for(work.acquire(), wait_s)
    except TimeoutError:
        return False
    return True


def predict_endpoint(
    model: nn.Module, dataset: Dataset, limits: Limits, budget: Budget
) -> Callable[[Request], Awaitable[Response]]:
    """POST /api/predict: a body is read once `budget` has room for it, and classified in a work slot."""
    work = asyncio.Semaphore(limits.slots)

    async def classify_in_turn(data: bytes, name: str) -> dict[str, Any]:
        """classify() in a worker thread once a slot is free. A client that hangs up does not cancel
        its request, so the slot stays taken until classify() returns."""
        if not await acquired(work, limits.wait_s):
            raise busy(f"all {limits.slots} image slots stayed taken for {limits.wait_s:g} s")
        try:
            outcome = await run_in_threadpool(classify_or_refuse, model, dataset, data, name)
        finally:
            work.release()
        if isinstance(outcome, str):
            raise ImageError(outcome)
        return outcome

    async def answer_upload(request: Request) -> dict[str, Any]:
        size = reservation(request)  # before any of the body is read
        if not await budget.take(size, limits.wait_s):
            mb = limits.body_budget / 2**20
            raise busy(f"the {mb:g} MB for request bodies stayed taken for {limits.wait_s:g} s")
        try:  # the reservation is held until the answer: the upload's bytes live until then
            name, data = await read_image(request, limits.read_s)
            return await classify_in_turn(data, name)
        finally:
            budget.give(size)

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        try:
            result = await answer_upload(request)
        except Refused as e:
            return error(e.status, str(e), e.headers)
        except ImageError as e:
            return error(400, str(e))
        except ClientDisconnect:  # an everyday event, not a server fault: one line, no traceback
            log.info("%s hung up before its upload arrived whole", client_name(request))
            return error(400, "client hung up")  # uvicorn drops an answer to a closed connection
        server_ms = 1000 * (time.perf_counter() - start)
        return JSONResponse(result, headers={"Server-Timing": f"predict;dur={server_ms:.2f}"})

    return predict


def create_app(model: nn.Module, dataset: Dataset, about: dict[str, Any], *, limits: Limits = Limits()) -> Starlette:
    """The ASGI app for one model in eval mode; `about` is what /api/model reports, `limits` what a
    request may take (app.state.limits, which server_config() reads for the connection deadline;
    app.state.budget is what is left of the bodies' budget)."""
    budget = Budget(limits.body_budget)
    files = {name: resources.files("mnist_cnn.serving").joinpath("static", name).read_bytes() for name in ASSETS}

    async def model_info(request: Request) -> Response:
        return JSONResponse(about)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [  # in the order the contract lists them: the API first
        Route("/api/predict", predict_endpoint(model, dataset, limits, budget), methods=["POST"]),
        Route("/api/model", model_info),
        Route("/healthz", healthz),
        # the contract describes every route, these two included: their bodies are filled in below
        Route("/openapi.json", fixed(files, "openapi.json", "application/json")),
        Route("/docs", fixed(files, "docs", "text/html; charset=utf-8")),
        Route("/", fixed(files, "index.html", ASSETS["index.html"])),
        *(Route(f"/{name}", fixed(files, name, media)) for name, media in ASSETS.items()),
    ]
    contract = document(routes, dataset, ASSETS, field=FIELD, body_limit=BODY_LIMIT, limits=limits)
    files["openapi.json"] = json.dumps(contract).encode()
    files["docs"] = render(contract).encode()
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.limits, app.state.budget = limits, budget
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


def client_name(request: Request) -> str:
    return f"client {request.client.host}:{request.client.port}" if request.client else "a client"


def reservation(request: Request) -> int:
    """The bytes of budget the body needs, from its head alone: its Content-Length (none up to
    UNBUDGETED), or BODY_LIMIT when it is sent in chunks. An ImageError if it is not a form;
    Refused (413) if it declares more than BODY_LIMIT."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ImageError(f"send the image as a multipart/form-data field named '{FIELD}'")
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():  # chunked: refused as soon as the chunks pass the limit
        return BODY_LIMIT
    if int(declared) > BODY_LIMIT:
        raise too_large()
    return int(declared) if int(declared) > UNBUDGETED else 0


def too_large() -> Refused:
    return Refused(413, f"request body larger than the {BODY_LIMIT // 2**20} MB limit")


async def limited(chunks: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks as they arrive, refusing (413) as soon as they pass `limit` bytes."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large()
        yield chunk


async def read_form(request: Request) -> FormData:
    """The multipart form, parsed as its chunks arrive (no second copy of the whole body);
    an ImageError if it is malformed."""
    parser = InMemoryParser(
        Headers(raw=request.headers.raw), limited(request.stream(), BODY_LIMIT), max_files=1, max_fields=8
    )
    try:
        return await parser.parse()
    except MultiPartException as e:
        message = e.message
    raise ImageError(f"malformed multipart body: {message}")  # raised here, it carries no parser state


async def read_image(request: Request, read_s: float) -> tuple[str, bytes]:
    """(file name, bytes) of the multipart field FIELD, read within read_s (else Refused, 408, and the
    connection closed: the rest of the body is not wanted); an ImageError says what is wrong."""
    try:
        async with asyncio.timeout(read_s):
            form = await read_form(request)
    except TimeoutError:
        form = None
    if form is None:
        raise Refused(408, f"the request body did not arrive within {read_s:g} s", {"Connection": "close"})
    upload = form.get(FIELD)
    if upload is None:
        raise ImageError(f"no '{FIELD}' field in the form")
    if not isinstance(upload, UploadFile):
        raise ImageError(f"'{FIELD}' must be a file, not a text field")
    data = await upload.read()
    await form.close()  # the parser's copy goes now, not when the request ends
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


def describe_model(model: nn.Module, cfg, ckpt: Checkpoint, dataset: Dataset, checkpoint: str) -> dict[str, Any]:
    """What /api/model reports: the checkpoint's own record, nothing re-measured."""
    test_acc = ckpt.final.get("test_acc")
    return {
        "model": cfg.model,
        "parameters": count_parameters(model),
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "checkpoint": checkpoint,
        "epochs": ckpt.epoch,
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


def server_config(app: Starlette, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for the app: quiet (no access log), and HTTP/1.1 with the deadline of the
    app's limits on each request's head (uvicorn has none of its own)."""
    protocol = server_protocol(app.state.limits.read_s)
    return uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, **options)


def serve(app: Starlette, host: str, port: int, banner: str) -> None:
    """Run until Ctrl+C. Binds before printing, so the printed address is the real one (port 0 -> a free port)."""
    sock = listen(host, port)
    if not is_loopback(host):
        log.warning(
            "serving on %s: the page and API are reachable from the network by anyone who can reach this machine", host
        )
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"{banner} at http://{shown}:{bound}/  (Ctrl+C stops)", flush=True)
    try:
        uvicorn.Server(server_config(app, timeout_graceful_shutdown=2)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then passes the Ctrl+C on: the normal way to stop
        print("stopped", file=sys.stderr)
