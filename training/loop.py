"""The training loop: Adam steps on LR/β1 schedules, α retuning, an evaluation per epoch.

:func:`train` builds the run (:mod:`training.setup`), claims its folder and trains epoch by
epoch; after each epoch rank 0 writes the run's files (:class:`training.runfolder.RunFolder`).
A stop signal (:mod:`training.signals`) ends it at a step boundary with a resumable
``last.pt``; a non-finite loss, gradient or weight ends it at once (:class:`Diverged`).

Data order is a function of ``(seed, epoch)`` (DistributedSampler's permutation) and
augmentation of ``(seed, epoch, step)``, so a run resumed from ``last.pt`` takes exactly the
steps the uninterrupted run would have taken, and 2 ranks with batch B/2 each take the steps
one process takes with batch B.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from model_core import tune_alpha

from . import distributed
from .data import augment
from .evaluate import evaluate
from .options import TrainOptions
from .setup import Setup, build, steps_in_epoch
from .signals import Interrupted, StopFlag

TUNE_EARLY_STEP = 10  # α is retuned at this step of every epoch and at mid-epoch
TUNE_SAMPLES = 32  # see _retune
TUNE_MAX_ITER = 60
TUNE_SPAN = 0.5  # decades either side of the current α
# The solves of a monDEQ converge for any weights, at a rate set by α and the weights' scale;
# samples left unconverged or a large residual mean training has left the range where its
# gradients mean anything (e.g. --lr 1e3: every forward solve at the 300-iteration cap). A
# healthy run leaves none unconverged, so these bounds flag such runs without false alarms.
UNCONVERGED_WARN_SHARE = 0.05  # warn above 5% unconverged forward or backward solves
RESIDUAL_WARN_FACTOR = 10.0  # ... or a mean forward residual above 10 × tol
# Per-step sums of an epoch, kept in last.pt so that a resumed epoch reports its whole.
SUM_KEYS = ("loss", "correct", "count", "fwd", "bwd", "time",
            "fwd_unconverged", "bwd_unconverged", "fwd_residual")  # fmt: skip


class Diverged(Exception):
    """Raised out of :func:`train` at the first non-finite loss, gradient or weight.

    The step that produced it is not applied further and nothing is written: ``last.pt``,
    ``best.pt`` and ``metrics.jsonl`` keep the last finished epoch (none if it was the first).
    """

    def __init__(self, where: str, what: str, lr: float, kept: Path | None):
        kept_text = f"{kept} is left as it was" if kept else "no checkpoint was written"
        super().__init__(
            f"diverged at {where}: {what}; start a new run with a lower --lr "
            f"(this one: {lr:g}); {kept_text}"
        )
        self.where, self.what, self.kept = where, what, kept


def train(
    opts: TrainOptions,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dist_timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
) -> dict:
    """Run (or resume) a training run; returns the final epoch's metrics.

    Rank 0 holds the run folder's lock (:mod:`training.runfolder`) from before its first
    write until it returns; a fresh run onto a folder that holds one needs ``overwrite``.
    ``dist_timeout_s``: how long a collective of a distributed run waits for the other ranks
    once the run folder is claimed (before, at least :data:`distributed.DEFAULT_TIMEOUT_S`).

    Raises:
        Interrupted: after SIGINT, SIGTERM or SIGHUP, once ``last.pt`` is written.
        Aborted: after a second one, at once.
        RunFolderError: the folder holds a run and neither ``resume`` nor ``overwrite`` is
            set, or another run holds its lock (nothing is written).
        DataError, ValueError: bad data or options (before any file is written).
        Diverged: a non-finite loss, gradient or weight (nothing of that epoch is written).
        PeerLost: another rank died or stopped answering (nothing of that epoch is written;
            ``last.pt`` keeps the last finished epoch).
    """
    try:
        dist = distributed.setup(opts.device, dist_timeout_s)
    except RuntimeError as e:  # the rendezvous: another rank never came
        if distributed.is_peer_failure(e):
            rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
            raise distributed.PeerLost(rank, world, e) from None
        raise
    try:
        # From here on a signal stops cleanly, at a step boundary; the lock goes last.
        with contextlib.ExitStack() as held, StopFlag() as stop:
            st = build(opts, dist, resume=resume, overwrite=overwrite)
            if dist.any(stop.stopped):  # stopped while loading: leave the folder as it is
                raise _interrupted(dist, stop, None)
            st.files.claim(dist, held, resume=resume)
            distributed.watch(dist, dist_timeout_s)
            if dist.is_main:
                _log(_start_line(st))
            return _train_epochs(st, stop, dist_timeout_s)
    except RuntimeError as e:
        if dist.enabled and distributed.is_peer_failure(e):
            raise distributed.PeerLost(dist.rank, dist.world, e) from None
        raise
    finally:
        distributed.teardown(dist)


def _train_epochs(st: Setup, stop: StopFlag, timeout_s: float) -> dict:
    """Epochs from ``st.progress["epoch"]`` to ``st.epochs``, each evaluated and written.

    ``timeout_s`` (``--dist-timeout``) bounds the collectives of the training steps; the
    evaluation and rank 0's writes wait at least the default (:func:`distributed.patient`).
    """
    dist, progress = st.dist, st.progress
    last_metrics = _metrics_summary(progress["history"][-1]) if progress["history"] else {}
    for epoch in range(progress["epoch"], st.epochs):
        progress["epoch"] = epoch
        row = _run_epoch(st, stop)
        if row is None:  # interrupted mid-epoch
            with distributed.patient(dist, timeout_s):
                if dist.is_main:
                    _save_last(st, last_metrics)
                dist.barrier()
            raise _interrupted(dist, stop, st.files.last)
        with distributed.patient(dist, timeout_s):
            last_metrics = _end_epoch(st, row)
            # Every rank must agree, or the ones that go on wait on the others' collectives.
            stopped = dist.any(stop.stopped)
        if stopped and epoch + 1 < st.epochs:
            raise _interrupted(dist, stop, st.files.last)
    return last_metrics


def _end_epoch(st: Setup, row: dict) -> dict:
    """Evaluate the epoch just trained, log it, have rank 0 write its files, and wait for
    every rank; returns the epoch's metrics summary. ``row``: :func:`_run_epoch`'s, which
    this completes."""
    dist, model, progress = st.dist, st.model, st.progress
    epoch = progress["epoch"]
    model.eval()
    t0 = time.perf_counter()
    test = evaluate(model, st.test_x, st.test_y, dist=dist)
    if not math.isfinite(test["loss"]):  # finite weights whose logits overflow
        where = f"epoch {epoch + 1}/{st.epochs}, test evaluation"
        raise _diverged(st, where, f"the test loss is {test['loss']}")
    row.update({f"test_{k}": v for k, v in test.items() if k != "certified"})
    row["test_certified"] = test["certified"]
    row["eval_time_s"] = time.perf_counter() - t0
    figures = {
        **{k: row[k] for k in _TRAIN_SOLVER_KEYS},
        "test_fwd_unconverged_share": 1.0 - test["converged_share"],
        "test_fwd_residual_mean": test["residual_mean"],
    }
    row["solver_warning"] = _solver_warning(figures, model.solver_settings.tol)
    progress["history"].append(row)
    progress["epoch"], progress["step"], progress["sums"] = epoch + 1, 0, None
    metrics = _metrics_summary(row)
    if dist.is_main:
        _log(_epoch_line(row, st.epochs))
        if row["solver_warning"]:
            _log(f"warning: epoch {epoch + 1}/{st.epochs}: {row['solver_warning']}")
        if test["accuracy"] > progress["best"]:
            progress["best"] = test["accuracy"]
            st.files.save_best(model, _checkpoint_metadata(st, metrics), calibration=st.calibration)
        _save_last(st, metrics)
        st.files.write_metrics(progress["history"])
        st.files.write_curves(progress["history"], st.opts.preset)
    dist.barrier()
    return metrics


def _run_epoch(st: Setup, stop: StopFlag) -> dict | None:
    """Train one epoch from ``progress["step"]``; None if a signal stopped it part-way."""
    opts, dist, data, model, progress = st.opts, st.dist, st.data, st.model, st.progress
    epoch = progress["epoch"]
    sampler = DistributedSampler(
        range(len(data.train_x)),
        num_replicas=dist.world,
        rank=dist.rank,
        shuffle=True,
        seed=opts.seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    local = st.batch_size // dist.world
    steps = steps_in_epoch(len(order) * dist.world, st.batch_size, opts.steps_per_epoch)
    tune_at = {min(TUNE_EARLY_STEP, steps // 4), steps // 2} if opts.tune_alpha else set()
    # A checkpoint written before the unconverged counts existed resumes with them at 0.
    sums = dict.fromkeys(SUM_KEYS, 0.0) | (progress["sums"] or {})
    warned = False
    bar = None
    if opts.progress and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=steps,
            initial=progress["step"],
            desc=f"epoch {epoch + 1}/{st.epochs}",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    model.train()
    alphas, backward_alphas = [], []
    for step in range(progress["step"], steps):
        t0 = time.perf_counter()
        idx = order[step * local : (step + 1) * local]
        xb = data.train_x[idx]
        if st.preset.augment:
            g = _aug_generator(opts.seed, epoch, step)
            positions = torch.arange(dist.rank, st.batch_size, dist.world)
            xb = augment(xb, g, positions=positions, global_batch=st.batch_size)
        xb = xb.to(dist.device, non_blocking=True)
        x, y = model.input_spec.normalize(xb), data.train_y[idx].to(dist.device)
        fraction = epoch + step / steps
        lr, beta1 = st.preset.schedule.at(st.lr, fraction, st.epochs)
        for group in st.optimizer.param_groups:
            group["lr"] = lr
            if beta1 is not None:
                group["betas"] = (beta1, group["betas"][1])
        if step in tune_at:
            # The global batch, in single-process order, so that every rank agrees.
            calib_x, calib_y = dist.interleave(x), dist.interleave(y)
            model.eval()
            _retune(model, calib_x, calib_y, dist.broadcast_float)
            model.train()
            alphas.append(model.solver_settings.alpha)
            backward_alphas.append(model.solver_settings.backward().alpha)
        logits = st.net(x)
        loss = F.cross_entropy(logits, y)
        where = f"epoch {epoch + 1}/{st.epochs}, step {step + 1}/{steps}"
        # Every rank takes the same decision, so none waits in a collective alone.
        if dist.any(not math.isfinite(loss.item())):
            raise _diverged(st, where, f"the training loss is {loss.item()}", bar)
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad = _first_non_finite((n, p.grad) for n, p in model.named_parameters())
        if dist.any(bad is not None):
            raise _diverged(st, where, f"the gradient of {bad} is not finite", bar)
        st.optimizer.step()
        bad = _first_non_finite(model.named_parameters())
        if dist.any(bad is not None):
            raise _diverged(st, where, f"the update made {bad} non-finite", bar)
        fstats, bstats = model.deq.last_forward_stats, model.deq.last_backward_stats
        fwd = fstats.iterations.double().mean().item()
        bwd = bstats.iterations.double().mean().item()
        sums["fwd_unconverged"] += (~fstats.converged).sum().item()
        sums["bwd_unconverged"] += (~bstats.converged).sum().item()
        sums["fwd_residual"] += fstats.residual.double().sum().item()
        sums["loss"] += loss.item() * len(y)
        sums["correct"] += (logits.argmax(1) == y).sum().item()
        sums["count"] += len(y)
        sums["fwd"] += fwd * len(y)
        sums["bwd"] += bwd * len(y)
        sums["time"] += time.perf_counter() - t0
        progress["step"], progress["sums"] = step + 1, dict(sums)
        progress["elapsed"] += time.perf_counter() - t0
        warning = _solver_warning(_train_solver_figures(sums), model.solver_settings.tol)
        if warning and not warned and dist.is_main:
            if bar is not None:
                bar.write(f"warning: {where}: {warning}", file=sys.stderr)
            else:
                _log(f"warning: {where}: {warning}")
            warned = True
        if bar is not None:
            n = sums["count"]
            shares = (sums["fwd_unconverged"] / n, sums["bwd_unconverged"] / n)
            extra = {"unconverged": "/".join(f"{100 * v:.0f}%" for v in shares)} if warning else {}
            bar.set_postfix(
                loss=f"{sums['loss'] / n:.3f}",
                acc=f"{100 * sums['correct'] / n:.1f}%",
                fwd=f"{fwd:.1f}",
                bwd=f"{bwd:.1f}",
                α=_alphas(model),
                **extra,
                refresh=False,
            )
            bar.update(1)
        if dist.any(stop.stopped) and step + 1 < steps:
            if bar is not None:
                bar.close()
            return None
    if bar is not None:
        bar.close()
    total = dict(zip(SUM_KEYS, dist.all_sum([sums[k] for k in SUM_KEYS]), strict=True))
    n = max(total["count"], 1.0)
    return {
        "epoch": epoch + 1,
        "lr": lr if steps else st.lr,
        "alpha": model.solver_settings.alpha,
        "backward_alpha": model.solver_settings.backward().alpha,
        "alphas_tuned": alphas,
        "backward_alphas_tuned": backward_alphas,
        "train_loss": total["loss"] / n,
        "train_accuracy": total["correct"] / n,
        "train_fwd_iterations": total["fwd"] / n,
        "train_bwd_iterations": total["bwd"] / n,
        **_train_solver_figures(total),
        "epoch_time_s": sums["time"],
        "steps": steps,
    }


def _retune(model, x: torch.Tensor, y: torch.Tensor, agree) -> None:
    """α searches around the current α's, cheap enough to run twice an epoch (docs/math.md §6).

    The forward α first, then the backward one (§3) at the equilibrium the new forward α
    finds: the two problems are fastest at different α's. Each search runs on up to
    ``TUNE_SAMPLES`` samples with the iteration cap at ``TUNE_MAX_ITER`` (an α that needs
    more is a bad α anyway) and spans ``TUNE_SPAN`` decades either side of the current α:
    5 grid points, then 4 golden-section steps. Iterations are sharply peaked near the best
    α; on the trained fmnist-conv model, from α 0.762, a decade either side with 2
    refinements picked 0.32 / 0.42 (8.3 / 8.0 forward / backward iterations) in 9.4 s, this
    search 0.49 / 0.56 (8.0 / 7.1) in 7.4 s. Samples of a batch mostly stop at the same
    iteration, so 32 samples pick the α's 64 do (0.491 / 0.581 on three random
    Fashion-MNIST batches, both sizes) in half the time (2.2 s instead of 4.1 s for both
    searches). The best α moves slowly, so a search that ends on its grid's edge goes on at
    the next retune. ``agree`` makes every rank take rank 0's result.
    """
    x, y = x[:TUNE_SAMPLES], y[:TUNE_SAMPLES]
    for backward, key in ((False, "alpha"), (True, "backward_alpha")):
        s = model.solver_settings.backward() if backward else model.solver_settings
        if not s.solver.tunable_alpha:  # e.g. FB: its step is bounded by its convergence rule
            continue
        log_a = math.log10(model.solver_alpha(backward))
        result = tune_alpha(
            model,
            x,
            method=s.method,
            targets=y if backward else None,
            log10_range=(log_a - TUNE_SPAN, log_a + TUNE_SPAN),
            grid=5,
            refine=4,
            max_iter=min(TUNE_MAX_ITER, model.solver_settings.max_iter),
        )
        model.set_solver(**{key: agree(result.alpha)})


def _interrupted(dist: distributed.Dist, stop: StopFlag, path: Path | None) -> Interrupted:
    """The stop every rank agreed on, naming the ranks the signal reached when not all did
    (a ``kill`` of one rank's pid, rather than of the launcher)."""
    got = dist.gather_cat(torch.tensor([stop.signum or 0])).tolist()
    hit = [r for r, signum in enumerate(got) if signum]
    if not hit or len(hit) == dist.world:
        return Interrupted(stop.which(), path)
    names = ", ".join(map(str, hit))
    to = f" to rank{'s' if len(hit) > 1 else ''} {names} of {dist.world}"
    return Interrupted(got[hit[0]], path, to)


def _aug_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    # manual_seed takes 64 bits; the modulus changes nothing below 2**63 (seeds < 9.2e6).
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % 2**63)


# ---- divergence and solver health ---------------------------------------------------------


def _diverged(st: Setup, where: str, what: str, bar=None) -> Diverged:
    if bar is not None:
        bar.close()
    last = st.files.last
    return Diverged(where, what, st.lr, last if st.dist.is_main and last.is_file() else None)


def _first_non_finite(named) -> str | None:
    """The first name of ``(name, tensor or None)`` pairs whose tensor has a NaN or ±inf."""
    named = [(n, t) for n, t in named if t is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])  # one host sync
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


_TRAIN_SOLVER_KEYS = (
    "train_fwd_unconverged_share",
    "train_bwd_unconverged_share",
    "train_fwd_residual_mean",
)


def _train_solver_figures(sums: dict) -> dict:
    """Shares of unconverged solves and the mean forward residual from a step-sum dict."""
    n = max(sums["count"], 1.0)
    values = (sums["fwd_unconverged"] / n, sums["bwd_unconverged"] / n, sums["fwd_residual"] / n)
    return dict(zip(_TRAIN_SOLVER_KEYS, values, strict=True))


def _solver_warning(figures: dict, tol: float) -> str | None:
    """One line if the solves passed :data:`UNCONVERGED_WARN_SHARE` or
    :data:`RESIDUAL_WARN_FACTOR` × ``tol``, else None.

    ``figures``: ``{train,test}_{fwd,bwd}_unconverged_share`` and ``*_residual_mean`` keys,
    any subset.
    """
    unconverged, residual = [], []
    for key, value in figures.items():
        what = " ".join(key.replace("fwd", "forward").replace("bwd", "backward").split("_")[:2])
        if key.endswith("_unconverged_share") and value > UNCONVERGED_WARN_SHARE:
            unconverged.append(f"{what} {100 * value:.0f}%")
        if key.endswith("_residual_mean") and not value <= RESIDUAL_WARN_FACTOR * tol:
            residual.append(f"{what} {value:.3g}")
    parts = []
    if unconverged:
        bound = f"{100 * UNCONVERGED_WARN_SHARE:g}%"
        parts.append(f"unconverged solves: {', '.join(unconverged)} (bound {bound})")
    if residual:
        bound = f"{RESIDUAL_WARN_FACTOR:g} × tol = {RESIDUAL_WARN_FACTOR * tol:g}"
        parts.append(f"mean residual: {', '.join(residual)} (bound {bound})")
    return f"{'; '.join(parts)}; lower --lr" if parts else None


# ---- what is written and logged -----------------------------------------------------------


def _save_last(st: Setup, metrics: dict) -> None:
    st.files.save_last(
        st.model,
        _checkpoint_metadata(st, metrics),
        calibration=st.calibration,
        options=asdict(st.opts),
        optimizer=st.optimizer,
        progress=st.progress,
    )


def _checkpoint_metadata(st: Setup, metrics: dict) -> dict:
    """The free metadata of ``last.pt`` and ``best.pt`` (``mondeq export`` copies it)."""
    settings = st.model.solver_settings
    return {
        "preset": st.opts.preset,
        "dataset": st.data.name,
        "command": st.opts.command,
        "seed": st.opts.seed,
        "epoch": st.progress["epoch"],
        "alpha": settings.alpha,
        "backward_alpha": settings.backward().alpha,
        "metrics": metrics or {},
        "train_time_s": st.progress["elapsed"],
        "machine": _machine(st.dist.device),
    }


def _metrics_summary(row: dict) -> dict:
    keep = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "test_loss")
    out = {k: row[k] for k in keep if k in row}
    out.update(
        {
            "test_iterations_mean": row.get("test_iterations_mean"),
            "test_iterations_p99": row.get("test_iterations_p99"),
            "test_residual_mean": row.get("test_residual_mean"),
            "lipschitz": row.get("test_lipschitz"),
            "certified": row.get("test_certified"),
            "epoch_time_s": row.get("epoch_time_s"),
        }
    )
    return out


def _machine(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def _alphas(model) -> str:
    """``"forward/backward"`` α's for the progress bar."""
    s = model.solver_settings
    return "/".join("-" if a is None else f"{a:.3g}" for a in (s.alpha, s.backward().alpha))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _start_line(st: Setup) -> str:
    data, dist = st.data, st.dist
    return (
        f"{st.opts.preset}: {st.model.arch}, {st.model.num_parameters():,} parameters, "
        f"{data.name} from {data.source} ({len(data.train_x):,} train / "
        f"{len(st.test_x):,} test), batch {st.batch_size}"
        + (f" over {dist.world} processes" if dist.enabled else "")
        + f", {st.epochs} epochs on {dist.device}"
    )


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, "
        f"train {100 * row['train_accuracy']:.2f}%, test {100 * row['test_accuracy']:.2f}%, "
        f"fwd {row['train_fwd_iterations']:.1f} it, bwd {row['train_bwd_iterations']:.1f} it, "
        f"test {row['test_iterations_mean']:.1f} it, α {row['alpha']:.3g} / "
        f"{row.get('backward_alpha') or row['alpha']:.3g}, "
        f"{row['epoch_time_s']:.1f} s (+{row['eval_time_s']:.1f} s eval)"
    )


__all__ = [
    "RESIDUAL_WARN_FACTOR",
    "UNCONVERGED_WARN_SHARE",
    "Diverged",
    "train",
]
