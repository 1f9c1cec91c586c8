"""The masked solver loop on fixed batch buckets, its iterations captured in CUDA graphs.

A GPU solve of a small batch is bound by launches, not arithmetic: an iteration is dozens of
small kernels, each launched from Python. A CUDA graph replays a captured iteration with one
launch. A graph fixes its tensors' addresses and shapes, so a solve here runs on buffers of
a fixed *bucket* of rows (:data:`BUCKETS`, the next one up; padding rows start stopped and
cost only their arithmetic) and the masked loop of :mod:`model_core.solvers` writes its
state back into those buffers in place. Three graphs per bucket and problem: the first
iteration (with the load of the start state and the counters), a later one (one more with
the ``accept`` check where a stopping rule has one), and the final residual and outputs.
The host replays one graph per iteration and reads one flag (any row still running) every
``sync_every`` iterations.

When graphs are captured. A capture costs a warm-up and the capture itself (tens of ms), so
a bucket is captured the :data:`CAPTURE_AFTER_USES`-th time the same problem (weights, α,
tol, method, stopping rule) is solved in it: serving and evaluation reuse their graphs,
training (new weights every step) never captures. Until then, and whenever a bucket's
graphs are busy in another thread, too large (:data:`MAX_BUCKET_BYTES`) or failed to
capture, the solve runs the same masked loop eagerly. Answers do not depend on which ran.

What keeps a replay honest. A graph reads the memory its capture saw. The graphs of one
operator are dropped when its weights change (the cache is keyed on
:meth:`~model_core.operators.MonotoneOperator.fixed_weights`' key). Every tensor the capture
read from outside (spectra, resolvents, the head's weights of a stopping rule, masks) is
recorded; the runner keeps their memory alive, and before each solve checks that each still
has the memory it had (a parameter whose ``.data`` was replaced gets new graphs). In-place
changes are read by the replay as by an eager solve.

On the CPU nothing is captured: ``loop="graphed"`` runs the same bucketed code directly, which
is how the CPU tests check the buffers, padding and in-place updates of this path.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Hashable
from contextlib import nullcontext as _nothing
from typing import NamedTuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .solvers import (
    State,
    _certifies,
    _certify_masked,
    _Hooks,
    _masked_iteration,
    _masked_outputs,
)

log = logging.getLogger(__name__)

# Batch buckets: each a step of at most 1.5× from the one below, so padding wastes at most a
# third of a solve; a batch above the last runs the masked loop without graphs (at that size
# launches are a small share of an iteration).
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Buckets whose state entries would exceed this many bytes each are not captured (a bucket
# holds its state, padded, plus the graphs' own pool): 256 MiB is 2,300 fmnist-conv samples
# (115 KB each) or 700 CIFAR conv-81 samples (375 KB).
MAX_BUCKET_BYTES = 256 << 20
# The use of a (problem, bucket) at which its graphs are captured (on CUDA).
CAPTURE_AFTER_USES = 2


class GraphKey(NamedTuple):
    """Names one problem for the graphed loop (built by ``model_core.solvers._solve``).

    Attributes:
        owner: the operator; its graphs live and die with it (weakly referenced).
        weights: its weights key (:meth:`MonotoneOperator.fixed_weights`); a new key drops
            the graphs of the old one.
        problem: the rest, hashable: direction, method, α, tol, the nonlinearity and the
            stopping rule's ``graph_key``. Equal keys must mean the same computation.
    """

    owner: object
    weights: Hashable
    problem: Hashable


def bucket_for(rows: int, row_bytes: int) -> int | None:
    """The bucket a batch of ``rows`` runs in (the smallest in :data:`BUCKETS` that holds
    it), or ``None`` above the last bucket or :data:`MAX_BUCKET_BYTES`."""
    for b in BUCKETS:
        if b >= rows:
            return b if b * row_bytes <= MAX_BUCKET_BYTES else None
    return None


class _OwnerGraphs:
    """One operator's runners, for its current weights only."""

    def __init__(self, weights: Hashable):
        self.weights = weights
        self.runners: dict[Hashable, GraphRunner] = {}
        self.uses: dict[Hashable, int] = {}
        self.failed: set[Hashable] = set()


_CACHE: weakref.WeakKeyDictionary[object, _OwnerGraphs] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def clear() -> None:
    """Drop every captured graph and its buffers (their GPU memory returns to the pool)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _layout(state: State) -> tuple:
    """Names, per-row shapes, dtypes, and which entries are one tensor (a zero start shares
    one zero tensor among several names): a runner serves only starts of one layout."""
    first_of: dict[int, int] = {}
    groups = []
    for i, t in enumerate(state.values()):
        groups.append(first_of.setdefault(id(t), i))
    return tuple(
        (name, tuple(t.shape[1:]), t.dtype, g)
        for (name, t), g in zip(state.items(), groups, strict=True)
    )


def run_graphed(
    key: GraphKey,
    hooks: _Hooks,
    state: State,
    max_iter: int,
    check_every: int,
    sync_every: int,
    between: Callable[[], None] | None,
) -> tuple[dict[str, Tensor], Tensor, Tensor, str] | None:
    """Solve on a bucket's buffers (replaying its graphs on CUDA); ``None`` where this
    solve should run the plain masked loop instead (see the module docstring).

    Returns:
        ``(outputs, iterations, converged, loop)`` as :func:`~model_core.solvers.iterate`,
        fresh tensors of the batch's rows; ``loop`` is ``"cuda_graphs"`` or ``"bucketed"``.
    """
    x = state["x"]
    rows = x.shape[0]
    cuda = x.device.type == "cuda"
    row_bytes = max(t[0].numel() * t.element_size() for t in state.values())
    bucket = bucket_for(rows, row_bytes)
    if bucket is None:
        return None
    layout = _layout(state)
    slot = (key.problem, layout, bucket, x.device, hooks.accept is not None)
    with _CACHE_LOCK:
        owned = _CACHE.get(key.owner)
        if owned is None or owned.weights != key.weights:
            owned = _CACHE[key.owner] = _OwnerGraphs(key.weights)  # old weights' graphs go
        if slot in owned.failed:
            return None
        runner = owned.runners.get(slot)
        if runner is None:
            uses = owned.uses[slot] = owned.uses.get(slot, 0) + 1
            if cuda and uses < CAPTURE_AFTER_USES:
                return None
            runner = owned.runners[slot] = GraphRunner(state, bucket)
        if not runner.lock.acquire(blocking=False):  # another thread's solve holds it
            return None
    try:
        if cuda and not runner.captured:
            try:
                with torch.cuda.device(x.device):
                    runner.capture(hooks)
            except Exception:  # a graph that cannot be captured: this problem runs eagerly
                log.warning("CUDA graph capture failed; solving without graphs", exc_info=True)
                with _CACHE_LOCK:
                    owned.failed.add(slot)
                    owned.runners.pop(slot, None)
                return None
        if runner.captured and not runner.reads_intact():
            with _CACHE_LOCK:
                owned.runners.pop(slot, None)  # a read tensor moved: capture afresh next time
            return None
        with torch.cuda.device(x.device) if cuda else _nothing():
            outputs, iterations, converged = runner.run(
                hooks, state, max_iter, check_every, sync_every, between
            )
        return outputs, iterations, converged, "cuda_graphs" if runner.captured else "bucketed"
    finally:
        runner.lock.release()


class _Reads(TorchFunctionMode):
    """Records the tensors the ops inside it read that none of those ops made."""

    def __init__(self):
        super().__init__()
        self.made: dict[int, weakref.ref] = {}
        self.read: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and id(t) not in self.read:
                ref = self.made.get(id(t))
                if ref is None or ref() is not t:
                    self.read[id(t)] = t
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.made[id(t)] = weakref.ref(t)
        return out


class GraphRunner:
    """The masked loop's buffers for one bucket and layout, and its graphs once captured.

    Not thread-safe: :func:`run_graphed` holds :attr:`lock` around each use.
    """

    def __init__(self, template: State, bucket: int):
        x = template["x"]
        dev = x.device
        self.bucket = bucket
        self.lock = threading.Lock()
        self.names = list(template)
        first_of: dict[int, int] = {}
        self.sources: list[int] = []  # staging buffer of each name
        staging_like: list[Tensor] = []
        for t in template.values():
            if id(t) not in first_of:
                first_of[id(t)] = len(staging_like)
                staging_like.append(t)
            self.sources.append(first_of[id(t)])

        def zeros(t: Tensor) -> Tensor:
            return torch.zeros((bucket, *t.shape[1:]), dtype=t.dtype, device=dev)

        self.staging = [zeros(t) for t in staging_like]
        self.state = {name: zeros(t) for name, t in template.items()}
        self.live = torch.zeros(bucket, dtype=torch.bool, device=dev)
        self.alive = torch.zeros((), dtype=torch.bool, device=dev)
        self.iterations = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.k = torch.zeros((), dtype=torch.int64, device=dev)
        self.params = torch.zeros(2, dtype=torch.int64, device=dev)  # rows, max_iter
        self.row_index = torch.arange(bucket, device=dev)
        self.dirty = 0  # staging rows that may hold an earlier batch's start
        self.graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}
        self.final: torch.cuda.CUDAGraph | None = None
        self.final_out: dict[str, Tensor] = {}
        self.reads: list[tuple[Tensor, int]] = []
        self.held: list[Tensor] = []

    @property
    def captured(self) -> bool:
        """Whether the graphs are captured (CUDA); else each run calls the code directly."""
        return self.final is not None

    # ---- the captured bodies: they read and write only the buffers above ---------------
    def _iteration(self, hooks: _Hooks, first: bool, check: bool) -> None:
        if first:  # the start: state from staging, counters from params
            for name, src in zip(self.names, self.sources, strict=True):
                self.state[name].copy_(self.staging[src])
            self.k.zero_()
            torch.lt(self.row_index, self.params[0], out=self.live)
            self.iterations.copy_(self.params[1].expand(self.bucket))
        self.k.add_(1)
        _masked_iteration(
            hooks,
            self.state,
            self.live,
            self.iterations,
            self.k,
            use_first=first,
            check=check,
            in_place=True,
        )
        torch.any(self.live, out=self.alive)

    def _outputs(self, hooks: _Hooks) -> dict[str, Tensor]:
        outputs, converged = _masked_outputs(hooks, self.state)
        outputs["converged"] = converged
        return outputs

    def _variants(self, hooks: _Hooks) -> list[tuple[bool, bool]]:
        checks = (False, True) if hooks.accept is not None else (False,)
        return [(first, check) for first in (True, False) for check in checks]

    def capture(self, hooks: _Hooks) -> None:
        """Warm every body up on a side stream (cuFFT plans, cuBLAS workspaces, the
        operator's lazy caches), then capture each into a graph sharing one memory pool
        (they never run at once), recording the tensors they read from outside."""
        device = self.state["x"].device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for first, check in self._variants(hooks):
                self._iteration(hooks, first, check)
            self._outputs(hooks)
        torch.cuda.current_stream(device).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        reads = _Reads()
        graphs = {}
        for first, check in self._variants(hooks):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"), reads:
                self._iteration(hooks, first, check)
            graphs[first, check] = g
        final = torch.cuda.CUDAGraph()
        with torch.cuda.graph(final, pool=pool, capture_error_mode="thread_local"), reads:
            out = self._outputs(hooks)
        own = {id(t) for t in (*self.staging, *self.state.values(), self.live, self.alive)}
        own |= {id(t) for t in (self.iterations, self.k, self.params, self.row_index)}
        external = [t for i, t in reads.read.items() if i not in own]
        self.reads = [(t, t.data_ptr()) for t in external]
        self.held = [t.detach() for t in external]  # their memory outlives a replaced .data
        self.graphs, self.final_out, self.final = graphs, out, final

    def reads_intact(self) -> bool:
        """Whether every tensor the graphs read from outside still has its captured memory."""
        return all(t.data_ptr() == ptr for t, ptr in self.reads)

    def run(
        self,
        hooks: _Hooks,
        state: State,
        max_iter: int,
        check_every: int,
        sync_every: int,
        between: Callable[[], None] | None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Load ``state`` (``(rows, ...)``, rows ≤ bucket), iterate, return fresh tensors."""
        rows = state["x"].shape[0]
        seen: set[int] = set()
        for t, src in zip(state.values(), self.sources, strict=True):
            if src not in seen:
                seen.add(src)
                self.staging[src][:rows].copy_(t)
                if self.dirty > rows:
                    self.staging[src][rows : self.dirty].zero_()
        self.dirty = rows
        self.params[0].fill_(rows)  # (fills launch a kernel; a copy from the host would sync)
        self.params[1].fill_(max_iter)
        for k in range(1, max_iter + 1):
            if between is not None:
                between()
            variant = (k == 1, hooks.accept is not None and k % check_every == 0)
            if self.captured:
                self.graphs[variant].replay()
            else:
                self._iteration(hooks, *variant)
            if hooks.certify is not None and k < max_iter and _certifies(hooks, k, check_every):
                # Eagerly, between replays: it reads the running rows on the host.
                _certify_masked(hooks, self.state, self.live, self.iterations, k)
                torch.any(self.live, out=self.alive)
            if k < max_iter and k % sync_every == 0 and not bool(self.alive):  # host sync
                break
        if self.captured:
            self.final.replay()
            out = dict(self.final_out)
        else:
            out = self._outputs(hooks)
        converged = out.pop("converged")[:rows].clone()
        outputs = {name: value[:rows].clone() for name, value in out.items()}
        return outputs, self.iterations[:rows].clone(), converged
