"""One client cannot stall the others: a default request's queue wait behind costly ones.

    .venv/bin/python bench/service_fairness.py [--scenario costliest|four-keys|big-same-key]
        [--model fmnist-fc] [--repeats 5] [--offset 0.5]
        [--rows R --max-iter M --tol T --method forward_backward]

Starts ``python -m service`` on the default model repository and, ``--repeats`` times, sends
the scenario's costly requests (clients A) at once to ``POST /v2/models/<model>/infer``,
then ``--offset`` seconds later client B's one Fashion-MNIST test image with the default
settings. Scenarios:

* ``costliest``: one A, the most expensive request the server's limits allow (by default
  ``max_row_iterations // max_iter_cap`` rows, at most ``max_request_batch``, at
  ``max_iter = max_iter_cap``, ``tol = min_tol``, forward–backward: the slowest method on
  these models) of test images; ``--rows`` and the solver flags change it;
* ``four-keys``: four A clients, 25 test images each at ``forward_backward``,
  ``max_iter`` 1000 and four different ``tol`` (1e-6, 2e-6, 3e-6, 4e-6): four solves with
  four different settings in flight at once;
* ``big-same-key``: one A, 256 rows of uniform noise with the *default* settings (the
  same settings as B's, so B cannot ride in A's solve and must not wait for it to end).

B's ``queue_ms`` (time from its arrival at the batcher to the start of its solve, as the
server reports it) and latency are recorded, with the As' solve times, and B's label is
checked against the label of the same image solved alone. Only runs where an A was still
solving when B arrived count.

The server serves only ``<model>`` (a copy of its folder) with the checkpoint's α
(``MONDEQ_TUNE_AT_LOAD=false``: a load-time α search only delays the start). Beforehand B is
sent alone a few times for its unloaded latency. Prints a Markdown table and appends to
``bench/results/service_fairness-<device>.json``. Target (issue 12 §2): B's queue wait
stays under 250 ms on a 2-core CPU while the As run.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from servers import start_service

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


def a_requests(scenario: str, args: argparse.Namespace) -> tuple[list[dict], np.ndarray]:
    """The scenario's costly requests, as ``[{"rows", "method", "tol", "max_iter",
    "input"}]``, and B's image ``(1, 1, 28, 28)``."""
    if scenario == "costliest":
        heavy = heaviest_request()
        for k in ("rows", "max_iter", "tol", "method"):
            if getattr(args, k) is not None:
                heavy[k] = getattr(args, k)
        images = test_images(heavy["rows"] + 1)
        return [{**heavy, "input": "test images", "x": images[:-1]}], images[-1:]
    if scenario == "four-keys":
        images = test_images(4 * 25 + 1)
        return [
            {
                "rows": 25,
                "method": "forward_backward",
                "tol": tol,
                "max_iter": 1000,
                "input": "test images",
                "x": images[25 * i : 25 * (i + 1)],
            }
            for i, tol in enumerate((1e-6, 2e-6, 3e-6, 4e-6))
        ], images[-1:]
    if scenario == "big-same-key":
        noise = np.random.default_rng(0).random((256, 1, 28, 28), dtype=np.float32)
        return [{"rows": 256, "input": "uniform noise", "x": noise}], test_images(1)
    raise SystemExit(f"unknown scenario {scenario!r}")


async def scenario(url: str, path: str, a_bodies: list[dict], b_body: dict, offset: float):
    async with httpx.AsyncClient(base_url=url, timeout=600) as cb:
        clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in a_bodies]
        t0 = time.perf_counter()

        async def post_a(c: httpx.AsyncClient, body: dict):
            r = await c.post(path, json=body)
            return r, time.perf_counter() - t0

        tasks = [
            asyncio.create_task(post_a(c, body)) for c, body in zip(clients, a_bodies, strict=True)
        ]
        await asyncio.sleep(offset)
        t_b = time.perf_counter()
        rb = await cb.post(path, json=b_body)
        b_latency = time.perf_counter() - t_b
        b_done = time.perf_counter() - t0
        answers = await asyncio.gather(*tasks)
        for c in clients:
            await c.aclose()
    for r in [rb, *(ra for ra, _ in answers)]:
        if r.status_code != 200:
            raise SystemExit(f"{r.status_code}: {r.text}")
    pb = rb.json()["parameters"]
    pas = [ra.json()["parameters"] for ra, _ in answers]
    a_done = [t for _, t in answers]
    label_b = next(o for o in rb.json()["outputs"] if o["name"] == "label")["data"][0]
    return {
        "b_queue_ms": pb["queue_ms"],
        "b_latency_ms": 1000 * b_latency,
        "b_label": label_b,
        "a_queue_ms": [pa["queue_ms"] for pa in pas],
        "a_solve_ms": [pa["solve_ms"] for pa in pas],
        "a_done_s": a_done,
        "b_done_s": b_done,
        "b_before_a": b_done < min(a_done),
        "a_solving_at_b": max(a_done) > offset,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models")
    p.add_argument(
        "--scenario", default="costliest", choices=["costliest", "four-keys", "big-same-key"]
    )
    p.add_argument("--model", default="fmnist-fc")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--offset", type=float, default=0.5, help="seconds between the As and B")
    p.add_argument("--rows", type=int, help="costliest: A's rows (default: the limits' most)")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--tol", type=float)
    p.add_argument("--method")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/service_fairness-cpu.json")
    args = p.parse_args()

    heavy, b_image = a_requests(args.scenario, args)
    a_bodies = [
        body(h["x"], {k: h[k] for k in ("method", "tol", "max_iter") if k in h}) for h in heavy
    ]
    b_body = body(b_image)
    path = f"/v2/models/{args.model}/infer"
    repo = Path(tempfile.mkdtemp(prefix="fairness-"))
    shutil.copytree(args.model_dir / args.model, repo / args.model)
    proc, url = start_service(repo, env={"MONDEQ_TUNE_AT_LOAD": "false"}, ready_timeout_s=180)
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
            run = asyncio.run(scenario(url, path, a_bodies, b_body, args.offset))
            run["b_label_ok"] = run["b_label"] == label_alone
            runs.append(run)
            shown = (
                f"{k}={v:.1f}"
                if isinstance(v, float)
                else f"{k}=[{', '.join(f'{u:.1f}' for u in v)}]"
                if isinstance(v, list)
                else f"{k}={v}"
                for k, v in run.items()
            )
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
        raise SystemExit("no A was still solving when B arrived: use a smaller --offset")
    qs = [r["b_queue_ms"] for r in overlapped]
    described = [{k: v for k, v in h.items() if k != "x"} for h in heavy]
    summary = {
        "label": args.label,
        "scenario": args.scenario,
        "model": args.model,
        "heavy_requests": described,
        "offset_s": args.offset,
        "b_alone_ms_median": statistics.median(alone),
        "b_queue_ms_median": statistics.median(qs),
        "b_queue_ms_max": max(qs),
        "b_latency_ms_median": statistics.median(r["b_latency_ms"] for r in overlapped),
        "runs_overlapped": len(overlapped),
        "a_solve_ms_median": statistics.median(max(r["a_solve_ms"]) for r in runs),
        "b_labels_ok": all(r["b_label_ok"] for r in runs),
        "b_before_a": all(r["b_before_a"] for r in overlapped),
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
    }
    print()
    print(
        "| scenario | model | As: rows × max_iter (method, tol) | B alone ms "
        "| B queue ms median / max | B latency ms | slowest A solve ms | B label right "
        "| B before every A |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    shown_a = "; ".join(
        f"{h['rows']} × {h.get('max_iter', 'default')} ({h.get('method', 'default')}, {h['tol']:g})"
        if "tol" in h
        else f"{h['rows']} × default ({h['input']})"
        for h in described
    )
    print(
        f"| {args.scenario} | {args.model} | {shown_a} "
        f"| {summary['b_alone_ms_median']:.0f} | {summary['b_queue_ms_median']:.0f} / "
        f"{summary['b_queue_ms_max']:.0f} | {summary['b_latency_ms_median']:.0f} "
        f"| {summary['a_solve_ms_median']:.0f} | {summary['b_labels_ok']} "
        f"| {summary['b_before_a']} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*old, summary], indent=1) + "\n")


if __name__ == "__main__":
    main()
