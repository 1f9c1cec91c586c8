"""One client cannot stall the others: per-request work limits and solves that share the CPU.

Issue 12 §2: 64 rows at ``forward_backward, tol 1e-6, max_iter 1000`` used to hold a default
single-image request in the queue until all of them were solved. Now the work one request may
ask for is bounded (``max_row_iterations``, ``max_iter_cap``, ``min_tol``: 422 past them) and
solves with other settings start at once, sharing the CPU through the batcher's
:class:`~service.batcher.ComputeGate` (least attained service, switching between iterations).
"""

from __future__ import annotations

import asyncio
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
    fashion_images,
    local_model,
    make_checkpoint,
    normalise,
    outputs,
    v2_body,
)

from model_core import build_model
from service.batcher import ComputeGate

ROOT = Path(__file__).resolve().parents[2]


def default_answer(tmp_path: Path, response, pixels: torch.Tensor):
    """Check that ``response`` was solved at the model's defaults (PR, tol 1e-2, 300
    iterations, alone in its batch) and return ``(model, in-process answer, its outputs)``."""
    model = local_model(tmp_path / "fmnist-fc/1/model.pt")
    p = response.json()["parameters"]
    assert (p["method"], p["tol"], p["max_iter"], p["batch_size"]) == (
        "peaceman_rachford", 0.01, 300, 1,
    )  # fmt: skip
    return model, model.infer(normalise(model, pixels)), outputs(response.json())


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


def test_a_request_waits_for_a_batch_of_many_requests_but_not_for_one_large_request():
    """Same settings, two ways to be behind a solve in flight. Behind a batch of 64 single
    images (saturation) a new image waits and is solved in the next batch, after all of
    them: batching stays as full as before. Behind one 64-row request it starts a solve of
    its own once that one has computed a slice, and is answered first."""
    from service.batcher import Batcher, BatchOutput

    def solve(x: torch.Tensor, key, between) -> BatchOutput:
        for _ in range(int(x[0, 0])):  # the first row's value: how many iterations
            between()
            time.sleep(0.005)
        return BatchOutput({"y": 2 * x})

    async def scenario(first: list[torch.Tensor]) -> list[str]:
        batcher = Batcher(
            "t", solve, max_batch_size=64, max_delay_s=0.0, max_gap_s=0.0, max_queue=1000
        )
        order: list[str] = []

        async def call(x: torch.Tensor, name: str) -> None:
            await batcher.submit(x, "k")
            order.append(name)

        tasks = [asyncio.create_task(call(x, f"A{i}")) for i, x in enumerate(first)]
        while batcher.solving == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # the batch has computed about 2.5 slices
        await call(torch.full((1, 1), 10.0), "B")
        await asyncio.gather(*tasks)
        await batcher.close()
        return order

    singles = [torch.full((1, 1), 40.0) for _ in range(64)]
    order = asyncio.run(scenario(singles))
    assert order == [f"A{i}" for i in range(64)] + ["B"]
    order = asyncio.run(scenario([torch.full((64, 1), 40.0)]))
    assert order == ["B", "A0"]


def test_rows_in_flight_stay_within_max_solving_rows():
    """Solves have no count cap, only a row cap: three 3-row requests with three settings
    under ``max_solving_rows = 4`` solve one at a time (3 + 3 would pass it), a 6-row
    request larger than the cap is still solved (alone), and every caller gets its rows."""
    from service.batcher import Batcher, BatchOutput

    lock = threading.Lock()
    solving = 0  # solves between their first and last iteration
    most = 0

    def solve(x: torch.Tensor, key, between) -> BatchOutput:
        nonlocal solving, most
        with lock:
            solving += 1
            most = max(most, solving)
        for _ in range(5):
            between()
            time.sleep(0.002)
        with lock:
            solving -= 1
        return BatchOutput({"y": x + key})

    async def scenario() -> list:
        batcher = Batcher(
            "t",
            solve,
            max_batch_size=64,
            max_delay_s=0.0,
            max_gap_s=0.0,
            max_queue=100,
            max_solving_rows=4,
            gate=ComputeGate(slice_s=0.0),  # solves in flight would alternate every iteration
        )
        xs = [torch.full((3, 1), float(i)) for i in range(3)] + [torch.zeros(6, 1)]
        answers = await asyncio.gather(*(batcher.submit(x, k) for k, x in enumerate(xs)))
        await batcher.close()
        return [a.rows["y"][:, 0].tolist() for a in answers]

    assert asyncio.run(scenario()) == [[0.0] * 3, [2.0] * 3, [4.0] * 3, [3.0] * 6]
    assert most == 1  # any two would pass 4 rows: 3 + 3, 3 + 6


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

    model, ref_b, out_b = default_answer(tmp_path, rb, images[64:])
    assert out_b["label"].tolist() == ref_b.logits.argmax(1).tolist()
    assert out_b["iterations"].tolist() == ref_b.stats.iterations.tolist()
    torch.testing.assert_close(out_b["logits"], ref_b.logits, atol=1e-5, rtol=0)

    pa = ra.json()["parameters"]
    assert (pa["method"], pa["max_iter"], pa["batch_size"]) == ("forward_backward", 1000, 64)
    out_a = outputs(ra.json())
    assert out_a["iterations"].tolist() == [1000] * 64
    ref_a = model.infer(normalise(model, images[:4]), **heavy)
    torch.testing.assert_close(out_a["logits"][:4], ref_a.logits, atol=1e-4, rtol=0)


async def heavy_then_light(
    url: str, path: str, heavy: list[dict], light: dict, in_flight: int
) -> tuple[list[httpx.Response], httpx.Response, list[str]]:
    """Send the ``heavy`` bodies at once, each from a client of its own; once the model has
    ``in_flight`` solves in flight, send ``light``. Returns the heavy answers, the light
    one, and the order in which they completed (``"A0"``, ``"A1"``, ..., ``"B"``)."""
    order: list[str] = []

    async def post(client: httpx.AsyncClient, body: dict, name: str) -> httpx.Response:
        r = await client.post(path, json=body)
        order.append(name)
        return r

    clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in range(len(heavy) + 1)]
    try:
        tasks = [
            asyncio.create_task(post(c, body, f"A{i}"))
            for i, (c, body) in enumerate(zip(clients, heavy, strict=False))
        ]
        seen = 0
        for _ in range(6000):
            (model,) = (await clients[-1].get("/v1/models")).json()["models"]
            seen = max(seen, model["solves_in_flight"])
            if seen >= in_flight or order:
                break
            await asyncio.sleep(0.01)
        assert seen >= in_flight and not order, (
            f"{seen} solves in flight at most, {in_flight} wanted; completed: {order}"
        )
        rb = await post(clients[-1], light, "B")
        return list(await asyncio.gather(*tasks)), rb, order
    finally:
        for c in clients:
            await c.aclose()


def test_a_default_request_is_not_held_by_four_solves_with_four_other_settings(tmp_path):
    """Issue 12 §2, more keys than solves used to be allowed: four clients send 25 test
    images each under forward–backward at max_iter 1000 with four different tol (four
    solves in flight, the old per-version cap), then one client sends one image with the
    default settings. Its solve starts at once rather than when a slot frees: it is
    answered before every one of the four, with the in-process solve's answer, and each
    of the four gets exactly the answer of its own uninterrupted solve."""
    shutil.copytree(ROOT / "models/fmnist-fc", tmp_path / "fmnist-fc")
    srv = LiveServer(model_dir=tmp_path, tune_at_load=False).start()
    images = fashion_images(101)
    tols = (1e-6, 2e-6, 3e-6, 4e-6)
    wanted = [{"name": n} for n in ("logits", "label", "iterations")]
    heavy = [
        v2_body(
            images[25 * i : 25 * (i + 1)],
            parameters={"method": "forward_backward", "tol": tol, "max_iter": 1000},
            outputs=wanted,
        )
        for i, tol in enumerate(tols)
    ]
    light = v2_body(images[100:], outputs=wanted)
    try:
        answers, rb, order = asyncio.run(
            heavy_then_light(srv.url, "/v2/models/fmnist-fc/infer", heavy, light, in_flight=4)
        )
    finally:
        srv.stop()
    assert order[0] == "B", order
    assert [r.status_code for r in [*answers, rb]] == [200] * 5, [r.text for r in answers]

    model, ref_b, out_b = default_answer(tmp_path, rb, images[100:])
    assert torch.equal(out_b["logits"], ref_b.logits)
    assert out_b["iterations"].tolist() == ref_b.stats.iterations.tolist()
    for i, (tol, ra) in enumerate(zip(tols, answers, strict=True)):
        pa = ra.json()["parameters"]
        assert (pa["method"], pa["tol"], pa["max_iter"], pa["batch_size"]) == (
            "forward_backward",
            tol,
            1000,
            25,
        )
        ref = model.infer(
            normalise(model, images[25 * i : 25 * (i + 1)]),
            method="forward_backward",
            tol=tol,
            max_iter=1000,
        )
        out = outputs(ra.json())
        assert torch.equal(out["logits"], ref.logits), i
        assert out["iterations"].tolist() == ref.stats.iterations.tolist()


def test_a_default_image_is_not_held_by_a_long_solve_with_the_same_settings(tmp_path):
    """Issue 12 §2, the same settings: 256 rows of uniform noise at the default settings
    (a solve of about a second on fmnist-conv), then one default test image. Requests with
    the same settings batch together only while the solve in flight is young: once it has
    computed a slice, the image starts a solve of its own and is answered first, alone in
    its batch and with the in-process answer; the 256 rows get their uninterrupted
    answer."""
    shutil.copytree(ROOT / "models/fmnist-conv", tmp_path / "fmnist-conv")
    srv = LiveServer(model_dir=tmp_path, tune_at_load=False).start()
    noise = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    image = fashion_images(1)
    wanted = [{"name": n} for n in ("logits", "label", "iterations")]
    try:
        (ra,), rb, order = asyncio.run(
            heavy_then_light(
                srv.url,
                "/v2/models/fmnist-conv/infer",
                [v2_body(noise, outputs=wanted)],
                v2_body(image, outputs=wanted),
                in_flight=1,
            )
        )
    finally:
        srv.stop()
    assert order == ["B", "A0"]
    assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
    pa, pb = ra.json()["parameters"], rb.json()["parameters"]
    assert (pa["method"], pa["tol"], pa["max_iter"]) == (pb["method"], pb["tol"], pb["max_iter"])
    assert (pa["batch_size"], pb["batch_size"]) == (256, 1)

    model = local_model(tmp_path / "fmnist-conv/1/model.pt")
    for r, x in ((rb, image), (ra, noise)):
        ref = model.infer(normalise(model, x))
        out = outputs(r.json())
        assert torch.equal(out["logits"], ref.logits)
        assert out["iterations"].tolist() == ref.stats.iterations.tolist()
