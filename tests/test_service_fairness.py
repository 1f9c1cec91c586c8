"""One client cannot stall the others: per-request work limits and solves that share the CPU.

Issue 12 §2: 64 rows at ``forward_backward, tol 1e-6, max_iter 1000`` used to hold a default
single-image request in the queue until all of them were solved. Now the work one request may
ask for is bounded (``max_row_iterations``, ``max_iter_cap``, ``min_tol``: 422 past them) and
solves with other settings start at once, sharing the CPU through the batcher's
:class:`~service.batcher.ComputeGate` (least attained service, switching between iterations).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_support import (
    FC_CONFIG,
    LiveServer,
    local_model,
    make_checkpoint,
    normalise,
    outputs,
    v2_body,
)

from model_core import build_model
from service.batcher import ComputeGate

ROOT = Path(__file__).resolve().parent.parent
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def fashion_images(n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images, ``(n, 1, 28, 28)`` in [0, 1]."""
    with gzip.open(FASHION_TEST, "rb") as f:
        raw = f.read(16 + n * 784)
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, 28, 28)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


# ---- the gate ---------------------------------------------------------------------------------


def test_a_short_solve_overtakes_a_long_one_and_only_one_computes_at_a_time():
    """A long solve that calls ``between`` every iteration lets a newer, shorter one run
    first: the short one ends while the long one still has iterations to go, and at no
    moment do both compute."""
    gate = ComputeGate(slice_s=0.005)
    computing = 0
    overlaps = 0
    events: list[str] = []
    lock = threading.Lock()
    long_started = threading.Event()
    short_done = threading.Event()

    def iteration() -> None:
        nonlocal computing, overlaps
        with lock:
            computing += 1
            overlaps += computing > 1
        time.sleep(0.001)  # the work of one iteration
        with lock:
            computing -= 1

    def long_solve() -> None:
        with gate.turn() as turn:
            for i in range(5000):  # ~5 s if nothing overtook it; it stops soon after
                turn.between()
                iteration()
                long_started.set()
                if short_done.is_set() and i % 10 == 0:
                    events.append(f"long ended at {i}")
                    return
            events.append("long ran out")

    def short_solve() -> None:
        long_started.wait()
        with gate.turn() as turn:
            for _ in range(5):
                turn.between()
                iteration()
        events.append("short done")
        short_done.set()

    threads = [threading.Thread(target=long_solve), threading.Thread(target=short_solve)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert events[0] == "short done"
    assert events[1].startswith("long ended at"), events
    assert overlaps == 0
    assert gate.waiting == 0


def test_between_is_called_once_per_iteration_and_changes_no_answer():
    torch.manual_seed(3)
    model = build_model(FC_CONFIG)
    x = torch.randn(5, 1, 8, 8)
    for method in ("peaceman_rachford", "forward_backward"):
        calls = []
        hooked = model.infer(
            x, method=method, tol=1e-6, max_iter=60, between=partial(calls.append, 1)
        )
        plain = model.infer(x, method=method, tol=1e-6, max_iter=60)
        assert len(calls) == int(hooked.stats.iterations.max())
        assert torch.equal(hooked.logits, plain.logits)
        assert torch.equal(hooked.stats.iterations, plain.stats.iterations)


# ---- limits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A tiny fc model (default max_iter 200) behind max_row_iterations = 300."""
    root = tmp_path_factory.mktemp("limited")
    make_checkpoint(root / "fc/1/model.pt", FC_CONFIG)
    srv = LiveServer(
        model_dir=root, max_row_iterations=300, max_iter_cap=500, tune_at_load=False
    ).start()
    yield srv
    srv.stop()


def png(pixels: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((pixels[0, 0].numpy() * 255).round().astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def assert_work_refused(r: httpx.Response, rows: int, max_iter: int) -> None:
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert f"{rows} rows × max_iter {max_iter} = {rows * max_iter}" in message
    assert "max_row_iterations = 300" in message


@pytest.mark.parametrize(
    "rows,params,code",
    [
        (1, {}, 200),  # 1 × 200 (the model's default max_iter)
        (2, {}, 422),  # 2 × 200: the limit holds for the default max_iter too
        (2, {"max_iter": 150}, 200),  # 300: at the limit
        (3, {"max_iter": 100, "tol": 1e-6, "method": "forward_backward"}, 200),
        (3, {"max_iter": 101}, 422),
        (1, {"max_iter": 301}, 422),
    ],
)
def test_work_past_max_row_iterations_is_422_on_v2_and_v1_json(limited, rows, params, code):
    x = torch.rand(rows, 1, 8, 8, generator=torch.Generator().manual_seed(rows))
    max_iter = params.get("max_iter", 200)
    with limited.client() as c:
        v2 = c.post("/v2/models/fc/infer", json=v2_body(x, parameters=params))
        v1 = c.post("/v1/models/fc:classify", json={"inputs": x.tolist(), **params})
    for r in (v2, v1):
        if code == 200:
            assert r.status_code == 200, r.text
        else:
            assert_work_refused(r, rows, max_iter)
    if code == 422 and rows == 1:
        assert "max_iter may be at most 300" in v2.json()["error"]
    elif code == 422:
        assert f"send at most {300 // max_iter} rows" in v2.json()["error"]


def test_work_past_max_row_iterations_is_422_on_uploads(limited):
    image = png(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    with limited.client() as c:
        ok = c.post(
            "/v1/models/fc:classify",
            files={"file": ("x.png", image, "image/png")},
            data={"max_iter": "300"},
        )
        refused = c.post(
            "/v1/models/fc:classify",
            files={"file": ("x.png", image, "image/png")},
            data={"max_iter": "400"},
        )
    assert ok.status_code == 200, ok.text
    assert ok.json()["solver"]["max_iter"] == 300
    assert_work_refused(refused, 1, 400)


# ---- scheduling on a real server --------------------------------------------------------------


def test_a_default_request_is_answered_while_the_costliest_allowed_one_solves(tmp_path):
    """The issue's case on the shipped fmnist-fc model and real Fashion-MNIST images: client
    A sends the most expensive request the limits allow (64 rows × max_iter 1000 under
    forward–backward at tol 1e-6; the model's FB iterations never reach that residual, so
    every row runs all 1000), and once it is solving client B sends one image with the
    default settings. B is answered, correctly, while A is still solving; A's answer is the
    one an uninterrupted solve gives."""
    shutil.copytree(ROOT / "models/fmnist-fc", tmp_path / "fmnist-fc")
    srv = LiveServer(
        model_dir=tmp_path,
        max_row_iterations=64 * 1000,
        max_iter_cap=1000,
        min_tol=1e-6,
        tune_at_load=False,
    ).start()
    images = fashion_images(65)
    heavy = {"method": "forward_backward", "tol": 1e-6, "max_iter": 1000}
    path = "/v2/models/fmnist-fc/infer"
    wanted = [{"name": n} for n in ("logits", "label", "iterations")]
    try:
        with srv.client() as c:
            assert_refused = c.post(path, json=v2_body(images, parameters=heavy))
            assert assert_refused.status_code == 422  # 65 rows: one past the limit
            assert "max_row_iterations = 64000" in assert_refused.json()["error"]

        async def scenario():
            async with (
                httpx.AsyncClient(base_url=srv.url, timeout=600) as a,
                httpx.AsyncClient(base_url=srv.url, timeout=600) as b,
            ):
                task_a = asyncio.create_task(
                    a.post(path, json=v2_body(images[:64], parameters=heavy, outputs=wanted))
                )
                for _ in range(6000):
                    (model,) = (await b.get("/v1/models")).json()["models"]
                    if model["solves_in_flight"] >= 1:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("A's solve never started")
                assert not task_a.done()
                rb = await b.post(path, json=v2_body(images[64:], outputs=wanted))
                a_was_solving = not task_a.done()
                return await task_a, rb, a_was_solving

        ra, rb, a_was_solving = asyncio.run(scenario())
    finally:
        srv.stop()
    assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
    assert a_was_solving  # B's answer came back before A's

    model = local_model(tmp_path / "fmnist-fc/1/model.pt")
    pb = rb.json()["parameters"]
    assert (pb["method"], pb["tol"], pb["max_iter"], pb["batch_size"]) == (
        "peaceman_rachford",
        0.01,
        300,
        1,
    )
    ref_b = model.infer(normalise(model, images[64:]))
    out_b = outputs(rb.json())
    assert out_b["label"].tolist() == ref_b.logits.argmax(1).tolist()
    assert out_b["iterations"].tolist() == ref_b.stats.iterations.tolist()
    torch.testing.assert_close(out_b["logits"], ref_b.logits, atol=1e-5, rtol=0)

    pa = ra.json()["parameters"]
    assert (pa["method"], pa["max_iter"], pa["batch_size"]) == ("forward_backward", 1000, 64)
    out_a = outputs(ra.json())
    assert out_a["iterations"].tolist() == [1000] * 64
    ref_a = model.infer(normalise(model, images[:4]), **heavy)
    torch.testing.assert_close(out_a["logits"][:4], ref_a.logits, atol=1e-4, rtol=0)
