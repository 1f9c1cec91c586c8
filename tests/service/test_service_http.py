"""HTTP by the book, on a real server: HEAD, methods, body limits before reading, media
types and encodings, malformed JSON, and one set of validation rules for JSON and multipart."""

from __future__ import annotations

import gzip
import io
import json
import socket

import numpy as np
import pytest
from PIL import Image
from service_support import ADMIN_TOKEN, v2_body

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LIMIT = 256 * 1024  # the `server` fixture's max_body_bytes
PIXELS = [[0.25] * 8 for _ in range(8)]


def infer_body() -> dict:
    import torch

    return v2_body(torch.full((1, 1, 8, 8), 0.25))


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 64, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def error(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


# ---- HEAD ------------------------------------------------------------------------------------

GET_ROUTES = [
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/fc",
    "/v2/models/fc/versions/1",
    "/v2/models/fc/ready",
    "/v2/models/fc/versions/1/ready",
    "/v2/models/broken",  # 503
    "/v2/models/broken/ready",  # 503
    "/v2/models/nope",  # 404
    "/no/such/path",  # 404 from the router
    "/v1/models",
    "/metrics",
    "/openapi.json",
    "/docs",
]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_like_get_without_a_body(client, path):
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the exposition changes between two scrapes
        assert head.headers["content-length"] == get.headers["content-length"]
    else:
        assert int(head.headers["content-length"]) > 1000


# ---- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("OPTIONS", "/v1/models", "GET, HEAD"),
        ("PUT", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v2/health/ready", "GET, HEAD"),
        ("PATCH", "/metrics", "GET, HEAD"),
        ("GET", "/v2/models/fc/infer", "POST"),
        ("HEAD", "/v2/models/fc/infer", "POST"),
        ("OPTIONS", "/v1/models/fc:classify", "POST"),
        ("PUT", "/v1/models/fc/reload", "POST"),
        ("DELETE", "/v1/models/fc/tune-alpha", "POST"),
    ],
)
def test_other_methods_are_405_with_allow(client, method, path, allow):
    r = client.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    if method != "HEAD":
        assert r.json()["error"] == f"method {method} not allowed on {path}; allowed: {allow}"


def test_a_method_http_does_not_define_is_400_and_the_server_goes_on(client):
    """``FROB`` is no HTTP method: the server's HTTP parser (httptools, uvicorn[standard])
    refuses the request line as malformed, with 400, before any route sees it; a 5xx (501)
    would page someone for a client's mistake. The connection after it serves as before."""
    r = client.request("FROB", "/v2")
    assert r.status_code == 400
    assert client.get("/v2/health/live").status_code == 200


# ---- body size: refused from the declared length, before reading -----------------------------


def raw_exchange(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send request headers only, then read what the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        got = b""
        while True:
            try:
                part = s.recv(65536)
            except TimeoutError:
                break
            if not part:
                break
            got += part
    return got


@pytest.mark.parametrize("path", ["/v2/models/fc/infer", "/v1/models/fc:classify"])
def test_expect_100_continue_over_the_limit_gets_413_and_no_continue(server, path):
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    got = raw_exchange(server.port, head)  # no body byte is ever sent
    assert b"100 Continue" not in got
    status, _, rest = got.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert json.loads(body) == {
        "error": f"request body of 1000000000 bytes exceeds the limit of {LIMIT} bytes"
    }


def test_expect_100_continue_within_the_limit_continues(server):
    body = json.dumps(infer_body()).encode()
    head = (
        "POST /v2/models/fc/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        assert s.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        got = b""
        while part := s.recv(65536):
            got += part
    assert got.startswith(b"HTTP/1.1 200 OK")


def test_declared_length_over_the_limit_keeps_the_connection(server):
    """Without Expect the client sends its body anyway: it is answered 413 and the
    connection still serves the next request."""
    with server.client() as c:
        r = c.post(
            "/v2/models/fc/infer",
            content=b" " * (LIMIT + 1),
            headers={"content-type": "application/json"},
        )
        assert error(r, 413) == (
            f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes"
        )
        assert c.get("/v2/health/live").status_code == 200


# ---- media types, encodings, malformed JSON ----------------------------------------------------

JSON_ENDPOINTS = [
    ("/v2/models/fc/infer", {}),
    ("/v2/models/fc/versions/1/infer", {}),
    ("/v1/models/fc:classify", {}),
    ("/v1/models/fc/tune-alpha", AUTH),
    ("/v1/models/fc/reload", AUTH),  # takes no parameters, but a body is still read as JSON
]


@pytest.mark.parametrize("path,auth", JSON_ENDPOINTS)
def test_malformed_json_is_400_on_every_endpoint(client, path, auth):
    r = client.post(path, content=b"{oops", headers={**auth, "content-type": "application/json"})
    assert error(r, 400).startswith("malformed JSON body")


def test_the_token_is_checked_before_the_body(client):
    r = client.post(
        "/v1/models/fc/tune-alpha", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert error(r, 401) == "missing or wrong bearer token"


@pytest.mark.parametrize("path,auth", JSON_ENDPOINTS)
def test_content_encodings_are_415(client, path, auth):
    body = gzip.compress(json.dumps({"inputs": PIXELS}).encode())
    headers = {**auth, "content-type": "application/json", "content-encoding": "gzip"}
    r = client.post(path, content=body, headers=headers)
    assert error(r, 415) == "Content-Encoding 'gzip' is not supported: send the body uncompressed"
    assert r.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("path,auth", JSON_ENDPOINTS)
def test_json_in_another_charset_is_415(client, path, auth):
    body = json.dumps({"inputs": PIXELS}).encode("utf-16")
    headers = {**auth, "content-type": "application/json; charset=utf-16"}
    r = client.post(path, content=body, headers=headers)
    assert error(r, 415) == "JSON bodies are UTF-8 (RFC 8259), got charset=utf-16"


@pytest.mark.parametrize("path,auth", [JSON_ENDPOINTS[0], JSON_ENDPOINTS[3]])
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
def test_json_endpoints_refuse_other_content_types(client, path, auth, ctype):
    r = client.post(path, content=b'{"apply": false}', headers={**auth, "content-type": ctype})
    assert error(r, 415) == f"content type {ctype!r}: send application/json"


def test_json_without_content_type_and_with_utf8_charset_is_read(client):
    body = json.dumps(infer_body()).encode()
    assert client.post("/v2/models/fc/infer", content=body).status_code == 200
    r = client.post(
        "/v2/models/fc/infer",
        content=body,
        headers={"content-type": "application/json; charset=UTF-8"},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/models/fc/tune-alpha", {"source": "calibration", "aply": False}, "aply"),
        ("/v1/models/fc/reload", {"version": 1}, "version"),
    ],
)
def test_unknown_fields_are_422_not_ignored(client, path, body, field):
    """A misspelt field must not be dropped silently: ``"aply": false`` applied the α
    search's result (200), ``maxiter`` solved with the default max_iter."""
    before = client.get("/v1/models").json()
    r = client.post(path, json=body, headers=AUTH)
    assert error(r, 422) == f"invalid request: body.{field}: Extra inputs are not permitted"
    assert client.get("/v1/models").json() == before  # nothing tuned or reloaded


# ---- one set of rules for JSON and multipart ---------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("top_k", 0, "invalid request: body.top_k: Input should be greater than or equal to 1"),
        ("top_k", -2, "invalid request: body.top_k: Input should be greater than or equal to 1"),
        ("tol", 2, "invalid request: body.tol: Input should be less than or equal to 1"),
        ("tol", 0, "invalid request: body.tol: Input should be greater than 0"),
        (
            "max_iter",
            0,
            "invalid request: body.max_iter: Input should be greater than or equal to 1",
        ),
        ("method", "newton", "unknown method 'newton'"),
        ("maxiter", 5, "invalid request: body.maxiter: Extra inputs are not permitted"),
    ],
)
def test_json_and_multipart_share_the_validation_rules(client, field, value, message):
    as_json = client.post("/v1/models/fc:classify", json={"inputs": PIXELS, field: value})
    as_form = client.post(
        "/v1/models/fc:classify", files={"file": ("a.png", png())}, data={field: str(value)}
    )
    assert error(as_json, 422).startswith(message)
    assert error(as_form, 422).startswith(message)
    if as_json.json().get("detail"):
        assert as_form.json()["detail"] == as_json.json()["detail"]


@pytest.mark.parametrize(
    "field,value,text,kind",
    [
        ("max_iter", True, "true", "a valid integer"),
        ("max_iter", "3", "3_0", "a valid integer"),
        ("top_k", 2.0, "2.5", "a valid integer"),
        ("tol", "0.01", "1e-2x", "a valid number"),
        ("tol", False, "false", "a valid number"),
    ],
)
def test_numbers_are_read_as_sent_not_coerced(client, field, value, text, kind):
    """JSON ``"max_iter": true`` solved with max_iter 1 and ``"3"`` with 3; the form's
    ``3_0`` with 30. A value is honoured as sent or refused (422 naming the field), never
    guessed at; plain numbers in either encoding still work."""
    message = f"invalid request: body.{field}: Input should be {kind}"
    as_json = client.post("/v1/models/fc:classify", json={"inputs": PIXELS, field: value})
    assert error(as_json, 422).startswith(message)
    as_form = client.post(
        "/v1/models/fc:classify", files={"file": ("a.png", png())}, data={field: text}
    )
    assert error(as_form, 422).startswith(message)
    body = {**infer_body(), "parameters": {field: value}}
    if field != "top_k":  # V2 has no top_k
        r = client.post("/v2/models/fc/infer", json=body)
        assert r.status_code == 422, r.text
        assert field in r.json()["error"] and kind in r.json()["error"]


def test_plain_numbers_pass_in_json_form_and_v2(client):
    ok = {"max_iter": 30, "tol": 0.01, "top_k": 2}
    r = client.post("/v1/models/fc:classify", json={"inputs": PIXELS, **ok})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["top_k"]) == 2
    form = {"max_iter": "30", "tol": "1e-2", "top_k": "2"}
    r = client.post("/v1/models/fc:classify", files={"file": ("a.png", png())}, data=form)
    assert r.status_code == 200, r.text
    assert r.json()["solver"]["max_iter"] == 30 and r.json()["solver"]["tol"] == 0.01
    r = client.post("/v2/models/fc/infer", json={**infer_body(), "parameters": {"max_iter": 30}})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["max_iter"] == 30
