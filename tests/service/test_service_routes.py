"""The routers as wired by ``create_app``: every path in the OpenAPI document, the V2 model
router included twice, and the ``endpoint`` label each request is counted under."""

from __future__ import annotations

import pytest
import torch
from service_support import metric_samples, v2_body

from service.metrics import ENDPOINTS

PATHS = {
    "/v2": {"get"},
    "/v2/health/live": {"get"},
    "/v2/health/ready": {"get"},
    "/v2/models/{name}": {"get"},
    "/v2/models/{name}/ready": {"get"},
    "/v2/models/{name}/infer": {"post"},
    "/v2/models/{name}/versions/{version}": {"get"},
    "/v2/models/{name}/versions/{version}/ready": {"get"},
    "/v2/models/{name}/versions/{version}/infer": {"post"},
    "/v2/models/stats": {"get"},
    "/v2/models/{name}/stats": {"get"},
    "/v2/models/{name}/versions/{version}/stats": {"get"},
    "/v2/repository/index": {"post"},
    "/v2/repository/models/{name}/load": {"post"},
    "/v2/repository/models/{name}/unload": {"post"},
    "/v1/models": {"get"},
    "/v1/models/{name}:classify": {"post"},
    "/v1/models/{name}/tune-alpha": {"post"},
    "/v1/models/{name}/reload": {"post"},
    "/metrics": {"get"},
}
PIXELS = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)


def test_openapi_lists_every_path_once_with_its_parameters(client):
    doc = client.get("/openapi.json").json()
    assert {p: set(ops) for p, ops in doc["paths"].items()} == PATHS
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) == 20
    for suffix, summary in (("", "Model metadata"), ("/ready", "Model readiness")):
        plain = doc["paths"]["/v2/models/{name}" + suffix]["get"]
        versioned = doc["paths"]["/v2/models/{name}/versions/{version}" + suffix]["get"]
        assert plain["summary"] == summary
        assert versioned["summary"] == summary + " (one version)"
        assert [(p["name"], p["in"]) for p in plain["parameters"]] == [("name", "path")]
        assert [(p["name"], p["in"]) for p in versioned["parameters"]] == [
            ("name", "path"),
            ("version", "path"),
        ]
    infer = doc["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]
    assert infer["summary"] == "Inference (one version)"
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferRequest"
    }
    classify = doc["paths"]["/v1/models/{name}:classify"]["post"]
    assert [(p["name"], p["in"]) for p in classify["parameters"]] == [
        ("name", "path"),
        ("version", "query"),
    ]
    for admin in (
        "/v1/models/{name}/tune-alpha",
        "/v1/models/{name}/reload",
        "/v2/repository/index",
        "/v2/repository/models/{name}/load",
        "/v2/repository/models/{name}/unload",
    ):
        assert doc["paths"][admin]["post"]["security"] == [{"HTTPBearer": []}]


# (method, path, body) → the (model, endpoint, code) label set it adds one to.
COUNTED = [
    ("GET", "/v2", None, ("", "v2_server", "200")),
    ("GET", "/v2/health/live", None, ("", "v2_live", "200")),
    ("GET", "/v2/health/ready", None, ("", "v2_ready", "200")),
    ("GET", "/v2/models/fc", None, ("fc", "v2_model", "200")),
    ("GET", "/v2/models/fc/versions/1", None, ("fc", "v2_model", "200")),
    ("GET", "/v2/models/fc/versions/9", None, ("fc", "v2_model", "404")),
    ("GET", "/v2/models/nope", None, ("unknown", "v2_model", "404")),
    ("HEAD", "/v2/models/fc/ready", None, ("fc", "v2_model_ready", "200")),
    ("GET", "/v2/models/fc/versions/1/ready", None, ("fc", "v2_model_ready", "200")),
    ("POST", "/v2/models/fc/infer", v2_body(PIXELS), ("fc", "v2_infer", "200")),
    ("POST", "/v2/models/fc/versions/1/infer", v2_body(PIXELS), ("fc", "v2_infer", "200")),
    ("DELETE", "/v2/models/fc/versions/1/infer", None, ("fc", "v2_infer", "405")),
    ("GET", "/v2/models/stats", None, ("", "v2_stats", "200")),
    ("GET", "/v2/models/fc/stats", None, ("fc", "v2_stats", "200")),
    ("GET", "/v2/models/fc/versions/1/stats", None, ("fc", "v2_stats", "200")),
    ("GET", "/v2/models/nope/stats", None, ("unknown", "v2_stats", "404")),
    ("POST", "/v2/repository/index", None, ("", "v2_repository_index", "401")),
    ("POST", "/v2/repository/models/fc/load", None, ("fc", "v2_repository_load", "401")),
    ("POST", "/v2/repository/models/fc/unload", None, ("fc", "v2_repository_unload", "401")),
    ("GET", "/v1/models", None, ("", "v1_models", "200")),
    (
        "POST",
        "/v1/models/fc:classify",
        {"inputs": PIXELS[0].tolist()},
        ("fc", "v1_classify", "200"),
    ),
    ("POST", "/v1/models/fc/tune-alpha", None, ("fc", "v1_tune_alpha", "401")),
    ("POST", "/v1/models/nope/reload", None, ("unknown", "v1_reload", "401")),
    ("GET", "/docs", None, ("", "docs", "200")),
    ("HEAD", "/docs", None, ("", "docs", "200")),
    ("GET", "/docs/oauth2-redirect", None, ("", "docs", "200")),
    ("GET", "/redoc", None, ("", "docs", "200")),
    ("GET", "/openapi.json", None, ("", "docs", "200")),
    ("POST", "/openapi.json", None, ("", "docs", "405")),
    ("GET", "/no/such/path", None, ("", "other", "404")),
]


def _requests_total(client) -> dict[tuple[str, str, str], float]:
    samples = metric_samples(client.get("/metrics").text)
    return {
        (d["model"], d["endpoint"], d["code"]): v
        for (n, ls), v in samples.items()
        if n == "mondeq_requests_total"
        for d in [dict(ls)]
    }


@pytest.mark.parametrize(("method", "path", "body", "label"), COUNTED, ids=lambda c: str(c))
def test_each_request_counts_once_under_its_endpoint(client, method, path, body, label):
    assert label[1] in ENDPOINTS
    before = _requests_total(client)
    r = client.request(method, path, json=body)
    assert r.status_code == int(label[2]), r.text
    after = _requests_total(client)
    added = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    # The first scrape counts itself once it has answered.
    assert added == {label: 1.0, ("", "metrics", "200"): 1.0}


REFUSED_BEFORE_ROUTING = [  # (path, headers, body, label): the Guard answers, no router runs
    ("/v2/models/fc/infer", {"content-encoding": "gzip"}, b"{}", ("fc", "v2_infer", "415")),
    (
        "/v2/models/fc/versions/1/infer",
        {"content-encoding": "deflate"},
        b"{}",
        ("fc", "v2_infer", "415"),
    ),
    ("/v1/models/fc:classify", {"content-encoding": "br"}, b"{}", ("fc", "v1_classify", "415")),
    ("/v2/models/fc/infer", {}, b"0" * (256 * 1024 + 1), ("fc", "v2_infer", "413")),
    ("/v2/models/nope/infer", {"content-encoding": "gzip"}, b"{}", ("unknown", "v2_infer", "415")),
]


@pytest.mark.parametrize(
    ("path", "headers", "body", "label"), REFUSED_BEFORE_ROUTING, ids=lambda c: str(c)[:40]
)
def test_a_body_refused_before_routing_counts_under_its_endpoint(
    client, path, headers, body, label
):
    """A compressed or oversized body is refused before any router sees it; it used to be
    counted as endpoint="other" with no model, so the endpoint's error rate missed it."""
    before = _requests_total(client)
    r = client.post(path, content=body, headers={"content-type": "application/json", **headers})
    assert r.status_code == int(label[2]), r.text
    after = _requests_total(client)
    added = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert added == {label: 1.0, ("", "metrics", "200"): 1.0}
