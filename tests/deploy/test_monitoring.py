"""The dashboard and the alerts against the real thing: `mondeq serve` and Debian's
`prometheus` on loopback, scraping every second.

Every PromQL expression of the Grafana dashboard (variables filled in) and of the alert rules
goes through Prometheus's HTTP API: each must parse and evaluate, and each dashboard query must
return data after traffic. The traffic includes client errors, an unconverged solve and an
admin α search, so the error, unconverged and tuning-annotation panels have data too, and
requests under stop="label" (whose answers count in the proof alert's series). A renamed
metric breaks this test, not a dashboard in production.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch
from promql import alert_queries, dashboard_queries, prometheus_config
from service_support import FC_CONFIG, free_port, make_checkpoint, v2_body, wait_ready_url

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian package prometheus is not installed (make test installs it)"
)
TOKEN = "monitoring-test"
MODELS = ("alpha", "beta")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    for i, name in enumerate(MODELS):
        make_checkpoint(root / "models" / name / "1" / "model.pt", FC_CONFIG, seed=i,
                        calibration=16)  # fmt: skip
    port, prom_port = free_port(), free_port()
    env = {**os.environ, "MONDEQ_ADMIN_TOKEN": TOKEN, "MONDEQ_POLL_INTERVAL_S": "0",
           "MONDEQ_GRPC_PORT": "0"}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "mondeq_cli", "serve", "--model-dir", str(root / "models"),
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    cfg = root / "prometheus.yml"
    cfg.write_text(prometheus_config(f"127.0.0.1:{port}"))
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={root / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready_url(base, timeout=120)
        prom_url = f"http://127.0.0.1:{prom_port}"
        _wait(lambda: httpx.get(f"{prom_url}/-/ready", timeout=2).status_code == 200, 60)
        yield base, prom_url
    finally:
        for p in (server, prom):
            p.terminate()
        for p in (server, prom):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _traffic(base: str, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    with httpx.Client(base_url=base, timeout=60) as c:
        for _ in range(rounds):
            for name in MODELS:
                x = torch.rand(3, 1, 8, 8, generator=g)
                r = c.post(f"/v2/models/{name}/infer", json=v2_body(x))
                assert r.status_code == 200, r.text
                r = c.post(f"/v2/models/{name}/infer", json={"inputs": []})  # a client error
                assert 400 <= r.status_code < 500
            time.sleep(0.5)


def _query(prom_url: str, expr: str) -> list:
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, r.text)
    return body["data"]["result"]


def test_every_dashboard_and_alert_expression_runs_and_the_dashboard_has_data(stack):
    base, prom_url = stack
    _wait(lambda: bool(_query(prom_url, 'up{job="mondeq"} == 1')), 60)
    _traffic(base, rounds=4)
    with httpx.Client(base_url=base, timeout=60) as c:
        x = torch.rand(2, 1, 8, 8)
        body = v2_body(x, parameters={"max_iter": 1, "tol": 1e-6})
        r = c.post(f"/v2/models/{MODELS[0]}/infer", json=body)
        assert r.status_code == 200, r.text  # an unconverged solve still answers
        body = v2_body(torch.rand(3, 1, 8, 8), parameters={"stop": "label"})
        r = c.post(f"/v2/models/{MODELS[1]}/infer", json=body)
        assert r.status_code == 200, r.text
        label_proven = next(o["data"] for o in r.json()["outputs"] if o["name"] == "label_proven")
        for name in MODELS:  # an α search: the tuning annotations have an event to show
            r = c.post(f"/v1/models/{name}/tune-alpha",
                       headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
            assert r.status_code == 200, r.text
    _traffic(base, rounds=6)  # rates need samples on both sides of the events

    model = "|".join(MODELS)
    queries = dashboard_queries(model=model, rate_interval="30s", interval="5s")
    assert len(queries) >= 15
    empty = [q.source for q in queries if not _query(prom_url, q.expr)]
    assert empty == [], f"dashboard queries without data: {empty}"

    alerts = alert_queries()
    assert len(alerts) >= 5
    for q in alerts:
        _query(prom_url, q.expr)  # parses and evaluates; healthy traffic need not fire them

    # The gauges carry the server's real settings, per model.
    for name in MODELS:
        (tol,) = _query(prom_url, f'mondeq_solver_tol{{model="{name}"}}')
        assert float(tol["value"][1]) == FC_CONFIG["solver"]["tol"]
        (alpha,) = _query(prom_url, f'mondeq_solver_alpha{{model="{name}"}}')
        assert float(alpha["value"][1]) > 0
    (unconverged,) = _query(
        prom_url, f'sum(mondeq_solver_unconverged_total{{model="{MODELS[0]}"}})'
    )
    assert float(unconverged["value"][1]) >= 2
    # The 3 stop=label answers, split by proof exactly as the response said.
    for proven in ("true", "false"):
        expr = f'sum(mondeq_answers_total{{model="{MODELS[1]}", stop="label", proven="{proven}"}})'
        (n,) = _query(prom_url, expr)
        assert float(n["value"][1]) == label_proven.count(proven == "true")


def test_prometheus_config_and_rules_load_in_the_real_server(stack):
    _, prom_url = stack
    rules = httpx.get(f"{prom_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {q.source.removeprefix("alert: ") for q in alert_queries()} <= names
    targets = httpx.get(f"{prom_url}/api/v1/targets", timeout=10).json()["data"]
    (target,) = targets["activeTargets"]
    assert target["labels"]["job"] == "mondeq" and target["health"] == "up"
