"""The model repository on a real server: gauges follow what serves, and a bad or half-written
file never takes a serving version down."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from service_support import (
    ADMIN_TOKEN,
    FC_CONFIG,
    LiveServer,
    local_model,
    make_checkpoint,
    metric_samples,
    normalise,
    outputs,
    v2_body,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
X = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(12))


def config(alpha: float, tol: float, max_iter: int) -> dict:
    return {**FC_CONFIG, "solver": {"alpha": alpha, "tol": tol, "max_iter": max_iter}}


def age(path: Path, seconds: float = 60) -> None:
    """Date a file back, as a checkpoint copied in long ago."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def models(c: httpx.Client) -> dict:
    return {m["name"]: m for m in c.get("/v1/models").json()["models"]}


def series(c: httpx.Client, model: str) -> dict[str, list]:
    """Every gauge series of ``model``: ``{metric: [(labels without model, value)]}``."""
    out: dict[str, list] = {}
    for (name, labels), value in metric_samples(c.get("/metrics").text).items():
        ls = dict(labels)
        if ls.pop("model", None) != model or not name.startswith("mondeq_"):
            continue
        if name.endswith(("_total", "_created", "_bucket", "_sum", "_count")):
            continue  # counters and histograms are history, not state
        out.setdefault(name, []).append((ls, value))
    return out


def served_gauges(version: str, alpha: float, tol: float, max_iter: int) -> dict:
    return {
        "mondeq_model_ready": [({}, 1.0)],
        "mondeq_model_info": [
            ({"version": version, "arch": "fc", "method": "peaceman_rachford"}, 1.0)
        ],
        "mondeq_solver_alpha": [({}, alpha)],
        "mondeq_solver_tol": [({}, tol)],
        "mondeq_solver_max_iter": [({}, float(max_iter))],
    }


def logits_of(path_bytes: bytes, tmp: Path, alpha: float) -> torch.Tensor:
    """The logits a checkpoint (given as its bytes) gives ``X`` in-process."""
    f = tmp / "reference.pt"
    f.write_bytes(path_bytes)
    model = local_model(f)
    return model.infer(normalise(model, X), alpha=alpha).logits


# ---- gauges -----------------------------------------------------------------------------------


def test_gauges_describe_the_version_that_serves_now(tmp_path):
    root = tmp_path / "models"
    # No calibration batch and no drift retunes: α stays the checkpoint's (exact values).
    make_checkpoint(root / "m/2/model.pt", config(0.7, 1e-4, 200), seed=2)
    make_checkpoint(root / "m/3/model.pt", config(0.4, 1e-3, 150), seed=3)
    (root / "dud/1").mkdir(parents=True)
    (root / "dud/1/model.pt").write_bytes(b"not a checkpoint")
    srv = LiveServer(
        model_dir=root, admin_token=ADMIN_TOKEN, poll_interval_s=0.1, retune_factor=0
    ).start()
    try:
        with srv.client() as c:
            assert series(c, "m") == served_gauges("3", 0.4, 1e-3, 150)
            # A model with no version that serves: ready 0 and nothing describing a version.
            assert series(c, "dud") == {
                "mondeq_model_ready": [({}, 0.0)],
                "mondeq_model_load_failed": [({"version": "1"}, 1.0)],
            }

            # The default version's folder goes: version 2 serves, the gauges say so.
            shutil.rmtree(root / "m/3")
            wait_until(lambda: models(c)["m"]["default_version"] == "2")
            assert series(c, "m") == served_gauges("2", 0.7, 1e-4, 200)
            r = c.post("/v2/models/m/infer", json=v2_body(X))
            assert r.json()["model_version"] == "2" and r.json()["parameters"]["alpha"] == 0.7

            # A reload that fails keeps version 2 serving: its gauges stay, the failure shows.
            garbage = root / "m/2/.model.pt.tmp"
            garbage.write_bytes(b"garbage")
            garbage.replace(root / "m/2/model.pt")
            wait_until(lambda: models(c)["m"]["versions"][0]["reload"] is not None)
            assert series(c, "m") == {
                **served_gauges("2", 0.7, 1e-4, 200),
                "mondeq_model_load_failed": [({"version": "2"}, 1.0)],
            }
            s = metric_samples(c.get("/metrics").text)
            key = (
                "mondeq_model_load_failures_total",
                frozenset({"model": "m", "version": "2"}.items()),
            )
            assert s[key] == 1.0

            # A good file and an admin reload: loaded, the failure gauge gone.
            make_checkpoint(root / "m/tmp.pt", config(0.9, 1e-4, 120), seed=4)
            (root / "m/tmp.pt").replace(root / "m/2/model.pt")
            r = c.post("/v1/models/m/reload", headers=AUTH)
            assert r.status_code == 200 and r.json()["loaded"] == ["m/2"], r.text
            assert series(c, "m") == served_gauges("2", 0.9, 1e-4, 120)

            # The model leaves the repository: none of its gauges remain.
            shutil.rmtree(root / "m")
            wait_until(lambda: "m" not in models(c))
            assert series(c, "m") == {}
    finally:
        srv.stop()


# ---- files being written ----------------------------------------------------------------------


class SlowCopy(threading.Thread):
    """``cp``-like writer: truncates ``path`` and writes ``data`` into it in 40 steps, one
    every 0.1 s, and stalls halfway until :attr:`resume` is set."""

    def __init__(self, path: Path, data: bytes):
        super().__init__(daemon=True)
        self.path, self.data = path, data
        self.stalled, self.resume = threading.Event(), threading.Event()

    def run(self) -> None:
        step = len(self.data) // 40 + 1
        with open(self.path, "wb") as f:
            for i, pos in enumerate(range(0, len(self.data), step)):
                if i == 20:
                    self.stalled.set()
                    self.resume.wait()
                f.write(self.data[pos : pos + step])
                f.flush()
                time.sleep(0.1)


def test_a_checkpoint_overwritten_in_place_never_takes_the_model_down(tmp_path):
    root = tmp_path / "models"
    target = root / "solo/1/model.pt"
    make_checkpoint(target, FC_CONFIG, seed=7)
    age(target)
    old_bytes = target.read_bytes()
    make_checkpoint(tmp_path / "new.pt", FC_CONFIG, seed=8)
    new_bytes = (tmp_path / "new.pt").read_bytes()
    srv = LiveServer(model_dir=root, poll_interval_s=0.1, settle_s=2.0, retune_factor=0).start()
    copy = SlowCopy(target, new_bytes)
    try:
        with srv.client() as c:
            alpha = models(c)["solo"]["alpha"]
            old_logits = logits_of(old_bytes, tmp_path, alpha)
            new_logits = logits_of(new_bytes, tmp_path, alpha)

            def serves_old() -> None:
                r = c.post("/v2/models/solo/infer", json=v2_body(X))
                assert r.status_code == 200, r.text
                assert r.json()["model_version"] == "1"
                torch.testing.assert_close(outputs(r.json())["logits"], old_logits)
                assert c.get("/v2/health/ready").status_code == 200

            # 1. A copy in progress across many polls: the file is pending, not loaded.
            copy.start()
            time.sleep(0.5)
            while not copy.stalled.is_set():
                serves_old()
                v = models(c)["solo"]["versions"][0]
                assert v["status"] == "ready" and v["reload"]["status"] == "pending", v
                assert "still changing" in v["reload"]["error"]
                time.sleep(0.1)
            # 2. The copy stalls past the settle time: the half file fails to load and the
            #    loaded weights keep serving.
            wait_until(lambda: models(c)["solo"]["versions"][0]["reload"]["status"] == "failed")
            serves_old()
            m = models(c)["solo"]
            assert m["status"] == "ready" and m["default_version"] == "1"
            assert "truncated" in m["versions"][0]["reload"]["error"]
            s = metric_samples(c.get("/metrics").text)
            labels = frozenset({"model": "solo", "version": "1"}.items())
            assert s[("mondeq_model_load_failed", labels)] == 1.0
            assert s[("mondeq_model_load_failures_total", labels)] == 1.0
            assert s[("mondeq_model_ready", frozenset({"model": "solo"}.items()))] == 1.0
            # 3. The copy ends: once settled, the new weights serve.
            copy.resume.set()
            copy.join(30)

            def serves_new() -> bool:
                r = c.post("/v2/models/solo/infer", json=v2_body(X))
                assert r.status_code == 200, r.text
                return torch.allclose(outputs(r.json())["logits"], new_logits, atol=1e-5)

            wait_until(serves_new)
            assert models(c)["solo"]["versions"][0]["reload"] is None
            s = metric_samples(c.get("/metrics").text)
            assert ("mondeq_model_load_failed", labels) not in s
            assert s[("mondeq_model_load_failures_total", labels)] == 1.0
    finally:
        copy.resume.set()
        srv.stop()


def test_new_versions_load_only_when_complete_and_temporary_names_are_ignored(tmp_path):
    root = tmp_path / "models"
    make_checkpoint(root / "solo/1/model.pt", FC_CONFIG, seed=7)
    age(root / "solo/1/model.pt")
    make_checkpoint(tmp_path / "v2.pt", FC_CONFIG, seed=9)
    data = (tmp_path / "v2.pt").read_bytes()
    srv = LiveServer(model_dir=root, poll_interval_s=0.1, settle_s=1.0, retune_factor=0).start()
    try:
        with srv.client() as c:
            # Work in progress under temporary names is never a model or a version.
            for tmp in ("solo/.2.tmp/model.pt", "solo/2.tmp/model.pt", "solo.tmp/1/model.pt"):
                (root / tmp).parent.mkdir(parents=True)
                (root / tmp).write_bytes(data)
            (root / "solo/1/model.pt.tmp").write_bytes(b"partial")
            # A new version still being written: pending, the default stays.
            (root / "solo/3").mkdir()
            with open(root / "solo/3/model.pt", "wb") as f:
                for i in range(8):
                    f.write(data[i * 1000 : (i + 1) * 1000])
                    f.flush()
                    time.sleep(0.15)
                m = models(c)
                assert set(m) == {"solo"}
                assert [v["version"] for v in m["solo"]["versions"]] == ["3", "1"]
                v3 = m["solo"]["versions"][0]
                assert v3["status"] == "pending" and "still changing" in v3["error"]
                assert m["solo"]["default_version"] == "1"
                r = c.post("/v2/models/solo/versions/3/infer", json=v2_body(X))
                assert r.status_code == 503 and "pending" in r.json()["error"]
                assert (
                    c.post("/v2/models/solo/infer", json=v2_body(X)).json()["model_version"] == "1"
                )
                f.write(data[8000:])
            wait_until(lambda: models(c)["solo"]["default_version"] == "3")
            # The documented way: write aside, rename into place.
            (root / "solo/.2.tmp").rename(root / "solo/2")
            wait_until(
                lambda: [v["status"] for v in models(c)["solo"]["versions"]] == ["ready"] * 3
            )
            assert set(models(c)) == {"solo"}
    finally:
        srv.stop()


@pytest.mark.parametrize("poll", [0.0, 0.1])
def test_a_fresh_checkpoint_at_start_settles_before_ready(tmp_path, poll):
    """Written just before the server starts: loaded once settled, with or without polling."""
    root = tmp_path / "models"
    make_checkpoint(root / "fresh/1/model.pt", FC_CONFIG, seed=5)
    srv = LiveServer(model_dir=root, poll_interval_s=poll, settle_s=0.5).start()
    try:
        with srv.client() as c:
            assert models(c)["fresh"]["status"] == "ready"
    finally:
        srv.stop()


# ---- models waiting for their turn to load ---------------------------------------------------


def test_models_not_loaded_yet_are_503_not_404(tmp_path):
    """Models load one after another (each tunes α on its calibration batch). Until its turn,
    a model on disk is listed as loading and answers 503 (not ready), never 404 (unknown):
    a probe or client must not take a model that is about to serve for one that does not
    exist. (Each was 404 until the loader reached it.)"""
    root = tmp_path / "models"
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        make_checkpoint(root / f"{name}/1/model.pt", FC_CONFIG, seed=i, calibration=64)
    srv = LiveServer(model_dir=root, retune_factor=0).start(wait_ready=False)
    try:
        with srv.client() as c:
            wait_until(lambda: models(c) != {}, timeout=60)
            listed = models(c)
            assert sorted(listed) == names
            waiting = [n for n in names if listed[n]["status"] == "loading"]
            assert waiting, listed  # the first is still tuning
            for name in waiting:
                r = c.get(f"/v2/models/{name}/ready")
                assert r.status_code in (200, 503), r.text  # 200: it loaded meanwhile
                r = c.post(f"/v2/models/{name}/infer", json=v2_body(X))
                assert r.status_code in (200, 503), r.text
            wait_until(lambda: c.get("/v2/health/ready").status_code == 200, timeout=120)
            assert all(m["status"] == "ready" for m in models(c).values())
    finally:
        srv.stop()
