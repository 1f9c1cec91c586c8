"""``mondeq serve --workers 2`` (issue 15 §4): HTTP parsing in two worker processes, one
solver process. Real processes on loopback, compared with ``--workers 1`` on the same
checkpoints and Fashion-MNIST images: the same answers bit for bit, the same errors, one
Prometheus view, the repository's state and the admin calls on the solver process, and a
SIGTERM that loses no accepted request."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_support import (
    ADMIN_TOKEN,
    FC_CONFIG,
    fashion_images,
    free_port,
    make_checkpoint,
    metric,
    metric_samples,
    v2_body,
    wait_ready_url,
)

FC28 = {**FC_CONFIG, "image_size": 28}
# Tens of ms or more per 16-row solve: long enough that a burst finds the queue full, on any
# machine (an fc solve of 60 rows may end before the next request is parsed). Every row runs
# max_iter: no float32 iterate has a residual near tol 1e-9 (its true residual, certified in
# float64, bottoms out near 4e-7; at tol 1e-6 rows stop at iteration 16).
SLOW = {"arch": "conv", "in_channels": 3, "image_size": 16, "channels": 16,
        "solver": {"tol": 1e-9, "max_iter": 500}}  # fmt: skip
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def png(pixels: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((pixels[0, 0].numpy() * 255).round().astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


class Serve:
    """``python -m service --workers N`` in a process of its own."""

    def __init__(self, model_dir: Path, workers: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "MONDEQ_POLL_INTERVAL_S": "0",
            "MONDEQ_SETTLE_S": "0",
            "MONDEQ_ADMIN_TOKEN": ADMIN_TOKEN,
            "MONDEQ_TUNE_AT_LOAD": "false",
            "MONDEQ_GRPC_PORT": "0",
            "MONDEQ_MAX_QUEUE": "64",
            "MONDEQ_MAX_DELAY_MS": "5",
        }
        args = ["--model-dir", str(model_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", *args, "--workers", str(workers)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        wait_ready_url(self.url, 120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    make_checkpoint(root / "fc/1/model.pt", FC28, mean=0.28, std=0.35)
    make_checkpoint(root / "evolving/1/model.pt", FC28, seed=5)
    make_checkpoint(root / "slow/1/model.pt", SLOW)
    (root / "broken/1").mkdir(parents=True)
    (root / "broken/1/model.pt").write_bytes(b"this is not a checkpoint")
    return root


@pytest.fixture(scope="module")
def servers(repo, tmp_path_factory):
    """``(one process, two workers)`` on the same repository."""
    logs = tmp_path_factory.mktemp("logs")
    one = Serve(repo, 1, logs / "one.log")
    two = Serve(repo, 2, logs / "two.log")
    yield one, two
    for s in (one, two):
        s.stop()


def comparable(body: dict) -> dict:
    """An answer without its timings (``queue_ms``, ``solve_ms``)."""
    out = dict(body)
    for k in ("parameters", "solver"):
        if k in out:
            out[k] = {a: b for a, b in out[k].items() if a not in ("queue_ms", "solve_ms")}
    return out


def test_answers_are_those_of_one_process_bit_for_bit(servers):
    """V2 JSON one image at a time and eight in one request, V1 JSON with top-k and solver
    fields, V1 PNG uploads: every answer equal to the single process's (same floats,
    same batch sizes), timings aside."""
    images = fashion_images(8)
    requests = [("/v2/models/fc/infer", {"json": v2_body(images[i : i + 1])}) for i in range(8)]
    requests.append(("/v2/models/fc/infer", {"json": v2_body(images)}))
    outs = [{"name": n} for n in ("logits", "label", "logit_error_bound")]
    requests.append(("/v2/models/fc/infer", {"json": v2_body(images[:2], outputs=outs)}))
    # Forward-backward to tol 1e-3 converges on these rows in 37 iterations, by float32's own
    # residual test; 1e-5 is below what that test certifies on this model (near 1e-4), and
    # such rows stop only where the float64 certificate is offered (iteration 16, 32, 64, …).
    classify = {
        "inputs": images[:3].tolist(),
        "top_k": 3,
        "tol": 1e-3,
        "method": "forward_backward",
    }
    requests.append(("/v1/models/fc:classify", {"json": classify}))
    for i in range(3):
        requests.append(
            ("/v1/models/fc:classify", {"files": {"file": ("x.png", png(images[i : i + 1]))}})
        )
    answers = []
    for server in servers:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            answers.append([c.post(path, **kw) for path, kw in requests])
    for r1, r2 in zip(*answers, strict=True):
        assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
        assert comparable(r2.json()) == comparable(r1.json())
    solved = answers[0][10].json()  # the classify request: the fields took effect
    assert solved["solver"]["tol"] == 1e-3
    assert solved["solver"]["method"] == "forward_backward"
    assert [(a["iterations"], a["converged"]) for a in solved["predictions"]] == [(37, True)] * 3


INFER = "/v2/models/fc/infer"
ERRORS = [
    ("POST", "/v2/models/nope/infer", {"json": {"inputs": []}}),
    ("POST", "/v2/models/fc/versions/7/infer", {"json": {"inputs": []}}),
    ("GET", "/v2/models/broken", {}),
    ("GET", "/v2/models/broken/ready", {}),
    ("GET", "/v2/models/nope/ready", {}),
    ("POST", "/v2/models/broken/infer", {"json": {"inputs": []}}),
    ("POST", INFER, {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", INFER, {"content": b"x", "headers": {"content-type": "text/plain"}}),
    ("POST", INFER, {"json": v2_body(torch.zeros(1, 1, 8, 8))}),
    ("POST", INFER, {"json": v2_body(torch.zeros(1, 1, 28, 28), parameters={"tol": 5})}),
    ("POST", INFER, {"json": v2_body(torch.zeros(200, 1, 28, 28), parameters={"max_iter": 999})}),
    ("POST", INFER, {"json": v2_body(torch.zeros(1, 1, 28, 28), outputs=[{"name": "x"}])}),
    ("POST", "/v1/models/fc:classify", {"json": {"inputs": [[1.0]]}}),
    ("POST", "/v1/models/fc/tune-alpha", {}),
    ("POST", "/v1/models/fc/reload", {"headers": {"Authorization": "Bearer wrong"}}),
    ("POST", "/v1/models/nope/reload", {"headers": AUTH}),
    ("POST", "/v1/models/fc/tune-alpha", {"json": {"source": "nowhere"}, "headers": AUTH}),
    ("GET", "/v1/models/nope", {}),
    ("GET", "/v2/models/nope/stats", {}),
    ("POST", "/v2/repository/index", {}),
    ("POST", "/v2/repository/models/nope/unload", {"headers": AUTH}),
]  # fmt: skip


@pytest.mark.parametrize("method,path,kw", ERRORS)
def test_errors_are_those_of_one_process(servers, method, path, kw):
    """Unknown model or version (404), a model that failed to load (503), malformed or
    foreign bodies (400, 415), bad shapes, parameters and outputs (422), too much work
    (422), admin without or with a wrong token (401) and bad admin bodies: the same status,
    body and headers that matter from both."""
    got = []
    for server in servers:
        r = httpx.request(method, server.url + path, timeout=60, **kw)
        headers = {h: r.headers.get(h) for h in ("retry-after", "www-authenticate")}
        got.append((r.status_code, r.text, headers))
    assert got[0][0] >= 400
    assert got[1] == got[0]


def test_a_full_queue_is_429_with_retry_after(servers):
    """16 requests of 16 rows of a slow model at once against a queue of 64 rows: some are
    refused with 429, ``Retry-After`` and the single process's words; every other one is
    answered."""
    body = v2_body(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    results: list[httpx.Response] = []

    def send() -> None:
        results.append(httpx.post(servers[1].url + "/v2/models/slow/infer", json=body, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 429}, codes
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "rows queued (limit 64); retry later" in r.json()["error"]


def test_metrics_are_one_view_of_the_server(servers):
    """40 requests on 40 connections spread over the two workers: every scrape, whichever
    worker answers it, counts exactly 40 more requests and 40 more rows in the solver's
    histograms (counted once), with each series once."""
    two = servers[1]

    def scrape() -> dict:
        return metric_samples(httpx.get(two.url + "/metrics").text)

    before = scrape()
    image = fashion_images(1)
    for _ in range(40):
        assert httpx.post(two.url + "/v2/models/fc/infer", json=v2_body(image)).status_code == 200
    texts = [httpx.get(two.url + "/metrics").text for _ in range(6)]
    for text in texts:
        series = [line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")]
        assert len(series) == len(set(series))
        after = metric_samples(text)
        for name, labels in (
            ("mondeq_requests_total", {"endpoint": "v2_infer", "code": "200", "model": "fc"}),
            ("mondeq_request_duration_seconds_count", {"endpoint": "v2_infer", "model": "fc"}),
            ("mondeq_batch_size_sum", {"model": "fc"}),
            ("mondeq_solver_iterations_count", {"model": "fc"}),
            ("mondeq_answers_total", {"model": "fc"}),
            ("mondeq_queue_wait_seconds_count", {"model": "fc"}),
        ):
            assert metric(after, name, **labels) - metric(before, name, **labels) == 40, name
        assert metric(after, "mondeq_model_ready", model="fc") == 1
        assert metric(after, "mondeq_inflight_requests") == 0


def test_reload_and_alpha_search_act_on_the_solver_and_every_worker_sees_them(servers, repo):
    """A new version loaded by an admin reload on one connection is ready on the next
    connections, whichever worker takes them; removed and reloaded, it is 404 everywhere.
    An α search through a worker runs in the solver: the α it applied is the one every
    worker describes and the gauge shows."""
    two = servers[1]
    make_checkpoint(repo / "evolving/2/model.pt", FC28, seed=6)
    try:
        r = httpx.post(two.url + "/v1/models/evolving/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and "evolving/2" in r.json()["loaded"], r.text
        for _ in range(6):
            meta = httpx.get(two.url + "/v2/models/evolving").json()
            assert meta["versions"] == ["1", "2"]
            assert httpx.get(two.url + "/v2/models/evolving/versions/2/ready").status_code == 200
    finally:
        shutil.rmtree(repo / "evolving/2")
    r = httpx.post(two.url + "/v1/models/evolving/reload", headers=AUTH, timeout=60)
    assert r.json()["removed"] == ["evolving/2"]
    for _ in range(6):
        assert httpx.get(two.url + "/v2/models/evolving/versions/2/ready").status_code == 404
        assert httpx.get(two.url + "/v2/models/evolving").json()["versions"] == ["1"]

    images = fashion_images(64)
    for i in range(0, 64, 16):  # recent traffic to search on
        httpx.post(two.url + "/v2/models/evolving/infer", json=v2_body(images[i : i + 16]))
    r = httpx.post(
        two.url + "/v1/models/evolving/tune-alpha",
        json={"source": "recent", "apply": True},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    alpha = r.json()["alpha"]
    for _ in range(6):
        (model,) = [
            m for m in httpx.get(two.url + "/v1/models").json()["models"] if m["name"] == "evolving"
        ]
        assert model["alpha"] == alpha
        answer = httpx.post(two.url + "/v2/models/evolving/infer", json=v2_body(images[:1]))
        assert answer.json()["parameters"]["alpha"] == alpha
    samples = metric_samples(httpx.get(two.url + "/metrics").text)
    assert metric(samples, "mondeq_solver_alpha", model="evolving") == alpha
    assert metric(samples, "mondeq_alpha_tuning_total", model="evolving", reason="admin") == 1


def test_statistics_and_repository_extensions_act_on_the_solver(servers):
    """The statistics extension counts what the solver answered, as it is at the request,
    on every worker; an unload through one worker is 404 on all of them and in the index,
    and a load brings the model back."""
    two = servers[1]
    image = fashion_images(1)

    def stats() -> dict:
        (s,) = httpx.get(two.url + "/v2/models/fc/stats").json()["model_stats"]
        return s

    before = stats()
    for _ in range(5):
        httpx.post(two.url + "/v2/models/fc/infer", json=v2_body(image))
    for _ in range(4):
        after = stats()
        assert after["inference_count"] - before["inference_count"] == 5
        assert (
            after["inference_stats"]["success"]["count"]
            - before["inference_stats"]["success"]["count"]
            == 5
        )

    r = httpx.post(two.url + "/v2/repository/models/evolving/unload", headers=AUTH)
    assert r.status_code == 200, r.text
    for _ in range(4):
        assert httpx.get(two.url + "/v2/models/evolving/ready").status_code == 404
        index = httpx.post(two.url + "/v2/repository/index", headers=AUTH).json()
        (row,) = [m for m in index if m["name"] == "evolving"]
        assert (row["state"], row["reason"]) == ("UNAVAILABLE", "unloaded")
    r = httpx.post(two.url + "/v2/repository/models/evolving/load", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    for _ in range(4):
        assert httpx.get(two.url + "/v2/models/evolving/ready").status_code == 200


def test_sigterm_answers_every_accepted_request_then_exits_0(servers):
    """12 requests accepted by the workers, their bodies half sent, when the solver process
    gets SIGTERM: the clients then send the rest, all 12 are answered 200 (the solver keeps
    solving while the workers drain), and the server exits 0, workers included."""
    two = servers[1]
    images = fashion_images(12)
    go = threading.Event()
    codes: list = []

    def send(k: int) -> None:
        data = json.dumps(v2_body(images[k : k + 1])).encode()

        def body():
            yield data[:100]
            go.wait(60)
            yield data[100:]

        try:
            r = httpx.post(
                two.url + "/v2/models/fc/infer",
                content=body(),
                headers={"content-type": "application/json"},
                timeout=60,
            )
            codes.append(r.status_code)
        except httpx.TransportError as e:
            codes.append(type(e).__name__)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for _ in range(600):
        text = httpx.get(two.url + "/metrics").text
        if metric(metric_samples(text), "mondeq_inflight_requests") == 12:
            break
        time.sleep(0.05)
    assert metric(metric_samples(text), "mondeq_inflight_requests") == 12
    two.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the workers have stopped accepting
    go.set()
    for t in threads:
        t.join()
    assert codes == [200] * 12
    assert two.proc.wait(60) == 0
    log = two.log.read_text()
    assert "Traceback" not in log, log
