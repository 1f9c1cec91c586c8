"""One client cannot stall the others: a default request's queue wait behind a costly one.

    .venv/bin/python bench/service_fairness.py [--model fmnist-fc] [--repeats 5]
        [--rows R --max-iter M --tol T --method forward_backward] [--offset 0.5]

Starts ``python -m service`` on the default model repository and, ``--repeats`` times:

1. client A sends the most expensive request the server's limits allow (by default
   ``max_row_iterations // max_iter_cap`` rows, at most ``max_request_batch``, at
   ``max_iter = max_iter_cap``, ``tol = min_tol``, forward–backward: the slowest method on
   these models) of Fashion-MNIST test images to ``POST /v2/models/<model>/infer``;
2. ``--offset`` seconds later client B sends one test image with the default settings;
3. B's ``queue_ms`` (time from its arrival at the batcher to the start of its solve, as the
   server reports it) and latency are recorded, with A's solve time, and B's label is checked
   against the label of the same image solved alone. Only runs where A was still solving
   when B arrived count.

The server serves only ``<model>`` (a copy of its folder) with the checkpoint's α
(``MONDEQ_TUNE_AT_LOAD=false``: a load-time α search only delays the start). Beforehand B is
sent alone a few times for its unloaded latency. Prints a Markdown table and
writes ``bench/results/service_fairness-<device>.json``. Target (issue 12 §2): B's queue wait
stays under 250 ms on a 2-core CPU while A runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]  (see service_load.py)


def test_images(n: int) -> np.ndarray:
    """The first ``n`` Fashion-MNIST test images as ``(n, 1, 28, 28)`` float32 in [0, 1]."""
    with gzip.open(FASHION, "rb") as f:
        raw = f.read()
    return (
        (np.frombuffer(raw, np.uint8, offset=16)[: n * 784] / 255.0)
        .astype(np.float32)
        .reshape(n, 1, 28, 28)
    )


def body(x: np.ndarray, parameters: dict | None = None) -> dict:
    out = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if parameters:
        out["parameters"] = parameters
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "MONDEQ_POLL_INTERVAL_S": "0", **env},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server not ready after 180 s")


def heaviest_request() -> dict:
    """Rows and solver settings of the most expensive request the default limits allow."""
    sys.path.insert(0, str(ROOT))
    from service.settings import Settings

    s = Settings()
    work = getattr(s, "max_row_iterations", None)
    rows = s.max_request_batch if work is None else max(1, work // s.max_iter_cap)
    return {
        "rows": min(rows, s.max_request_batch),
        "max_iter": s.max_iter_cap,
        "tol": s.min_tol,
        "method": "forward_backward",
    }


async def scenario(url: str, path: str, a_body: dict, b_body: dict, offset: float) -> dict:
    async with (
        httpx.AsyncClient(base_url=url, timeout=600) as ca,
        httpx.AsyncClient(base_url=url, timeout=600) as cb,
    ):
        t0 = time.perf_counter()
        task_a = asyncio.create_task(ca.post(path, json=a_body))
        await asyncio.sleep(offset)
        t_b = time.perf_counter()
        rb = await cb.post(path, json=b_body)
        b_latency = time.perf_counter() - t_b
        b_done = time.perf_counter() - t0
        ra = await task_a
        a_done = time.perf_counter() - t0
    for r in (ra, rb):
        if r.status_code != 200:
            raise SystemExit(f"{r.status_code}: {r.text}")
    pa, pb = ra.json()["parameters"], rb.json()["parameters"]
    label_b = next(o for o in rb.json()["outputs"] if o["name"] == "label")["data"][0]
    return {
        "b_queue_ms": pb["queue_ms"],
        "b_latency_ms": 1000 * b_latency,
        "b_label": label_b,
        "a_queue_ms": pa["queue_ms"],
        "a_solve_ms": pa["solve_ms"],
        "a_done_s": a_done,
        "b_done_s": b_done,
        "b_before_a": b_done < a_done,
        "a_solving_at_b": a_done > offset,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="fmnist-fc")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--offset", type=float, default=0.5, help="seconds between A and B")
    p.add_argument("--rows", type=int, help="A's rows (default: the limits' most)")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--tol", type=float)
    p.add_argument("--method")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/service_fairness-cpu.json")
    args = p.parse_args()

    heavy = heaviest_request()
    for k in ("rows", "max_iter", "tol", "method"):
        if getattr(args, k) is not None:
            heavy[k] = getattr(args, k)
    images = test_images(max(heavy["rows"], 1) + 1)
    a_body = body(images[: heavy["rows"]], {k: heavy[k] for k in ("method", "tol", "max_iter")})
    b_body = body(images[-1:])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = f"/v2/models/{args.model}/infer"
    repo = Path(tempfile.mkdtemp(prefix="fairness-"))
    shutil.copytree(args.model_dir / args.model, repo / args.model)
    proc = start_server(repo, port, {"MONDEQ_TUNE_AT_LOAD": "false"})
    try:
        alone = []
        for _ in range(5):
            t = time.perf_counter()
            r = httpx.post(url + path, json=b_body, timeout=60)
            r.raise_for_status()
            alone.append(1000 * (time.perf_counter() - t))
        label_alone = next(o for o in r.json()["outputs"] if o["name"] == "label")["data"][0]
        runs = []
        for i in range(args.repeats):
            run = asyncio.run(scenario(url, path, a_body, b_body, args.offset))
            run["b_label_ok"] = run["b_label"] == label_alone
            runs.append(run)
            shown = (f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in run.items())
            print(f"run {i}: " + ", ".join(shown), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(repo, ignore_errors=True)

    overlapped = [r for r in runs if r["a_solving_at_b"]]
    if not overlapped:
        raise SystemExit("A was never still solving when B arrived: use a smaller --offset")
    qs = [r["b_queue_ms"] for r in overlapped]
    summary = {
        "label": args.label,
        "model": args.model,
        "heavy_request": heavy,
        "offset_s": args.offset,
        "b_alone_ms_median": statistics.median(alone),
        "b_queue_ms_median": statistics.median(qs),
        "b_queue_ms_max": max(qs),
        "b_latency_ms_median": statistics.median(r["b_latency_ms"] for r in overlapped),
        "runs_overlapped": len(overlapped),
        "a_solve_ms_median": statistics.median(r["a_solve_ms"] for r in runs),
        "b_labels_ok": all(r["b_label_ok"] for r in runs),
        "b_before_a": all(r["b_before_a"] for r in overlapped),
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
    }
    print()
    print(
        "| model | A: rows × max_iter (method, tol) | B alone ms | B queue ms median / max "
        "| B latency ms | A solve ms | B label right |"
    )
    print("|---|---|---|---|---|---|---|")
    h = heavy
    print(
        f"| {args.model} | {h['rows']} × {h['max_iter']} ({h['method']}, {h['tol']:g}) "
        f"| {summary['b_alone_ms_median']:.0f} | {summary['b_queue_ms_median']:.0f} / "
        f"{summary['b_queue_ms_max']:.0f} | {summary['b_latency_ms_median']:.0f} "
        f"| {summary['a_solve_ms_median']:.0f} | {summary['b_labels_ok']} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*old, summary], indent=1) + "\n")


if __name__ == "__main__":
    main()
