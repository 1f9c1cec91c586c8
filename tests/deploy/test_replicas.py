"""Two replicas behind a real load balancer, one real Prometheus scraping both.

Two ``mondeq serve`` processes on loopback, Debian's HAProxy in front of them (health checks on
``/v2/health/ready``, the retry and redispatch settings docs/deploy.md explains), and Debian's
Prometheus scraping both every second under the job ``mondeq``, as the ServiceMonitor of
docker/kubernetes does in a cluster.

* Requests through the load balancer are all answered, and both replicas serve them.
* Every dashboard and alert expression (and each operand of its comparisons), queried through
  that Prometheus, gives per model the values that the two replicas' own ``/metrics`` add up
  to. The reference is a second Prometheus that scrapes one exposition: the sum of the two
  replicas' counters and histogram buckets, and each replica's gauges. Rates
  are compared as the counts they are rates of (``rate(x[w])`` → ``x``): at rest both sides
  hold the same last samples, so the values must be equal, not merely close; a quantile taken
  per replica, a rate not summed, or a gauge summed where it should not be, differs.
* One replica gets SIGTERM in the middle of the load: no accepted request is lost, and the
  other replica answers the rest.
"""

from __future__ import annotations

import http.server
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from promql import alert_queries, dashboard_queries, prometheus_config
from service_support import FC_CONFIG, free_port, make_checkpoint, metric_samples, v2_body

HAPROXY, PROMETHEUS = shutil.which("haproxy"), shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    HAPROXY is None or PROMETHEUS is None,
    reason="Debian packages haproxy and prometheus are not installed (make test installs them)",
)
MODELS = ("alpha", "beta")
CONCURRENCY = 8
REQUESTS_PER_TEST = 1000  # two load tests: 2,000 requests through the load balancer
NAMES = ("a", "b")

# The load balancer of the test; docs/deploy.md, "Replicas behind a load balancer", explains it.
HAPROXY_CONFIG = """\
global
    maxconn 512
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
frontend mondeq
    bind 127.0.0.1:{port}
    default_backend mondeq
backend mondeq
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server check inter 500ms fall 1 rise 2
{servers}
"""


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.ports = {n: free_port() for n in NAMES}
        self.lb_port, self.prom_port = free_port(), free_port()
        self.socket = root / "haproxy.sock"
        self.procs: dict[str, subprocess.Popen] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def lb(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def prom(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def start_server(self, name: str) -> None:
        env = {**os.environ, "MONDEQ_POLL_INTERVAL_S": "0", "MONDEQ_GRPC_PORT": "0",
               "MONDEQ_GRACEFUL_TIMEOUT_S": "30"}  # fmt: skip
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "mondeq_cli", "serve", "--model-dir", str(self.root / "models"),
             "--host", "127.0.0.1", "--port", str(self.ports[name]), "--device", "cpu",
             "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def haproxy(self, command: str) -> str:
        """One command on HAProxy's runtime API (its stats socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self) -> dict[str, str]:
        lines = self.haproxy("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "mondeq"
                and r["svname"] in NAMES}  # fmt: skip

    def metrics(self, name: str) -> dict:
        r = httpx.get(f"{self.url(name)}/metrics", timeout=10)
        r.raise_for_status()
        return metric_samples(r.text)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.TransportError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class NotReadyYet(OSError):
    """Prometheus answered 503: still starting (reading its WAL); wait_for tries again."""


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    if r.status_code == 503:
        raise NotReadyYet(r.text)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, r.text)
    return body["data"]["result"]


def start_prometheus(root: Path, targets: list[str], port: int) -> subprocess.Popen:
    cfg = yaml.safe_load(prometheus_config(targets[0]))
    cfg["rule_files"] = []  # the rules' expressions are queried here, not evaluated as rules
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.Popen(
        [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    for i, name in enumerate(MODELS):
        make_checkpoint(root / "models" / name / "1" / "model.pt", FC_CONFIG, seed=i,
                        calibration=16)  # fmt: skip
    c = Cluster(root)
    for name in NAMES:
        c.start_server(name)
    servers = "\n".join(f"    server {n} 127.0.0.1:{c.ports[n]}" for n in NAMES)
    (root / "haproxy.cfg").write_text(
        HAPROXY_CONFIG.format(socket=c.socket, port=c.lb_port, servers=servers)
    )
    c.procs["haproxy"] = subprocess.Popen(
        [HAPROXY, "-f", str(root / "haproxy.cfg"), "-db"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    targets = [f"127.0.0.1:{c.ports[n]}" for n in NAMES]
    c.procs["prometheus"] = start_prometheus(root / "prom", targets, c.prom_port)
    try:
        wait_for(lambda: c.server_status() == {"a": "UP", "b": "UP"}, 120, "both replicas UP")
        wait_for(lambda: len(query(c.prom, 'up{job="mondeq"} == 1')) == 2, 60, "2 targets up")
        yield c
    finally:
        c.stop()


# ---- load --------------------------------------------------------------------------------------
_local = threading.local()


def _client(base: str) -> httpx.Client:
    if getattr(_local, "base", None) != base:
        _local.client = httpx.Client(base_url=base, timeout=60)
        _local.base = base
    return _local.client


def _infer(base: str, i: int) -> int:
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(i))
    r = _client(base).post(f"/v2/models/{MODELS[i % 2]}/infer", json=v2_body(x))
    return r.status_code


def load(base: str, n: int, on_done=None) -> list[int]:
    """``n`` V2 inference requests (2 rows each, the models in turn), ``CONCURRENCY`` at a
    time; the status of each. ``on_done(k)`` is called after the k-th answer."""
    done = 0
    lock = threading.Lock()

    def one(i: int) -> int:
        nonlocal done
        try:
            code = _infer(base, i)
        except httpx.HTTPError as e:  # no answer at all: a lost request
            code = f"{type(e).__name__}"
        with lock:
            done += 1
            k = done
        if on_done is not None:
            on_done(k)
        return code

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(n)))


def infer_count(samples: dict) -> float:
    return sum(v for (n, ls), v in samples.items() if n == "mondeq_requests_total"
               and ("endpoint", "v2_infer") in ls and ("code", "200") in ls)  # fmt: skip


def test_requests_through_the_load_balancer_are_all_answered_by_both_replicas(cluster):
    before = {n: infer_count(cluster.metrics(n)) for n in NAMES}
    codes = load(cluster.lb, REQUESTS_PER_TEST)
    assert codes == [200] * REQUESTS_PER_TEST
    served = {n: infer_count(cluster.metrics(n)) - before[n] for n in NAMES}
    # Each request answered once, by one replica; round robin gives each a share.
    assert sum(served.values()) == REQUESTS_PER_TEST
    assert min(served.values()) >= REQUESTS_PER_TEST // 4, served


# ---- the dashboard and the alerts, summed across replicas ----------------------------------------
_RANGE_FUNCTION = re.compile(r"\b(?:rate|irate|increase)\((\w+(?:\{[^{}]*\})?)\[[^\]]+\]\)")
_OPERATOR = re.compile(r"(?:==|!=|>=|<=|>|<)|\b(?:unless|and|or)\b")
_MODIFIER = re.compile(r"^\s*(?:bool\b|(?:on|ignoring|group_left|group_right)\s*\([^()]*\))\s*")


def as_counts(expr: str) -> str:
    """``rate(x[w])`` / ``increase(x[w])`` → ``x``: the expression over the counts themselves."""
    out = _RANGE_FUNCTION.sub(r"\1", expr)
    assert not re.search(r"\b(?:rate|irate|increase)\(", out), out
    return out


def _top_level_split(expr: str) -> list[str]:
    """The operands of ``expr``'s comparison and set operators at nesting depth 0."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and (m := _OPERATOR.match(expr, i)):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return False
    return depth == 0


def operands(expr: str) -> list[str]:
    """``expr`` and, recursively, every operand of its comparisons and set operations (both
    sides of an alert's threshold), numbers left out."""
    expr = expr.strip()
    out, inner = [expr], expr
    while inner.startswith("(") and inner.endswith(")") and _balanced(inner[1:-1]):
        inner = inner[1:-1].strip()
    parts = _top_level_split(inner)
    if len(parts) > 1:
        for part in parts:
            while _MODIFIER.match(part):
                part = _MODIFIER.sub("", part, count=1)
            part = part.strip()
            if part and not re.fullmatch(r"[\d.e+-]+", part):
                out += operands(part)
    return out


def merged_exposition(snapshots: list[dict]) -> str:
    """One exposition of what the replicas' ``/metrics`` add up to: each counter and
    histogram series summed over the replicas; each gauge series once per replica, told
    apart by a ``replica`` label (whether a gauge adds up, like ready pods, or not, like
    ``tol``, is the expression's to say: its ``sum``, ``max`` or ``count``)."""
    total: dict = {}
    for i, samples in enumerate(snapshots):
        for (name, labels), value in samples.items():
            if not name.startswith("mondeq_") or name.endswith("_created"):
                continue
            if _is_gauge(name):
                labels = labels | {("replica", NAMES[i])}
            total[(name, labels)] = total.get((name, labels), 0.0) + value
    lines = []
    for (name, labels), value in sorted(total.items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))):
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels))
        lines.append(f"{name}{{{text}}} {value!r}")
    return "\n".join(lines) + "\n"


def _is_gauge(name: str) -> bool:
    from promql import METRICS

    return METRICS.get(name) == "gauge"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _serve(text: str) -> tuple[http.server.HTTPServer, int]:
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _by_labels(result: list[dict]) -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = {}
    for series in result:
        labels = {k: v for k, v in series["metric"].items() if k != "instance"}
        out.setdefault(tuple(sorted(labels.items())), []).append(float(series["value"][1]))
    return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _mixed_traffic(base: str) -> None:
    """Through the load balancer: good requests, client errors, unconverged solves and
    stop=label answers, so every panel has series on both replicas."""
    g = torch.Generator().manual_seed(1)
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(40):
            name = MODELS[i % 2]
            x = torch.rand(3, 1, 8, 8, generator=g)
            kinds = [
                (v2_body(x), 200),
                (v2_body(x, parameters={"max_iter": 1, "tol": 1e-6}), 200),  # unconverged
                (v2_body(x, parameters={"stop": "label"}), 200),
                ({"inputs": []}, 422),
            ]
            for j in range(len(kinds)):  # rotated, so that round robin sends each to both
                body, code = kinds[(i + j) % len(kinds)]
                assert c.post(f"/v2/models/{name}/infer", json=body).status_code == code


def _at_rest(cluster: Cluster) -> list[dict]:
    """Both replicas' per-model ``mondeq_*`` samples once Prometheus holds exactly them:
    unchanged across a scrape of each replica that started after the first read. The
    server's own requests (``model=""``: scrapes, health checks) go on at rest and are left
    out; no dashboard or alert expression selects them."""

    def read() -> list[dict]:
        return [
            {
                k: v
                for k, v in cluster.metrics(n).items()
                if k[0].startswith("mondeq_") and ("model", "") not in k[1]
            }
            for n in NAMES
        ]

    while True:
        first, t = read(), time.time()
        wait_for(
            lambda t=t: (
                len(query(cluster.prom, f'timestamp(up{{job="mondeq"}}) > {t + 0.01}')) == 2
            ),
            30,
            "a scrape of both replicas",
        )
        if read() == first:
            return first


def test_dashboard_and_alert_expressions_add_up_across_replicas(cluster, tmp_path):
    _mixed_traffic(cluster.lb)
    # HAProxy's health checks are requests too (endpoint v2_ready, in flight while they run):
    # the replicas are at rest only without them.
    for n in NAMES:
        cluster.haproxy(f"disable health mondeq/{n}")
    reference = None
    try:
        snapshots = _at_rest(cluster)
        a, b = snapshots
        assert infer_count(a) > 0 and infer_count(b) > 0
        # The gauges describe the same models on both replicas (α found by the same search), so
        # a per-pod expression (α per pod) must show each pod the reference's one value.
        gauges = [{k: v for k, v in s.items() if _is_gauge(k[0])} for s in snapshots]
        assert gauges[0] == gauges[1] and gauges[0]

        server, port = _serve(merged_exposition(snapshots))
        ref_port = free_port()
        reference = start_prometheus(tmp_path / "reference", [f"127.0.0.1:{port}"], ref_port)
        ref = f"http://127.0.0.1:{ref_port}"
        # A few scrapes, so that `x offset 2s` (the annotation's) has data on both sides.
        wait_for(lambda: query(ref, 'count_over_time(up{job="mondeq"}[1m]) >= 4'), 60, "4 scrapes")

        exprs: dict[str, str] = {}
        for model in ("alpha", "beta", "alpha|beta"):  # the heatmap repeats per model
            for q in dashboard_queries(model=model, rate_interval="2s", interval="1s"):
                for e in operands(as_counts(q.expr)):
                    exprs.setdefault(e, q.source)
        for q in alert_queries():
            for e in operands(as_counts(q.expr)):
                exprs.setdefault(e, q.source)
        assert len(exprs) >= 40

        with_data = 0
        for e, source in exprs.items():
            result = query(cluster.prom, e)
            got, want = _by_labels(result), _by_labels(query(ref, e))
            assert got.keys() == want.keys(), (source, e, got, want)
            per_pod = any("instance" in series["metric"] for series in result)
            for key, values in got.items():
                (expected,) = want[key]
                # Aggregated per model: one value, the sum's; per pod: each pod's own value.
                assert per_pod or len(values) == 1, (source, e, key, values)
                assert all(_same(v, expected) for v in values), (source, e, key, values, expected)
            with_data += bool(got)
        assert with_data >= 30, with_data
        server.shutdown()
    finally:
        for n in NAMES:
            cluster.haproxy(f"enable health mondeq/{n}")
        if reference is not None:
            reference.terminate()
            reference.wait(timeout=30)


def test_a_replica_stopped_mid_load_loses_no_accepted_request(cluster):
    wait_for(lambda: cluster.server_status() == {"a": "UP", "b": "UP"}, 30, "both replicas UP")
    before_a = infer_count(cluster.metrics("a"))
    stopped = threading.Event()
    b = cluster.procs["b"]

    def sigterm_once(k: int) -> None:
        if k == REQUESTS_PER_TEST // 3 and not stopped.is_set():
            stopped.set()
            b.send_signal(signal.SIGTERM)

    codes = load(cluster.lb, REQUESTS_PER_TEST, on_done=sigterm_once)
    assert stopped.is_set()
    # Every request answered: those b had accepted by b (it drains before exiting), the rest
    # by a (HAProxy redispatches a connection b refused).
    assert codes == [200] * REQUESTS_PER_TEST, {c: codes.count(c) for c in set(codes)}
    assert b.wait(timeout=40) == 0  # a graceful exit
    wait_for(lambda: cluster.server_status()["b"].startswith("DOWN"), 10, "b DOWN in HAProxy")
    # The other replica carries on: it answered its share and, after b left, everything.
    assert infer_count(cluster.metrics("a")) - before_a >= REQUESTS_PER_TEST // 2
    x = torch.rand(1, 1, 8, 8)
    r = httpx.post(f"{cluster.lb}/v2/models/{MODELS[0]}/infer", json=v2_body(x), timeout=30)
    assert r.status_code == 200
