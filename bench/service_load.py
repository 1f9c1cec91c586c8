"""Load test of the service against the servers users would pick instead, with real load
generators, head to head on the same checkpoint and machine.

    .venv/bin/python bench/service_load.py [--models models/fmnist-fc,models/fmnist-conv]
        [--rounds 3] [--window 5] [--connections 64] [--workers N] [--device auto]
        [--slow-connections 8 --slow-delay-ms 10] [--no-peers]

Servers, per model folder (``<dir>/<name>/<version>/model.pt``), all up at once:

- ours (``python -m service``, batching on, ``max_batch_size`` 64) with ``--workers 1`` and
  ``--workers N`` (N: the CPU count), each over V2 JSON, V2 binary tensors and V2 gRPC (a
  flag the server lacks is skipped with a printed note), and with batching off (1) over JSON;
- KServe's ``ModelServer`` (bench/peers/kserve_server.py: a ``kserve.Model`` subclass, V2
  REST JSON and binary, and gRPC);
- LitServe (bench/peers/litserve_server.py: a ``litserve.LitAPI``, dynamic batching 64).

The peers run in their own virtual environment, ``bench/.venv-peers``, which this script
builds on its first run (``pip install kserve litserve``, our project without its
dependencies, and torch shared from ours so every server runs the same torch build) and
prints what it installs; the project's own environment is left untouched.

Load: ``wrk`` (Debian's C load generator) with bench/wrk/v2_json.lua or v2_binary.lua,
rotating 64 Fashion-MNIST test images, and bench/peers/grpc_load.py (multi-process grpc.aio)
for gRPC. Each window runs one load generator against one server after a 1 s warm-up; each
round visits every (server, protocol) once, then times the in-process limit (``infer`` at
batch 64 in this process, α tuned as the server tunes it), so the ratios are taken within a
round, on the machine's speed of that minute. The generator's CPU (its process tree's
user + system time over the window) is printed beside each rate: above 30% of a core, the
generator may be the bound. A "slow arrivals" load (few connections, a pause before each
request: wrk's ``delay()``) reports the latency when requests trickle in.

Prints one Markdown table with the machine probe and writes
bench/results/service_load-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from peers.served import latest_checkpoint, served_model
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, start_service

from mondeq_cli.benchmark import machine_probe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
PEERS_VENV = HERE / ".venv-peers"
PEER_PACKAGES = ("kserve", "litserve")
# Above this share of one core, the load generator may be what bounds the rate it measures.
GENERATOR_CPU_LIMIT = 0.30


# ---- requests ---------------------------------------------------------------------------------


def test_images(n: int = 64) -> np.ndarray:
    """The first ``n`` Fashion-MNIST test images, ``(n, 1, 28, 28)`` float32 in [0, 1]."""
    with gzip.open(FASHION, "rb") as f:
        raw = f.read()
    pixels = np.frombuffer(raw, np.uint8, offset=16)[: n * 784]
    return (pixels / 255.0).astype(np.float32).reshape(n, 1, 28, 28)


def v2_json_body(x: np.ndarray) -> bytes:
    """A V2 inference request for one image ``x`` ``(1, 1, 28, 28)``, its label asked for."""
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [inp], "outputs": [{"name": "label"}]}).encode()


def v2_binary_header(x: np.ndarray) -> bytes:
    """The JSON header of a binary-tensor V2 request for ``x``: the input's data follows the
    header as ``binary_data_size`` raw bytes (the binary tensor extension)."""
    inp = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes},
    }
    return json.dumps({"inputs": [inp], "outputs": [{"name": "label"}]}).encode()


def write_requests(folder: Path, images: np.ndarray) -> None:
    """The files bench/wrk/*.lua and bench/peers/grpc_load.py read: ``count.txt``, and per
    image ``json-<i>.json``, ``header-<i>.json`` and ``tensor-<i>.f32`` (little-endian)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        x = img[None].astype("<f4")
        (folder / f"json-{i}.json").write_bytes(v2_json_body(x))
        (folder / f"header-{i}.json").write_bytes(v2_binary_header(x))
        (folder / f"tensor-{i}.f32").write_bytes(x.tobytes())
    (folder / "count.txt").write_text(f"{len(images)}\n")


# ---- the in-process limit ---------------------------------------------------------------------


class Limit:
    """The in-process limit: ``infer`` at batch 64 on the test images, in this process, with
    the model as every server loads it (:func:`peers.served.served_model`), at the faster of
    torch's default intra-op threads and one thread.

    One thread, because on a shared VM whose other processes hold the cores, two OpenMP
    threads spin against them: fmnist-fc read 112 samples/s with 2 threads and 6,772 with 1,
    back to back, on this 2-core VM under load.
    """

    def __init__(self, ckpt: Path, device: str, images: np.ndarray):
        self.device = torch.device(device)
        self.model = served_model(ckpt, device)
        self.x = self.model.input_spec.normalize(torch.from_numpy(images)).to(device)
        self.model.infer(self.x)
        self.threads = torch.get_num_threads()
        if self.device.type == "cpu" and self.threads > 1:
            rates = {}
            for n in (self.threads, 1):
                torch.set_num_threads(n)
                rates[n] = self.samples_per_s(64, 1.0)
            self.threads = max(rates, key=rates.get)
            torch.set_num_threads(self.threads)

    @property
    def alpha(self) -> float:
        return self.model.solver_settings.alpha

    def samples_per_s(self, batch: int, seconds: float) -> float:
        xb = self.x[:batch]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.model.infer(xb)
            n += batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return n / (time.perf_counter() - t0)


# ---- the peers' environment -------------------------------------------------------------------


def peers_python(venv: Path = PEERS_VENV) -> Path:
    """The peers' interpreter, building their virtual environment on first use.

    ``pip install kserve litserve``, then this project with ``--no-deps`` (its one dependency,
    torch, is this environment's own, reached through a ``.pth`` line placed after the peers'
    packages: the same torch build in every server, and no second multi-GB torch install).
    Our environment's packages are never changed. A ``.installed`` stamp holds what was
    installed; a different list rebuilds.
    """
    py = venv / "bin" / "python"
    torch_site = Path(torch.__file__).resolve().parent.parent
    spec = f"{' '.join(PEER_PACKAGES)}; -e {ROOT} --no-deps; torch from {torch_site}\n"
    stamp = venv / ".installed"
    if py.exists() and stamp.exists() and stamp.read_text() == spec:
        return py
    print(
        f"peers: building {venv} (once): pip install {' '.join(PEER_PACKAGES)}; "
        f"pip install --no-deps -e {ROOT}; torch shared from {torch_site}",
        file=sys.stderr,
    )
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Read after the peers' own site-packages: only what they lack (torch and its own
    # dependencies) comes from ours.
    (site / "zz-mondeq-torch.pth").write_text(f"{torch_site}\n")
    stamp.write_text(spec)
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True)
    print("peers: installed\n  " + "\n  ".join(freeze.stdout.split()), file=sys.stderr)
    return py


def peer_versions(py: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, torch; "
        f"print(json.dumps({{p: m.version(p) for p in {list(PEER_PACKAGES)!r}}} | "
        "{'torch': torch.__version__}))"
    )
    return json.loads(
        subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout
    )


# ---- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    """A running server: its base URL, gRPC ``host:port`` when it has one, and how to read
    its ``(rows, batches)`` solved so far (``None``: it does not batch)."""

    name: str
    proc: subprocess.Popen
    url: str
    grpc: str | None = None
    batches: Callable[[], tuple[float, float]] | None = None
    cleanup: list[Path] = field(default_factory=list)
    group: bool = False  # started in a session of its own: signals go to its process group

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 30 s; to the whole process group for a peer (LitServe's
        worker processes outlive a SIGTERM to its main process alone)."""

        def send(sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                if self.group:
                    os.killpg(self.proc.pid, sig)
                elif self.proc.poll() is None:
                    self.proc.send_signal(sig)

        send(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if self.group or self.proc.poll() is None:
            send(signal.SIGKILL)
        self.proc.wait()
        for p in self.cleanup:
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def our_flags() -> set[str]:
    """The optional flags this checkout's ``python -m service`` has (``--workers``, the gRPC
    port), read from its ``--help``."""
    run = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    return {f for f in ("--workers", "--grpc-port") if f in run.stdout}


def prometheus_batches(url: str) -> tuple[float, float]:
    """``(rows, batches)`` from ``mondeq_batch_size``'s sum and count, all models."""
    rows = batches = 0.0
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "mondeq_batch_size":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    rows += s.value
                elif s.name.endswith("_count"):
                    batches += s.value
    return rows, batches


def start_ours(
    folder: Path,
    device: str,
    workers: int | None,
    batch: int,
    flags: set[str],
    tmp: Path,
    name: str,
    grpc: bool = True,
) -> Server:
    """``python -m service`` on a repository holding only ``folder``, its gRPC port a free
    one (``grpc``) or off, where the server has one."""
    repo = Path(tempfile.mkdtemp(prefix="mondeq-bench-", dir=tmp))
    (repo / folder.name).symlink_to(folder.resolve())
    args = ["--max-batch-size", str(batch), "--device", device]
    if workers is not None:
        args += ["--workers", str(workers)]
    address = None
    if "--grpc-port" in flags:
        # Always named: its default port is fixed, and would clash between servers.
        port = free_port() if grpc else 0
        args += ["--grpc-port", str(port)]
        address = f"127.0.0.1:{port}" if grpc else None
    env = {"MONDEQ_MAX_QUEUE": "100000", "MONDEQ_RETUNE_FACTOR": "0"}
    # A loaded shared VM has taken over 5 minutes to tune α for fmnist-conv at load.
    proc, url = start_service(repo, *args, env=env, ready_timeout_s=1200)
    return Server(name, proc, url, address, lambda: prometheus_batches(url), [repo])


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(
                f"{url}: exited with {proc.returncode}; log: {log}\n" + log.read_text()[-3000:]
            )
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{url}: not ready after {timeout:.0f} s; log: {log}")


def start_kserve(py: Path, folder: Path, device: str, tmp: Path) -> Server:
    http, grpc = free_port(), free_port()
    log = tmp / f"kserve-{folder.name}.log"
    proc = subprocess.Popen(
        [
            str(py),
            str(HERE / "peers" / "kserve_server.py"),
            "--model_name",
            folder.name,
            "--checkpoint",
            str(latest_checkpoint(folder)),
            "--device",
            device,
            "--http_port",
            str(http),
            "--grpc_port",
            str(grpc),
            "--workers",
            "1",
        ],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{http}"
    wait_ready(proc, f"{url}/v2/models/{folder.name}/ready", log, 1200)
    return Server("KServe ModelServer", proc, url, f"127.0.0.1:{grpc}", None, group=True)


def start_litserve(py: Path, folder: Path, device: str, tmp: Path, timeout_s: float) -> Server:
    port = free_port()
    log = tmp / f"litserve-{folder.name}.log"
    stats = tmp / f"litserve-{folder.name}.stats"
    proc = subprocess.Popen(
        [
            str(py),
            str(HERE / "peers" / "litserve_server.py"),
            "--checkpoint",
            str(latest_checkpoint(folder)),
            "--device",
            device,
            "--port",
            str(port),
            "--batch-timeout",
            str(timeout_s),
            "--batch-stats",
            str(stats),
        ],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{url}/health", log, 1200)

    def batches() -> tuple[float, float]:
        try:
            rows, n = stats.read_text().split()
        except (FileNotFoundError, ValueError):
            return 0.0, 0.0
        return float(rows), float(n)

    return Server("LitServe", proc, url, None, batches, group=True)


# ---- load generators --------------------------------------------------------------------------


def child_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children so far (a load
    generator's whole tree, once it is waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_generator(cmd: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """Run a load generator to its end; its JSON line plus ``cpu_s`` and ``wall_s``."""
    cpu0, t0 = child_cpu_s(), time.perf_counter()
    run = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    wall, cpu = time.perf_counter() - t0, child_cpu_s() - cpu0
    line = next((ln for ln in reversed(run.stdout.splitlines()) if ln.startswith("{")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"{cmd[0]} failed ({run.returncode}): {run.stderr[-2000:]}")
    # A generator that measures its own CPU (grpc_load.py: its callers' time, start-up left
    # out) is taken at its word.
    return {"cpu_s": cpu, "wall_s": wall, **json.loads(line)}


def wrk(
    script: str,
    url: str,
    path: str,
    reqs: Path,
    connections: int,
    seconds: float,
    delay_ms: float = 0,
    nice: int = 0,
) -> dict:
    # wrk takes whole seconds.
    cmd = [
        "nice",
        "-n",
        str(nice),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{round(seconds)}s",
        "--timeout",
        "60s",
        "-s",
        str(HERE / "wrk" / script),
        url,
        "--",
        str(reqs),
        path,
    ]
    r = run_generator(cmd, env={"WRK_DELAY_MS": f"{delay_ms:g}"})
    r["seconds"] = r["duration_us"] / 1e6
    return r


def wrk_version() -> str:
    """``wrk debian/4.1.0-3+b2``: the first words of ``wrk --version``."""
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return out.split("[")[0].strip()


def grpc_load(
    py: Path | None,
    target: str,
    model: str,
    reqs: Path,
    connections: int,
    seconds: float,
    warmup: float,
    processes: int,
    nice: int = 0,
) -> dict:
    cmd = [
        "nice",
        "-n",
        str(nice),
        # Without the peers' venv (--no-peers), ours: its test extra has kserve's protobuf too.
        str(py or sys.executable),
        str(HERE / "peers" / "grpc_load.py"),
        "--target",
        target,
        "--model",
        model,
        "--images",
        str(reqs),
        "--connections",
        str(connections),
        "--processes",
        str(processes),
        "--duration",
        str(seconds),
        "--warmup",
        str(warmup),
    ]
    r = run_generator(cmd)
    r["seconds"] = seconds
    return r


@dataclass
class Target:
    """One (server, protocol, load) the rounds visit."""

    server: Server
    protocol: str  # "JSON", "binary" or "gRPC"
    path: str  # the URL path posted to (HTTP)
    load: str = "saturating"  # or "slow"
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.server.name} | {self.protocol} | {self.load}"


def drain(t: Target, reqs: Path, timeout: float = 120.0) -> None:
    """Wait until the server has answered what the window left queued: one JSON request,
    answered once those before it are (every server here queues in arrival order).

    A generator that stops leaves up to its connections' worth of requests queued; a server
    solving one row at a time works them off for seconds after its window, on the cores the
    next window's server needs (the first slow-arrivals window after the unbatched one read
    p99 4–9× p50 without this wait, 1.4× for the second).
    """
    body = (reqs / "json-0.json").read_bytes()  # every target's path takes it (gRPC's: HTTP's)
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(
            t.server.url + t.path,
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )


def measure(t: Target, model: str, reqs: Path, args, py: Path | None) -> dict:
    """One window: a warm-up, then ``args.window`` seconds timed; rate, latency, mean batch
    and the generator's CPU share."""
    slow = t.load == "slow"
    conns = args.slow_connections if slow else args.connections
    delay = args.slow_delay_ms if slow else 0
    before = t.server.batches() if t.server.batches else None
    if t.protocol == "gRPC":
        r = grpc_load(
            py,
            t.server.grpc,
            model,
            reqs,
            conns,
            args.window,
            args.warmup,
            args.grpc_processes,
            args.nice,
        )
    else:
        script = "v2_binary.lua" if t.protocol == "binary" else "v2_json.lua"
        wrk(script, t.server.url, t.path, reqs, conns, args.warmup, delay, args.nice)
        if t.server.batches:
            before = t.server.batches()
        r = wrk(script, t.server.url, t.path, reqs, conns, args.window, delay, args.nice)
    after = t.server.batches() if t.server.batches else None
    drain(t, reqs)
    ok = r["requests"] - r["non_2xx"]
    out = {
        "req_per_s": ok / r["seconds"],
        "requests": r["requests"],
        "errors": r["non_2xx"]
        + sum(r.get(k, 0) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")),
        "p50_ms": r["p50_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "mean_ms": r["mean_us"] / 1e3,
        "generator_cpu_share": r["cpu_s"] / r["wall_s"],
        "mean_batch": None,
    }
    if before is not None and after is not None and after[1] > before[1]:
        out["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
    elif t.server.name.startswith("KServe") or "off" in t.server.name:
        out["mean_batch"] = 1.0  # neither batches: one request, one solve
    return out


# ---- report -----------------------------------------------------------------------------------


def num(v, fmt: str) -> str:
    return "n/a" if v is None or v != v else format(v, fmt)


def summarise(rounds: list[dict], keys: list[str], conns: dict[str, int], window: float) -> dict:
    """Per target: the median over rounds of each figure, the rate's range, and the share of
    the limit taken within each round.

    A server that answered fewer requests in every window than it had connections (each
    connection waited longer than the window for one answer) has no rate a window can
    measure: ``below`` holds the rate it is under, ``connections / window``.
    """
    out = {}
    for key in keys:
        runs = [r[key] for r in rounds if key in r]
        if not runs:
            continue

        def med(f: str, runs=runs):
            vals = [x[f] for x in runs if x[f] is not None and x[f] == x[f]]
            return statistics.median(vals) if vals else None

        rates = [x["req_per_s"] for x in runs]
        out[key] = {
            "req_per_s": med("req_per_s"),
            "req_per_s_range": [min(rates), max(rates)],
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
            "mean_batch": med("mean_batch"),
            "generator_cpu_share": med("generator_cpu_share"),
            "errors": sum(x["errors"] for x in runs),
            "share_of_limit": statistics.median(
                r[key]["req_per_s"] / r["limit"] for r in rounds if key in r
            ),
            "below": None,
        }
        n = conns[key.rsplit(" | ", 1)[1]]
        if all(x["req_per_s"] * window < n for x in runs):
            out[key]["below"] = n / window
    return out


def rate(s: dict) -> float:
    """A target's rate for the ratios: its median, or the rate it is under (the peer's best
    case) where no window measured it."""
    return s["below"] if s["below"] else s["req_per_s"]


def ours(key: str) -> bool:
    return key.startswith("ours")


def targets_report(
    model: str, rounds: list[dict], summary: dict, conns: int, window: float
) -> list[str]:
    """The issue's targets, each measured against its figure (reported, not asserted)."""
    sat = [k for k in summary if k.endswith("| saturating")]
    our_sat = [k for k in sat if ours(k) and "batching off" not in k]
    peers = [k for k in sat if not ours(k)]
    lines = []
    if not our_sat:
        return lines
    best = max(our_sat, key=lambda k: summary[k]["req_per_s"])
    fast = [k for k in our_sat if "| gRPC |" in k or "| binary |" in k]
    if model == "fmnist-fc" and fast:
        k = max(fast, key=lambda k: summary[k]["req_per_s"])
        v = summary[k]["req_per_s"]
        lines.append(
            f"- {model}: ≥ 4,000 req/s over gRPC or binary HTTP: {v:,.0f} "
            f"({k.split(' | ')[0]}, {k.split(' | ')[1]}) — "
            f"{'met' if v >= 4000 else 'not met'}"
        )
    if model == "fmnist-conv":
        s = summary[best]["share_of_limit"]
        lines.append(
            f"- {model}: ≥ 70% of the in-process limit: {100 * s:.0f}% "
            f"({best.replace(' | saturating', '')}) — "
            f"{'met' if s >= 0.7 else 'not met'}"
        )
    if peers:
        # Within each round: our best over each peer's best (a peer that no window could
        # measure counts at the rate it is under, so the ratio is a lower bound).
        for peer in sorted({k.split(" | ")[0] for k in peers}):
            ratios, bound = [], False
            for r in rounds:
                ob = max((r[k]["req_per_s"] for k in our_sat if k in r), default=None)
                mine = [k for k in peers if k in r and k.startswith(peer)]
                if not ob or not mine:
                    continue
                pb = max(r[k]["req_per_s"] for k in mine)
                # Fewer answers than connections in the window: the rate is under
                # connections / window, which stands in for it.
                floor = conns / window if pb * window < conns else 0.0
                bound |= floor > pb
                ratios.append(ob / max(pb, floor))
            if ratios:
                m = statistics.median(ratios)
                ge = "≥ " if bound else ""
                lines.append(
                    f"- {model}: ≥ 2× {peer}: {ge}{m:.1f}× (median of rounds, "
                    f"{min(ratios):.1f}–{max(ratios):.1f}×) — {'met' if m >= 2 else 'not met'}"
                )
    for k in summary:
        if ours(k):
            s = summary[k]
            q = s["p99_ms"] / s["p50_ms"] if s["p50_ms"] else float("nan")
            lines.append(f"- {model}: p99 < 3× p50, {k}: {q:.2f} — {'met' if q < 3 else 'not met'}")
    return lines


def table(results: list[dict], meta: dict) -> str:
    pb, pa = meta["probe_before"], meta["probe_after"]
    lines = [
        f"Machine: {meta['cpus']} CPUs ({meta['machine']}), device {meta['device']}, torch "
        f"{meta['torch']}; probe before GEMM {pb['gemm_gflops']:.0f} GFLOP/s, copy "
        f"{pb['copy_gbps']:.1f} GB/s; after {pa['gemm_gflops']:.0f} GFLOP/s, "
        f"{pa['copy_gbps']:.1f} GB/s. {meta['rounds']} rounds of {meta['window_s']:g} s "
        f"windows; {meta['connections']} connections, slow arrivals "
        f"{meta['slow_connections']} connections with {meta['slow_delay_ms']:g} ms before each "
        "request.",
        "",
        "In-process limit (`infer` at batch 64): "
        + "; ".join(
            f"{m['model']} {statistics.median(r['limit'] for r in m['rounds']):,.0f} samples/s"
            for m in results
        ),
        "",
        "| model | server | protocol | load | req/s, median (range) | p50 ms | p99 ms | "
        "p99/p50 | mean batch | % of limit | generator CPU |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        for key, s in m["summary"].items():
            server, protocol, load = key.split(" | ")
            lo, hi = s["req_per_s_range"]
            err = f", {s['errors']} errors" if s["errors"] else ""
            cpu = s["generator_cpu_share"]
            flag = " ⚠" if cpu is not None and cpu > GENERATOR_CPU_LIMIT else ""
            q = s["p99_ms"] / s["p50_ms"] if s["p50_ms"] else None
            shown = f"< {s['below']:,.0f}" if s["below"] else f"{s['req_per_s']:,.0f}"
            lines.append(
                f"| {m['model']} | {server} | {protocol} | {load} | "
                f"{shown} ({lo:,.0f}–{hi:,.0f}{err}) | {num(s['p50_ms'], '.1f')} | "
                f"{num(s['p99_ms'], '.1f')} | {num(q, '.2f')} | {num(s['mean_batch'], '.1f')} | "
                f"{100 * s['share_of_limit']:.0f}% | {num(cpu and 100 * cpu, '.0f')}%{flag} |"
            )
    notes = [f"- {n}" for n in meta["notes"]]
    targets = [line for m in results for line in m["targets"]]
    for extra in (targets, notes):
        if extra:
            lines += ["", *extra]
    return "\n".join(lines)


def report(saved: dict) -> str:
    """The table of a saved results file, its summaries computed afresh from its rounds."""
    meta, results = saved["meta"], saved["results"]
    conns = {"saturating": meta["connections"], "slow": meta["slow_connections"]}
    for m in results:
        keys = list(dict.fromkeys(k for r in m["rounds"] for k in r if " | " in k))
        m["summary"] = summarise(m["rounds"], keys, conns, meta["window_s"])
        m["targets"] = targets_report(
            m["model"], m["rounds"], m["summary"], meta["connections"], meta["window_s"]
        )
    return table(results, meta)


# ---- main -------------------------------------------------------------------------------------


def run_model(
    folder: Path,
    args,
    device: str,
    flags: set[str],
    py: Path | None,
    reqs: Path,
    images: np.ndarray,
    tmp: Path,
    notes: list[str],
) -> dict:
    name, ckpt = folder.name, latest_checkpoint(folder)
    print(f"{name}: in-process limit ...", file=sys.stderr)
    limit = Limit(ckpt, device, images)
    limit_first = limit.samples_per_s(64, min(args.window, 5))
    path = f"/v2/models/{name}/infer"
    servers: list[Server] = []
    targets: list[Target] = []
    try:
        worker_counts: list[int | None] = [None]
        if "--workers" in flags:
            worker_counts = sorted({1, args.workers})
        for w in worker_counts:
            label = "ours" if w is None else f"ours ×{w}"
            s = start_ours(folder, device, w, 64, flags, tmp, label)
            servers.append(s)
            targets += [Target(s, "JSON", path), Target(s, "binary", path)]
            if s.grpc:
                targets.append(Target(s, "gRPC", path))
        off = start_ours(folder, device, None, 1, flags, tmp, "ours, batching off", grpc=False)
        servers.append(off)
        targets.append(Target(off, "JSON", path))
        if py is not None:
            ks = start_kserve(py, folder, device, tmp)
            ls_ = start_litserve(py, folder, device, tmp, args.litserve_batch_timeout)
            servers += [ks, ls_]
            targets += [
                Target(ks, "JSON", path),
                Target(ks, "binary", path),
                Target(ks, "gRPC", path),
                Target(ls_, "JSON", "/predict"),
            ]
        if args.slow_connections:
            slow = [t for t in targets if t.protocol == "JSON" and "off" not in t.server.name]
            targets += [Target(t.server, t.protocol, t.path, "slow") for t in slow]
        # A target that answers nothing but errors (a protocol the server lacks) is dropped
        # before the rounds, with a note. A slow one (nothing back within the probe, no
        # error either) stays.
        live = []
        probe_args = argparse.Namespace(**{**vars(args), "window": 2})
        for t in targets:
            probe = measure(t, name, reqs, probe_args, py)
            if probe["req_per_s"] == 0 and probe["errors"]:
                notes.append(
                    f"{name}: {t.server.name} over {t.protocol} answered only errors "
                    f"({probe['errors']}); left out"
                )
                print(notes[-1], file=sys.stderr)
            else:
                live.append(t)
        rounds = []
        for k in range(args.rounds):
            row: dict = {"round": k + 1}
            for t in live:
                row[t.key] = r = measure(t, name, reqs, args, py)
                print(
                    f"{name} round {k + 1}: {t.key}: {r['req_per_s']:.0f} req/s, p50 "
                    f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, batch "
                    f"{num(r['mean_batch'], '.1f')}, generator CPU "
                    f"{100 * r['generator_cpu_share']:.0f}%"
                    + (f", {r['errors']} errors" if r["errors"] else ""),
                    file=sys.stderr,
                )
            # The servers sit idle meanwhile.
            row["limit"] = limit.samples_per_s(64, args.window)
            print(f"{name} round {k + 1}: limit {row['limit']:.0f} samples/s", file=sys.stderr)
            rounds.append(row)
    finally:
        for s in servers:
            s.stop()
    conns = {"saturating": args.connections, "slow": args.slow_connections}
    summary = summarise(rounds, [t.key for t in live], conns, args.window)
    return {
        "model": name,
        "checkpoint": str(ckpt),
        "alpha": limit.alpha,
        "limit_threads": limit.threads,
        "limit_first_samples_per_s": limit_first,
        "limit_batch1_samples_per_s": limit.samples_per_s(1, min(args.window, 3)),
        "rounds": rounds,
        "summary": summary,
        "targets": targets_report(name, rounds, summary, args.connections, args.window),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = [
        f"models/{n}" for n in ("fmnist-fc", "fmnist-conv") if (ROOT / "models" / n).is_dir()
    ]
    p.add_argument("--models", default=",".join(default), help="comma-separated model folders")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=5.0, help="seconds timed per window")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each window")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="N of ours with --workers N, beside --workers 1",
    )
    p.add_argument("--slow-connections", type=int, default=8, help="0: no slow-arrivals load")
    p.add_argument("--slow-delay-ms", type=float, default=10.0)
    p.add_argument("--grpc-processes", type=int, default=2, help="of the gRPC load generator")
    p.add_argument("--litserve-batch-timeout", type=float, default=0.01, help="seconds")
    p.add_argument("--nice", type=int, default=0, help="niceness of the load generators")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-peers", action="store_true", help="ours alone (no peers' venv)")
    p.add_argument("--report", type=Path, help="print the table of a saved results file")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk (the Makefile's DEB_PACKAGES)")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = [Path(m) for m in args.models.split(",") if m]
    notes: list[str] = []
    flags = our_flags()
    for flag, what in (("--workers", "multi-process front end"), ("--grpc-port", "gRPC")):
        if flag not in flags:
            notes.append(f"`python -m service` has no {flag}: {what} not measured")
            print(notes[-1], file=sys.stderr)
    py = None if args.no_peers else peers_python()
    probe_before = machine_probe(device)
    images = test_images(64)

    def save() -> dict:
        meta = {
            "device": device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "wrk": wrk_version(),
            "peers": peer_versions(py) if py else None,
            "our_flags": sorted(flags),
            "rounds": args.rounds,
            "window_s": args.window,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "workers": args.workers,
            "slow_connections": args.slow_connections,
            "slow_delay_ms": args.slow_delay_ms,
            "grpc_processes": args.grpc_processes,
            "litserve_batch_timeout_s": args.litserve_batch_timeout,
            "probe_before": probe_before,
            "probe_after": machine_probe(device),
            "notes": notes,
        }
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"service_load-{device}.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=2)
        )
        return meta

    results = []
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        reqs = Path(tmp) / "requests"
        write_requests(reqs, images)
        for folder in folders:
            # Each model's results are saved as soon as they are in: a later model's failure
            # (a server that never became ready) loses nothing measured before it.
            try:
                results.append(
                    run_model(folder, args, device, flags, py, reqs, images, Path(tmp), notes)
                )
            except SystemExit as e:
                notes.append(f"{folder.name}: not measured: {str(e).splitlines()[0]}")
                print(notes[-1], file=sys.stderr)
            meta = save()
    print(table(results, meta))


if __name__ == "__main__":
    main()
