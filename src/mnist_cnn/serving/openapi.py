"""The OpenAPI 3.1 contract of `mnist-cnn serve`, built from the app's own routes and constants.

    doc = document(app.routes, dataset, ASSETS, field=..., body_limit=..., limits=...)   # -> GET /openapi.json
    html = render(doc)                    # -> GET /docs, a page with no script at all

Each route the app serves is looked up in OPERATIONS by (path, method); a route without
an entry stops create_app at startup, so the document cannot fall behind the app. The
figures in it (the body limit, the multipart field, the number of classes, the image
slots, the budget for bodies, the deadline) are the values the app enforces, passed in,
never retyped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Route

from mnist_cnn.data.datasets import Dataset
from mnist_cnn.inference.predict import CANVAS
from mnist_cnn.serving.limits import RETRY_AFTER_S, UNBUDGETED, Limits

OPENAPI_VERSION = "3.1.0"
NAME_LIMIT = 200  # characters of an upload's file name kept in answers and messages (app.read_image)
IMPLICIT = {"HEAD"}  # Starlette answers HEAD wherever it answers GET: not an operation of its own


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


def json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def file_response(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def answer_schema(classes: int) -> dict[str, Any]:
    """POST /api/predict's 200 body, for a data set of `classes` classes."""
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    digit = {"type": "integer", "minimum": 0, "maximum": classes - 1, "description": "class index"}
    guess = {
        "type": "object",
        "required": ["digit", "label", "probability"],
        "additionalProperties": False,
        "properties": {"digit": digit, "label": {"type": "string"}, "probability": probability},
    }
    row = {"type": "array", "items": probability, "minItems": CANVAS, "maxItems": CANVAS}
    return {
        "type": "object",
        "description": "predict --json's object for the upload, plus every class's probability "
        "and the 28x28 input the network saw",
        "required": ["image", "digit", "label", "probability", "top3", "probabilities", "preprocessed"],
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "maxLength": NAME_LIMIT, "description": "the upload's file name, printable"},
            "digit": digit,
            "label": {"type": "string", "description": "class name"},
            "probability": probability,
            "top3": {"type": "array", "items": guess, "minItems": 1, "maxItems": 3},
            "probabilities": {"type": "array", "items": probability, "minItems": classes, "maxItems": classes},
            "preprocessed": {
                "type": "array",
                "items": row,
                "minItems": CANVAS,
                "maxItems": CANVAS,
                "description": "rows of the preprocessed image in [0, 1], 4 decimals",
            },
        },
    }


def schemas(dataset: Dataset) -> dict[str, Any]:
    """The JSON bodies, as JSON Schema 2020-12 (OpenAPI 3.1's dialect)."""
    classes = len(dataset.classes)
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "Answer": answer_schema(classes),
        "Model": {
            "type": "object",
            "description": "the checkpoint's own record, nothing re-measured",
            "required": ["model", "parameters", "dataset", "classes", "checkpoint", "epochs", "test_accuracy"],
            "additionalProperties": False,
            "properties": {
                "model": {"type": "string"},
                "parameters": {"type": "integer", "minimum": 0},
                "dataset": {"type": "string"},
                "classes": {"type": "array", "items": {"type": "string"}, "minItems": classes, "maxItems": classes},
                "checkpoint": {"type": "string"},
                "epochs": {"type": ["integer", "null"]},
                "test_accuracy": {**probability, "type": ["number", "null"], "description": "null: not measured"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "additionalProperties": False,
            "properties": {"status": {"const": "ok"}},
        },
        "Error": {
            "type": "object",
            "description": "every refusal: one line, the CLI's own message where the CLI has one",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {"type": "string"}},
        },
    }


def predict_operation(field: str, body_limit: int, limits: Limits) -> dict[str, Any]:
    """POST /api/predict: the multipart field, the size limit, the budget, the slots, every answer."""
    mb, budget_mb = body_limit // 2**20, limits.body_budget / 2**20
    return {
        "operationId": "predict",
        "summary": "Classify one image",
        "description": f"The image is decoded, checked and preprocessed exactly as `mnist-cnn predict` does a "
        f"file (PNG, JPEG, BMP, GIF, TIFF, WebP; a photo of a dark digit on light paper is inverted). "
        f"Bodies over {body_limit} bytes ({mb} MB) are refused before they are read whole; nothing is "
        f"written to disk. A body over {UNBUDGETED // 1024} kB is read only once the {budget_mb:g} MB that "
        f"bodies in memory may take together has room for its Content-Length (or for {mb} MB if it is "
        f"chunked); every body must arrive within {limits.read_s:g} s. At most {limits.slots} uploads are "
        f"classified at once.",
        "x-body-limit-bytes": body_limit,  # for tools: larger bodies get 413 before they are read
        "x-body-budget-bytes": limits.body_budget,  # bodies being read or classified, all together
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field],
                        "properties": {field: {"type": "string", "format": "binary", "description": "the image file"}},
                    }
                }
            },
        },
        "responses": {
            "200": {
                **json_response("the answer", "Answer"),
                "headers": {"Server-Timing": {"schema": {"type": "string"}, "description": "predict;dur=MS"}},
            },
            "400": error_response("not a multipart form, no image field, or an image predict would refuse"),
            "408": error_response(
                f"the body did not arrive within {limits.read_s:g} s; the connection is closed",
                {"Connection": {"schema": {"const": "close"}, "description": "the rest of the body is not read"}},
            ),
            "413": error_response(f"request body larger than {body_limit} bytes"),
            "503": error_response(
                f"all {limits.slots} image slots, or the {budget_mb:g} MB for request bodies, stayed taken for "
                f"{limits.wait_s:g} s (the body is then not read); try again",
                {"Retry-After": {"schema": {"type": "string"}, "description": f"seconds: {RETRY_AFTER_S}"}},
            ),
        },
    }


def operations(
    assets: dict[str, str], field: str, body_limit: int, limits: Limits
) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, method) -> the OpenAPI operation object of every route create_app serves;
    `assets` maps the page's files to their media types."""
    page = {"summary": "The draw-a-digit page", "responses": {"200": file_response("the page", "text/html")}}
    ops = {
        ("/api/predict", "POST"): predict_operation(field, body_limit, limits),
        ("/api/model", "GET"): {
            "operationId": "model",
            "summary": "The model being served",
            "responses": {"200": json_response("name, size, classes and recorded accuracy", "Model")},
        },
        ("/healthz", "GET"): {
            "operationId": "health",
            "summary": "Liveness",
            "responses": {"200": json_response("the server is up", "Health")},
        },
        ("/openapi.json", "GET"): {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}},
        },
        ("/docs", "GET"): {
            "operationId": "docs",
            "summary": "This document as a page",
            "responses": {"200": file_response("HTML", "text/html")},
        },
        ("/", "GET"): {**page, "operationId": "page"},
        ("/index.html", "GET"): page,
    }
    for name, media in assets.items():
        media = media.split(";")[0]  # the schema names the bare media type; the response adds its charset
        ops.setdefault((f"/{name}", "GET"), {"summary": name, "responses": {"200": file_response(name, media)}})
    return ops


def document(
    routes: Sequence[BaseRoute],
    dataset: Dataset,
    assets: dict[str, str],
    *,
    field: str,
    body_limit: int,
    limits: Limits,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`; a route missing from operations() is a RuntimeError."""
    ops = operations(assets, field, body_limit, limits)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        assert isinstance(route, Route), "the app routes plain endpoints only"
        for method in sorted((route.methods or set()) - IMPLICIT):
            if (route.path, method) not in ops:
                raise RuntimeError(f"{method} {route.path} has no OpenAPI operation in serving/openapi.py")
            operation = dict(ops[(route.path, method)])
            operation.setdefault("operationId", route.path.strip("/"))
            paths.setdefault(route.path, {})[method.lower()] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "mnist-cnn serve",
            "version": package_version(),
            "description": f"A classifier of {dataset.name} images. Any path not listed here is answered 404, "
            "and a method a path does not take 405 (with an Allow header), both with the Error body. "
            f"A connection that sends no whole request head within {limits.read_s:g} s is closed. "
            "Every response carries Content-Security-Policy default-src 'self'.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas(dataset),
            "responses": {
                "NotFound": error_response("404: no such path"),
                "MethodNotAllowed": error_response(
                    "405: the path does not take this method",
                    {"Allow": {"schema": {"type": "string"}, "description": "the methods it takes"}},
                ),
            },
        },
    }


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnist-cnn")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"


def render(doc: dict[str, Any]) -> str:
    """The document as a static HTML page: each operation, its request and responses; the schemas last."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(doc['info']['title'])} API</title><link rel='stylesheet' href='/docs.css'></head><body>",
        f"<h1>{e(doc['info']['title'])} <small>{e(doc['info']['version'])}</small></h1>",
        f"<p>{e(doc['info']['description'])}</p><p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> "
        f"(OpenAPI {e(doc['openapi'])}).</p>",
    ]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            parts.append(f"<section><h2><code>{e(method.upper())} {e(path)}</code> {e(op['summary'])}</h2>")
            if "description" in op:
                parts.append(f"<p>{e(op['description'])}</p>")
            if "requestBody" in op:
                for media, body in op["requestBody"]["content"].items():
                    parts.append(f"<h3>Request: {e(media)}</h3>{schema_block(body['schema'])}")
            parts.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
            for status, response in op["responses"].items():
                media = ", ".join(response.get("content", {}))
                parts.append(f"<tr><td>{e(status)}</td><td>{e(response['description'])}</td><td>{e(media)}</td></tr>")
            parts.append("</table></section>")
    parts.append("<section><h2>Every other path or method</h2><table>")
    for status, name in (("404", "NotFound"), ("405", "MethodNotAllowed")):
        response = doc["components"]["responses"][name]
        parts.append(f"<tr><td>{status}</td><td>{e(response['description'])}</td><td>application/json</td></tr>")
    parts.append("</table></section>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        parts.append(f"<h3 id='{e(name)}'>{e(name)}</h3>{schema_block(schema)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def schema_block(schema: dict[str, Any]) -> str:
    return f"<pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
