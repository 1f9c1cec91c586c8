"""GPU benchmarks of the sync-free solver path (issue 14), for a lent H100/H200.

    python3 bench/gpu_check.py [--quick]

Measures, on random-weight models of the default shapes (no checkpoint needed):

* ``infer_latency``: single-image fmnist-conv ``infer`` (32 channels, 28×28), median of
  200 calls, under each loop (``compact``: today's, one host sync per iteration;
  ``masked``; ``graphed``: the default on CUDA) and ``sync_every`` 1, 2, 4, 8; the solve's
  own time and the rest of ``infer`` (bias, error bound, head, radius) apart;
* ``throughput``: fmnist-conv samples/s at batch 1,024 and 64, each loop;
* ``train_epoch``: one cifar-conv (81 channels) training epoch on synthetic CIFAR-shaped
  data at batch 128 (50,000 samples, 391 steps; ``--quick``: 40 steps, scaled), beside the
  paper's 1.4 h / 40 epochs on an RTX 2080 Ti (126 s per epoch).

Every row carries its iteration counts, so a speed-up is never fewer iterations. Writes
``bench/results/gpu_check-<device>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model_core import build_model, cuda_graphs

PAPER_S_PER_EPOCH = 1.4 * 3600 / 40  # RTX 2080 Ti, the paper's CIFAR conv model
FMNIST_CONV = {"arch": "conv", "in_channels": 1, "image_size": 28, "channels": 32}
CIFAR_CONV = {"arch": "conv", "in_channels": 3, "image_size": 32, "channels": 81}


DEVICE = "cuda"  # --device cpu: a smoke run of this script where there is no GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(min(warmup, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def infer_latency(model, repeats: int) -> list[dict]:
    x = torch.randn(1, 1, 28, 28, device=DEVICE)
    rows = []
    for loop, sync_every in [("compact", 1), ("masked", 4)] + [
        ("graphed", k) for k in (1, 2, 4, 8)
    ]:
        kw = {"loop": loop, "sync_every": sync_every}
        res = model.infer(x, **kw)
        ms = median_ms(lambda kw=kw: model.infer(x, **kw), repeats)
        solve_ms = median_ms(lambda kw=kw: model.deq.solve(x, **kw), repeats)
        res = model.infer(x, **kw)
        rows.append(
            {
                "loop": loop,
                "sync_every": sync_every,
                "ran": res.stats.extra.get("loop"),
                "infer_ms": ms,
                "solve_ms": solve_ms,
                "iterations": int(res.stats.iterations.item()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def throughput(model, batch: int, repeats: int) -> list[dict]:
    x = torch.randn(batch, 1, 28, 28, device=DEVICE)
    rows = []
    for loop in ("compact", "masked", "graphed"):
        res = model.infer(x, loop=loop)
        ms = median_ms(lambda loop=loop: model.infer(x, loop=loop), repeats)
        res = model.infer(x, loop=loop)
        it = res.stats.iterations.double()
        rows.append(
            {
                "batch": batch,
                "loop": loop,
                "ran": res.stats.extra.get("loop"),
                "ms_per_batch": ms,
                "samples_per_s": batch / ms * 1e3,
                "iterations_mean": it.mean().item(),
                "iterations_max": int(it.max().item()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def train_epoch(steps: int, batch: int = 128, samples: int = 50_000) -> dict:
    torch.manual_seed(0)
    model = build_model(CIFAR_CONV).to(DEVICE).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    batch = 8 if DEVICE == "cpu" else batch
    data = torch.randn(steps, batch, 3, 32, 32, device=DEVICE, generator=g)
    labels = torch.randint(0, 10, (steps, batch), device=DEVICE, generator=g)
    fwd, bwd = [], []

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data[i]), labels[i])
        loss.backward()
        opt.step()
        fwd.append(model.deq.last_forward_stats.iterations.double().mean())
        bwd.append(model.deq.last_backward_stats.iterations.double().mean())

    for i in range(min(3 if DEVICE == "cuda" else 1, steps)):  # warm-up: cuFFT plans, allocator
        step(i)
    fwd.clear(), bwd.clear()
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    full_steps = -(-samples // batch)
    s_epoch = elapsed / steps * full_steps
    row = {
        "model": "cifar-conv (81 ch), synthetic CIFAR-shaped data",
        "batch": batch,
        "steps_timed": steps,
        "s_per_step": elapsed / steps,
        "s_per_epoch": s_epoch,
        "paper_s_per_epoch_rtx2080ti": PAPER_S_PER_EPOCH,
        "speedup_vs_paper": PAPER_S_PER_EPOCH / s_epoch,
        "fwd_iterations_mean": torch.stack(fwd).mean().item(),
        "bwd_iterations_mean": torch.stack(bwd).mean().item(),
        "forward_loop": model.deq.last_forward_stats.extra.get("loop"),
    }
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and train steps")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (--device cpu: a smoke run)")
    repeats = (3 if DEVICE == "cpu" else 30) if args.quick else 200
    torch.manual_seed(0)
    model = build_model(FMNIST_CONV).to(DEVICE).eval()
    t0 = time.perf_counter()
    out = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "buckets": list(cuda_graphs.BUCKETS),
        "infer_latency_fmnist_conv_batch1": infer_latency(model, repeats),
        "throughput_fmnist_conv": throughput(
            model, 64 if DEVICE == "cpu" else 1024, max(2, repeats // 10)
        )
        + throughput(model, 64, max(2, repeats // 4)),
        "train_epoch_cifar_conv": train_epoch(
            (2 if DEVICE == "cpu" else 40) if args.quick else 391
        ),
    }
    out["wall_s"] = time.perf_counter() - t0
    if DEVICE == "cpu":  # a smoke run: nothing to record
        print(json.dumps(out, indent=2))
        return
    dest = Path(__file__).parent / "results"
    dest.mkdir(exist_ok=True)
    name = out["device"].replace(" ", "_")
    text = json.dumps(out, indent=2)
    (dest / f"gpu_check-{name}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
