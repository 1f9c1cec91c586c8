"""Speed of the paper's CIFAR models: inference, train step, iterations (``mondeq bench``).

Weights are the models' initialisation and inputs are CIFAR-shaped Gaussian noise: the
benchmark measures the solver, not a training run. Accuracy is guarded by re-solving the same
batch at tol 1e-6 and reporting how many predicted labels agree and how far the logits moved.

A ratio to the paper's reference code is printed only when that code ran in the same process,
alternating with ours call by call (:func:`alternate`), on the same inputs: given a checkout of
github.com/locuslab/monotone_op_net (``--reference-dir``, :mod:`mondeq_cli.reference`), each
model is built twice, ours and the reference's of the same architecture and solver (PR, α, tol,
300 iterations), and both sides' times, iterations and residuals are reported. A figure quoted
from elsewhere is never divided by: a shared machine drifts by 2× within minutes, and the
paper's code was once quoted 4× too slow that way.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from model_core import SolverSettings, build_model

from .reference import ReferenceCode, build_reference_model

# The paper's solver setup (PR): the defaults of SolverSettings.
PAPER_SOLVER = SolverSettings()

T = TypeVar("T")

CIFAR = {"in_channels": 3, "image_size": 32, "num_classes": 10}

# name -> the model's config: the paper's CIFAR-10 networks (experiments.ipynb of the
# reference code builds the same four with m = 1)
PAPER_MODELS: dict[str, dict] = {
    "cifar-conv": {"arch": "conv", "channels": 81, **CIFAR},
    "cifar-multitier": {"arch": "multi_tier", "channels": [16, 32, 60], **CIFAR},
    "cifar-conv-lg": {"arch": "conv", "channels": 200, **CIFAR},
    "cifar-multitier-lg": {"arch": "multi_tier", "channels": [64, 128, 128], **CIFAR},
}
# The fewest timed calls per side of a side-by-side ratio (each a median).
MIN_SIDE_BY_SIDE_REPEATS = 7
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


def alternate(
    calls: Sequence[Callable[[], object]],
    rounds: int,
    device: torch.device | None = None,
    setups: Sequence[Callable[[], object] | None] | None = None,
) -> list[list[float]]:
    """Time ``calls`` in turn, round after round: ``calls[0], calls[1], …, calls[0], …``.

    A comparison's sides interleaved this way see the same drift of a shared machine, which
    runs timed one after the other do not. ``setups[i]`` (untimed) runs right before each
    timed call ``i``.

    Returns:
        ``rounds`` wall times in seconds per call, in ``calls``' order (:func:`timed`).

    Raises:
        ValueError: ``rounds < 1``, or ``setups`` of another length than ``calls``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    setups = [None] * len(calls) if setups is None else list(setups)
    if len(setups) != len(calls):
        raise ValueError(f"{len(setups)} setups for {len(calls)} calls")
    dev = device or torch.device("cpu")
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for fn, setup, out in zip(calls, setups, times, strict=True):
            if setup is not None:
                setup()
            out.append(timed(fn, dev)[0])
    return times


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``(step, restore)``: one Adam step (lr 1e-3) of cross-entropy on ``(x, y)``, forward,
    backward and update; ``restore`` puts the weights back as they were before the first
    step, so that every timed step starts from the same weights (Adam would otherwise move
    them, and the iteration counts, so the times, with them)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, lambda: model.load_state_dict(start)


def reference_residual(ref_model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over the batch of the reference's true fixed-point residual
    ``‖z − σ(Wz + Ux)‖ / ‖z‖`` at the point its network reads (``mon`` returns
    ``σ(Wz* + Ux)`` for its last iterate ``z*``), all tiers together, for images ``x``
    ``(B, C, H, W)``: the comparison with our ``SolveStats.residual`` (§2), which the
    reference's stopping rule (relative change of the iterate) does not bound."""
    mon = ref_model.mon
    with torch.no_grad():
        # SingleFcNet flattens the image; the conv networks pad it
        fc = len(mon.linear_module.x_shape(1)) == 2
        xp = x.flatten(1) if fc else F.pad(x, (1, 1, 1, 1))
        z = tuple(t.clone() for t in mon(xp))
        fz = mon.nonlin_module(*mon.linear_module(xp, *z))
        diff = sum((a - b).flatten(1).pow(2).sum(1) for a, b in zip(z, fz, strict=True))
        norm = sum(a.flatten(1).pow(2).sum(1) for a in z)
    return (diff.sqrt() / norm.sqrt().clamp_min(1e-30)).mean().item()


def bench_model(
    name: str,
    *,
    batch_size: int = 64,
    device: str = "auto",
    tol: float = PAPER_SOLVER.tol,
    alpha: float = PAPER_SOLVER.alpha,
    repeats: int = 3,
    seed: int = 0,
    reference: ReferenceCode | None = None,
) -> dict:
    """Measure one model at ``batch_size`` samples of shape (3, 32, 32); returns a row of
    plain numbers (times in ms as medians over ``repeats`` calls, iterations as means over
    the batch).

    With ``reference`` (:func:`~mondeq_cli.reference.load_reference`), the reference's
    network of the same architecture and solver is timed alternating with ours
    (:func:`alternate`: ref, ours, ref, ours, …) on the same inputs, inference under
    ``no_grad`` and a train step (forward, backward, Adam step) from the same weights each
    time, and the row adds its times (``ref_*``), iterations, residual and the ratios
    ``infer_ratio`` and ``train_ratio`` (ours / reference: below 1 is faster).

    Raises:
        ValueError: an unknown model name or device (see :func:`pick_device`), or
            ``reference`` with ``repeats`` below :data:`MIN_SIDE_BY_SIDE_REPEATS`.
    """
    if name not in PAPER_MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(PAPER_MODELS)}")
    if reference is not None and repeats < MIN_SIDE_BY_SIDE_REPEATS:
        raise ValueError(
            f"a side-by-side ratio takes the median of >= {MIN_SIDE_BY_SIDE_REPEATS} "
            f"calls per side, got --repeats {repeats}"
        )
    config = PAPER_MODELS[name]
    dev = pick_device(device)
    torch.manual_seed(seed)
    solver = PAPER_SOLVER.replace(alpha=alpha, tol=tol)
    model = build_model({**config, "solver": solver.to_dict()}).to(dev)
    x = torch.randn(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    ref_model = None
    if reference is not None:
        torch.manual_seed(seed)
        ref_model = build_reference_model(
            reference,
            {**config, "m": model.config["m"]},
            alpha=alpha,
            tol=tol,
            max_iter=solver.max_iter,
        ).to(dev)
    repeats = max(1, repeats)

    model.eval()
    model.op.clear_cache()
    cold, _ = timed(lambda: model.infer(x), dev)  # builds spectra and the resolvent
    last: dict = {}

    def ours_infer():
        last["result"] = model.infer(x)

    ref_fwd: list[float] = []

    def ref_infer():
        with torch.no_grad():
            ref_model(x)
        ref_fwd.append(ref_model.mon.stats.fwd_iters.val)

    if ref_model is not None:
        ref_model.eval()
        ref_infer()  # warm-up (allocator, first-call overheads); its iterations are kept
        ref_times, infer_times = alternate([ref_infer, ours_infer], repeats, dev)
    else:
        (infer_times,) = alternate([ours_infer], repeats, dev)
    result = last["result"]
    tight = model.infer(x, tol=1e-6, max_iter=3000)
    agree = (tight.labels == result.labels).double().mean().item()
    logit_err = ((tight.logits - result.logits).norm() / tight.logits.norm()).item()

    model.train()
    step, restore = train_step(model, x, y)
    step()  # warm-up (allocator, first-call overheads)
    if ref_model is not None:
        ref_model.train()
        ref_step, ref_restore = train_step(ref_model, x, y)
        ref_step()
        ref_train_times, train_times = alternate(
            [ref_step, step], repeats, dev, setups=[ref_restore, restore]
        )
    else:
        # load_state_dict bumps the weights' versions: the resolvent is rebuilt each step
        (train_times,) = alternate([step], repeats, dev, setups=[restore])
    fwd, bwd = model.deq.last_forward_stats, model.deq.last_backward_stats
    infer_ms = statistics.median(infer_times) * 1e3
    train_ms = statistics.median(train_times) * 1e3
    row = {
        "model": name,
        "params": model.num_parameters(),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "batch": batch_size,
        "tol": tol,
        "alpha": alpha,
        "repeats": repeats,
        "infer_ms": infer_ms,
        "infer_cold_ms": cold * 1e3,
        "train_ms": train_ms,
        "fwd_iters": result.stats.iterations.double().mean().item(),
        "fwd_iters_max": result.stats.iterations.max().item(),
        "train_fwd_iters": fwd.iterations.double().mean().item(),
        "train_bwd_iters": bwd.iterations.double().mean().item(),
        "residual": result.stats.residual.mean().item(),
        "label_agreement_vs_tol1e-6": agree,
        "logit_rel_err_vs_tol1e-6": logit_err,
    }
    if ref_model is None:
        return row
    ref_infer_ms = statistics.median(ref_times) * 1e3
    ref_train_ms = statistics.median(ref_train_times) * 1e3
    stats = ref_model.mon.stats
    return {
        **row,
        "ref_params": sum(p.numel() for p in ref_model.parameters()),
        "ref_infer_ms": ref_infer_ms,
        "ref_train_ms": ref_train_ms,
        # the reference stops the whole batch at once, on the relative change of the
        # iterate summed over tiers: its count is per batch, ours a mean of per-sample counts
        "ref_fwd_iters": statistics.mean(ref_fwd),
        "ref_train_fwd_iters": stats.fwd_iters.val,
        "ref_train_bwd_iters": stats.bkwd_iters.val,
        "ref_residual": reference_residual(ref_model.eval(), x),
        "infer_ratio": infer_ms / ref_infer_ms,
        "train_ratio": train_ms / ref_train_ms,
        "runs_ms": {
            "infer": [t * 1e3 for t in infer_times],
            "ref_infer": [t * 1e3 for t in ref_times],
            "train": [t * 1e3 for t in train_times],
            "ref_train": [t * 1e3 for t in ref_train_times],
        },
    }


def run_benchmark(models=DEFAULT_MODELS, progress: bool = True, **kwargs) -> list[dict]:
    """:func:`bench_model` for each name in ``models`` (``kwargs`` go to it, ``reference``
    included), with a progress line per model on stderr; the device is checked before the
    first model.

    Raises:
        ValueError: an unknown model or device, before any model runs for the device.
    """
    pick_device(kwargs.get("device", "auto"))  # refused before the first model's line
    unknown = [m for m in models if m not in PAPER_MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; choose from {sorted(PAPER_MODELS)}")
    side = " beside the reference code" if kwargs.get("reference") is not None else ""
    rows = []
    for name in models:
        if progress:
            print(f"benchmarking {name}{side} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, **kwargs))
    return rows


def _pair(a: float | None, b: float | None, fmt: str) -> str:
    return " / ".join("—" if v is None else fmt.format(v) for v in (a, b))


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows. Rows measured beside the reference code
    (:func:`bench_model` with ``reference``) give both sides and the ratios ours/reference;
    otherwise there is no reference column at all."""
    side_by_side = any("ref_infer_ms" in r for r in rows)
    cols: list[tuple[str, Callable[[dict], str]]] = [
        ("model", lambda r: r["model"]),
        ("params", lambda r: f"{r['params']:,}"),
        ("device", lambda r: r["device"]),
    ]
    if side_by_side:
        cols += [
            ("infer ms ours", lambda r: f"{r['infer_ms']:.0f}"),
            ("infer ms ref", lambda r: f"{r['ref_infer_ms']:.0f}"),
            ("infer ours/ref", lambda r: f"{r['infer_ratio']:.2f}×"),
            ("train ms ours", lambda r: f"{r['train_ms']:.0f}"),
            ("train ms ref", lambda r: f"{r['ref_train_ms']:.0f}"),
            ("train ours/ref", lambda r: f"{r['train_ratio']:.2f}×"),
            ("fwd iters ours/ref", lambda r: _pair(r["fwd_iters"], r["ref_fwd_iters"], "{:.1f}")),
            (
                "train fwd/bwd iters ours",
                lambda r: _pair(r["train_fwd_iters"], r["train_bwd_iters"], "{:.1f}"),
            ),
            (
                "train fwd/bwd iters ref",
                lambda r: _pair(r["ref_train_fwd_iters"], r["ref_train_bwd_iters"], "{:.0f}"),
            ),
            ("residual ours/ref", lambda r: _pair(r["residual"], r["ref_residual"], "{:.1e}")),
        ]
    else:
        cols += [
            ("infer ms/batch", lambda r: f"{r['infer_ms']:.0f}"),
            ("cold infer ms", lambda r: f"{r['infer_cold_ms']:.0f}"),
            ("train ms/step", lambda r: f"{r['train_ms']:.0f}"),
            ("fwd iters", lambda r: f"{r['fwd_iters']:.1f}"),
            ("bwd iters", lambda r: f"{r['train_bwd_iters']:.1f}"),
        ]
    cols.append(("labels = tol 1e-6", lambda r: f"{r['label_agreement_vs_tol1e-6']:.0%}"))
    lines = [
        "| " + " | ".join(c[0] for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


NO_REFERENCE_NOTE = (
    "No ratio to the paper's code: a ratio counts only when both ran side by side. For one, "
    "clone https://github.com/locuslab/monotone_op_net and pass --reference-dir DIR."
)


def format_probe(before: dict, after: dict) -> str:
    """One line: the :func:`machine_probe` figures before and after a run."""
    return (
        f"machine probe: GEMM {before['gemm_gflops']:.0f} → {after['gemm_gflops']:.0f} GFLOP/s, "
        f"copy {before['copy_gbps']:.1f} → {after['copy_gbps']:.1f} GB/s (before → after)"
    )
