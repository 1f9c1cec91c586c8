"""Load test of the HTTP service: throughput and latency against concurrency.

    .venv/bin/python bench/service_load.py [--models models/fmnist-fc,models/fmnist-conv]
        [--clients 1,2,4,8,16,32,64] [--duration 5] [--device cpu]

For each model folder (``<dir>/<name>``, holding ``<version>/model.pt``) it starts
``python -m service`` twice, with batching on (``max_batch_size`` 64) and off (1), and
drives each with an async httpx load generator: every client sends one image at a time
(``POST /v2/models/<name>/infer``, FP32 ``[1, C, H, W]`` from the checkpoint's calibration
batch) for ``--duration`` seconds after a warm-up. Beside it stands the limit: the same
model's in-process batched ``infer`` throughput at batch 64 (and 1), with α tuned as the
server tunes it.

The targets compare three throughputs at 64 clients (batching on, off, and the limit). On a
shared VM the machine's speed drifts by up to 2× within minutes, so those three are also
measured *head to head*: both servers stay up and ``--rounds`` rounds alternate short
windows of each with the limit, and the ratios are taken within each round. Prints Markdown
tables and writes bench/results/service_load-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from servers import start_service

from model_core import load_checkpoint, tune_alpha
from mondeq_cli.benchmark import machine_probe

ROOT = Path(__file__).resolve().parent.parent

# httpcore tries `import sniffio` on every request; where it is not installed, each failed
# import scans sys.path (about a quarter of the load generator's CPU). Mark it absent once:
# the behaviour is the same (asyncio), the search is skipped.
sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


def latest_checkpoint(folder: Path) -> Path:
    versions = sorted((int(p.name), p) for p in folder.iterdir() if p.name.isdigit())
    if not versions:
        raise SystemExit(f"{folder}: no <version>/model.pt inside")
    return versions[-1][1] / "model.pt"


def pixel_batch(model, n: int = 64) -> torch.Tensor:
    """``(n, C, H, W)`` pixels in [0, 1]: the calibration batch, else uniform noise."""
    cal = model.calibration
    if isinstance(cal, torch.Tensor) and cal.dim() == 4:
        x = cal.float() / 255.0 if cal.dtype == torch.uint8 else cal.float()
        return x[:n]
    return torch.rand(n, *model.input_spec.shape, generator=torch.Generator().manual_seed(0))


class Limit:
    """The in-process limit: ``model.infer`` on normalised calibration pixels, with α tuned
    as the server tunes it at load."""

    def __init__(self, ckpt: Path, device: str):
        self.device = torch.device(device)
        model = load_checkpoint(ckpt, map_location=device)
        self.x = model.input_spec.normalize(pixel_batch(model)).to(device)
        s = model.solver_settings
        if s.solver.tunable_alpha:
            model.set_solver(alpha=tune_alpha(model, self.x, method=s.method).alpha)
        self.model = model
        model.infer(self.x)  # warm: resolvent and allocator

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


async def drive(
    url: str, path: str, bodies: list[bytes], clients: int, warmup: float, duration: float
) -> dict:
    """``clients`` concurrent clients, each one request at a time; stats of the timed part.

    Each client has its own ``AsyncClient`` (one keep-alive connection): httpcore's pool
    scans every connection per request, so one shared pool of 64 costs the load generator
    more CPU than the server spends.
    """
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    pool = [httpx.AsyncClient(base_url=url, timeout=120, verify=False) for _ in range(clients)]
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_stop = t_measure + duration

    async def worker(k: int) -> None:
        i, client = k, pool[k]
        while True:
            t0 = time.perf_counter()
            if t0 >= t_stop:
                return
            try:
                r = await client.post(path, content=bodies[i % len(bodies)], headers=headers)
                code = str(r.status_code)
            except httpx.TransportError as e:
                code = type(e).__name__
            t1 = time.perf_counter()
            i += clients
            if t0 < t_measure or t1 > t_stop:
                continue
            if code == "200":
                latencies.append(t1 - t0)
            else:
                errors[code] = errors.get(code, 0) + 1

    try:
        await asyncio.gather(*(worker(k) for k in range(clients)))
    finally:
        for client in pool:
            await client.aclose()
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "throughput": len(lat) / duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
    }


def serve(model_folder: Path, batch: int, device: str) -> tuple[subprocess.Popen, str, Path]:
    """``python -m service`` on a repository holding only this model."""
    repo = Path(tempfile.mkdtemp(prefix="mondeq-bench-"))
    (repo / model_folder.name).symlink_to(model_folder.resolve())
    env = {"MONDEQ_MAX_QUEUE": "100000", "MONDEQ_RETUNE_FACTOR": "0"}
    flags = ("--max-batch-size", str(batch), "--device", device)
    proc, url = start_service(repo, *flags, env=env)
    return proc, url, repo


def stop(proc: subprocess.Popen, repo: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    (repo / next(iter(os.listdir(repo)))).unlink()
    repo.rmdir()


def request_bodies(model, name: str) -> list[bytes]:
    x = pixel_batch(model)
    return [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, *x.shape[1:]],
                        "datatype": "FP32",
                        "data": x[i].flatten().tolist(),
                    }
                ],
                "outputs": [{"name": "label"}, {"name": "iterations"}],
            }
        ).encode()
        for i in range(x.shape[0])
    ]


def table(results: list[dict], h2h_clients: int = 64) -> str:
    lines = [
        "| model | batching | clients | req/s | p50 ms | p99 ms | % of in-process limit |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        limit = m["limit"]["samples_per_s_batch64"]
        for mode in ("on", "off"):
            for r in m["runs"][mode]:
                err = f" ({sum(r['errors'].values())} errors)" if r["errors"] else ""
                lines.append(
                    f"| {m['model']} | {mode} | {r['clients']} | {r['throughput']:.0f}{err} | "
                    f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                    f"{100 * r['throughput'] / limit:.0f}% |"
                )
    lines += [
        "",
        f"Head to head at {h2h_clients} clients (each round: batching on, off, then the "
        "in-process limit, back to back):",
        "",
        "| model | round | batching on req/s | off req/s | limit samples/s | % of limit | "
        "× unbatched |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        for r in m.get("head_to_head", []):
            lines.append(
                f"| {m['model']} | {r['round']} | {r['on']:.0f} | {r['off']:.0f} | "
                f"{r['limit']:.0f} | {100 * r['share_of_limit']:.0f}% | "
                f"{num(r['vs_unbatched'], '.1f')}× |"
            )
    lines += [
        "",
        f"| model | in-process limit (batch 64) | batch 1 | at {h2h_clients} clients: % of "
        "limit (median, range) | × unbatched (median) | p99/p50 at 16 clients |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        s = m["summary"]
        share, rng = s.get("share_of_limit_64"), s.get("share_range")
        spread = f" ({100 * rng[0]:.0f}–{100 * rng[1]:.0f}%)" if rng else ""
        lines.append(
            f"| {m['model']} | {m['limit']['samples_per_s_batch64']:.0f}/s | "
            f"{m['limit']['samples_per_s_batch1']:.0f}/s | "
            f"{num(share and share * 100, '.0f')}%{spread} | "
            f"{num(s.get('vs_unbatched_64'), '.1f')}× | {num(s['p99_over_p50_16'], '.2f')} |"
        )
    return "\n".join(lines)


def num(v, fmt: str) -> str:
    return "n/a" if v is None or v != v else format(v, fmt)


def head_to_head(folder: Path, bodies: list[bytes], limit: Limit, device: str, args) -> list[dict]:
    """Rounds of (batching on, batching off, limit) at ``args.h2h_clients`` clients, each a
    short window, so that the machine's speed is the same for the three within a round."""
    name = folder.name
    servers = {mode: serve(folder, 64 if mode == "on" else 1, device) for mode in ("on", "off")}
    rounds = []
    try:
        for k in range(args.rounds):
            row: dict = {"round": k + 1}
            for mode, (_, url, _) in servers.items():
                r = asyncio.run(
                    drive(url, f"/v2/models/{name}/infer", bodies, args.h2h_clients,
                          args.warmup, args.h2h_window)
                )  # fmt: skip
                row[mode] = r["throughput"]
                row[f"{mode}_errors"] = r["errors"]
            # The servers sit idle meanwhile, so the load generator's niceness costs the
            # limit nothing.
            row["limit"] = limit.samples_per_s(64, args.h2h_window)
            row["share_of_limit"] = row["on"] / row["limit"]
            row["vs_unbatched"] = row["on"] / row["off"] if row["off"] else None
            print(
                f"{name} head to head, round {k + 1}: on {row['on']:.0f}/s, off "
                f"{row['off']:.0f}/s, limit {row['limit']:.0f}/s: "
                f"{100 * row['share_of_limit']:.0f}% of the limit, "
                f"{row['vs_unbatched'] or float('nan'):.1f}× unbatched",
                file=sys.stderr,
            )
            rounds.append(row)
    finally:
        for proc, _, repo in servers.values():
            stop(proc, repo)
    return rounds


def summarise(runs: dict, rounds: list[dict]) -> dict:
    def at(mode: str, clients: int) -> dict | None:
        return next((r for r in runs[mode] if r["clients"] == clients), None)

    out = {}
    on16 = at("on", 16)
    out["p99_over_p50_16"] = on16["p99_ms"] / on16["p50_ms"] if on16 else None
    if rounds:
        out["share_of_limit_64"] = statistics.median(r["share_of_limit"] for r in rounds)
        out["vs_unbatched_64"] = statistics.median(r["vs_unbatched"] or 0.0 for r in rounds)
        out["share_range"] = [min(r["share_of_limit"] for r in rounds),
                              max(r["share_of_limit"] for r in rounds)]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = [
        f"models/{n}" for n in ("fmnist-fc", "fmnist-conv") if (ROOT / "models" / n).is_dir()
    ]
    p.add_argument("--models", default=",".join(default), help="comma-separated model folders")
    p.add_argument("--clients", default="1,2,4,8,16,32,64")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--modes", default="on,off", help="batching on (64), off (1), or both")
    p.add_argument("--nice", type=int, default=10, help="niceness of the load generator")
    p.add_argument("--rounds", type=int, default=3, help="head-to-head rounds (0: none)")
    p.add_argument("--h2h-clients", type=int, default=64, help="clients in the head to head")
    p.add_argument("--h2h-window", type=float, default=4.0, help="seconds per window")
    args = p.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    clients = [int(c) for c in args.clients.split(",") if c]
    folders = [Path(m) for m in args.models.split(",") if m]
    probe_before = machine_probe(device)
    limits: dict[Path, Limit] = {}
    limit_figures: dict[Path, dict] = {}
    for folder in folders:  # first, on an otherwise idle machine
        print(f"{folder.name}: in-process limit ...", file=sys.stderr)
        limit = limits[folder] = Limit(latest_checkpoint(folder), device)
        seconds = min(args.duration, 5)
        limit_figures[folder] = {
            "alpha": limit.alpha,
            "samples_per_s_batch64": limit.samples_per_s(64, seconds),
            "samples_per_s_batch1": limit.samples_per_s(1, seconds),
        }
    # The load generator shares the machine with the server; on a small CPU machine it would
    # take a core from the system under test. Lower its priority: it still keeps every client
    # busy, and the server's throughput is what is measured.
    os.nice(args.nice)
    results = []
    for folder in folders:
        name, ckpt = folder.name, latest_checkpoint(folder)
        bodies = request_bodies(load_checkpoint(ckpt), name)
        runs: dict[str, list] = {"on": [], "off": []}
        for mode in args.modes.split(",") if clients else ():
            proc, url, repo = serve(folder, 64 if mode == "on" else 1, device)
            try:
                for c in clients:
                    r = asyncio.run(
                        drive(
                            url, f"/v2/models/{name}/infer", bodies, c, args.warmup, args.duration
                        )
                    )
                    print(
                        f"{name} batching {mode} {c:>2} clients: {r['throughput']:.0f} req/s, "
                        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
                        file=sys.stderr,
                    )
                    runs[mode].append(r)
            finally:
                stop(proc, repo)
        rounds = head_to_head(folder, bodies, limits[folder], device, args) if args.rounds else []
        results.append(
            {"model": name, "checkpoint": str(ckpt), "limit": limit_figures[folder],
             "runs": runs, "head_to_head": rounds, "summary": summarise(runs, rounds)}
        )  # fmt: skip
    meta = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "duration_s": args.duration,
        "load_generator_nice": args.nice,
        "probe_before": probe_before,
        "probe_after": machine_probe(device),
        "head_to_head": {"clients": args.h2h_clients, "window_s": args.h2h_window,
                         "rounds": args.rounds},
    }  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"service_load-{device}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    print(table(results, args.h2h_clients))


if __name__ == "__main__":
    main()
