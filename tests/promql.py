"""The PromQL of the deployment: every expression of the Grafana dashboard and of the alert
rules, ready to run against a real Prometheus.

Sources:

* ``docker/grafana/dashboards/mondeq-solver-convergence.json``: every panel target and every
  annotation query, with the Grafana variables (``$model``, ``$__rate_interval``,
  ``$__interval``, ...) replaced by concrete values;
* ``docker/prometheus/alerts.yml``: every rule's ``expr`` (no variables).

Used by ``tests/deploy/test_deploy.py`` (offline: metric names, syntax through
``promtool``) and meant for a live test that runs ``mondeq serve`` and a real
``prometheus`` on loopback::

    from promql import all_queries, prometheus_config

    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(prometheus_config(f"127.0.0.1:{port}"))   # job "mondeq", 1 s scrapes
    # prometheus --config.file=cfg --storage.tsdb.path=... --web.listen-address=127.0.0.1:P
    # ... send some traffic, wait for a few scrapes ...
    for q in all_queries(model="fmnist-fc|fmnist-conv", rate_interval="30s"):
        r = httpx.get(f"http://127.0.0.1:{P}/api/v1/query", params={"query": q.expr})
        assert r.json()["status"] == "success", (q.source, q.expr, r.text)

Each :class:`Query` says where it comes from (``source``) and whether it should return data
once the server has loaded its models and answered a few good inference requests
(``expect_data``). It is false for alert rules (nothing while healthy), annotation queries
(only after an α search within the window), and the panels of events that a healthy server may
never have had: error responses (``code=~"4..|5.."``) and unconverged solves (the counter's
series appears with the first one). Only the standard library and PyYAML are needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "mondeq-solver-convergence.json"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"

# The metric contract of the service (service/metrics.py): name -> type.
METRICS: dict[str, str] = {
    "mondeq_solver_iterations": "histogram",
    "mondeq_solver_residual": "histogram",
    "mondeq_solver_alpha": "gauge",
    "mondeq_solver_max_iter": "gauge",
    "mondeq_solver_tol": "gauge",
    "mondeq_solver_unconverged": "counter",
    "mondeq_error_bound": "histogram",
    "mondeq_answers": "counter",
    "mondeq_float64_certificates": "counter",
    "mondeq_alpha_tuning": "counter",
    "mondeq_requests": "counter",
    "mondeq_request_duration_seconds": "histogram",
    "mondeq_queue_wait_seconds": "histogram",
    "mondeq_batch_size": "histogram",
    "mondeq_inflight_requests": "gauge",
    "mondeq_model_info": "gauge",
    "mondeq_model_ready": "gauge",
    "mondeq_model_load_failures": "counter",
    "mondeq_model_load_failed": "gauge",
}


def _series_names() -> frozenset[str]:
    names = {"up"}  # written by Prometheus for every scrape target
    for name, kind in METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names.add(f"{name}_total")
        else:
            names.add(name)
    return frozenset(names)


# Every series name a query may use: what /metrics exposes, plus Prometheus' own `up`.
SERIES_NAMES: frozenset[str] = _series_names()

# Concrete values of the Grafana variables. `model` is a regex (the queries say =~"$model").
DEFAULT_VARIABLES: dict[str, str] = {
    "model": ".*",
    "datasource": "prometheus",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "15000",
}

# Panels whose series exist only after an error response or an unconverged solve.
_ONLY_AFTER_AN_EVENT = ('code=~"4..|5.."', "mondeq_solver_unconverged_total")

_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")


@dataclass(frozen=True)
class Query:
    """One PromQL expression: ``expr`` as run, ``raw`` as written in the file."""

    source: str  # e.g. "dashboard: Forward iterations p50 / p90 / p99 [A]", "alert: MondeqDown"
    expr: str
    raw: str
    expect_data: bool = True


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) by
    ``variables`` over :data:`DEFAULT_VARIABLES`. An unknown variable raises ``KeyError``."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def _variables(model: str | None, rate_interval: str | None, interval: str | None):
    out: dict[str, str] = {}
    if model is not None:
        out["model"] = model
    if rate_interval is not None:
        out["__rate_interval"] = rate_interval
    if interval is not None:
        out["__interval"] = interval
    return out


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels inside collapsed rows


def dashboard_queries(
    path: Path = DASHBOARD,
    *,
    model: str | None = None,
    rate_interval: str | None = None,
    interval: str | None = None,
) -> list[Query]:
    """Every panel target and annotation query of the dashboard, variables substituted
    (``model`` is a regex over model names; default ``.*``)."""
    board = json.loads(Path(path).read_text())
    values = _variables(model, rate_interval, interval)
    out = []
    for panel in _panels(board.get("panels", [])):
        for t in panel.get("targets", []):
            if t.get("expr"):
                src = f"dashboard: {panel.get('title', '?')} [{t.get('refId', '?')}]"
                expect = not any(e in t["expr"] for e in _ONLY_AFTER_AN_EVENT)
                out.append(Query(src, substitute(t["expr"], values), t["expr"], expect))
    for a in board.get("annotations", {}).get("list", []):
        if a.get("expr"):
            src = f"dashboard annotation: {a.get('name', '?')}"
            out.append(Query(src, substitute(a["expr"], values), a["expr"], expect_data=False))
    return out


def alert_queries(path: Path = ALERTS) -> list[Query]:
    """Every rule's ``expr`` in the alert rules file (alerting and recording rules)."""
    doc = yaml.safe_load(Path(path).read_text())
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            expr = rule["expr"].strip()
            out.append(Query(f"alert: {name}", expr, expr, expect_data="record" in rule))
    return out


def all_queries(
    *, model: str | None = None, rate_interval: str | None = None, interval: str | None = None
) -> list[Query]:
    """:func:`dashboard_queries` then :func:`alert_queries`."""
    return (
        dashboard_queries(model=model, rate_interval=rate_interval, interval=interval)
        + alert_queries()
    )


# ---- metric names ------------------------------------------------------------------------------
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not followed by "(" (a function or an aggregation), matched whole.
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (functions, aggregations, keywords, label
    names and label values left out). ``{__name__=...}`` selectors are not resolved."""
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub("", s)
    s = _RANGE.sub("", s)
    s = _LABEL_LIST.sub("", s)
    return {m for m in _IDENT.findall(s) if m not in _KEYWORDS}


# ---- a Prometheus for a live test -----------------------------------------------------------
def prometheus_config(
    target: str, *, scrape_interval: str = "1s", evaluation_interval: str = "1s"
) -> str:
    """docker/prometheus/prometheus.yml for a server at ``target`` (``host:port``), e.g. on
    loopback: the same job name (``mondeq``, which the alerts select on), faster scrapes and
    rule evaluation, the alert rules by absolute path, no other scrape job."""
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = evaluation_interval
    cfg["rule_files"] = [str(ALERTS)]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "mondeq"]
    for job in jobs:
        job["scrape_interval"] = scrape_interval
        job.pop("scrape_timeout", None)
        job["static_configs"] = [{"targets": [target]}]
    cfg["scrape_configs"] = jobs
    return yaml.safe_dump(cfg, sort_keys=False)
