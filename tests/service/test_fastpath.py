"""The V2 inference hot path (service/fastpath.py) answers exactly as the FastAPI route does.

Two real servers on the same repository: one as built by ``create_app``, one with the
:class:`~service.fastpath.InferRoute` middleware taken out (every request then goes through
FastAPI's route). The same requests, good and bad, go to both: statuses, headers, bodies and
the request metrics must agree, and the first server must have answered its inference requests
through the hot path.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from service_support import ADMIN_TOKEN, LiveServer, metric, metric_samples, v2_body

import service.fastpath as fastpath
from service.middleware import route_path

HEADER = "Inference-Header-Content-Length"
# Per-request timings in the answer's parameters: the only fields allowed to differ.
TIMINGS = ("queue_ms", "solve_ms")


def binary_request(x: torch.Tensor, *, size: int | None = None) -> tuple[bytes, dict]:
    raw = x.numpy().astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw) if size is None else size},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER: str(len(header))}
    return header + raw, headers


def cases() -> list[tuple[str, str, str, dict]]:
    """(label, method, path, httpx keyword arguments): one of each kind of answer."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g)
    body, headers = binary_request(x)
    short_body, short_headers = binary_request(x, size=7)
    wide = x.clone()
    wide[0, 0, 0, 0] = 1.5
    return [
        ("json", "POST", "/v2/models/fc/infer", {"json": v2_body(x)}),
        ("versioned", "POST", "/v2/models/fc/versions/1/infer", {"json": v2_body(x, id="a")}),
        (
            "outputs",
            "POST",
            "/v2/models/fc/infer",
            {"json": v2_body(x, outputs=[{"name": "logit_error_bound"}, {"name": "label"}])},
        ),
        ("binary", "POST", "/v2/models/fc/infer", {"content": body, "headers": headers}),
        ("percent-encoded name", "POST", "/v2/models/f%63/infer", {"json": v2_body(x)}),
        ("unknown model", "POST", "/v2/models/nope/infer", {"json": v2_body(x)}),
        ("unknown version", "POST", "/v2/models/fc/versions/9/infer", {"json": v2_body(x)}),
        ("broken model", "POST", "/v2/models/broken/infer", {"json": v2_body(x)}),
        (
            "malformed JSON",
            "POST",
            "/v2/models/fc/infer",
            {"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}},
        ),
        ("wrong shape of JSON", "POST", "/v2/models/fc/infer", {"json": {"inputs": 3}}),
        (
            "duplicate key",
            "POST",
            "/v2/models/fc/infer",
            {
                "content": b'{"inputs": [], "inputs": []}',
                "headers": {"Content-Type": "application/json"},
            },
        ),
        (
            "content type",
            "POST",
            "/v2/models/fc/infer",
            {"content": b"{}", "headers": {"Content-Type": "text/plain"}},
        ),
        ("pixel out of range", "POST", "/v2/models/fc/infer", {"json": v2_body(wide)}),
        (
            "unknown output",
            "POST",
            "/v2/models/fc/infer",
            {"json": v2_body(x, outputs=[{"name": "nope"}])},
        ),
        (
            "bad parameter",
            "POST",
            "/v2/models/fc/infer",
            {"json": v2_body(x, parameters={"tol": -1})},
        ),
        (
            "binary framing",
            "POST",
            "/v2/models/fc/infer",
            {"content": short_body, "headers": short_headers},
        ),
        ("query parameter", "POST", "/v2/models/fc/infer?tol=1e-4", {"json": v2_body(x)}),
        ("GET on the inference path", "GET", "/v2/models/fc/infer", {}),
        ("trailing slash", "POST", "/v2/models/fc/infer/", {"json": v2_body(x)}),
        ("extra segment", "POST", "/v2/models/fc/x/infer", {"json": v2_body(x)}),
    ]


def comparable(response: httpx.Response) -> tuple:
    """Status, the headers that carry meaning, and the body with the timings taken out."""
    headers = {
        k: response.headers.get(k)
        for k in ("content-type", "retry-after", "allow", "www-authenticate", "location")
    }
    if headers["location"]:  # the servers' ports differ
        headers["location"] = httpx.URL(headers["location"]).path
    raw = response.content
    if HEADER in response.headers:
        n = int(response.headers[HEADER])
        head, tail = json.loads(raw[:n]), raw[n:]
    else:
        head, tail = (json.loads(raw) if raw else None), b""
    if isinstance(head, dict) and isinstance(head.get("parameters"), dict):
        for k in TIMINGS:
            head["parameters"].pop(k, None)
    return response.status_code, headers, head, tail


@pytest.fixture(scope="module")
def servers(model_repo):
    settings = {
        "model_dir": model_repo,
        "admin_token": ADMIN_TOKEN,
        "retune_factor": 0,
        "max_delay_ms": 1,
        "max_request_batch": 4,
    }
    hot = LiveServer(**settings)
    plain = LiveServer(**settings, hot_path=False)  # the FastAPI route alone
    hot.start()
    plain.start()
    yield hot, plain
    hot.stop()
    plain.stop()


def test_answers_are_the_routes(servers, monkeypatch):
    hot, plain = servers
    calls = []
    real = fastpath.infer_answer

    async def counted(*args, **kwargs):
        calls.append(args[:2])
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastpath, "infer_answer", counted)
    expected_calls = 0
    with hot.client() as a, plain.client() as b:
        for label, method, path, kw in cases():
            ra, rb = a.request(method, path, **kw), b.request(method, path, **kw)
            assert comparable(ra) == comparable(rb), label
            assert ra.status_code < 500 or label == "broken model", label
            if method == "POST" and path.endswith("/infer") and "/x/" not in path:
                expected_calls += 1
    # Every POST to an inference path went through the hot path (the plain server has none).
    assert len(calls) == expected_calls
    assert ("fc", "1") in calls and ("nope", None) in calls
    assert ("fc", None) in calls  # the percent-encoded name arrives decoded, as Starlette's


def test_answers_have_the_right_values(servers):
    """Not merely equal: the statuses each kind of request must get."""
    hot, _ = servers
    status = {}
    with hot.client() as c:
        for label, method, path, kw in cases():
            status[label] = c.request(method, path, **kw).status_code
    assert status == {
        "json": 200,
        "versioned": 200,
        "outputs": 200,
        "binary": 200,
        "percent-encoded name": 200,
        "unknown model": 404,
        "unknown version": 404,
        "broken model": 503,
        "malformed JSON": 400,
        "wrong shape of JSON": 422,
        "duplicate key": 400,
        "content type": 415,
        "pixel out of range": 422,
        "unknown output": 422,
        "bad parameter": 422,
        "binary framing": 400,
        "query parameter": 422,
        "GET on the inference path": 405,
        "trailing slash": 307,  # Starlette's redirect to the path without it
        "extra segment": 404,
    }


def test_request_metrics_are_labelled_as_the_route(servers):
    """The hot path's requests are counted as the route's: ``endpoint="v2_infer"`` with the
    model's name, ``"unknown"`` for a name the repository does not hold."""
    hot, plain = servers
    counts = []
    for srv in (hot, plain):
        with srv.client() as c:
            before = metric_samples(c.get("/metrics").text)
            for _, method, path, kw in cases():
                c.request(method, path, **kw)
            after = metric_samples(c.get("/metrics").text)

        def delta(model, code, before=before, after=after):
            labels = {"model": model, "endpoint": "v2_infer", "code": code}
            return metric(after, "mondeq_requests_total", **labels) - metric(
                before, "mondeq_requests_total", **labels
            )

        counts.append(
            {
                ("fc", "200"): delta("fc", "200"),
                ("fc", "422"): delta("fc", "422"),
                ("fc", "400"): delta("fc", "400"),
                ("unknown", "404"): delta("unknown", "404"),
                ("broken", "503"): delta("broken", "503"),
            }
        )
    assert counts[0] == counts[1]
    assert counts[0] == {
        ("fc", "200"): 5.0,
        ("fc", "422"): 5.0,
        ("fc", "400"): 3.0,
        ("unknown", "404"): 1.0,
        ("broken", "503"): 1.0,
    }


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/v2/models/a/infer", "", "/v2/models/a/infer"),
        ("/api/v2/models/a/infer", "/api", "/v2/models/a/infer"),
        ("/api", "/api", ""),
        ("/apix/v2/models/a/infer", "/api", "/apix/v2/models/a/infer"),
        ("/v2/models/a/infer", "/api", "/v2/models/a/infer"),
    ],
)
def test_route_path_strips_only_the_root_path(path, root, expected):
    assert route_path({"path": path, "root_path": root}) == expected
