"""serve's API on a real uvicorn server in a subprocess: the same answers and the same
one-line refusals as `mnist-cnn predict`, 413 before a large body is read, nothing on disk;
and on in-process servers with small limits: memory bounded by the work (a refusal keeps
nothing, bodies wait for the budget), deadlines on slow clients, one line for a hang-up."""

from __future__ import annotations

import asyncio
import gc
import http.client
import io
import json
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from conftest import served, synthetic_digits
from mnist_cnn.checkpoint import load_model_file
from mnist_cnn.cli import main
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.inference.predict import MAX_PIXELS, load_digit, predict_probs
from mnist_cnn.serving.app import InMemoryParser, create_app, is_loopback, listen, server_config
from mnist_cnn.serving.limits import BODY_LIMIT, RETRY_AFTER_S, UNBUDGETED, Limits

CONCURRENT = 50
QUEUED = 3  # requests that find the one slot taken
PART_START = b'--b\r\nContent-Disposition: form-data; name="image"; filename="slow.png"\r\n\r\n'  # boundary b
PART_END = b"\r\n--b--\r\n"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data form; a None file name makes a text field."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        parts.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
            + (b"Content-Type: application/octet-stream\r\n" if filename is not None else b"")
            + b"\r\n"
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(
    url: str, method: str, path: str, body: bytes | None = None, content_type: str | None = None
) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request on a fresh connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def post_image(url: str, data: bytes, filename: str = "digit.png") -> tuple[int, dict, dict]:
    body, content_type = multipart({"image": (filename, data)})
    return request(url, "POST", "/api/predict", body, content_type)


def cli_error(checkpoint: Path, name: str, capsys) -> str:
    """The one-line message `mnist-cnn predict CHECKPOINT NAME` prints (NAME in the working folder)."""
    assert main(["predict", str(checkpoint), name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err.removeprefix("error: ")


def test_health_and_model_report_the_checkpoint(server):
    url, checkpoint, _ = server
    assert request(url, "GET", "/healthz")[::2] == (200, {"status": "ok"})
    status, _, about = request(url, "GET", "/api/model")
    model, cfg, ckpt = load_model_file(checkpoint)
    assert status == 200
    assert about["model"] == cfg.model == "seed"
    assert about["parameters"] == sum(p.numel() for p in model.parameters()) == 16_426
    assert about["classes"] == [str(d) for d in range(10)] and about["dataset"] == "mnist"
    assert about["test_accuracy"] == pytest.approx(ckpt.final["test_acc"]) and about["epochs"] == ckpt.epoch == 2


def test_a_prediction_is_the_clis_answer_plus_the_input_the_network_saw(server, tmp_path, capsys):
    url, checkpoint, _ = server
    images, _ = synthetic_digits(3, seed=5)
    paths = []
    for i, a in enumerate(images):  # one MNIST-like, two that need the full preprocessing (dark on light, large)
        img = Image.fromarray(a) if i == 0 else Image.fromarray(255 - a).resize((28 * (i + 2),) * 2)
        paths.append(tmp_path / f"d{i}.png")
        img.save(paths[-1])
    assert (
        main(["predict", str(checkpoint), *map(str, paths), "--json", "--save-preprocessed", str(tmp_path / "pre")])
        == 0
    )
    cli = json.loads(capsys.readouterr().out)
    for i, (path, expected) in enumerate(zip(paths, cli)):
        status, headers, got = post_image(url, path.read_bytes(), path.name)
        assert status == 200, got
        assert {k: got[k] for k in ("digit", "label")} == {k: expected[k] for k in ("digit", "label")}
        assert got["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert [t["digit"] for t in got["top3"]] == [t["digit"] for t in expected["top3"]]
        assert got["image"] == path.name
        assert len(got["probabilities"]) == 10 and sum(got["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert max(got["probabilities"]) == pytest.approx(got["probability"])
        seen = np.array(got["preprocessed"])
        saved = np.asarray(Image.open(tmp_path / "pre" / f"{i:03d}_{path.stem}.png"), dtype=np.float32) / 255
        assert seen.shape == (28, 28) and 0 <= seen.min() and seen.max() <= 1
        assert np.abs(seen - saved).max() <= 0.5 / 255 + 1e-4  # the CLI's PNG rounds to 8 bits
        assert headers["server-timing"].startswith("predict;dur=")


def bad_inputs(folder: Path) -> dict[str, bytes]:
    """name -> file bytes that predict refuses."""
    huge = Image.new("1", (6400, 6400))  # 41 Mpx, a few kB as PNG
    assert huge.size[0] * huge.size[1] > MAX_PIXELS
    return {
        "notes.png": b"this is not an image at all\n",
        "empty.png": b"",
        "blank.png": png_bytes(Image.new("RGB", (280, 280), "white")),  # the page's canvas, nothing drawn
        "tiny.png": png_bytes(Image.new("L", (5, 5), 255)),
        "huge.png": png_bytes(huge),
    }


def test_every_bad_image_is_a_400_with_the_clis_message(server, tmp_path, capsys, monkeypatch):
    url, checkpoint, _ = server
    monkeypatch.chdir(tmp_path)
    for name, data in bad_inputs(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        status, _, body = post_image(url, data, name)
        assert status == 400, (name, body)
        assert body == {"error": cli_error(checkpoint, name, capsys)}, name
    assert "empty file" in post_image(url, b"", "empty.png")[2]["error"]
    assert "no ink" in post_image(url, (tmp_path / "blank.png").read_bytes())[2]["error"]
    assert request(url, "GET", "/healthz")[0] == 200  # still answering


def test_malformed_requests_are_400_not_500(server):
    url, _, _ = server
    cases = [
        multipart({"picture": ("a.png", b"x")}),  # no "image" field
        multipart({"image": (None, b"text")}),  # a text field, not a file
        (b"image=abc", "application/x-www-form-urlencoded"),
        (b"--nope\r\n", "multipart/form-data; boundary=x"),
        (b"", "multipart/form-data"),
    ]  # no boundary
    for body, content_type in cases:
        status, _, answer = request(url, "POST", "/api/predict", body, content_type)
        assert status == 400 and "\n" not in answer["error"], (content_type, answer)
    assert request(url, "GET", "/api/predict")[0] == 405
    assert request(url, "GET", "/no-such-page")[0] == 404
    assert request(url, "GET", "/healthz")[0] == 200


def raw_exchange(url: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a hand-made request (head, then body parts as far as the server takes them); the response."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: it did not want the rest
        response = b""
        while not complete(response):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        return response


def complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(sep) and bool(lengths) and len(body) >= int(lengths[0])


def test_a_body_over_the_limit_is_413_before_it_is_read_whole(server):
    url, _, _ = server
    host = urlsplit(url).netloc
    # the Content-Length says 11 MB but only 1 kB is sent: a server that read it whole would wait forever
    declared = BODY_LIMIT + 2**20
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    response = raw_exchange(url, head, [b"x" * 1024])
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"error":"request body larger than the 10 MB limit"' in response
    # chunked, no length given: refused as soon as the chunks pass the limit (a well-formed form so far:
    # the form is parsed as it arrives, so one malformed from its first bytes is a 400 at once)
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"x" * 2**20
    chunks = [f"{len(data):x}\r\n".encode() + data + b"\r\n" for data in [PART_START, *[chunk] * 12]] + [b"0\r\n\r\n"]
    assert raw_exchange(url, head, chunks).startswith(b"HTTP/1.1 413")
    garbage = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 12 + [b"0\r\n\r\n"]
    assert b"malformed multipart body" in raw_exchange(url, head, garbage)
    assert request(url, "GET", "/healthz")[0] == 200


def parse_upload(parser_class, body: bytes, content_type: str):
    """The UploadFile that `parser_class` makes of the field "image" in `body`."""

    async def chunks():
        yield body

    async def parse():
        return await parser_class(Headers({"content-type": content_type}), chunks()).parse()

    return asyncio.run(parse())["image"]


def test_nothing_from_a_request_is_written_to_disk(server):
    """A 9 MB upload is far past Starlette's 1 MB spool: stock Starlette would roll it over to a
    temporary file (unnamed, so the folder check alone could not see it); serve keeps it in memory."""
    url, _, workdir = server
    noise = np.random.default_rng(0).integers(0, 256, 9 * 2**20, dtype=np.uint8).tobytes()
    status, _, body = post_image(url, noise, "noise.png")
    assert status == 400 and "not an image" in body["error"]
    assert list(workdir.iterdir()) == []  # the server's working and temporary folder
    form, content_type = multipart({"image": ("noise.png", noise)})
    assert parse_upload(MultiPartParser, form, content_type).file._rolled  # the stock parser: on disk
    kept = parse_upload(InMemoryParser, form, content_type)
    assert not kept.file._rolled and kept.size == len(noise)


def test_concurrent_requests_each_get_their_own_answer(server):
    url, checkpoint, _ = server
    pngs = [png_bytes(Image.fromarray(a)) for a in synthetic_digits(CONCURRENT, seed=9)[0]]
    model, _, _ = load_model_file(checkpoint)
    expected = predict_probs(model, [load_digit(png) for png in pngs])  # (50, 10), one at a time in-process
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda i: post_image(url, pngs[i], f"{i}.png"), range(CONCURRENT)))
    assert all(status == 200 for status, _, _ in answers)
    for i, (_, _, got) in enumerate(answers):
        assert got["image"] == f"{i}.png"
        assert got["digit"] == int(expected[i].argmax())
        assert torch.tensor(got["probabilities"]) == pytest.approx(expected[i], abs=1e-5)


@contextmanager
def in_process(app):
    """`app` on a real uvicorn server in a thread of this process, so that a test can patch
    what it calls; yields its base URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app))  # serve()'s settings: the head's deadline too
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_a_request_that_finds_no_free_slot_is_a_503_and_the_server_recovers(synthetic_run, monkeypatch):
    """One slot, held by a request whose inference is stalled until the test lets it go: the
    requests behind it wait their 0.2 s and get 503, JSON and Retry-After; then it answers 200,
    and the slot is free again, after an answer and after a refusal alike."""
    from mnist_cnn.serving import app as server

    model, cfg, _ = load_model_file(synthetic_run[1] / "last.pt")
    inside, release = threading.Event(), threading.Event()

    def stalled(*args, **kwargs):
        inside.set()
        assert release.wait(timeout=60)
        return predict_probs(*args, **kwargs)

    monkeypatch.setattr(server, "predict_probs", stalled)
    png = png_bytes(Image.fromarray(synthetic_digits(1, seed=4)[0][0]))
    app = create_app(model, get_dataset(cfg.dataset), {}, limits=Limits(slots=1, wait_s=0.2))
    with in_process(app) as url, ThreadPoolExecutor(1 + QUEUED) as pool:
        try:
            first = pool.submit(post_image, url, png, "first.png")
            assert inside.wait(timeout=60)  # the first request holds the slot
            queued = [pool.submit(post_image, url, png, f"q{i}.png") for i in range(QUEUED)]
            refused = [f.result(timeout=10) for f in queued]  # without a bound they would wait for `release`
        finally:
            release.set()
        status, _, answer = first.result(timeout=60)
        assert status == 200 and answer["image"] == "first.png"
        for status, headers, body in refused:
            assert status == 503, body
            assert body == {
                "error": f"server busy: all 1 image slots stayed taken for 0.2 s; try again in {RETRY_AFTER_S} s"
            }
            assert headers["retry-after"] == str(RETRY_AFTER_S)
        assert post_image(url, png, "after.png")[0] == 200
        assert post_image(url, b"not an image", "bad.png")[0] == 400
        assert post_image(url, png, "after-bad.png")[0] == 200
        assert request(url, "GET", "/healthz")[0] == 200


@pytest.fixture(scope="module")
def model_and_dataset(synthetic_run):
    """(model, data set) of the synthetic run, for apps built in-process with their own limits."""
    model, cfg, _ = load_model_file(synthetic_run[1] / "last.pt")
    return model, get_dataset(cfg.dataset)


def conforms(doc: dict, schema: str, instance) -> None:
    """jsonschema's 2020-12 validator (OpenAPI 3.1's dialect) on one body; ValidationError if it does not fit."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


def upload_head(url: str, length: int) -> bytes:
    """The head of a POST /api/predict whose multipart body (boundary b) declares `length` bytes."""
    return (
        f"POST /api/predict HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset, when it closed with
    bytes of ours unread, is a close too)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_refused_large_photo_leaves_none_of_its_arrays_in_memory(model_and_dataset, monkeypatch):
    """A 12 Mpx photo of a blank page is refused (no ink). The full-size array preprocessing made
    of it (48 MB) must be gone when the answer arrives, with the cyclic garbage collector off: an
    ImageError that crossed the worker thread kept it alive through its traceback, in a reference
    cycle with the future that carried it, until the collector's next full pass (150 MB a photo).
    The same holds for an unexpected error (a bug, answered 500)."""
    from mnist_cnn.inference import predict as predicting

    arrays, foreground = [], predicting.foreground

    def watched(gray, source):
        arrays.append(weakref.ref(gray))
        if source == "bug.png":
            raise RuntimeError("a bug in preprocessing")
        return foreground(gray, source)

    monkeypatch.setattr(predicting, "foreground", watched)
    page = png_bytes(Image.new("L", (4000, 3000), 235))  # 12 Mpx, light gray paper, nothing written
    body, content_type = multipart({"image": ("bug.png", page)})
    gc.collect()
    gc.disable()
    try:
        with in_process(create_app(*model_and_dataset, {})) as url:
            for i in range(2):
                status, _, answer = post_image(url, page, "page.png")
                assert status == 400 and "no ink found" in answer["error"]
                assert arrays[i]() is None, f"refusal {i + 1} still holds its 4000x3000 array"
            parts = urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            conn.request("POST", "/api/predict", body=body, headers={"Content-Type": content_type})
            assert conn.getresponse().status == 500
            conn.close()
            assert arrays[2]() is None, "the 500's traceback still holds the array"
    finally:
        gc.enable()


def test_bodies_beyond_the_budget_get_503_unread_and_the_budget_comes_back(model_and_dataset):
    """The budget holds two maximum-size bodies: two uploads that declare BODY_LIMIT bytes and are
    still arriving fill it, so a third of 1 MB waits its 0.3 s and gets 503 with Retry-After (as
    the contract says) without its body being read, while a drawn digit (a few kB, under
    UNBUDGETED) is still answered. Then the two finish (400: not an image) and their share of the
    budget is free again."""
    app = create_app(*model_and_dataset, {}, limits=Limits(body_budget=2 * BODY_LIMIT, wait_s=0.3))
    png = png_bytes(Image.fromarray(synthetic_digits(1, seed=4)[0][0]))
    photo = bytes(2**20)
    filler = b"x" * (BODY_LIMIT - len(PART_START) - len(PART_END))
    with in_process(app) as url, connect(url) as first, connect(url) as second:
        contract = request(url, "GET", "/openapi.json")[2]
        for sock in (first, second):
            sock.sendall(upload_head(url, BODY_LIMIT) + PART_START)
        wait_for(lambda: app.state.budget.free == 0)
        status, headers, body = post_image(url, photo, "third.png")
        assert status == 503, body
        assert body == {"error": "server busy: the 20 MB for request bodies stayed taken for 0.3 s; try again in 1 s"}
        assert headers["retry-after"] == str(RETRY_AFTER_S)
        conforms(contract, "Error", body)
        assert "Retry-After" in contract["paths"]["/api/predict"]["post"]["responses"]["503"]["headers"]
        assert post_image(url, png, "drawn.png")[0] == 200 and len(png) < UNBUDGETED
        for sock in (first, second):
            sock.sendall(filler + PART_END)
            answer = b""
            while not complete(answer):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 400") and b"slow.png: not an image" in answer, answer[:300]
        assert app.state.budget.free == 2 * BODY_LIMIT
        status, _, body = post_image(url, photo, "again.png")  # read now: a 400 from the image check, not a 503
        assert status == 400 and "again.png: not an image" in body["error"]


def trickle(sock: socket.socket, data: bytes, every_s: float) -> int:
    """Send `data` a byte every `every_s` s until the server closes the connection; the bytes sent by then."""
    for i in range(len(data)):
        if select.select([sock], [], [], every_s)[0]:  # readable: an answer, or the server's close
            return i
        sock.sendall(data[i : i + 1])
    return len(data)


def test_a_slow_client_is_cut_off_at_the_read_deadline(model_and_dataset):
    """read_s = 0.5: a body that stops arriving is answered 408 (the contract's Error, with
    Connection: close) and its connection closed; a head sent a byte every 50 ms is closed
    unanswered at the deadline, however it trickles, and so is a connection that sends nothing;
    the server keeps answering."""
    app = create_app(*model_and_dataset, {}, limits=Limits(read_s=0.5))
    with in_process(app) as url, connect(url) as idle:
        contract = request(url, "GET", "/openapi.json")[2]
        with connect(url) as sock:
            start = time.monotonic()
            sock.sendall(upload_head(url, 100_000) + PART_START + b"x" * 1000)
            response = until_closed(sock)
            waited = time.monotonic() - start
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), response[:300]
        assert json.loads(body) == {"error": "the request body did not arrive within 0.5 s"}
        conforms(contract, "Error", json.loads(body))
        assert "408" in contract["paths"]["/api/predict"]["post"]["responses"]
        assert 0.5 <= waited < 5
        head = upload_head(url, 100)
        with connect(url) as sock:
            start = time.monotonic()
            sent = trickle(sock, head, every_s=0.05)
            assert until_closed(sock) == b""  # closed, no answer
            waited = time.monotonic() - start
        assert sent < len(head) and 0.5 <= waited < 5, (sent, waited)
        assert until_closed(idle) == b""  # a connection that never sent anything is closed too
        assert request(url, "GET", "/healthz")[0] == 200


class Records(logging.Handler):
    """Every record it sees once, though it listens to a logger and to that logger's parents."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(record is seen for seen in self.records):
            self.records.append(record)


def test_a_client_that_hangs_up_mid_upload_is_one_log_line(model_and_dataset):
    """One INFO line naming the client, no traceback, in our logger, uvicorn's or any other
    (Starlette's ClientDisconnect used to reach uvicorn, which logged it as an ERROR with 40 lines
    of stack). The listeners go on once the server runs: uvicorn's start resets its loggers."""
    app = create_app(*model_and_dataset, {})
    caught = Records()
    loggers = [logging.getLogger(name) for name in ("mnist_cnn", "uvicorn", "")]
    level = loggers[0].level
    loggers[0].setLevel(logging.INFO)  # as the CLI sets it
    try:
        with in_process(app) as url:
            for logger in loggers:
                logger.addHandler(caught)
            with connect(url) as sock:
                sock.sendall(upload_head(url, 100_000) + PART_START + b"x" * 1000)
                wait_for(lambda: app.state.budget.free < app.state.limits.body_budget)  # being read
            wait_for(lambda: caught.records)
            time.sleep(0.5)  # room for a second line, if there were one
            assert request(url, "GET", "/healthz")[0] == 200
    finally:
        loggers[0].setLevel(level)
        for logger in loggers:
            logger.removeHandler(caught)
    assert len(caught.records) == 1, [r.getMessage()[:200] for r in caught.records]
    record = caught.records[0]
    assert record.levelno == logging.INFO and record.exc_info is None
    message = record.getMessage()
    assert "\n" not in message and message.startswith("client 127.0.0.1:") and "hung up" in message


def test_every_response_carries_the_security_headers(server):
    """The page may load nothing from elsewhere and may not be framed by another site (clickjacking)."""
    url, _, _ = server
    parts = urlsplit(url)
    for method, path in [
        ("GET", "/"),
        ("GET", "/app.js"),
        ("GET", "/api/model"),
        ("POST", "/api/predict"),
        ("GET", "/no-such-page"),
    ]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            csp = [d.strip() for d in response.getheader("content-security-policy", "").split(";")]
            assert "frame-ancestors 'none'" in csp, (path, csp)
            assert "default-src 'self'" in csp and "object-src 'none'" in csp
            assert response.getheader("x-content-type-options") == "nosniff"
            assert response.getheader("referrer-policy") == "no-referrer"
        finally:
            conn.close()


def test_serve_refuses_a_bad_checkpoint_and_a_taken_port_in_one_line(synthetic_run, tmp_path):
    checkpoint = synthetic_run[1] / "last.pt"
    missing = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "serve", str(tmp_path / "nope.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.pt" in missing.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "mnist_cnn", "serve", str(checkpoint), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert busy.returncode == 2 and busy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert busy.stderr.count("\n") == 1


def test_a_non_loopback_host_gets_a_one_line_warning(synthetic_run, monkeypatch, capsys):
    """--host 0.0.0.0 warns; the test binds loopback in its place (servers here never leave 127.0.0.1)."""
    import uvicorn

    from mnist_cnn.serving import app as server

    bound = []
    monkeypatch.setattr(
        server, "listen", lambda host, port: bound.append(host) or socket.create_server(("127.0.0.1", 0))
    )
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: sockets[0].close())
    assert main(["serve", str(synthetic_run[1] / "last.pt"), "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert bound == ["0.0.0.0"]
    assert err.count("\n") == 1 and "reachable from the network" in err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_a_safetensors_export_is_served_like_its_checkpoint(server, tmp_path):
    url, checkpoint, _ = server
    export = tmp_path / "model.safetensors"
    assert (
        main(
            ["export", str(checkpoint), "--format", "safetensors", "--out", str(export), "--check", "16", "--no-verify"]
        )
        == 0
    )
    png = png_bytes(Image.fromarray(synthetic_digits(1, seed=3)[0][0]))
    with served(export, tmp_path) as exported:
        status, _, about = request(exported, "GET", "/api/model")
        assert status == 200 and about["parameters"] == 16_426 and about["checkpoint"] == "model.safetensors"
        got = post_image(exported, png)[2]
    expected = post_image(url, png)[2]
    assert got["digit"] == expected["digit"]
    assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)


def test_ctrl_c_stops_the_server_cleanly(synthetic_run, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", str(synthetic_run[1] / "last.pt"), "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0].rstrip("/")
        assert request(url, "GET", "/healthz")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == "stopped\n"
    finally:
        proc.kill()
