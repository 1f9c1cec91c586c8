"""The training loop: Adam, LR/β1 schedules, α retuning, evaluation, resumable checkpoints.

Files written to ``--out`` (rank 0 only, each atomically):

* ``last.pt``: the latest model plus everything needed to resume (optimizer, position in the
  epoch, partial epoch sums, history), written after every epoch and on a stop signal;
* ``best.pt``: the model with the best test accuracy so far (no training state);
* ``metrics.jsonl``: one line per epoch; ``curves.png``: loss, accuracy, iterations and α.

Data order is a function of ``(seed, epoch)`` (DistributedSampler's permutation) and
augmentation of ``(seed, epoch, step)``, so a run resumed from ``last.pt`` takes exactly the
steps the uninterrupted run would have taken, and 2 ranks with batch B/2 each take the steps
one process takes with batch B.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from model_core import build_model, load_checkpoint, save_checkpoint, tune_alpha

from . import distributed
from .data import DATASETS, Data, DataError, Normalizer, augment, load_dataset
from .evaluate import evaluate
from .options import check_options, flag
from .presets import Preset, get_preset
from .runfolder import RunFolderError, claim_run_folder, clear_run_files

CALIBRATION_SAMPLES = 64
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


@dataclass
class TrainOptions:
    """Everything a run depends on; stored in ``last.pt`` so ``--resume`` needs nothing else."""

    preset: str
    out: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    dataset: str | None = None  # override the preset's, e.g. "synthetic"
    synthetic_size: int = 2048
    steps_per_epoch: int | None = None  # cap, for smoke tests
    eval_limit: int | None = None  # evaluate on the first N test samples only
    tune_alpha: bool = True
    progress: bool = True
    command: str = ""

    def __post_init__(self):
        # Every construction path is checked; from_dict names the source of a bad value.
        checked = check_options({f.name: getattr(self, f.name) for f in fields(self)})
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: dict, label=flag) -> TrainOptions:
        """Options from ``d``; ``label(name)`` names an option in an error message.

        Raises:
            OptionError: an unknown name or a refused value (:mod:`training.options`).
        """
        return cls(**check_options(d, label))


class Interrupted(Exception):
    """Raised out of :func:`train` after a signal, once the resumable checkpoint is written."""

    def __init__(self, signum: int, path: Path | None):
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}; resume from {path}"
            if path is not None
            else f"interrupted by {name} before the first step; nothing was written"
        )
        self.signum, self.path = signum, path


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


class Aborted(KeyboardInterrupt):
    """A second stop signal: the run ends at once, without writing a checkpoint.

    Files are only ever replaced by rename, so the run folder keeps the last checkpoint
    written (none before the first epoch ends or the first signal's ``last.pt``).
    """

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


# Ctrl-C, `kill` / `docker stop` / a scheduler, and a closed terminal or ssh session.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StopFlag:
    """A stop signal (:data:`STOP_SIGNALS`) sets a flag the loop checks after each step; a
    second one aborts (:class:`Aborted`)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # every rank gets it; one says so
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then writing a "
                "resumable checkpoint (send again to abort)",
                file=sys.stderr,
                flush=True,
            )

    def which(self) -> int:
        """The signal this process got; SIGTERM on a rank that stops because another got one."""
        return self.signum if self.signum is not None else signal.SIGTERM

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


# ---- small helpers ----------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _optimizer_to_plain(state: dict) -> dict:
    """Optimizer state with str keys (checkpoint metadata must load under weights_only)."""
    return {
        "state": {str(k): v for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def _optimizer_from_plain(state: dict) -> dict:
    groups = [
        dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["param_groups"]
    ]
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": groups}


def _aug_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    # manual_seed takes 64 bits; the modulus changes nothing below 2**63 (seeds < 9.2e6).
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % 2**63)


def steps_in_epoch(n: int, batch_size: int, cap: int | None) -> int:
    steps = n // batch_size  # the last partial batch is dropped, as in DistributedSampler
    return steps if cap is None else min(steps, cap)


# ---- the run ----------------------------------------------------------------------------


@dataclass
class _Setup:
    opts: TrainOptions
    preset: Preset
    data: Data
    epochs: int
    batch_size: int
    lr: float
    dist: distributed.Dist


def _resolve(opts: TrainOptions, dist: distributed.Dist) -> _Setup:
    preset = get_preset(opts.preset)
    name = preset.dataset if opts.dataset is None else opts.dataset
    shape = DATASETS[preset.dataset][0]
    data = load_dataset(
        name,
        opts.data_dir,
        download=opts.download,
        shape=shape,
        synthetic_size=opts.synthetic_size,
        seed=opts.seed,
    )
    # None is "not given": the preset's value. Anything given was checked by TrainOptions.
    batch = preset.batch_size if opts.batch_size is None else opts.batch_size
    epochs = preset.epochs if opts.epochs is None else opts.epochs
    lr = preset.lr if opts.lr is None else opts.lr
    if batch % dist.world:
        raise ValueError(f"batch size {batch} must divide evenly over {dist.world} processes")
    if len(data.train_x) < batch:
        raise ValueError(f"{len(data.train_x)} training samples cannot fill a batch of {batch}")
    if opts.eval_limit is not None and opts.eval_limit > len(data.test_x):
        raise ValueError(
            f"--eval-limit {opts.eval_limit} is more than the {len(data.test_x):,} test samples "
            f"of {data.name}"
        )
    return _Setup(opts, preset, data, epochs, batch, lr, dist)


def train(opts: TrainOptions, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) a training run; returns the final epoch's metrics.

    Rank 0 holds the run folder's lock (:mod:`training.runfolder`) from before its first
    write until it returns; a fresh run onto a folder that holds one needs ``overwrite``.

    Raises:
        Interrupted: after SIGINT, SIGTERM or SIGHUP, once ``last.pt`` is written.
        Aborted: after a second one, at once.
        RunFolderError: the folder holds a run and neither ``resume`` nor ``overwrite`` is
            set, or another run holds its lock (nothing is written).
        DataError, ValueError: bad data or options (before any file is written).
    """
    dist = distributed.setup(opts.device)
    try:
        # From here on a signal stops cleanly, at a step boundary; the lock goes last.
        with contextlib.ExitStack() as held, _StopFlag() as stop:
            return _train(opts, dist, resume, stop, held=held, overwrite=overwrite)
    finally:
        distributed.teardown(dist)


def _claim(out: Path, dist: distributed.Dist, held: contextlib.ExitStack, **how: bool) -> None:
    """Rank 0 creates and locks ``out``; every rank raises rank 0's refusal, if any."""
    refusal = None
    if dist.is_main:
        try:
            held.enter_context(claim_run_folder(out, **how))
        except RunFolderError as e:
            refusal = str(e)
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderError(refusal)


def _train(
    opts: TrainOptions,
    dist: distributed.Dist,
    resume: bool,
    stop: _StopFlag,
    *,
    held: contextlib.ExitStack,
    overwrite: bool = False,
) -> dict:
    out = Path(opts.out)
    st = _resolve(opts, dist)
    data, device = st.data, dist.device
    mean, std = data.channel_stats()
    flat = [c for c, s in enumerate(std) if not s > 0]
    if flat:  # normalising would divide by zero: a NaN loss at step 1, not a too-high --lr
        raise DataError(
            f"{data.name} from {data.source}: channel {flat[0]} of the training images is "
            "constant (std 0), so it cannot be normalised"
        )
    torch.manual_seed(opts.seed)
    model = build_model(st.preset.model_config(data.shape, len(data.class_names)))
    model.input_spec = {
        "shape": list(data.shape),
        "mean": mean,
        "std": std,
        "class_names": list(data.class_names),
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=st.lr)
    progress = {"epoch": 0, "step": 0, "sums": None, "history": [], "best": -1.0, "elapsed": 0.0}
    if resume:
        saved = load_checkpoint(out / "last.pt")
        train_meta = saved.metadata.get("train") or {}
        model.load_state_dict(saved.state_dict())
        model.solver_settings = saved.solver_settings
        optimizer.load_state_dict(_optimizer_from_plain(train_meta["optimizer"]))
        progress = dict(train_meta["progress"])
        steps = steps_in_epoch(len(data.train_x), st.batch_size, opts.steps_per_epoch)
        if progress["step"] >= max(steps, 1):  # a written last.pt stops before an epoch's end
            raise ValueError(
                f"cannot resume: {out / 'last.pt'} is at step {progress['step']} of an epoch of "
                f"{steps} steps"
            )
    model.to(device)
    _optimizer_to_device(optimizer, device)
    net = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if dist.enabled
        else model
    )
    normalize = Normalizer(mean, std, device)
    calibration = data.train_x[
        torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(opts.seed))[
            :CALIBRATION_SAMPLES
        ]
    ]
    test_x, test_y = data.test_x, data.test_y
    if opts.eval_limit is not None:
        test_x, test_y = test_x[: opts.eval_limit], test_y[: opts.eval_limit]
    if dist.any(stop.signum is not None):  # stopped while loading: leave the folder as it is
        raise Interrupted(stop.which(), None)
    _claim(out, dist, held, resume=resume, overwrite=overwrite)
    if dist.is_main:
        _log(
            f"{opts.preset}: {model.arch}, {model.num_parameters():,} parameters, "
            f"{data.name} from {data.source} ({len(data.train_x):,} train / "
            f"{len(test_x):,} test), batch {st.batch_size}"
            + (f" over {dist.world} processes" if dist.enabled else "")
            + f", {st.epochs} epochs on {device}"
        )

    previous = [overwrite]  # the replaced run's files, removed just before the first write

    def save(path: Path, *, with_state: bool, metrics: dict | None) -> None:
        if previous[0]:
            clear_run_files(out)
            previous[0] = False
        meta = {
            "preset": opts.preset,
            "dataset": data.name,
            "command": opts.command,
            "seed": opts.seed,
            "epoch": progress["epoch"],
            "alpha": model.solver_settings.alpha,
            "backward_alpha": model.solver_settings.backward().alpha,
            "metrics": metrics or {},
            "train_time_s": progress["elapsed"],
            "machine": _machine(device),
            "calibration": calibration.clone(),
        }
        if with_state:
            meta["train"] = {
                "options": asdict(opts),
                "optimizer": _optimizer_to_plain(optimizer.state_dict()),
                "progress": progress,
            }
        save_checkpoint(model, path, **meta)

    last_metrics = _metrics_summary(progress["history"][-1]) if progress["history"] else {}
    for epoch in range(progress["epoch"], st.epochs):
        progress["epoch"] = epoch
        row = _run_epoch(st, model, net, optimizer, normalize, progress, stop)
        if row is None:  # interrupted mid-epoch
            if dist.is_main:
                save(out / "last.pt", with_state=True, metrics=last_metrics)
            dist.barrier()
            raise Interrupted(stop.which(), out / "last.pt")
        model.eval()
        t0 = time.perf_counter()
        test = evaluate(model, test_x, test_y, normalize, dist=dist)
        if not math.isfinite(test["loss"]):  # finite weights whose logits overflow
            where = f"epoch {epoch + 1}/{st.epochs}, test evaluation"
            raise _diverged(st, where, f"the test loss is {test['loss']}")
        row.update({f"test_{k}": v for k, v in test.items() if k != "certified"})
        row["test_certified"] = test["certified"]
        row["eval_time_s"] = time.perf_counter() - t0
        figures = {
            **_train_solver_figures_of(row),
            "test_fwd_unconverged_share": 1.0 - test["converged_share"],
            "test_fwd_residual_mean": test["residual_mean"],
        }
        row["solver_warning"] = _solver_warning(figures, model.solver_settings.tol)
        progress["history"].append(row)
        progress["epoch"], progress["step"], progress["sums"] = epoch + 1, 0, None
        last_metrics = _metrics_summary(row)
        if dist.is_main:
            _log(_epoch_line(row, st.epochs))
            if row["solver_warning"]:
                _log(f"warning: epoch {epoch + 1}/{st.epochs}: {row['solver_warning']}")
            if test["accuracy"] > progress["best"]:
                progress["best"] = test["accuracy"]
                save(out / "best.pt", with_state=False, metrics=last_metrics)
            save(out / "last.pt", with_state=True, metrics=last_metrics)
            _write_metrics(out, progress["history"])
            _plot_curves(out / "curves.png", progress["history"], opts.preset)
        dist.barrier()
        # Every rank must agree, or the ones that go on wait on the others' collectives.
        if dist.any(stop.signum is not None) and epoch + 1 < st.epochs:
            raise Interrupted(stop.which(), out / "last.pt")
    return last_metrics


def _run_epoch(st, model, net, optimizer, normalize, progress, stop) -> dict | None:
    """Train one epoch from ``progress["step"]``; None if a signal stopped it part-way."""
    opts, dist, data, epoch = st.opts, st.dist, st.data, progress["epoch"]
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
    keys = ("loss", "correct", "count", "fwd", "bwd", "time",
            "fwd_unconverged", "bwd_unconverged", "fwd_residual")  # fmt: skip
    # A checkpoint written before the unconverged counts existed resumes with them at 0.
    sums = dict.fromkeys(keys, 0.0) | (progress["sums"] or {})
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
        x, y = normalize(xb), data.train_y[idx].to(normalize.device)
        fraction = epoch + step / steps
        lr, beta1 = st.preset.schedule.at(st.lr, fraction, st.epochs)
        for group in optimizer.param_groups:
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
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        where = f"epoch {epoch + 1}/{st.epochs}, step {step + 1}/{steps}"
        # Every rank takes the same decision, so none waits in a collective alone.
        if dist.any(not math.isfinite(loss.item())):
            raise _diverged(st, where, f"the training loss is {loss.item()}", bar)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad = _first_non_finite((n, p.grad) for n, p in model.named_parameters())
        if dist.any(bad is not None):
            raise _diverged(st, where, f"the gradient of {bad} is not finite", bar)
        optimizer.step()
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
        if dist.any(stop.signum is not None) and step + 1 < steps:
            if bar is not None:
                bar.close()
            return None
    if bar is not None:
        bar.close()
    total = dict(zip(keys, dist.all_sum([sums[k] for k in keys]), strict=True))
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


def _diverged(st: _Setup, where: str, what: str, bar=None) -> Diverged:
    if bar is not None:
        bar.close()
    last = Path(st.opts.out) / "last.pt"
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


def _train_solver_figures(sums: dict) -> dict:
    """Shares of unconverged solves and the mean forward residual from a step-sum dict."""
    n = max(sums["count"], 1.0)
    return {
        "train_fwd_unconverged_share": sums["fwd_unconverged"] / n,
        "train_bwd_unconverged_share": sums["bwd_unconverged"] / n,
        "train_fwd_residual_mean": sums["fwd_residual"] / n,
    }


def _train_solver_figures_of(row: dict) -> dict:
    keys = ("train_fwd_unconverged_share", "train_bwd_unconverged_share", "train_fwd_residual_mean")
    return {k: row[k] for k in keys}


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


def _alphas(model) -> str:
    """``"forward/backward"`` α's for the progress bar."""
    s = model.solver_settings
    return "/".join("-" if a is None else f"{a:.3g}" for a in (s.alpha, s.backward().alpha))


def _optimizer_to_device(optimizer, device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, "
        f"train {100 * row['train_accuracy']:.2f}%, test {100 * row['test_accuracy']:.2f}%, "
        f"fwd {row['train_fwd_iterations']:.1f} it, bwd {row['train_bwd_iterations']:.1f} it, "
        f"test {row['test_iterations_mean']:.1f} it, α {row['alpha']:.3g} / "
        f"{row.get('backward_alpha') or row['alpha']:.3g}, "
        f"{row['epoch_time_s']:.1f} s (+{row['eval_time_s']:.1f} s eval)"
    )


def _write_metrics(out: Path, history: list[dict]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))

    _atomic_write(out / "metrics.jsonl", write)


def _plot_curves(path: Path, history: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    ax[0, 0].plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    ax[0, 0].plot(ep, [r["test_loss"] for r in history], "s--", label="test")
    ax[0, 0].set(title="cross-entropy loss", xlabel="epoch")
    ax[0, 1].plot(ep, [100 * r["train_accuracy"] for r in history], "o-", label="train")
    ax[0, 1].plot(ep, [100 * r["test_accuracy"] for r in history], "s--", label="test")
    ax[0, 1].set(title="accuracy (%)", xlabel="epoch")
    ax[1, 0].plot(ep, [r["train_fwd_iterations"] for r in history], "o-", label="forward (train)")
    ax[1, 0].plot(ep, [r["train_bwd_iterations"] for r in history], "^-", label="backward (train)")
    ax[1, 0].plot(ep, [r["test_iterations_mean"] for r in history], "s--", label="forward (test)")
    ax[1, 0].set(title="solver iterations per sample (mean)", xlabel="epoch")
    ax[1, 1].plot(ep, [r["alpha"] for r in history], "o-", color="C3", label="α forward")
    backward = [r.get("backward_alpha") or r["alpha"] for r in history]
    ax[1, 1].plot(ep, backward, "^-", color="C1", label="α backward")
    ax[1, 1].set(title="PR step sizes α (tuned)", xlabel="epoch", yscale="log")
    lr_ax = ax[1, 1].twinx()
    lr_ax.plot(ep, [r["lr"] for r in history], ":", color="C7", label="learning rate")
    lr_ax.set(yscale="log", ylabel="learning rate")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}: training curves")
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def command_line() -> str:
    return shlex.join(["mondeq", *sys.argv[1:]]) if sys.argv else ""


__all__ = [
    "STOP_SIGNALS",
    "Aborted",
    "Diverged",
    "Interrupted",
    "TrainOptions",
    "command_line",
    "steps_in_epoch",
    "train",
]
