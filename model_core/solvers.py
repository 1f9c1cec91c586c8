"""Operator-splitting solvers: one iteration loop, one step per method (docs/math.md §2, §3).

Both problems are monotone inclusions ``0 ∈ F(x) + G(x)`` that share the linear operator
``I − W``:

* forward (Theorem 1):  ``F(z) = (I − W) z − (Ux + b)``, ``G = ∂f`` (so ``prox = σ``);
* backward (Theorem 2): ``F(ũ) = (I − Wᵀ) ũ``, ``G(ũ) = D ũ − g`` with ``D = J⁻¹ − I``.

A method (forward–backward or Peaceman–Rachford) only says how to take one step on either
problem and what the true fixed-point residual of its current point is. :func:`iterate` owns
the loop: per-sample stopping, the iteration counters, and what happens to samples that
have stopped. Two loops give the same answers (:data:`LOOPS`):

* ``"compact"`` (the CPU's): finished samples leave the working batch, so they stop costing
  work; deciding who leaves reads the stopping test on the host every iteration.
* ``"masked"`` (the GPU's): every sample stays in the batch; the stopping test runs on the
  device every iteration and a finished sample's state is frozen by a mask
  (``torch.where``), so its answer and count are those of the iteration at which it first met
  the rule. The host reads one flag, "any sample still running", every ``sync_every``
  iterations; a solve runs at most ``sync_every − 1`` iterations past its last sample's stop.
* ``"graphed"`` (opt-in until checked on a GPU): the masked loop on buffers padded to a
  fixed batch bucket, its iteration captured in CUDA graphs on a GPU
  (:mod:`model_core.cuda_graphs`); on the CPU the same code runs without capture (tests).

:func:`default_loop` picks per device.

The stopping rule, and what ``converged`` means everywhere (``SolveStats``, the HTTP API,
``mondeq eval``, training logs): a sample is converged when the **true fixed-point
residual at the returned point** is at most ``tol``,

* forward (§2):  ``r(z) = ‖z − σ(W z + U x + b)‖ / ‖z‖ ≤ tol``,
* backward (§3): ``r(ũ) = ‖ũ − J(g + Wᵀ ũ)‖ / ‖ũ‖ ≤ tol``,

(at ``z = 0`` the denominator is ``‖σ(Ux + b)‖``, see :func:`relative_residual`). The
relative change ``‖x⁺ − x‖ ≤ tol ‖x⁺‖`` alone is no such bound: a forward–backward step is
about α times the residual, so with a small α it fires far from the fixed point. It serves
only as a cheap pre-filter for when to evaluate the residual.

Adding a solver: one :class:`SplittingMethod` subclass, in this module or any other, with
the :func:`register_solver` decorator. Give it a ``name``; its capabilities
(``needs_resolvent``, ``tunable_alpha``, ``default_alpha`` or a ``safe_alpha(op)``); the
forward hooks ``init_forward``, ``step_forward``, ``residual_forward``, ``finish_forward``
(and ``first_forward`` where the zero start allows a cheaper first step) and the backward
ones of the same names. Once the module defining it is imported, the name is accepted by
:func:`solve_forward`, :func:`solve_backward`, ``SolverSettings``, checkpoints,
``mondeq eval --method`` and the service's ``method`` parameter; ``tune_alpha``, training and
the service's α tuning ask its capabilities. ``tests/model_core/test_solvers.py`` holds the checks a
new method should pass (dense fixed points, closed-form first steps, chunking).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from .bounds import ROUNDING_ULPS, rounding_error
from .nonlinearity import Nonlinearity
from .operators import MonotoneOperator, Resolvent
from .operators.base import chunk_rows

State = dict[str, Tensor]

# On the CPU the loop runs the batch in equal chunks of at most the operator's share of
# operators.base.CPU_CHUNK_BYTES of iterate (:func:`chunk_rows`, where the budget is read and
# measured). GPUs get the whole batch.

# The loop rebuilds the working batch without its finished rows once at least this share of
# the rows it still carries are finished. Index-selecting the state costs about one elementwise
# pass; a step costs two FFTs and a batched matmul, so even small shares pay.
COMPACT_SHARE = 0.05

# The loops :func:`iterate` runs (module docstring). "compact" reads the stopping test on the
# host after every iteration; the other two never do.
LOOPS = ("compact", "masked", "graphed")
# Iterations between two host reads of "any sample still running" in the masked loops: the
# solve's only host syncs. A read costs a device round trip (~10-20 µs); up to
# ``SYNC_EVERY − 1`` iterations run past the last sample's stop, all of them masked out.
SYNC_EVERY = 4


def certifies_at(k: int, check_every: int = 1) -> bool:
    """Whether iteration ``k`` offers the rows still running to :func:`iterate`'s
    ``certify``: 8, 16, 32, … checks, a check every ``check_every`` iterations (1 under the
    residual rule). A row whose rule its own precision cannot decide (its test stalled at
    the rounding floor) stops at most twice as late as where it stalled, and a row that can
    never be certified costs a certification only ``log₂(max_iter)`` times."""
    n, rest = divmod(k, check_every)
    return rest == 0 and n >= 8 and n & (n - 1) == 0


def default_loop(device: torch.device) -> str:
    """The loop a solve on ``device`` runs unless told otherwise: ``"masked"`` on CUDA (no
    host sync inside the iteration but one every ``sync_every``), ``"compact"`` elsewhere (on
    the CPU a host read is free and dropping finished rows saves their work).

    ``"graphed"`` (CUDA graphs for repeated batch buckets) is opt-in until its answers have
    been checked on a GPU (bench/gpu_check.sh): it is tested against ``"compact"`` here only
    through its uncaptured CPU form, and a wrong answer costs more than launch overhead."""
    return "masked" if torch.device(device).type == "cuda" else "compact"


@dataclass
class SolveStats:
    """What one solve did, per sample, returned by every forward and backward solve.

    Attributes:
        iterations: ``(B,)`` int64, iterations run before the sample stopped (``max_iter``
            if its residual never reached ``tol`` before the cap).
        residual: ``(B,)`` float, the true fixed-point residual at the returned point.
            Forward: ``‖z − σ(Wz + Ux + b)‖ / ‖z‖`` (§2). Backward: ``‖ũ − J(g + Wᵀũ)‖ / ‖ũ‖``
            (§3). See :func:`relative_residual` for ``z = 0``. NaN or inf if the solve blew up.
        converged: ``(B,)`` bool, exactly ``isfinite(residual) & (residual <= tol)``.
        alpha: step size α used.
        method: registered solver name.
        tol, max_iter: the stopping rule used.
        time_s: wall time of the solve, in seconds (the zero start and the iteration loop;
            not the resolvent's build).
        direction: ``"forward"`` or ``"backward"``.
        extra: free per-method information (the built-in methods leave it empty).
        pre_scale: forward solves with ``preactivation``: ``(B,)``, the scale of the sums
            the returned ``W z + bias`` was formed from, the injection's included
            (:func:`~model_core.bounds.rounding_error`); else ``None``.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    alpha: float
    method: str
    tol: float
    max_iter: int
    time_s: float
    direction: str = "forward"
    extra: dict = field(default_factory=dict)
    pre_scale: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """``B``, the number of samples solved."""
        return int(self.iterations.shape[0])

    def summary(self) -> dict:
        """Batch aggregates as plain Python numbers (for logs and progress bars):
        ``direction``, ``method``, ``alpha``, ``iterations_mean``, ``iterations_max``,
        ``residual_mean`` (over the non-NaN residuals), ``converged_share`` in [0, 1] and
        ``time_s`` (seconds)."""
        it = self.iterations.double()
        res = self.residual[~self.residual.isnan()]
        return {
            "direction": self.direction,
            "method": self.method,
            "alpha": self.alpha,
            "iterations_mean": it.mean().item() if it.numel() else 0.0,
            "iterations_max": int(self.iterations.max().item()) if it.numel() else 0,
            "residual_mean": res.mean().item() if res.numel() else float("nan"),
            "converged_share": self.converged.double().mean().item() if it.numel() else 1.0,
            "time_s": self.time_s,
        }


def _row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


class _Rows(dict):
    """A state restricted to some rows, gathered only for the entries ``finish`` reads."""

    def __init__(self, state: State, index: Tensor):
        super().__init__()
        self._state, self._index = state, index

    def __missing__(self, key: str) -> Tensor:
        value = self[key] = self._state[key].index_select(0, self._index)
        return value

    def __contains__(self, key: object) -> bool:  # the state's entries, gathered or not
        return key in self._state

    def get(self, key: str, default: Tensor | None = None) -> Tensor | None:
        return self[key] if key in self._state else default


def iterate(
    step: Callable[[State], State],
    state: State,
    *,
    tol: float,
    max_iter: int,
    residual: Callable[[State], Tensor],
    finish: Callable[[State], dict[str, Tensor]],
    first: Callable[[State], State] | None = None,
    chunk_scale: float = 1.0,
    between: Callable[[], None] | None = None,
    accept: Callable[[dict[str, Tensor]], Tensor] | None = None,
    check_every: int = 1,
    loop: str = "compact",
    sync_every: int = SYNC_EVERY,
    graphs: Hashable | None = None,
    info: dict | None = None,
    certify: Callable[[dict[str, Tensor]], Tensor] | None = None,
    first_row: int = 0,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Run ``state ← step(state)`` until every sample's true residual is at most ``tol``
    (or, with ``accept``, until every sample is accepted).

    After each step a sample stops when both hold:

    1. the pre-filter ``‖x⁺ − x‖ ≤ tol ‖x⁺‖`` on the watched iterate ``x = state["x"]``
       (it only decides when the residual is worth evaluating: a sample still moving
       by more than ``tol`` is rarely at its fixed point, and the residual costs a few
       elementwise passes more than the change);
    2. ``residual(state) ≤ tol``: the true fixed-point residual of the point ``finish``
       returns. This alone decides ``converged``.

    A sample whose iterate turns non-finite (NaN or inf: diverged weights, a NaN input)
    stops at that step, unconverged, with a NaN residual: it would never come back. In the
    last iteration the residual is evaluated for every sample still running. Every
    decision is per sample, so a sample's answer and count do not depend on its batch.

    With ``accept`` the rule is the caller's instead: every ``check_every`` iterations a
    sample stops when ``accept(finish(state))`` says so (the classifier's "label proven"
    and "logits within ε" rules, docs/math.md §9). ``converged`` keeps its one meaning,
    ``residual ≤ tol`` at the returned point, whatever stopped the sample.

    With ``certify``, at the iterations :func:`certifies_at` names (8, 16, 32, … checks,
    below ``max_iter``), every sample still running after that iteration's test is offered to
    ``certify(finish(state))``, and those it accepts stop there too: a second, costlier
    test of the same rule (the classifier's float64 certificate of a float32 point whose
    own test is stuck at its rounding floor, docs/math.md §2). Its outputs carry
    ``"row"``, each row's sample index in the caller's batch.

    Args:
        step: one iteration of a splitting method. It receives and returns a dict of tensors
            whose first dimension is the working batch. Entries it does not change (the data
            of the problem) it passes through, so that compaction keeps them aligned.
        state: the initial state, every tensor with leading dimension ``B``.
        tol: bound on the relative residual, applied per sample.
        max_iter: iteration cap, ``>= 1``.
        residual: ``(B,)`` true fixed-point residual of the point ``finish`` would return
            from this state (methods get it from products their step formed anyway).
        finish: maps the state of the rows that stop to the per-row outputs, ``"x"`` the
            returned point; it runs once per row, on that row's last state.
        first: the first iteration from ``state``, where a method knows it in closed form
            (default: ``step``). It must return exactly what ``step`` would.
        chunk_scale: the operator's multiple of the CPU chunk budget
            (:attr:`MonotoneOperator.chunk_scale`).
        between: called before every step, from the solving thread, with nothing in
            flight: a scheduler may block there to let another solve run first (the
            service's solves share the CPU this way). It must not touch the state.
        accept: maps ``finish``'s outputs for the working rows to a ``(rows,)`` bool, the
            rows that may stop (replaces the residual test; ``None``: stop on ``tol``).
        check_every: iterations between two calls of ``accept`` (``>= 1``).
        loop: ``"compact"``, ``"masked"`` or ``"graphed"`` (module docstring): how finished
            samples are kept; the answers are the same (to float rounding where a batch's
            shape changes the summation order; iteration counts and flags exactly).
        sync_every: the masked loops' iterations between two host reads of "any sample
            still running" (``>= 1``).
        graphs: ``"graphed"`` only: a :class:`~model_core.cuda_graphs.GraphKey` naming the
            problem, under which captured graphs are kept and reused; ``None``: the masked
            loop without buffers or graphs.
        info: if given, ``info["loop"]`` is set to the loop that ran (``"compact"``,
            ``"masked"``, ``"bucketed"``: the graphed loop's buffers without capture, or
            ``"cuda_graphs"``).
        certify: maps ``finish``'s outputs for some running rows, plus their ``"row"``,
            to a ``(rows,)`` bool, the rows that may stop; called only at the iterations
            :func:`certifies_at` names (the masked loops read the running rows on the host
            there), outside any CUDA graph. ``None``: no second test.
        first_row: the caller's index of ``state``'s first row (``"row"`` of ``certify``'s
            outputs; the CPU chunks pass their offset).

    Returns:
        ``(outputs, iterations, converged)``: ``finish``'s outputs for every sample plus
        ``outputs["residual"]`` ``(B,)``; per-sample ``(B,)`` iteration counts, and
        ``converged = isfinite(residual) & (residual <= tol)``.

    Raises:
        ValueError: ``max_iter < 1`` (a solve returns a point it has checked),
            ``check_every < 1``, ``sync_every < 1`` or an unknown ``loop``.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    x0 = state["x"]
    batch = x0.shape[0]
    device = x0.device
    rows_per_chunk = chunk_rows(x0, chunk_scale)
    if batch > rows_per_chunk:
        parts = [
            iterate(
                step,
                {k: v[i : i + rows_per_chunk] for k, v in state.items()},
                tol=tol,
                max_iter=max_iter,
                residual=residual,
                finish=finish,
                first=first,
                chunk_scale=chunk_scale,
                between=between,
                accept=accept,
                check_every=check_every,
                loop=loop,
                sync_every=sync_every,
                graphs=graphs,
                info=info,
                certify=certify,
                first_row=first_row + i,
            )
            for i in range(0, batch, rows_per_chunk)
        ]
        outputs = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        return outputs, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    iterations = torch.full((batch,), max_iter, dtype=torch.int64, device=device)
    if batch == 0:
        outputs = finish(state)
        outputs["residual"] = x0.new_zeros(0)
        return outputs, iterations, torch.zeros(0, dtype=torch.bool, device=device)
    if loop != "compact":
        hooks = _Hooks(step, first, residual, finish, accept, tol, certify, first_row)
        if loop == "graphed" and graphs is not None:
            from .cuda_graphs import run_graphed  # (it imports this module)

            ran = run_graphed(graphs, hooks, state, max_iter, check_every, sync_every, between)
            if ran is not None:
                if info is not None:
                    info["loop"] = ran[3]
                return ran[:3]
        if info is not None:
            info["loop"] = "masked"
        return _iterate_masked(hooks, state, max_iter, check_every, sync_every, between)
    if info is not None:
        info["loop"] = "compact"

    outputs: dict[str, Tensor] = {}

    def record(where: Tensor, mask: Tensor, res: Tensor) -> None:
        if len(where) == batch:  # every sample at once (the common case): no gathers
            outputs.update(finish(state))  # (the rows are still in order: no compaction yet)
            outputs["residual"] = res
            return
        out = finish(_Rows(state, mask.nonzero().squeeze(1)))
        out["residual"] = res[mask]
        for name, value in out.items():
            if name not in outputs:
                outputs[name] = value.new_empty((batch, *value.shape[1:]))
            outputs[name][where] = value

    rows = torch.arange(batch, device=device)  # working row -> original sample
    live = torch.ones(batch, dtype=torch.bool, device=device)  # working rows not finished
    n_live = batch

    def stop(done: Tensor, res: Tensor, k: int) -> bool:
        """Record the working rows ``done`` as stopped at ``k``; True once none runs."""
        nonlocal state, rows, live, n_live
        finished = rows[done]
        record(finished, done, res)
        iterations[finished] = k
        live &= ~done
        n_live -= len(finished)
        if n_live == 0:
            return True
        if (len(rows) - n_live) >= COMPACT_SHARE * len(rows):
            keep = live.nonzero().squeeze(1)
            state = {name: t.index_select(0, keep) for name, t in state.items()}
            rows = rows.index_select(0, keep)
            live = torch.ones(len(rows), dtype=torch.bool, device=device)
        return False

    for k in range(1, max_iter + 1):
        if between is not None:
            between()
        prev = state["x"]
        state = first(state) if k == 1 and first is not None else step(state)
        if k == max_iter:
            break
        x = state["x"]
        x_norm = _row_norms(x)
        # A non-finite iterate (diverged weights, an overflowing α) never comes back: stop
        # its row now, unconverged, instead of grinding to max_iter on NaN.
        lost = ~torch.isfinite(x_norm) & live
        if accept is None:
            near = (_row_norms(x - prev) <= tol * x_norm) & live
        elif k % check_every == 0:
            near = accept(finish(state)) & live
        else:
            near = lost
        if bool((near | lost).any()):  # the one host sync of most iterations
            res = residual(state)
            # (NaN compares False: lost rows stop unconverged.)
            done = (near if accept is not None else near & (res <= tol)) | lost
            if bool(done.any()) and stop(done, res, k):
                return outputs, iterations, _converged(outputs["residual"], tol)
        if certify is not None and certifies_at(k, check_every if accept is not None else 1):
            running = live.nonzero().squeeze(1)
            samples = rows.index_select(0, running) + first_row
            passed = running[_certify(certify, finish, state, running, samples)]
            if len(passed):
                done = torch.zeros_like(live).index_fill_(0, passed, True)
                if stop(done, residual(state), k):
                    return outputs, iterations, _converged(outputs["residual"], tol)
    # The cap: every row still running stops here, converged if its residual allows.
    record(rows[live], live, residual(state))
    return outputs, iterations, _converged(outputs["residual"], tol)


def _certify(
    certify: Callable[[dict[str, Tensor]], Tensor],
    finish: Callable[[State], dict[str, Tensor]],
    state: State,
    index: Tensor,
    samples: Tensor,
) -> Tensor:
    """``(len(index),)`` bool: ``certify`` on ``finish``'s outputs for the working rows
    ``index``, with ``"row"`` their ``samples`` (:func:`iterate`)."""
    if len(index) == 0:
        return torch.zeros(0, dtype=torch.bool, device=index.device)
    out = finish(_Rows(state, index))
    out["row"] = samples
    return certify(out)


def _certifies(hooks: _Hooks, k: int, check_every: int) -> bool:
    """:func:`certifies_at` for the masked loops' ``hooks`` (checks count under ``accept``)."""
    return certifies_at(k, check_every if hooks.accept is not None else 1)


def _certify_masked(hooks: _Hooks, state: State, live: Tensor, iterations: Tensor, k: int) -> None:
    """The masked loops' ``certify`` step after iteration ``k``, in place on ``live`` and
    ``iterations``: the running rows it accepts stop at ``k`` (their state is that of
    ``k``). Reads the running rows on the host (one sync)."""
    running = live.nonzero().squeeze(1)
    samples = running + hooks.first_row
    passed = running[_certify(hooks.certify, hooks.finish, state, running, samples)]
    if len(passed):
        live.index_fill_(0, passed, False)
        iterations.index_fill_(0, passed, k)


def _converged(residual: Tensor, tol: float) -> Tensor:
    """The one definition of ``converged``: a finite true residual within ``tol``."""
    return torch.isfinite(residual) & (residual <= tol)


class _Hooks(NamedTuple):
    """A problem's hooks as the masked loops take them (see :func:`iterate`)."""

    step: Callable[[State], State]
    first: Callable[[State], State] | None
    residual: Callable[[State], Tensor]
    finish: Callable[[State], dict[str, Tensor]]
    accept: Callable[[dict[str, Tensor]], Tensor] | None
    tol: float
    certify: Callable[[dict[str, Tensor]], Tensor] | None = None
    first_row: int = 0  # the caller's index of the state's first row (certify's "row")


def _masked_iteration(
    hooks: _Hooks,
    state: State,
    live: Tensor,
    iterations: Tensor,
    k: int | Tensor,
    *,
    use_first: bool,
    check: bool,
    in_place: bool,
) -> tuple[State, Tensor, Tensor]:
    """One iteration of the masked loop on every row, with no host sync.

    The rule is the compact loop's, evaluated for every row: a running row stops at ``k``
    when ``‖x⁺ − x‖ ≤ tol ‖x⁺‖`` and its residual is at most ``tol`` (``accept`` instead, on
    ``check`` iterations), or when its iterate is not finite. Rows that had stopped keep
    their state (``torch.where``), so each row's final state is the one after the iteration
    at which it stopped, and ``iterations`` holds that ``k``.

    Args:
        hooks: the problem's hooks and ``tol``.
        state: ``(B, ...)`` entries; ``live``: ``(B,)`` bool, the rows still running;
            ``iterations``: ``(B,)`` int64, each stopped row's stopping iteration (running
            rows: the cap).
        k: this iteration's number (a 0-d int64 device tensor under CUDA graphs).
        use_first: take ``hooks.first`` (the first iteration).
        check: call ``hooks.accept`` on this iteration.
        in_place: write the new state, ``live`` and ``iterations`` into the given tensors
            (the fixed buffers a CUDA graph reads), else return new ones.

    Returns:
        ``(state, live, iterations)`` after the iteration.
    """
    new = hooks.first(state) if use_first and hooks.first is not None else hooks.step(state)
    x = new["x"]
    x_norm = _row_norms(x)
    lost = ~torch.isfinite(x_norm)
    if hooks.accept is None:
        res = hooks.residual(new)
        done = (_row_norms(x - state["x"]) <= hooks.tol * x_norm) & (res <= hooks.tol)
        done = done | lost  # (NaN compares False: lost rows stop unconverged)
    elif check:
        done = hooks.accept(hooks.finish(new)) | lost
    else:
        done = lost
    done = done & live
    if not in_place:
        frozen = {
            name: value
            if value is state[name]
            else torch.where(_rows_mask(live, value), value, state[name])
            for name, value in new.items()
        }
        return frozen, live & ~done, torch.where(done, k, iterations)
    # In place: a new entry that shares memory with a buffer (a step passing one entry on
    # as another) is formed aside before any buffer is written.
    buffers = {t.untyped_storage().data_ptr() for t in state.values()}
    aside = {}
    for name, value in new.items():
        if value is not state[name] and value.untyped_storage().data_ptr() in buffers:
            aside[name] = torch.where(_rows_mask(live, value), value, state[name])
    for name, value in new.items():
        if value is not state[name] and name not in aside:
            torch.where(_rows_mask(live, value), value, state[name], out=state[name])
    for name, value in aside.items():
        state[name].copy_(value)
    torch.where(done, k, iterations, out=iterations)
    live.logical_and_(~done)
    return state, live, iterations


def _rows_mask(live: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` bool viewed to broadcast over ``like``'s per-row dimensions."""
    return live.view(-1, *([1] * (like.dim() - 1)))


def _masked_outputs(hooks: _Hooks, state: State) -> tuple[dict[str, Tensor], Tensor]:
    """``finish``'s outputs and the residual of every row's final (frozen) state."""
    res = hooks.residual(state)
    outputs = hooks.finish(state)
    outputs["residual"] = res
    return outputs, _converged(res, hooks.tol)


def _iterate_masked(
    hooks: _Hooks,
    state: State,
    max_iter: int,
    check_every: int,
    sync_every: int,
    between: Callable[[], None] | None,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The masked loop, eagerly, on ``state`` as given (``(B, ...)`` entries)."""
    x0 = state["x"]
    batch = x0.shape[0]
    live = torch.ones(batch, dtype=torch.bool, device=x0.device)
    iterations = torch.full((batch,), max_iter, dtype=torch.int64, device=x0.device)
    for k in range(1, max_iter + 1):
        if between is not None:
            between()
        check = hooks.accept is not None and k % check_every == 0 and k < max_iter
        state, live, iterations = _masked_iteration(
            hooks, state, live, iterations, k, use_first=k == 1, check=check, in_place=False
        )
        if hooks.certify is not None and k < max_iter and _certifies(hooks, k, check_every):
            _certify_masked(hooks, state, live, iterations, k)
        if k < max_iter and k % sync_every == 0 and not bool(live.any()):  # the host sync
            break
    outputs, converged = _masked_outputs(hooks, state)
    return outputs, iterations, converged


def _plus_injection(scale: Tensor, state: State) -> Tensor:
    """``scale`` plus the state's ``"bias_scale"`` (:func:`solve_forward`), where it has one."""
    try:
        return scale + state["bias_scale"]
    except KeyError:  # (a state posed without it; a lazily gathered one raises KeyError too)
        return scale


class SplittingMethod:
    """One step of an operator-splitting method on the forward and the backward problem.

    A subclass is a whole solver: :func:`register_solver` makes it known by :attr:`name` to
    :func:`get_solver`, :class:`~model_core.equilibrium.SolverSettings`, ``tune_alpha``,
    training and the service, which ask the class attributes below and never a name.

    Capabilities (class attributes):
        name: the registered name, stored in checkpoints and reported in
            :attr:`SolveStats.method`, the HTTP API and metric labels.
        needs_resolvent: the steps apply ``V = (I + α(I − W))⁻¹``: the constructor takes
            (or builds, from the operator's cache) ``self.resolvent`` for ``self.alpha``, and
            ``tune_alpha`` builds one aside for every α it tries.
        tunable_alpha: every α > 0 converges and the speed depends on it, so α is worth
            searching (docs/math.md §6): training retunes it, the service tunes it at load and
            on drift. False where α is bounded by a convergence rule.
        default_alpha: the α a solve takes when neither the call nor the settings name
            one; ``None`` where it depends on the weights (then :meth:`safe_alpha` derives
            it from the operator).

    Extension points. A state is a dict of tensors, each with the working batch as its
    first dimension: :func:`iterate` index-selects every entry when it drops finished rows
    and slices every entry into CPU chunks, so a state carries the problem's data (bias,
    ``g``, ``J``) beside the iterates, and every step returns every entry. ``state["x"]`` is
    the iterate the loop watches for its pre-filter, ``(B, *z_shape)``.

    * ``init_forward(bias)``: the zero start of the forward problem (``bias = Ux + b``).
    * ``step_forward(state, nonlin)``: one iteration; a new dict with the same keys.
    * ``first_forward(state, nonlin)``: the first iteration from ``init_forward``'s state,
      where the zero start gives it in closed form; exactly what ``step_forward`` returns.
    * ``residual_forward(state, nonlin)``: ``(B,)`` true residual of the point
      ``finish_forward`` would return, from products the step formed anyway.
    * ``finish_forward(state, nonlin, preactivation)``: ``{"x": z}``, plus ``"pre"``
      (``W z + Ux + b``) and ``"pre_scale"`` (:meth:`pre_scale_forward`) if asked. It may
      be handed a lazily gathered subset of the rows: read only the entries needed.
    * ``pre_scale_forward(state)``, ``pre_scale_backward(state)``: ``(B,)``, the scale of
      the sums the step formed ``p`` from (:func:`~model_core.bounds.rounding_error`);
      the residual counts that rounding. The defaults are a direct product's.
    * ``init_backward(grad, jac)``, ``step_backward(state)``, ``first_backward(state)``,
      ``residual_backward(state)``, ``finish_backward(state)``: the same for
      ``ũ = J(g + Wᵀũ)``; ``finish_backward`` returns ``{"x": ũ, "wtu": Wᵀũ}``.
    """

    name: ClassVar[str] = ""
    needs_resolvent: ClassVar[bool] = False
    tunable_alpha: ClassVar[bool] = False
    default_alpha: ClassVar[float | None] = None

    def __init__(self, op: MonotoneOperator, alpha: float, resolvent: Resolvent | None = None):
        self.op = op
        self.alpha = float(alpha)
        if resolvent is not None and resolvent.alpha != self.alpha:
            raise ValueError(f"resolvent was built for alpha={resolvent.alpha}, not {alpha}")
        if resolvent is not None and not resolvent.is_current():
            raise ValueError("resolvent was built for other weights than the operator's now")
        if self.needs_resolvent and resolvent is None:
            resolvent = op.resolvent(self.alpha)
        self.resolvent = resolvent

    @classmethod
    def safe_alpha(cls, op: MonotoneOperator) -> float:
        """The α a solve on ``op`` takes when none is named: :attr:`default_alpha`.

        Methods whose convergence bounds α in terms of the operator override this (and
        leave :attr:`default_alpha` ``None``)."""
        if cls.default_alpha is None:
            raise NotImplementedError(f"{cls.__name__} sets no default_alpha nor safe_alpha")
        return float(cls.default_alpha)

    def init_forward(self, bias: Tensor) -> State:
        """The zero start, every entry ``(B, *z_shape)`` (``bias = Ux + b``)."""
        raise NotImplementedError

    def step_forward(self, state: State, nonlin: Nonlinearity) -> State:
        """One iteration on ``z = σ(W z + bias)``: the next state, with the same keys."""
        raise NotImplementedError

    def residual_forward(self, state: State, nonlin: Nonlinearity) -> Tensor:
        """``(B,)`` ``‖z − σ(W z + Ux + b)‖ / ‖z‖`` at the ``z`` :meth:`finish_forward` returns."""
        raise NotImplementedError

    def finish_forward(
        self, state: State, nonlin: Nonlinearity, preactivation: bool = False
    ) -> dict[str, Tensor]:
        """``{"x": z}`` (and ``"pre"``, ``W z + Ux + b``, if asked) from a final state."""
        raise NotImplementedError

    def init_backward(self, grad: Tensor, jac: Tensor) -> State:
        """The zero start of ``ũ = J(g + Wᵀũ)``: ``grad`` is ``g``, ``jac`` is ``J`` (0/1)."""
        raise NotImplementedError

    def step_backward(self, state: State) -> State:
        """One iteration on ``ũ = J(g + Wᵀũ)``: the next state, with the same keys."""
        raise NotImplementedError

    def residual_backward(self, state: State) -> Tensor:
        """``(B,)`` ``‖ũ − J(g + Wᵀũ)‖ / ‖ũ‖`` at the ``ũ`` :meth:`finish_backward` returns."""
        raise NotImplementedError

    def finish_backward(self, state: State) -> dict[str, Tensor]:
        """``{"x": ũ, "wtu": Wᵀũ}`` from a final state."""
        raise NotImplementedError

    def pre_scale_forward(self, state: State) -> Tensor:
        """``(B,)`` scale ``S`` of the rounding of the ``p = W z + bias`` a state holds
        (:func:`~model_core.bounds.rounding_error`): for a product formed directly, ``‖W‖
        ‖z‖ + ‖bias‖`` (``‖W‖`` bounded by :meth:`MonotoneOperator.weight_norm`), plus the
        rounding scale of ``bias`` itself (``state["bias_scale"]``, :func:`solve_forward`)."""
        scale = self.op.weight_norm() * _row_norms(state["x"]) + _row_norms(state["bias"])
        return _plus_injection(scale, state)

    def pre_scale_backward(self, state: State) -> Tensor:
        """``(B,)`` as :meth:`pre_scale_forward` for ``g + Wᵀũ``: ``‖W‖ ‖ũ‖ + ‖g‖``."""
        return self.op.weight_norm() * _row_norms(state["x"]) + _row_norms(state["grad"])

    # Both problems start from zero, where a step can often be written down without applying
    # W or the resolvent (a zero in, a zero out). These return exactly what the step would.
    def first_forward(self, state: State, nonlin: Nonlinearity) -> State:
        """The first forward step from :meth:`init_forward`'s state."""
        return self.step_forward(state, nonlin)

    def first_backward(self, state: State) -> State:
        """The first backward step from :meth:`init_backward`'s state."""
        return self.step_backward(state)


SOLVERS: dict[str, type[SplittingMethod]] = {}

_Method = TypeVar("_Method", bound=type[SplittingMethod])


def register_solver(cls: _Method) -> _Method:
    """Class decorator: make a :class:`SplittingMethod` subclass available as ``cls.name``.

    Raises:
        TypeError: not a subclass, or neither ``default_alpha`` nor ``safe_alpha`` given.
        ValueError: an empty name, or a name another class holds.
    """
    if not (isinstance(cls, type) and issubclass(cls, SplittingMethod)):
        raise TypeError(f"register_solver takes a SplittingMethod subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty name")
    if cls.default_alpha is None and cls.safe_alpha.__func__ is SplittingMethod.safe_alpha.__func__:
        raise TypeError(f"{cls.__qualname__} needs a default_alpha or a safe_alpha(op)")
    held = SOLVERS.get(cls.name, cls)
    if held is not cls:
        raise ValueError(f"solver name {cls.name!r} is taken by {held.__qualname__}")
    SOLVERS[cls.name] = cls
    return cls


def get_solver(name: str) -> type[SplittingMethod]:
    """The solver class registered as ``name``; ``ValueError`` listing the valid names if none."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


@register_solver
class ForwardBackward(SplittingMethod):
    """Forward–backward splitting (Algorithm 1). Needs ``α ≤ 2m / ‖I − W‖²``.

    forward:  ``z⁺ = σ((1 − α) z + α (W z + U x + b))``
    backward: ``ũ⁺ = J ((1 − α) ũ + α Wᵀ ũ + α g)``  (J is 0/1 for our ReLU-type σ)

    The state carries ``p = W z + Ux + b`` (backward: ``Wᵀũ``) of its current point: the
    next step needs it, and it gives that point's residual ``‖z − σ(p)‖ / ‖z‖`` with no
    extra multiply. One multiply per iteration, as the textbook form.

    State: forward ``x`` (z), ``pre`` (``W z + Ux + b``), ``bias``; backward ``x`` (ũ),
    ``wtu`` (``Wᵀũ``), ``grad`` (g), ``jac`` (J).
    """

    name = "forward_backward"

    @classmethod
    def safe_alpha(cls, op: MonotoneOperator) -> float:
        """Half the bound of Algorithm 1: ``m / ‖I − W‖²`` (``‖I − W‖₂`` by power iteration,
        :meth:`MonotoneOperator.operator_norm_estimate`)."""
        norm = op.operator_norm_estimate()
        return op.m / max(norm * norm, 1e-12)

    def init_forward(self, bias: Tensor) -> State:
        return {"x": torch.zeros_like(bias), "pre": bias, "bias": bias}  # W0 + bias = bias

    def step_forward(self, state: State, nonlin: Nonlinearity) -> State:
        z = nonlin(torch.lerp(state["x"], state["pre"], self.alpha))  # (1 − α) z + α p
        bias = state["bias"]
        return {**state, "x": z, "pre": torch.add(self.op.multiply(z), bias)}

    def residual_forward(self, state: State, nonlin: Nonlinearity) -> Tensor:
        pre = state["pre"]
        return relative_residual(state["x"], nonlin(pre), pre, self.pre_scale_forward(state))

    def finish_forward(
        self, state: State, nonlin: Nonlinearity, preactivation: bool = False
    ) -> dict[str, Tensor]:
        if not preactivation:
            return {"x": state["x"]}
        return {"x": state["x"], "pre": state["pre"], "pre_scale": self.pre_scale_forward(state)}

    def init_backward(self, grad: Tensor, jac: Tensor) -> State:
        zero = torch.zeros_like(grad)
        return {"x": zero, "wtu": zero, "grad": grad, "jac": jac}

    def step_backward(self, state: State) -> State:
        u, g, jac = state["x"], state["grad"], state["jac"]
        u = jac * torch.lerp(u, state["wtu"] + g, self.alpha)
        return {"x": u, "wtu": self.op.multiply_transpose(u), "grad": g, "jac": jac}

    def residual_backward(self, state: State) -> Tensor:
        arg = state["grad"] + state["wtu"]
        return relative_residual(
            state["x"], state["jac"] * arg, arg, self.pre_scale_backward(state)
        )

    def finish_backward(self, state: State) -> dict[str, Tensor]:
        return {"x": state["x"], "wtu": state["wtu"]}


@register_solver
class PeacemanRachford(SplittingMethod):
    """Peaceman–Rachford splitting (Algorithm 2). Converges for any α > 0.

    With ``V = (I + α(I − W))⁻¹``, from ``z = u = 0``:

    forward:  ``u½ = 2z − u;  z½ = V(u½ + α(Ux + b));  u = 2z½ − u½;  z = σ(u)``
    backward: ``u½ = 2ũ − u;  z½ = Vᵀ u½;  u = 2z½ − u½;  ũ = J(u + α g)``

    Both return ``z½``, whose ``W z½`` (``Wᵀz½``) the resolvent identity gives for free
    (§2), and with it the residual of the returned point.

    State: forward ``x`` (z), ``u``, ``bias``, ``z_half``, ``u_half``; backward ``x`` (ũ),
    ``u``, ``jg`` (``αJg``), ``jac``, ``grad``, ``z_half``, ``u_half``.
    """

    name = "peaceman_rachford"
    needs_resolvent = True
    tunable_alpha = True
    default_alpha = 1.0

    def init_forward(self, bias: Tensor) -> State:
        zero = torch.zeros_like(bias)
        return {"x": zero, "u": zero, "bias": bias, "z_half": zero, "u_half": zero}

    def step_forward(self, state: State, nonlin: Nonlinearity) -> State:
        z, u, bias = state["x"], state["u"], state["bias"]
        u_half = torch.lerp(u, z, 2.0)  # 2z − u, in one pass
        z_half = self.resolvent.inverse(torch.add(u_half, bias, alpha=self.alpha))
        u = torch.lerp(u_half, z_half, 2.0)
        return {**state, "x": nonlin(u), "u": u, "z_half": z_half, "u_half": u_half}

    def first_forward(self, state: State, nonlin: Nonlinearity) -> State:
        """From ``z = u = 0``: ``u½ = 0``, ``z½ = V(α(Ux + b))``, ``u = 2z½``. Given the
        input (``state["image"]``, :func:`solve_forward`'s ``image``), ``z½`` comes from
        :meth:`~model_core.operators.base.Resolvent.inverse_injection`, which a
        convolution forms from the image's few channels (on cifar-conv about 22 of this
        step's 72 MFLOP a sample); the residual's rounding scale counts that path
        (:meth:`pre_scale_forward`)."""
        image = state.get("image")
        if image is None:
            return self.step_forward(state, nonlin)
        z_half = self.resolvent.inverse_injection(image)
        u = z_half * 2.0  # lerp(0, z½, 2), exactly
        return {**state, "x": nonlin(u), "u": u, "z_half": z_half, "u_half": state["u"]}

    def _pre(self, state: State) -> Tensor:
        """``W z½ + Ux + b = ((1 + α) z½ − u½) / α``, from ``(I + α(I − W)) z½ = u½ +
        α(Ux + b)`` (§2), in one ``lerp`` pass: ``u½ + ((1 + α)/α)(z½ − u½)``. Backward,
        the same identity transposed gives ``Wᵀz½``."""
        a = self.alpha
        return torch.lerp(state["u_half"], state["z_half"], (1.0 + a) / a)

    def _shortcut_scale(
        self, state: State, data: Tensor, into_resolvent: float, formed: Tensor | None = None
    ) -> Tensor:
        """``(B,)`` scale of the rounding of :meth:`_pre`'s ``p``, for ``p = data + W z½``.

        The identity gives ``W z½`` exactly only for the exact ``z½ = V t``; the computed one
        is off by the resolvent's rounding ``e`` (a few ``eps ‖t‖``), and ``p`` by ``(I +
        α(I − W)) e / α``: a factor ``(1 + α‖I − W‖)/α`` more, the ``1/α`` that a small α
        or a large ``‖I − W‖`` makes count. ``t = u½ + into_resolvent · data``; the
        ``lerp`` adds ``(1 + α)/α (‖z½‖ + ‖u½‖)``, and ``data`` enters ``p`` once.
        Measured in float32 against float64 (default models at α 1e-3 to 10, and weights
        with ``‖I − W‖`` up to 1e4 ``m``, α 1e-4 to 100): ``p`` was off by at most 0.85
        ``eps`` times this scale, and by up to 7,900 ``eps (‖z½‖ + ‖p‖)``, the scale
        before it (413 for the default conv model at α 1e-3).

        ``formed``: ``(B,)``, the rounding scale of ``data`` as the first step may have
        formed it inside the resolvent (:meth:`first_forward` from the image: ``‖|U||x| +
        |b|‖``, where ``Ux`` may cancel far below it). Where ``u½ = 0``, the resolvent's
        argument counts at that scale instead (at least ``‖data‖``). Measured for that step
        (cifar-conv and cifar-multitier, α 1e-3 to 10, ``‖A‖`` scaled by 100, random,
        1e6-scaled and cancelling inputs): ``p`` off by at most 0.27 ``eps`` times the
        scale (0.45 without this term), against 0.41 on the path through ``bias``."""
        a = self.alpha
        k = self.op.weight_norm()  # ≥ ‖I − W‖
        amplified = (1.0 + a * k) / a
        z_norm, u_norm = _row_norms(state["z_half"]), _row_norms(state["u_half"])
        d_norm = _row_norms(data)
        d_in = d_norm
        if formed is not None:
            d_in = torch.where(u_norm == 0, torch.maximum(d_norm, formed), d_norm)
        return (
            amplified * (u_norm + into_resolvent * d_in)
            + ((1.0 + a) / a) * (z_norm + u_norm)
            + d_norm
        )

    def pre_scale_forward(self, state: State) -> Tensor:
        """See :meth:`_shortcut_scale`: ``t = u½ + α · bias``, ``p = bias + W z½``; plus
        the rounding scale of ``bias`` itself (``state["bias_scale"]``, :func:`solve_forward`),
        which also bounds ``t``'s where the first step formed it from the image."""
        formed = state.get("bias_scale") if "image" in state else None
        scale = self._shortcut_scale(state, state["bias"], self.alpha, formed)
        return _plus_injection(scale, state)

    def pre_scale_backward(self, state: State) -> Tensor:
        """See :meth:`_shortcut_scale`: ``t = u½``, ``p = g + Wᵀz½``."""
        return self._shortcut_scale(state, state["grad"], 0.0)

    def residual_forward(self, state: State, nonlin: Nonlinearity) -> Tensor:
        pre = self._pre(state)
        scale = self.pre_scale_forward(state)
        return relative_residual(state["z_half"], nonlin(pre), pre, scale)

    def finish_forward(
        self, state: State, nonlin: Nonlinearity, preactivation: bool = False
    ) -> dict[str, Tensor]:
        """Return ``z½`` (and ``W z½ + Ux + b``, free, with its ``pre_scale``), which tends
        to ``z*``."""
        out = {"x": state["z_half"]}
        if preactivation:
            out["pre"] = self._pre(state)
            out["pre_scale"] = self.pre_scale_forward(state)
        return out

    def init_backward(self, grad: Tensor, jac: Tensor) -> State:
        zero = torch.zeros_like(grad)
        # ũ = J(u + αg) = J u + αJg: the constant αJg once, then one fused pass a step.
        jg = torch.mul(jac, grad).mul_(self.alpha)
        return {
            "x": zero,
            "u": zero,
            "jg": jg,
            "jac": jac,
            "grad": grad,
            "z_half": zero,
            "u_half": zero,
        }

    def step_backward(self, state: State) -> State:
        x, u, jg, jac = state["x"], state["u"], state["jg"], state["jac"]
        u_half = torch.lerp(u, x, 2.0)
        z_half = self.resolvent.inverse_transpose(u_half)
        u = torch.lerp(u_half, z_half, 2.0)
        return {
            "x": torch.addcmul(jg, jac, u),
            "u": u,
            "jg": jg,
            "jac": jac,
            "grad": state["grad"],
            "z_half": z_half,
            "u_half": u_half,
        }

    def first_backward(self, state: State) -> State:
        """From ``ũ = u = 0``: ``u½ = 0``, ``z½ = Vᵀ0 = 0``, ``u = 0``, so ``ũ⁺ = αJg``.
        Saves one resolvent application (of about five) per backward solve."""
        return {**state, "x": state["jg"]}

    def residual_backward(self, state: State) -> Tensor:
        arg = state["grad"] + self._pre(state)
        scale = self.pre_scale_backward(state)
        return relative_residual(state["z_half"], state["jac"] * arg, arg, scale)

    def finish_backward(self, state: State) -> dict[str, Tensor]:
        """Return ``z½`` and ``Wᵀz½`` without a multiply: ``(I + α(I − Wᵀ)) z½ = u½`` gives
        ``Wᵀz½ = ((1 + α) z½ − u½) / α``; ``z½ → ũ*`` as PR converges."""
        return {"x": state["z_half"], "wtu": self._pre(state)}


def relative_residual(
    x: Tensor, fx: Tensor, pre: Tensor | None = None, pre_scale: Tensor | None = None
) -> Tensor:
    """``‖x − f(x)‖ / ‖x‖`` per sample, ``(B, ...)`` → ``(B,)`` (forward: ``f(z) =
    σ(Wz + Ux + b)``, §2; backward: ``f(ũ) = J(g + Wᵀũ)``, §3).

    Where ``x = 0`` the denominator is ``‖f(x)‖`` instead: a zero that is its own image
    has residual 0, a zero that is not has residual 1.

    With ``pre``, the argument of the nonexpansive map (``p = Wz + Ux + b``, or ``g +
    Wᵀũ``) as computed, the result is an upper bound on the residual of exact arithmetic at
    ``x``: the computed ``p`` is off from the exact one by at most ``ρ = ROUNDING_ULPS · eps
    · (‖x‖ + ‖p‖ + S)`` (the rounding model of the error bound, §9, with ``S =
    pre_scale``, the scale of the sums that formed ``p``:
    :func:`~model_core.bounds.rounding_error`), and σ or ``J`` passes at
    most ``ρ`` on to ``f(x)``: ``‖x − f(x)‖`` grows by ``ρ``, and the quotient by ``3 ·
    ROUNDING_ULPS · eps`` relative for the rounding of its two norms and the division. In
    float32 ``ρ`` is 7.8e-5 to 5.8e-4 of ``‖x‖`` on the default models under PR at the
    served α (1.5–6% of ``tol`` 1e-2), which keeps a smaller ``tol`` from being met by
    rounding alone and is the floor float32 can certify (§2). The iteration stops, and
    ``converged`` is decided, on this bound.
    """
    x_norm, fx_norm = _row_norms(x), _row_norms(fx)
    denom = torch.where(x_norm > 0, x_norm, fx_norm).clamp_min(torch.finfo(x.dtype).tiny)
    gap = _row_norms(x - fx)
    if pre is None:
        return gap / denom
    rho = rounding_error(x_norm, _row_norms(pre), x.dtype, pre_scale)
    # The quotient's own rounding: two norms and a division, each within ``ulps`` relative.
    ulps = ROUNDING_ULPS * torch.finfo(x.dtype).eps
    bound = (gap + rho) * (1.0 + 3.0 * ulps) / denom
    # A zero whose image is computed as zero keeps residual 0 (an FB iterate at z* = 0): its
    # p is U x + b with nothing from W (W·0 is exactly 0), and a denominator of 0 would turn
    # any ρ into an infinite residual.
    return torch.where((x_norm > 0) | (fx_norm > 0), bound, gap / denom)


def _timed_sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Problem(NamedTuple):
    """One problem as :func:`iterate` takes it: a start and a method's hooks bound to it."""

    state: State
    step: Callable[[State], State]
    residual: Callable[[State], Tensor]
    finish: Callable[[State], dict[str, Tensor]]
    first: Callable[[State], State]


def _solve(
    op: MonotoneOperator,
    pose: Callable[[SplittingMethod], _Problem],
    direction: str,
    device: torch.device,
    method: str,
    alpha: float,
    tol: float,
    max_iter: int,
    resolvent: Resolvent | None,
    between: Callable[[], None] | None,
    accept: Callable[[dict[str, Tensor]], Tensor] | None = None,
    check_every: int = 1,
    loop: str | None = None,
    sync_every: int = SYNC_EVERY,
    problem_key: Hashable | None = None,
    certify: Callable[[dict[str, Tensor]], Tensor] | None = None,
) -> tuple[dict[str, Tensor], SolveStats]:
    """Build the method, pose the problem with it, run :func:`iterate`, time it (the posing
    and the loop) and describe the run; the operator's weights stay fixed throughout.

    ``problem_key`` (with the weights, method, α and tol) names the problem for the graphed
    loop's captured graphs; ``None``: no graphs. ``certify``: :func:`iterate`'s."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    loop = default_loop(device) if loop is None else loop
    info: dict = {}
    with op.fixed_weights() as weights:  # validates the weight caches once, not per iteration
        solver = get_solver(method)(op, alpha, resolvent)
        graphs = None
        if loop == "graphed" and problem_key is not None:
            from .cuda_graphs import GraphKey

            graphs = GraphKey(op, weights, (direction, solver.name, solver.alpha, tol, problem_key))
        t0 = _timed_sync(device)
        problem = pose(solver)
        outputs, iterations, converged = iterate(
            problem.step,
            problem.state,
            tol=tol,
            max_iter=max_iter,
            residual=problem.residual,
            finish=problem.finish,
            first=problem.first,
            chunk_scale=op.chunk_scale,
            between=between,
            accept=accept,
            check_every=check_every,
            loop=loop,
            sync_every=sync_every,
            graphs=graphs,
            info=info,
            certify=certify,
        )
        elapsed = _timed_sync(device) - t0
    stats = SolveStats(
        iterations=iterations,
        residual=outputs["residual"],
        converged=converged,
        alpha=solver.alpha,
        method=solver.name,
        tol=tol,
        max_iter=max_iter,
        time_s=elapsed,
        direction=direction,
        extra=info,
    )
    return outputs, stats


@torch.no_grad()
def solve_forward(
    op: MonotoneOperator,
    nonlin: Nonlinearity,
    bias: Tensor,
    *,
    method: str,
    alpha: float,
    tol: float,
    max_iter: int,
    preactivation: bool = False,
    resolvent: Resolvent | None = None,
    between: Callable[[], None] | None = None,
    accept: Callable[[dict[str, Tensor]], Tensor] | None = None,
    check_every: int = 1,
    loop: str | None = None,
    sync_every: int = SYNC_EVERY,
    bias_scale: Tensor | None = None,
    certify: Callable[[dict[str, Tensor]], Tensor] | None = None,
    image: Tensor | None = None,
) -> tuple[Tensor, SolveStats] | tuple[Tensor, SolveStats, Tensor]:
    """Find ``z* = σ(W z* + bias)`` per sample (Theorem 1).

    A sample stops, and is ``converged``, once ``‖z − σ(W z + bias)‖ / ‖z‖ ≤ tol`` at the
    returned ``z`` (see :func:`iterate`); ``stats.residual`` is that residual, exact for the
    operator's current weights.

    Args:
        op: the monotone operator holding W.
        nonlin: σ, a proximal operator.
        bias: ``(B, *op.z_shape)``, the injection ``Ux + b``.
        method: a name in :data:`SOLVERS`.
        alpha: step size α > 0.
        tol: bound on the per-sample relative residual.
        max_iter: iteration cap, ``>= 1``.
        preactivation: also return ``W z + bias``, the argument of σ at the solution
            (training applies the layer once more through it); free for both methods.
        resolvent: a resolvent built aside for this α (else the operator's cached one).
        between: called once per iteration, between steps (see :func:`iterate`).
        accept: another stopping rule (see :func:`iterate`): it receives ``{"x": z, "pre":
            W z + bias}`` of the working rows every ``check_every`` iterations and returns
            the ``(rows,)`` bool of those that may stop. ``converged`` still means
            ``residual ≤ tol``.
        check_every: iterations between two calls of ``accept``.
        loop: :data:`LOOPS` (see :func:`iterate`); ``None``: :func:`default_loop` for
            ``bias``'s device. The graphed loop captures graphs only for an ``accept`` that
            carries a ``graph_key`` attribute (equal keys: the same rule on the same
            tensors); other rules run the masked loop.
        sync_every: the masked loops' iterations between two host syncs.
        bias_scale: ``(B,)``, ``‖|U||x| + |b|‖``, the scale of the rounding of ``bias``
            itself (:meth:`MonotoneOperator.injection_scale`): far above ``‖bias‖`` where
            ``U x`` cancels (an input near ``U``'s null space). It joins the state as
            ``"bias_scale"``, and the methods' residuals (hence stopping and ``converged``)
            and ``stats.pre_scale`` count it; ``None``: 0.
        certify: a second test of the rule (see :func:`iterate`): it receives ``{"x": z,
            "pre", "pre_scale", "row"}`` (``row``: the sample's index in ``bias``) of some
            running rows at iterations 8, 16, 32, … and returns the ``(rows,)`` bool of
            those that may stop.
        image: ``(B, ...)``, the input ``x`` whose injection ``bias`` is
            (``op.bias(image)``, exactly that tensor's values up to rounding). Methods that
            apply the resolvent to ``α(Ux + b)`` first (PR) then form it from the image
            (:meth:`~model_core.operators.base.Resolvent.inverse_injection`) where the
            operator does that at a fraction of a resolvent's cost
            (``op.injects_through_resolvent``: the convolutions). It then joins the state
            as ``"image"``; ``None``: every step from ``bias``.

    Returns:
        ``(z, stats)`` with ``z`` shaped like ``bias``; ``(z, stats, W z + bias)`` with
        ``preactivation``. ``stats.extra["loop"]`` names the loop that ran.

    Raises:
        ValueError: unknown method, ``alpha <= 0``, ``max_iter < 1``, or a ``resolvent``
            built for another α or other weights.
    """

    def pose(solver: SplittingMethod) -> _Problem:
        state = solver.init_forward(bias)
        if bias_scale is not None:  # a problem datum: every step passes it on
            state["bias_scale"] = bias_scale
        if image is not None and solver.needs_resolvent and op.injects_through_resolvent:
            state["image"] = image  # (PR's first step reads it)
        wants_pre = preactivation or accept is not None or certify is not None
        return _Problem(
            state,
            lambda s: solver.step_forward(s, nonlin),
            lambda s: solver.residual_forward(s, nonlin),
            lambda s: solver.finish_forward(s, nonlin, wants_pre),
            lambda s: solver.first_forward(s, nonlin),
        )

    run = (method, alpha, tol, max_iter, resolvent, between)
    rule = None if accept is None else getattr(accept, "graph_key", None)
    key = (type(nonlin).__name__, id(nonlin), preactivation, accept is not None, rule)
    key += (certify is not None,)  # ("pre" from finish)
    outputs, stats = _solve(
        op,
        pose,
        "forward",
        bias.device,
        *run,
        accept=accept,
        check_every=check_every,
        loop=loop,
        sync_every=sync_every,
        problem_key=None if accept is not None and rule is None else key,
        certify=certify,
    )
    z = outputs["x"]
    if preactivation:
        stats.pre_scale = outputs["pre_scale"]
        return z, stats, outputs["pre"]
    return z, stats


@torch.no_grad()
def solve_backward(
    op: MonotoneOperator,
    jac: Tensor,
    grad: Tensor,
    *,
    method: str,
    alpha: float,
    tol: float,
    max_iter: int,
    resolvent: Resolvent | None = None,
    loop: str | None = None,
    sync_every: int = SYNC_EVERY,
) -> tuple[Tensor, SolveStats]:
    """Implicit backward pass (Theorems 2 and 3): the gradient w.r.t. the layer's input.

    Solves ``ũ = J (g + Wᵀ ũ)`` per sample and returns ``g + Wᵀ ũ``, the gradient to
    push through one autograd application of the layer. A sample stops, and is
    ``converged``, once ``‖ũ − J(g + Wᵀũ)‖ / ‖ũ‖ ≤ tol`` at the returned ``ũ``.

    Args:
        op: the monotone operator holding W.
        jac: ``(B, *z_shape)``, ``J = σ'(W z* + U x + b)``, 0/1 valued.
        grad: ``(B, *z_shape)``, ``g = ∂ℓ/∂ẑ``.
        method, alpha, tol, max_iter, resolvent, loop, sync_every: as in
            :func:`solve_forward`.

    Returns:
        ``(g + Wᵀũ, stats)``.

    Raises:
        ValueError: as :func:`solve_forward`.
    """

    def pose(solver: SplittingMethod) -> _Problem:
        return _Problem(
            solver.init_backward(grad, jac),
            solver.step_backward,
            solver.residual_backward,
            solver.finish_backward,
            solver.first_backward,
        )

    run = (method, alpha, tol, max_iter, resolvent, None)
    outputs, stats = _solve(
        op,
        pose,
        "backward",
        grad.device,
        *run,
        loop=loop,
        sync_every=sync_every,
        problem_key=("backward",),
    )
    return grad + outputs["wtu"], stats
