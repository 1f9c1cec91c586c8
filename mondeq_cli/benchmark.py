"""Speed of the paper's CIFAR models: inference, train step, iterations (``mondeq bench``).

The reference figures are the paper's code on current PyTorch, measured on the 2-core CPU
these machines have, at batch 64 (from the model_core issue). Weights are the models'
initialisation and inputs are CIFAR-shaped Gaussian noise: the benchmark measures the
solver, not a training run. Accuracy is guarded by re-solving the same batch at tol 1e-6
and reporting how many predicted labels agree and how far the logits moved.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from model_core import SolverSettings, build_model

# The paper's solver setup (PR): the defaults of SolverSettings.
PAPER_SOLVER = SolverSettings()

T = TypeVar("T")

CIFAR = {"in_channels": 3, "image_size": 32, "num_classes": 10}

# name -> (config, reference inference s/batch, reference train s/step) on the 2-core CPU
PAPER_MODELS: dict[str, tuple[dict, float | None, float | None]] = {
    "cifar-conv": ({"arch": "conv", "channels": 81, **CIFAR}, 4.6, 8.4),
    "cifar-multitier": ({"arch": "multi_tier", "channels": [16, 32, 60], **CIFAR}, 1.7, 4.1),
    "cifar-conv-lg": ({"arch": "conv", "channels": 200, **CIFAR}, None, None),
    "cifar-multitier-lg": ({"arch": "multi_tier", "channels": [64, 128, 128], **CIFAR}, None, None),
}
DEFAULT_MODELS = ("cifar-conv", "cifar-multitier")


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given.

    Raises:
        ValueError: another name (torch's meta, mps, ... fail inside the first solve), or
            CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if (
        dev is None
        or dev.type not in ("cpu", "cuda")
        or (dev.type == "cpu" and dev.index is not None)
    ):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but no CUDA device is available")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """``(seconds, fn())``: the wall time of one call of ``fn``, with CUDA synchronised
    before and after it so that queued kernels are counted (the benchmarks' one timer)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def machine_probe(device: str = "auto", seconds: float = 1.0) -> dict:
    """How fast this machine is right now: float32 GEMM GFLOP/s (1024³) and copy GB/s
    (64 MB). Shared VMs drift by up to 2× within minutes; benchmark files record this
    beside their timings so that runs can be compared.

    Returns:
        ``{"gemm_gflops": …, "copy_gbps": …}``, each measured for about ``seconds`` s.

    Raises:
        ValueError: a bad ``device`` (:func:`pick_device`).
    """
    dev = pick_device(device)

    def rate(fn: Callable[[], object]) -> float:
        """Calls per second."""
        timed(fn, dev)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return n / (time.perf_counter() - start)

    a = torch.randn(1024, 1024, device=dev)
    src = torch.randn(16 << 20, device=dev)
    dst = torch.empty_like(src)
    return {
        "gemm_gflops": rate(lambda: a @ a) * 2 * 1024**3 / 1e9,
        "copy_gbps": rate(lambda: dst.copy_(src)) * 2 * src.numel() * 4 / 1e9,
    }


def bench_model(
    name: str,
    *,
    batch_size: int = 64,
    device: str = "auto",
    tol: float = PAPER_SOLVER.tol,
    alpha: float = PAPER_SOLVER.alpha,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Measure one model at ``batch_size`` samples of shape (3, 32, 32); returns a row of
    plain numbers (times in ms, iterations as means over the batch).

    Raises:
        ValueError: an unknown model name or device (see :func:`pick_device`).
    """
    if name not in PAPER_MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(PAPER_MODELS)}")
    config, ref_infer, ref_train = PAPER_MODELS[name]
    dev = pick_device(device)
    torch.manual_seed(seed)
    solver = PAPER_SOLVER.replace(alpha=alpha, tol=tol).to_dict()
    model = build_model({**config, "solver": solver}).to(dev)
    x = torch.randn(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)

    model.eval()
    model.op.clear_cache()
    cold, _ = timed(lambda: model.infer(x), dev)  # builds spectra and the resolvent
    runs = [timed(lambda: model.infer(x), dev) for _ in range(max(1, repeats))]
    infer_times, result = [t for t, _ in runs], runs[-1][1]
    tight = model.infer(x, tol=1e-6, max_iter=3000)
    agree = (tight.labels == result.labels).double().mean().item()
    logit_err = ((tight.logits - result.logits).norm() / tight.logits.norm()).item()

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up (allocator, first-call overheads)
    # Every timed step starts from the same weights: Adam would otherwise move them, and
    # the iteration counts (so the times) with them, the more the more repeats.
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_times = []
    for _ in range(max(1, repeats)):
        model.load_state_dict(start)  # bumps the weights' versions: the resolvent is rebuilt
        train_times.append(timed(step, dev)[0])
    fwd, bwd = model.deq.last_forward_stats, model.deq.last_backward_stats
    infer_ms = statistics.median(infer_times) * 1e3
    train_ms = statistics.median(train_times) * 1e3
    return {
        "model": name,
        "params": model.num_parameters(),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "batch": batch_size,
        "tol": tol,
        "alpha": alpha,
        "infer_ms": infer_ms,
        "infer_cold_ms": cold * 1e3,
        "train_ms": train_ms,
        "fwd_iters": result.stats.iterations.double().mean().item(),
        "train_fwd_iters": fwd.iterations.double().mean().item(),
        "train_bwd_iters": bwd.iterations.double().mean().item(),
        "residual": result.stats.residual.mean().item(),
        "label_agreement_vs_tol1e-6": agree,
        "logit_rel_err_vs_tol1e-6": logit_err,
        "ref_infer_ms": ref_infer * 1e3 if ref_infer else None,
        "ref_train_ms": ref_train * 1e3 if ref_train else None,
        "infer_speedup": (ref_infer * 1e3 / infer_ms) if ref_infer else None,
        "train_speedup": (ref_train * 1e3 / train_ms) if ref_train else None,
    }


def run_benchmark(models=DEFAULT_MODELS, progress: bool = True, **kwargs) -> list[dict]:
    """:func:`bench_model` for each name in ``models`` (``kwargs`` go to it), with a progress
    line per model on stderr; the device is checked before the first model.

    Raises:
        ValueError: an unknown model or device, before any model runs for the device.
    """
    pick_device(kwargs.get("device", "auto"))  # refused before the first model's line
    rows = []
    for name in models:
        if progress:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, **kwargs))
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    cols = [
        ("model", "model", "{}"),
        ("params", "params", "{:,}"),
        ("device", "device", "{}"),
        ("infer_ms", "infer ms/batch", "{:.0f}"),
        ("infer_cold_ms", "cold infer ms", "{:.0f}"),
        ("train_ms", "train ms/step", "{:.0f}"),
        ("fwd_iters", "fwd iters", "{:.1f}"),
        ("train_bwd_iters", "bwd iters", "{:.1f}"),
        ("ref_infer_ms", "ref infer ms", "{:.0f}"),
        ("ref_train_ms", "ref train ms", "{:.0f}"),
        ("infer_speedup", "infer ×", "{:.1f}"),
        ("train_speedup", "train ×", "{:.1f}"),
        ("label_agreement_vs_tol1e-6", "labels = tol 1e-6", "{:.0%}"),
    ]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        cells = ["—" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
