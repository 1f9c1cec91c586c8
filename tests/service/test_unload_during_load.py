"""An unload while a model loads (its α search runs) answers at once, and the load's result
is dropped: the model ends unloaded and the load's caller gets 409. With one process and
with ``--workers 2`` (the solver process holds the repository). Real servers in processes of
their own (stopped at the end, dropped α search and all).

The slow model is a real checkpoint whose stopping rule cannot be met (``tol`` 1e-30,
``max_iter`` 200000): its α search at load runs minutes, so the unload surely comes
during it, whatever the machine's speed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_support import ADMIN_TOKEN, FC_CONFIG, free_port, make_checkpoint, wait_ready_url

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SLOW = {**FC_CONFIG, "solver": {"alpha": 1.0, "tol": 1e-30, "max_iter": 200_000}}
BOUND_S = 30  # far more than an unload takes; far less than the slow α search


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A ``slow/1`` folder (outside the served repository until a test copies it in)."""
    root = tmp_path_factory.mktemp("slow")
    make_checkpoint(root / "slow/1/model.pt", SLOW, calibration=64)
    return root / "slow"


@pytest.fixture(params=[1, 2], ids=["one-process", "workers-2"])
def serve(request, tmp_path):
    """A server on a repository holding only ``fc``, in its own process."""
    repo = tmp_path / "models"
    make_checkpoint(repo / "fc/1/model.pt", FC_CONFIG, calibration=24)
    port = free_port()
    env = {
        **os.environ,
        "MONDEQ_POLL_INTERVAL_S": "0",
        "MONDEQ_SETTLE_S": "0",
        "MONDEQ_GRPC_PORT": "0",
        "MONDEQ_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    log = (tmp_path / "server.log").open("w")
    args = ["--model-dir", str(repo), "--port", str(port), "--workers", str(request.param)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers too are stopped at the end
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready_url(url, 120)
        yield repo, url
    finally:
        # SIGTERM first (the solver process stops its workers), then whatever is left.
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()


def state(url: str, name: str) -> tuple[str, str] | None:
    """``(state, reason)`` of ``name``'s version 1 in the repository index."""
    rows = httpx.post(f"{url}/v2/repository/index", headers=AUTH, timeout=BOUND_S).json()
    return next(((r["state"], r["reason"]) for r in rows if r["name"] == name), None)


def test_unload_during_a_load_answers_and_the_load_is_dropped(serve, slow_model):
    repo, url = serve
    shutil.copytree(slow_model, repo / "slow")
    pool = concurrent.futures.ThreadPoolExecutor(1)  # not awaited on failure
    try:
        loading = pool.submit(
            httpx.post, f"{url}/v2/repository/models/slow/load", headers=AUTH, timeout=300
        )
        for _ in range(600):  # until the load has begun (bounded: 60 s)
            if loading.done() or state(url, "slow") == ("LOADING", "loading"):
                break
            concurrent.futures.wait([loading], timeout=0.1)
        assert not loading.done(), f"the slow load answered at once: {loading.result().text}"
        assert state(url, "slow") == ("LOADING", "loading")
        # While the α search runs: other requests are answered, the unload included.
        assert httpx.get(f"{url}/v2/models/fc/ready", timeout=BOUND_S).status_code == 200
        try:
            r = httpx.post(f"{url}/v2/repository/models/slow/unload", headers=AUTH, timeout=BOUND_S)
        except httpx.TimeoutException:
            pytest.fail(f"the unload was not answered in {BOUND_S} s while slow/1 loaded")
        assert (r.status_code, r.json()) == (200, {"model": "slow", "unloaded": ["slow/1"]})
        try:
            answer = loading.result(timeout=BOUND_S)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"the load's caller got no answer in {BOUND_S} s after the unload")
    finally:
        pool.shutdown(wait=False)
    assert (answer.status_code, answer.json()) == (
        409,
        {"error": "model 'slow' was unloaded while loading; it stays unloaded"},
    )
    assert state(url, "slow") == ("UNAVAILABLE", "unloaded")
    r = httpx.get(f"{url}/v2/models/slow/ready", timeout=BOUND_S)
    assert r.status_code == 404
    assert httpx.get(f"{url}/v2/health/ready", timeout=BOUND_S).status_code == 200
