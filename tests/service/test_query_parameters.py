"""Query parameters, through a real server: a route takes those it declares (only
``classify``'s ``version``), and a request with any other is refused with 422 naming it and
saying where such a setting goes. ``POST /v2/models/m/infer?tol=1e-4`` was answered as if
no tol were given (200, solved at the model's tol): the client believed it had set one."""

from __future__ import annotations

import pytest
import torch
from service_support import ADMIN_TOKEN, v2_body

from service.query import WHERE_SETTINGS_GO

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROWS = [[0.25] * 8 for _ in range(8)]
V2_WHERE = (
    "solver settings (tol, max_iter, method, stop, logit_tol) go in the JSON body's "
    '"parameters" object, outputs in its "outputs"'
)
CLASSIFY_WHERE = (
    "top_k and the solver settings (tol, max_iter, method, stop, logit_tol) go in the JSON "
    "body, or in form fields beside an uploaded image"
)


def infer_body() -> dict:
    return v2_body(torch.full((1, 1, 8, 8), 0.25))


def error(r, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v2/models/fc/infer", "tol=1e-4"),
        ("/v2/models/fc/versions/1/infer", "tol=1e-4"),
        ("/v2/models/nope/infer", "tol=1e-4"),  # refused before the model is looked up
    ],
)
def test_v2_infer_refuses_a_setting_in_the_query(client, path, query):
    r = client.post(f"{path}?{query}", json=infer_body())
    assert error(r, 422) == (
        f"unknown query parameter 'tol' on POST {path}: it takes no query parameters; {V2_WHERE}"
    )


def test_every_unknown_parameter_is_named(client):
    r = client.post("/v2/models/fc/infer?max_iter=3&binary_data_output=true", json=infer_body())
    assert error(r, 422) == (
        "unknown query parameters 'max_iter', 'binary_data_output' on POST "
        f"/v2/models/fc/infer: it takes no query parameters; {V2_WHERE}"
    )


def test_the_setting_in_the_body_is_the_one_honoured(client):
    """What the message says to do works: the same tol in ``parameters`` is used."""
    r = client.post("/v2/models/fc/infer", json={**infer_body(), "parameters": {"tol": 1e-4}})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["tol"] == 1e-4


def test_classify_takes_version_and_nothing_else(client):
    ok = client.post("/v1/models/fc:classify?version=1", json={"inputs": ROWS})
    assert ok.status_code == 200, ok.text
    assert ok.json()["version"] == "1"
    r = client.post("/v1/models/fc:classify?version=1&top_k=3", json={"inputs": ROWS})
    assert error(r, 422) == (
        "unknown query parameter 'top_k' on POST /v1/models/fc:classify: its only query "
        f"parameter is 'version'; {CLASSIFY_WHERE}"
    )
    r = client.post("/v1/models/fc:classify?version=1&version=2", json={"inputs": ROWS})
    assert error(r, 422) == "query parameter 'version' is given more than once: send it once"


def test_an_empty_query_is_no_parameter(client):
    r = client.post("/v2/models/fc/infer?", json=infer_body())
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "query", "where"),
    [
        ("/v1/models/fc/tune-alpha", "apply=true", 'source, apply and version go in the JSON '
         'body ({"apply": true})'),
        ("/v1/models/fc/reload", "version=1", "it takes no settings"),
        ("/v2/repository/index", "ready=true", 'ready goes in the JSON body ({"ready": true})'),
        ("/v2/repository/models/fc/unload", "unload_dependents=true",
         "unload_dependents goes in the JSON body's \"parameters\" object"),
    ],
)  # fmt: skip
def test_admin_settings_in_the_query_are_refused_after_the_token(client, path, query, where):
    """Nothing is done (fc stays loaded), and without the token it is 401 as ever: the
    token is checked first."""
    name = query.partition("=")[0]
    r = client.post(f"{path}?{query}", headers=AUTH)
    assert error(r, 422) == (
        f"unknown query parameter {name!r} on POST {path}: it takes no query parameters; {where}"
    )
    assert error(client.post(f"{path}?{query}"), 401) == "missing or wrong bearer token"
    assert client.get("/v2/models/fc/ready").status_code == 200


def test_routing_errors_come_first_and_docs_pages_are_fastapis(client):
    assert client.get("/no/such/path?x=1").status_code == 404
    r = client.get("/v2/models/fc/infer?x=1")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert client.get("/openapi.json?x=1").status_code == 200
    assert client.get("/docs?x=1").status_code == 200


def test_every_api_route_refuses_an_unknown_parameter(server, client):
    """Each operation of the app's OpenAPI document (every API route, whatever its method):
    a route added later without the check fails here."""
    seen = set()
    for template, operations in server.app.openapi()["paths"].items():
        path = template.replace("{name}", "fc").replace("{version}", "1")
        for method, operation in operations.items():
            method = method.upper()
            name = next(
                (n for n in WHERE_SETTINGS_GO if operation["operationId"].startswith(n + "_")),
                None,
            )
            seen.add((method, template))
            r = client.request(method, f"{path}?bogus=1", headers=AUTH)
            takes = (
                "its only query parameter is 'version'"
                if name == "v1_classify"
                else "it takes no query parameters"
            )
            where = WHERE_SETTINGS_GO.get(name, "it takes no settings")
            assert error(r, 422) == (
                f"unknown query parameter 'bogus' on {method} {path}: {takes}; {where}"
            )
    assert ("POST", "/v2/models/{name}/infer") in seen
    assert ("POST", "/v2/repository/models/{name}/unload") in seen
    assert ("GET", "/metrics") in seen
    assert len(seen) == 20
