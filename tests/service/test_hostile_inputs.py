"""Client input that used to be misread or misnamed, through a real server: every value is
honoured as sent or refused with a 422 that names what is wrong and where, never read as
something else (a JSON ``true`` among pixels as 1.0, ``"false"`` as false, a NaN ``tol``
refused as "less than or equal to 1")."""

from __future__ import annotations

import json

import pytest
import torch
from service_support import (
    ADMIN_TOKEN,
    local_model,
    normalise,
    outputs,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"content-type": "application/json"}


def _infer(client, data, shape=(1, 1, 8, 8), **extra):
    body = {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": data}]}
    return client.post("/v2/models/fc/infer", json={**body, **extra})


def _classify(client, inputs, **extra):
    return client.post("/v1/models/fc:classify", json={"inputs": inputs, **extra})


FLAT = [0.25] * 64
ROWS = [[0.25] * 8 for _ in range(8)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # booleans among numbers: numpy read true as 1.0, and the answer was 200
        ([True, *FLAT[1:]], "input data must hold numbers only, got true at input data[0]"),
        ([*FLAT[:63], False], "input data must hold numbers only, got false at input data[63]"),
        (
            [[[r if i != 5 else [*r[:7], True] for i, r in enumerate(ROWS)]]],
            "input data must hold numbers only, got true at input data[0][0][5][7]",
        ),
        # values numpy kept as objects: were "got mixed or nested values"
        (
            [*FLAT[:40], None, *FLAT[41:]],
            "input data must hold numbers only, got null at input data[40]",
        ),
        (
            [*FLAT[:63], {"v": 1}],
            "input data must hold numbers only, got an object at input data[63]",
        ),
        (
            [*FLAT[:63], 10**400],
            "input data holds an integer too large for a number; pixels lie in [0, 1]",
        ),
        # ragged arrays: were numpy's "setting an array element with a sequence. The
        # requested array has an inhomogeneous shape after 1 dimensions. ..."
        (
            [[[r if i != 3 else r[:7] for i, r in enumerate(ROWS)]]],
            "input data is not a rectangular array: input data[0][0][3] holds 7 values, "
            "input data[0][0][0] holds 8",
        ),
        (
            [*FLAT[:63], [0.5]],
            "input data is not a rectangular array: input data[63] is an array, where "
            "input data[0] is a number",
        ),
        (
            [[[ROWS[0], *([0.5] * 7)]]],
            "input data is not a rectangular array: input data[0][0][1] is a number, where "
            "input data[0][0][0] is an array",
        ),
    ],
)
def test_v2_pixel_data_faults_are_named_and_located(client, data, message):
    r = _infer(client, data)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": message}


def test_classify_json_refuses_booleans_among_pixels_too(client):
    rows = [list(r) for r in ROWS]
    rows[2][4] = True
    r = _classify(client, rows)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": "inputs must hold numbers only, got true at inputs[2][4]"}
    r = _classify(client, [r[:5] if i == 6 else r for i, r in enumerate(ROWS)])
    assert r.status_code == 422, r.text
    assert r.json() == {
        "error": "inputs is not a rectangular array: inputs[6] holds 5 values, inputs[0] holds 8"
    }


def test_true_elsewhere_in_the_body_does_not_refuse_good_pixels(client, model_repo):
    """A ``true`` token in ``parameters`` or a string makes the server look at every pixel;
    good pixels still answer, exactly as in-process."""
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    r = _infer(
        client,
        x.flatten().tolist(),
        shape=(2, 1, 8, 8),
        id="true false",
        outputs=[{"name": "logits", "parameters": {"binary_data": False}}],
    )
    assert r.status_code == 200, r.text
    model = local_model(model_repo / "fc/1/model.pt")
    params = r.json()["parameters"]
    want = model.infer(
        normalise(model, x),
        alpha=params["alpha"],
        method=params["method"],
        tol=params["tol"],
        max_iter=params["max_iter"],
    ).logits
    torch.testing.assert_close(outputs(r.json())["logits"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_tol_is_named_as_such(client, literal):
    """``tol`` NaN was refused as "less than or equal to 1" (NaN fails every comparison)."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]})
    head = body[:-1] + f', "parameters": {{"tol": {literal}}}}}'
    head = head.replace('"datatype": "FP32"', f'"datatype": "FP32", "data": {json.dumps(FLAT)}')
    r = client.post("/v2/models/fc/infer", content=head, headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == (
        "invalid request: body.parameters.tol: Input should be a finite number"
    )
    r = client.post(
        "/v1/models/fc:classify",
        content=f'{{"inputs": {json.dumps(ROWS)}, "tol": {literal}}}',
        headers=JSON,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid request: body.tol: Input should be a finite number"


def test_classify_form_field_given_twice_is_refused(client):
    """A form read as a dict kept the last ``top_k`` and dropped the first unsaid."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (8, 8), 64).save(png, format="PNG")
    for fields in ({"top_k": ["1", "2"]}, {"tol": ["0.1", ""]}):
        r = client.post(
            "/v1/models/fc:classify",
            files={"file": ("x.png", png.getvalue(), "image/png")},
            data=fields,
        )
        assert r.status_code == 422, r.text
        (name,) = fields
        assert r.json() == {"error": f"form field {name!r} is given more than once: send it once"}
    r = client.post(
        "/v1/models/fc:classify",
        files={"file": ("x.png", png.getvalue(), "image/png")},
        data={"top_k": "2", "tol": "0.1"},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["top_k"]) == 2


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"apply": "false"}, "apply", "Input should be a valid boolean"),
        ({"apply": 0}, "apply", "Input should be a valid boolean"),
        ({"apply": "off"}, "apply", "Input should be a valid boolean"),
        ({"version": "1"}, "version", "Input should be a valid integer"),
        ({"version": 1.0}, "version", "Input should be a valid integer"),
        ({"version": True}, "version", "Input should be a valid integer"),
    ],
)
def test_tune_alpha_reads_booleans_and_versions_as_sent(client, body, field, message):
    """``"apply": "false"`` was read as false and ``"apply": 0`` too; ``"version": true``
    as version 1. An admin body is honoured as sent or refused, never guessed at."""
    r = client.post("/v1/models/fc/tune-alpha", json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == f"invalid request: body.{field}: {message}"
