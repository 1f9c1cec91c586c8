"""Proven answers through the server (issue 17, docs/math.md §9, docs/service.md).

Every answer carries ``error_bound`` (a rigorous bound on ``‖ẑ − z*‖``) and ``label_proven``;
a request may stop its samples once their label is proven (``stop: "label"``) or their logits
are within ``logit_tol`` (``stop: "logits"``). Checked on a real server, the default models
and real Fashion-MNIST test images against the same solve in-process, plus the tiny models
of ``service_support`` for the refusals.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from service_support import (
    LiveServer,
    float64_reference,
    metric,
    metric_samples,
    outputs,
    v2_body,
)

from model_core import load_checkpoint
from training.data import DEBIAN_FASHION_MNIST, read_idx

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PNG = ROOT / "docs" / "examples" / "fmnist-test-0.png"
IMAGES = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"

needs_images = pytest.mark.skipif(
    not IMAGES.is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (make test installs it)",
)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """The first 200 Fashion-MNIST test images, ``(200, 1, 28, 28)`` in [0, 1]."""
    x = torch.from_numpy(read_idx(IMAGES)[:200].copy()).unsqueeze(1)
    return x.float() / 255.0


@pytest.fixture(scope="module")
def fc():
    """fmnist-fc in-process, at the α of its checkpoint (the server does not tune here)."""
    return load_checkpoint(MODELS / "fmnist-fc" / "1" / "model.pt")


def local(model, x: torch.Tensor, **kw):
    """``infer`` on the server's normalisation of pixels ``x``."""
    return model.infer(model.input_spec.normalize(x, dtype=torch.float32), **kw)


def rule_met(result, stop: str = "tol", logit_tol: float | None = None) -> torch.Tensor:
    """``(B,)`` bool: does the stopping rule hold at each answer of ``result`` (an
    ``InferenceResult``; docs/math.md §9)? ``tol``: converged; ``label``: proven;
    ``logits``: every logit's bound within ``logit_tol``."""
    if stop == "tol":
        return result.stats.converged
    if stop == "label":
        return result.label_proven
    return result.logit_error_bound.amax(dim=1) <= logit_tol


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server on copies of the two default models, α as the checkpoints hold it."""
    root = tmp_path_factory.mktemp("proven")
    for name in ("fmnist-fc", "fmnist-conv"):
        shutil.copytree(MODELS / name, root / name)
    srv = LiveServer(model_dir=root, tune_at_load=False, retune_factor=0, max_delay_ms=1)
    srv.start()
    yield srv
    srv.stop()


def counts(client, model: str) -> dict[str, float]:
    """The proof metrics of ``model`` now, by name."""
    s = metric_samples(client.get("/metrics").text)
    out = {}
    for stop in ("tol", "label", "logits"):
        for proven in ("true", "false"):
            out[f"{stop} {proven}"] = metric(
                s, "mondeq_answers_total", model=model, stop=stop, proven=proven
            )
        out[f"{stop} bounds"] = metric(s, "mondeq_error_bound_count", model=model, stop=stop)
        out[f"{stop} bound sum"] = metric(s, "mondeq_error_bound_sum", model=model, stop=stop)
        out[f"{stop} unconverged"] = metric(
            s, "mondeq_solver_unconverged_total", model=model, stop=stop
        )
        out[f"{stop} float64"] = metric(
            s, "mondeq_float64_certificates_total", model=model, stop=stop
        )
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


# ---- the stopping rules on the default models -------------------------------------------------


@needs_images
def test_stop_label_proves_every_label_near_ties_in_float64(served, pixels, fc):
    """fmnist-fc, 200 test images, one V2 request per rule: under ``stop: "label"`` every
    label is proven, each the exact equilibrium's (a float64 solve to tol 1e-10). 193 are
    proven by the float32 test, in 7.42 iterations on average against 10.41 for the same 193
    under the default tol rule (1e-2), which proves 188 of the 200. The other 7 include the
    near ties that float32 cannot prove: their exact top-two margin (0.035 to 0.19) is
    within what the error bound's floor (the rounding of ``p = W z + U x + b``, docs/math.md
    §2, §9) lets the logits move. Their float32 test stalls; the certificate evaluated in
    float64 at their point, offered at iterations 8, 16, 32, …, proves them at 16 or 32
    (before it, at ``max_iter`` 300). Each answer equals the same rule in-process; the
    metrics move by exactly these answers."""
    exact = float64_reference(fc, fc.input_spec.normalize(pixels, dtype=torch.float32))
    with served.client() as client:
        before = counts(client, "fmnist-fc")
        answers = {}
        for stop in ("tol", "label"):
            r = client.post(
                "/v2/models/fmnist-fc/infer", json=v2_body(pixels, parameters={"stop": stop})
            )
            assert r.status_code == 200, r.text
            p = r.json()["parameters"]
            assert (p["stop"], p["logit_tol"], p["tol"], p["max_iter"]) == (stop, None, 0.01, 300)
            answers[stop] = outputs(r.json())
        moved = delta(counts(client, "fmnist-fc"), before)

    label, tol = answers["label"], answers["tol"]
    proven = label["label_proven"]
    assert proven.all()
    late = label["iterations"] >= 16
    assert late.nonzero().flatten().tolist() == [14, 43, 57, 67, 127, 141, 156]
    assert label["iterations"][late].tolist() == [16, 16, 16, 16, 32, 16, 16]  # in float64
    early = ~late
    assert torch.equal(label["label"], exact.labels)
    assert label["iterations"].sum().item() == 1559  # 1431 on the other 193 + 128
    assert label["iterations"][early].sum().item() == 1431  # mean 7.42
    assert tol["iterations"][early].sum().item() == 2008  # mean 10.41 on the same 193
    assert tol["iterations"].sum().item() == 2088  # mean 10.44
    assert int(tol["label_proven"].sum()) == 188
    assert torch.equal(tol["label"][tol["label_proven"]], exact.labels[tol["label_proven"]])
    # The proven radius is stated for the exact equilibrium: shrunk by the bound, never larger.
    assert torch.equal(label["certified_radius"].isnan(), ~proven)
    assert (label["certified_radius"][proven].double() <= exact.certified_radius[proven]).all()

    for stop, out in answers.items():
        ref = local(fc, pixels, stop=stop)
        assert out["iterations"].tolist() == ref.stats.iterations.tolist()
        assert out["label_proven"].tolist() == ref.label_proven.tolist()
        assert out["converged"].tolist() == ref.stats.converged.tolist()
        torch.testing.assert_close(out["error_bound"], ref.error_bound, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["certified_radius"], ref.certified_radius, rtol=1e-4,
                                   atol=1e-6, equal_nan=True)  # fmt: skip
        assert torch.equal(out["certified_radius"].isnan(), ~out["label_proven"])

    # Metrics: every answer once, by rule and proof; the bound of each; residual > tol by rule.
    n_conv = int(label["converged"].sum())
    assert n_conv == 23  # 177 stopped, proven, before their residual reached 1e-2 (+ 6 ties)
    assert moved["label true"] == 200 and moved["label false"] == 0
    assert moved["tol true"] == 188 and moved["tol false"] == 12
    # Certified in float64: the 7 late labels; under tol, 6 unproven answers whose bound is
    # mostly rounding, or that only rounding keeps from a proof (at the answer, 1 of them
    # proven so).
    assert moved["label float64"] == 7 and moved["tol float64"] == 6
    assert moved["label bounds"] == 200 and moved["tol bounds"] == 200
    assert moved["label unconverged"] == 200 - n_conv and moved["tol unconverged"] == 0
    assert moved["label bound sum"] == pytest.approx(
        label["error_bound"].double().sum().item(), rel=1e-5
    )
    assert moved["logits true"] == moved["logits false"] == moved["logits bounds"] == 0


@needs_images
def test_stop_logits_meets_its_logit_accuracy(served, pixels, fc):
    """``stop: "logits"`` with ``logit_tol`` 0.5 on 50 images: every logit's bound within
    0.5 (``logit_error_bound``, named in ``outputs``, ``[50, 10]``) in at most 15
    iterations, as in-process. A ``logit_tol`` below float32's floor (0.13 to 0.32 on these
    images: the error bound's rounding term on fmnist-fc, docs/math.md §2, §9) is never met
    by the float32 test: at 0.1 every sample's test stalls, and the bounds evaluated in
    float64 at its point meet it at iteration 16 or 32 (before, at ``max_iter`` 300)."""
    x = pixels[:50]
    names = ["label", "iterations", "error_bound", "label_proven", "logit_error_bound"]
    answers = {}
    with served.client() as client:
        for logit_tol in (0.5, 0.1):
            body = v2_body(x, parameters={"stop": "logits", "logit_tol": logit_tol},
                           outputs=[{"name": n} for n in names])  # fmt: skip
            before = counts(client, "fmnist-fc")
            r = client.post("/v2/models/fmnist-fc/infer", json=body)
            assert r.status_code == 200, r.text
            moved = delta(counts(client, "fmnist-fc"), before)
            assert [o["name"] for o in r.json()["outputs"]] == names
            assert r.json()["parameters"]["stop"] == "logits"
            assert r.json()["parameters"]["logit_tol"] == logit_tol
            out = outputs(r.json())
            assert out["logit_error_bound"].shape == (50, 10)
            ref = local(fc, x, stop="logits", logit_tol=logit_tol)
            assert out["iterations"].tolist() == ref.stats.iterations.tolist()
            torch.testing.assert_close(out["logit_error_bound"], ref.logit_error_bound,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            n_proven = int(ref.label_proven.sum())
            assert moved["logits true"] == n_proven and moved["logits false"] == 50 - n_proven
            answers[logit_tol] = out
    met, floor = answers[0.5], answers[0.1]
    assert (met["logit_error_bound"].amax(dim=1) <= 0.5).all()
    assert met["iterations"].max().item() == 15
    assert floor["iterations"].tolist() == [32 if i in (4, 13, 18, 49) else 16 for i in range(50)]
    assert (floor["logit_error_bound"].amax(dim=1) <= 0.1).all()


@needs_images
def test_fmnist_conv_under_stop_label(served, pixels):
    """fmnist-conv, 20 images: every label proven under ``stop: "label"``, the exact
    equilibrium's (a float64 solve), and the answer is the in-process one (iterations,
    bound)."""
    x = pixels[:20]
    model = load_checkpoint(MODELS / "fmnist-conv" / "1" / "model.pt")
    with served.client() as client:
        r = client.post(
            "/v2/models/fmnist-conv/infer", json=v2_body(x, parameters={"stop": "label"})
        )
        assert r.status_code == 200, r.text
    out = outputs(r.json())
    ref = local(model, x, stop="label")
    assert out["label_proven"].tolist() == [True] * 20
    assert out["iterations"].tolist() == ref.stats.iterations.tolist()
    torch.testing.assert_close(out["error_bound"], ref.error_bound, rtol=1e-5, atol=1e-6)
    exact = float64_reference(model, model.input_spec.normalize(x, dtype=torch.float32))
    assert torch.equal(out["label"], exact.labels)


@needs_images
def test_requests_with_different_rules_never_share_a_solve(served, pixels, fc):
    """Rules are part of the solve key (``SolveKey``): 16 concurrent requests alternating
    ``tol``, ``label``, ``logits`` 0.5 and ``logits`` 1.0 each get the iterations of their own
    rule. On these 4 images every rule is met well before ``max_iter`` 300, in different
    iterations (in-process: 9–10, 6–7, 12–14 and 10–11), so an answer solved under another
    rule's key shows. (A ``logit_tol`` of 0.1 is below float32's floor on fmnist-fc, 0.12 to
    0.38 per image: its samples run to ``max_iter``, and two such rules could not be told
    apart.)"""
    runtime = served.app.state.runtime
    model = runtime.served("fmnist-fc", None)
    keys = {model.key(), model.key(stop="label"), model.key(stop="logits", logit_tol=0.5),
            model.key(stop="logits", logit_tol=1.0)}  # fmt: skip
    assert len(keys) == 4
    assert model.key() == model.key(stop="tol") == model.default_key()
    rules = [{"stop": "tol"}, {"stop": "label"}, {"stop": "logits", "logit_tol": 0.5},
             {"stop": "logits", "logit_tol": 1.0}]  # fmt: skip
    x = pixels[:4]
    want = []
    for p in rules:
        ref = local(fc, x, **p)
        assert rule_met(ref, **p).all(), p
        assert ref.stats.iterations.max().item() <= 14, p  # well before max_iter 300
        want.append(ref.stats.iterations.tolist())
    assert len({tuple(w) for w in want}) == len(rules)  # a shared solve would show
    with served.client() as client, ThreadPoolExecutor(16) as pool:
        body = lambda p: v2_body(x, parameters=p)  # noqa: E731
        futures = [pool.submit(client.post, "/v2/models/fmnist-fc/infer", json=body(rules[i % 4]))
                   for i in range(16)]  # fmt: skip
        for i, f in enumerate(futures):
            r = f.result()
            assert r.status_code == 200, r.text
            p = r.json()["parameters"]
            assert (p["stop"], p["logit_tol"]) == (rules[i % 4]["stop"],
                                                   rules[i % 4].get("logit_tol"))  # fmt: skip
            assert outputs(r.json())["iterations"].tolist() == want[i % 4], rules[i % 4]


@needs_images
def test_image_upload_takes_the_stopping_rule(served, fc):
    """The V1 form: ``stop=label`` on docs/examples/fmnist-test-0.png (test image 0): the
    ankle boot, proven, in 6 iterations as in-process; ``stop=logits`` with ``logit_tol``
    0.5: met in 10 (the default ``tol`` rule takes 9), where 0.05 would be below float32's
    floor on this image (0.17) and run to ``max_iter``."""
    files = {"file": ("a.png", PNG.read_bytes(), "image/png")}
    x = torch.from_numpy(read_idx(IMAGES)[:1].copy()).unsqueeze(1).float() / 255.0
    with served.client() as client:
        r = client.post("/v1/models/fmnist-fc:classify", files=files, data={"stop": "label"})
        assert r.status_code == 200, r.text
        (pred,) = r.json()["predictions"]
        assert r.json()["solver"]["stop"] == "label" and r.json()["solver"]["logit_tol"] is None
        ref = local(fc, x, stop="label")
        assert (pred["label"], pred["class_name"], pred["label_proven"]) == (9, "Ankle boot", True)
        assert pred["iterations"] == ref.stats.iterations.item() == 6
        assert pred["error_bound"] == pytest.approx(ref.error_bound.item(), rel=1e-5)
        assert pred["certified_radius"] == pytest.approx(ref.certified_radius.item(), rel=1e-4)

        data = {"stop": "logits", "logit_tol": "0.5"}
        r = client.post("/v1/models/fmnist-fc:classify", files=files, data=data)
        assert r.status_code == 200, r.text
        assert r.json()["solver"]["stop"] == "logits" and r.json()["solver"]["logit_tol"] == 0.5
        ref = local(fc, x, stop="logits", logit_tol=0.5)
        assert rule_met(ref, "logits", 0.5).item()
        (pred,) = r.json()["predictions"]
        assert pred["iterations"] == ref.stats.iterations.item() == 10
        assert local(fc, x).stats.iterations.item() == 9  # the default rule stops elsewhere
        assert pred["error_bound"] == pytest.approx(ref.error_bound.item(), rel=1e-5)

        # JSON body of the friendly API, the same image and rule.
        r = client.post(
            "/v1/models/fmnist-fc:classify", json={"inputs": x[0].tolist(), "stop": "label"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["iterations"] == 6
        assert r.json()["predictions"][0]["label_proven"] is True


# ---- a server default -------------------------------------------------------------------------


@needs_images
def test_the_server_default_rule(tmp_path, pixels, fc):
    """``stop=logits`` with ``logit_tol`` 0.5 as settings (``--stop``, ``--logit-tol``):
    requests naming no rule solve under it; a request may name another rule, or only its own
    ``logit_tol``. On these 8 images every rule is met well before ``max_iter`` 300, each in
    its own iterations (in-process, per image: ``logits`` 0.5 11–14, ``logits`` 1.0 10–11,
    ``label`` 5–11, ``tol`` 9–11), so an answer under any other rule shows. (0.1 and 0.05
    are below float32's floor on fmnist-fc, 0.18 to 0.36 on these images: both ran to
    ``max_iter``, and a request's ``logit_tol`` was then not told from the server's.)"""
    shutil.copytree(MODELS / "fmnist-fc", tmp_path / "fmnist-fc")
    srv = LiveServer(model_dir=tmp_path, tune_at_load=False, retune_factor=0, max_delay_ms=1,
                     stop="logits", logit_tol=0.5).start()  # fmt: skip
    x = pixels[:8]
    names = [{"name": n} for n in ("iterations", "converged", "label_proven", "logit_error_bound")]
    seen = {}
    try:
        with srv.client() as client:
            for params, stop, logit_tol in (
                ({}, "logits", 0.5),
                ({"logit_tol": 1.0}, "logits", 1.0),
                ({"stop": "logits"}, "logits", 0.5),
                ({"stop": "label"}, "label", None),
                ({"stop": "tol"}, "tol", None),
            ):
                body = v2_body(x, parameters=params, outputs=names)
                r = client.post("/v2/models/fmnist-fc/infer", json=body)
                assert r.status_code == 200, (params, r.text)
                p = r.json()["parameters"]
                assert (p["stop"], p["logit_tol"]) == (stop, logit_tol), params
                ref = local(fc, x, stop=stop, logit_tol=logit_tol)
                assert rule_met(ref, stop, logit_tol).all(), params
                assert ref.stats.iterations.max().item() <= 14, params  # far from 300
                out = outputs(r.json())
                assert out["iterations"].tolist() == ref.stats.iterations.tolist(), params
                assert out["label_proven"].tolist() == ref.label_proven.tolist(), params
                assert out["converged"].tolist() == ref.stats.converged.tolist(), params
                torch.testing.assert_close(out["logit_error_bound"], ref.logit_error_bound,
                                           rtol=1e-5, atol=1e-6)  # fmt: skip
                seen[stop, logit_tol] = tuple(out["iterations"].tolist())
            body = v2_body(x, parameters={"stop": "label", "logit_tol": 0.5})
            r = client.post("/v2/models/fmnist-fc/infer", json=body)
            assert r.status_code == 422
            assert r.json()["error"] == "logit_tol applies to stop 'logits' only, not stop 'label'"
    finally:
        srv.stop()
    # Four rules, four different answers: a request solved under another rule would fail above.
    assert len(set(seen.values())) == len(seen) == 4


# ---- refusals (the tiny models of service_support) --------------------------------------------


def _tiny(rows: int = 1) -> torch.Tensor:
    """``rows`` 8×8 images for the tiny fc model, in steps of 1/8 (short JSON numbers: 201
    rows stay within the test server's 256 KiB body limit)."""
    x = torch.rand(rows, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return (x * 8).round() / 8


NO_DEFAULT = (
    "stop 'logits' needs logit_tol (the absolute logit accuracy, > 0); the server sets no default"
)
BAD = [
    ({"stop": "proof"}, "stop", "Input should be 'tol', 'label' or 'logits'"),
    ({"stop": "LABEL"}, "stop", "Input should be 'tol', 'label' or 'logits'"),
    ({"stop": 1}, "stop", "Input should be 'tol', 'label' or 'logits'"),
    ({"stop": None, "logit_tol": 0.1}, None,
     "logit_tol applies to stop 'logits' only, not stop 'tol' (the server's default: send "
     "stop 'logits' with it)"),
    ({"stop": "label", "logit_tol": 0.1}, None,
     "logit_tol applies to stop 'logits' only, not stop 'label'"),
    ({"stop": "logits"}, None, NO_DEFAULT),
    ({"stop": "logits", "logit_tol": 0}, "logit_tol", "Input should be greater than 0"),
    ({"stop": "logits", "logit_tol": -0.5}, "logit_tol", "Input should be greater than 0"),
    ({"stop": "logits", "logit_tol": "0.1"}, "logit_tol", "Input should be a valid number"),
    ({"stop": "logits", "logit_tol": True}, "logit_tol", "Input should be a valid number"),
    ({"stop": "logits", "logit_tol": math.inf}, "logit_tol", "Input should be a finite number"),
]  # fmt: skip


@pytest.mark.parametrize("params, field, message", BAD)
@pytest.mark.parametrize("api", ["v2", "v1"])
def test_bad_rules_are_refused_naming_the_field(client, api, params, field, message):
    """Each bad ``stop``/``logit_tol`` is 422 naming the field, in V2 ``parameters`` and the
    V1 JSON body alike; nothing is solved or counted."""
    params = {k: v for k, v in params.items() if v is not None}
    before = metric(metric_samples(client.get("/metrics").text), "mondeq_answers_total")
    if api == "v2":
        url, body = "/v2/models/fc/infer", v2_body(_tiny(), parameters=params)
        loc = ["body", "parameters", field]
    else:
        url, body = "/v1/models/fc:classify", {"inputs": _tiny().tolist(), **params}
        loc = ["body", field]
    # json.dumps spells inf as the token Infinity, which the server parses, then refuses.
    r = client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    if field is None:  # the rule and its accuracy do not go together: said in words
        assert r.json() == {"error": message}
    else:
        assert r.json()["error"] == f"invalid request: {'.'.join(loc)}: {message}"
        assert [d["loc"] for d in r.json()["detail"]] == [loc]
    assert metric(metric_samples(client.get("/metrics").text), "mondeq_answers_total") == before


@pytest.mark.parametrize(
    "fields, status, error",
    [
        ({"stop": "proof"}, 422,
         "invalid request: body.stop: Input should be 'tol', 'label' or 'logits'"),
        ({"stop": "label", "logit_tol": "0.1"}, 422,
         "logit_tol applies to stop 'logits' only, not stop 'label'"),
        ({"stop": "logits", "logit_tol": "0"}, 422,
         "invalid request: body.logit_tol: Input should be greater than 0"),
        ({"stop": "logits", "logit_tol": "tight"}, 422,
         "invalid request: body.logit_tol: Input should be a valid number"),
        ({"stop": "logits"}, 422, NO_DEFAULT),
    ],
)  # fmt: skip
def test_bad_rules_in_a_form_are_refused_as_in_json(client, fields, status, error):
    """The multipart fields of ``:classify`` obey the JSON body's rules, with its words."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    files = {"file": ("x.png", buf.getvalue(), "image/png")}
    r = client.post("/v1/models/fc:classify", files=files, data=fields)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


def test_stop_label_obeys_the_work_limit(client):
    """``rows × max_iter`` bounds a request under every rule: 201 rows × 500 is refused
    before it is queued, 200 × 500 solves (max_row_iterations 100,000)."""
    body = v2_body(_tiny(201), parameters={"stop": "label", "max_iter": 500})
    r = client.post("/v2/models/fc/infer", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == (
        "201 rows × max_iter 500 = 100500 row-iterations exceeds the server's limit "
        "max_row_iterations = 100000: send at most 200 rows at this max_iter, or a smaller "
        "max_iter"
    )
    body = v2_body(_tiny(200), parameters={"stop": "label", "max_iter": 500})
    r = client.post("/v2/models/fc/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["stop"] == "label"
