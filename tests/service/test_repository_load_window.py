"""A model being loaded is never "unknown": between a load's start and its scan of the
model's folder, requests for it are 503 (loading), not 404 (unknown model). Real server on
loopback, real checkpoints, real clients hammering it while an admin unloads and loads."""

from __future__ import annotations

import threading

import pytest
import torch
from service_support import ADMIN_TOKEN, FC_CONFIG, LiveServer, make_checkpoint, v2_body

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture()
def server(tmp_path):
    make_checkpoint(tmp_path / "fc/1/model.pt", FC_CONFIG, calibration=24)
    srv = LiveServer(model_dir=tmp_path, admin_token=ADMIN_TOKEN, tune_at_load=False).start()
    yield srv
    srv.stop()


def test_requests_during_unload_and_load_cycles_never_hear_unknown_model(server):
    """4 clients send inference and readiness requests while the model is unloaded and
    loaded 20 times: each answer is 200, 503 (loading) or 404 'is unloaded', never 404
    'unknown model' (every cycle used to open that window)."""
    body = v2_body(torch.rand(1, 1, 8, 8))
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def hammer(path: str, post: bool) -> None:
        with server.client() as c:
            while not done.is_set():
                r = c.post(path, json=body) if post else c.get(path)
                seen.append((r.status_code, r.text))

    threads = [
        threading.Thread(target=hammer, args=(p, post))
        for p, post in [("/v2/models/fc/infer", True)] * 2 + [("/v2/models/fc/ready", False)] * 2
    ]
    for t in threads:
        t.start()
    try:
        with server.client() as admin:
            for _ in range(20):
                assert (
                    admin.post("/v2/repository/models/fc/unload", headers=AUTH).status_code == 200
                )
                r = admin.post("/v2/repository/models/fc/load", headers=AUTH)
                assert r.status_code == 200, r.text
    finally:
        done.set()
        for t in threads:
            t.join()
    unknown = [text for code, text in seen if "unknown model" in text]
    assert unknown == []
    assert {code for code, _ in seen} <= {200, 404, 503}
    assert all("is unloaded" in text for code, text in seen if code == 404)
    assert any("is loading" in text for code, text in seen if code == 503)
