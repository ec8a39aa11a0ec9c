"""serve's contract: /openapi.json is valid OpenAPI 3.1, names every route the app has, and
the real answers match it; /docs shows it without a script; and Schemathesis, a client
written from the document alone, fuzzes the live server without a 5xx or a mismatch."""

from __future__ import annotations

import copy
import http.client
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
from openapi_spec_validator import validate
from PIL import Image
from starlette.routing import Route

from conftest import synthetic_digits
from mnist_cnn.checkpoint import load_model_file
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.serving.app import ASSETS, CSP, FIELD, create_app
from mnist_cnn.serving.limits import BODY_BUDGET, BODY_LIMIT, READ_DEADLINE_S, RETRY_AFTER_S, Limits
from mnist_cnn.serving.openapi import IMPLICIT, document
from test_serve import conforms, png_bytes, post_image, request

FUZZ_EXAMPLES = 15  # per operation: ~6 s for the ten operations on the 2-core EPYC


def fetch(url: str, path: str) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def contract(server) -> dict:
    status, headers, body = fetch(server[0], "/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def test_the_contract_is_valid_openapi_and_names_every_route_of_the_app(server, contract):
    validate(contract)  # openapi-spec-validator, OpenAPI 3.1 detected from the document
    model, cfg, _ = load_model_file(server[1])
    app = create_app(model, get_dataset(cfg.dataset), {})
    routed = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) for m in (r.methods or set()) - IMPLICIT}
    documented = {(path, method) for path, item in contract["paths"].items() for method in item}
    assert routed == documented and ("/api/predict", "post") in routed and len(routed) == 10
    assert list(contract["paths"])[:3] == ["/api/predict", "/api/model", "/healthz"]  # the API first, then the page
    predict = contract["paths"]["/api/predict"]["post"]
    assert set(predict["responses"]) == {"200", "400", "408", "413", "503"}
    assert set(contract["components"]["responses"]) == {"NotFound", "MethodNotAllowed"}
    assert (
        predict["x-body-limit-bytes"] == BODY_LIMIT
        and f"{BODY_LIMIT} bytes" in predict["description"]
        and f"{BODY_LIMIT} bytes" in predict["responses"]["413"]["description"]
    )
    assert list(predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]) == [FIELD]
    assert RETRY_AFTER_S and "Retry-After" in predict["responses"]["503"]["headers"]
    assert predict["x-body-budget-bytes"] == BODY_BUDGET and f"{BODY_BUDGET / 2**20:g} MB" in predict["description"]
    assert f"within {READ_DEADLINE_S:g} s" in predict["responses"]["408"]["description"]
    assert "Connection" in predict["responses"]["408"]["headers"]


def test_a_route_the_contract_does_not_describe_stops_the_app_at_startup(server):
    model, cfg, _ = load_model_file(server[1])
    routes = [Route("/healthz", lambda r: None), Route("/api/undocumented", lambda r: None, methods=["DELETE"])]
    with pytest.raises(RuntimeError, match="DELETE /api/undocumented has no OpenAPI operation"):
        document(routes, get_dataset(cfg.dataset), ASSETS, field=FIELD, body_limit=1, limits=Limits())


def test_real_answers_and_refusals_match_their_schemas(server, contract):
    url = server[0]
    images, _ = synthetic_digits(1, seed=3)
    status, _, answer = post_image(url, png_bytes(Image.fromarray(images[0])))
    assert status == 200
    conforms(contract, "Answer", answer)
    broken = copy.deepcopy(answer)
    broken["preprocessed"].pop()  # 27 rows: the schema must notice, or these checks prove nothing
    with pytest.raises(jsonschema.ValidationError):
        conforms(contract, "Answer", broken)
    conforms(contract, "Model", request(url, "GET", "/api/model")[2])
    conforms(contract, "Health", request(url, "GET", "/healthz")[2])
    refusals = {
        400: post_image(url, b"not an image"),
        404: request(url, "GET", "/api/nothing-here"),
        405: request(url, "GET", "/api/predict"),
        413: post_image(url, bytes(BODY_LIMIT + 1)),
    }
    for code, (status, headers, body) in refusals.items():
        assert status == code, body
        conforms(contract, "Error", body)
    assert refusals[405][1]["allow"] == "POST"


def test_the_docs_page_shows_every_operation_without_a_script(server, contract):
    status, headers, body = fetch(server[0], "/docs")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == CSP and "<script" not in page.lower()
    for path, item in contract["paths"].items():
        for method in item:
            assert f"<code>{method.upper()} {path}</code>" in page
    for name in contract["components"]["schemas"]:
        assert f"id='{name}'" in page
    assert "<td>404</td>" in page and "<td>405</td>" in page  # the paths and methods not listed
    assert "/docs.css" in page and fetch(server[0], "/docs.css")[0] == 200


def test_schemathesis_fuzzes_the_live_server_without_a_5xx_or_a_contract_mismatch(server, contract, tmp_path: Path):
    """Every check but positive_data_acceptance: a schema cannot say "a decodable image of at least
    8x8 pixels", so random bytes that fit it are rightly refused with 400. Schemathesis leaves out
    GET /openapi.json, the document it loaded (validated above)."""
    url, _, workdir = server
    run = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json"),
            *("--checks", "all", "--exclude-checks", "positive_data_acceptance"),
            *("--max-examples", str(FUZZ_EXAMPLES), "--seed", "1", "--generation-database", "none"),
            *("--request-timeout", "30", "--no-color", "--workers", "1"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    operations = sum(len(item) for item in contract["paths"].values())
    assert f"Tested: {operations - 1}" in run.stdout and "failure" not in run.stdout.split("SUMMARY")[-1].lower()
    assert request(url, "GET", "/healthz")[::2] == (200, {"status": "ok"})  # still up
    assert not any(workdir.iterdir())  # and nothing from the fuzzer's requests reached the disk
