"""Dynamic batching: one queue and one worker per served model version.

Callers :meth:`Batcher.submit` a ``(b, ...)`` tensor with a hashable key (the solver
parameters). The worker takes the oldest waiting request and collects the requests that
share its key until the first of:

* the batch holds the rows worth waiting for: the offered load (the most rows queued or
  solving at once lately), at most ``max_batch_size``; a lone caller therefore never waits;
* no request has arrived for ``max_gap``: the burst is over, nobody else is coming soon;
* ``max_delay`` has passed since the oldest request arrived (the hard bound).

Under load, answers go out together and the next requests come back as a burst that the
event loop parses one by one (about 0.3–1 ms each on a small CPU). Waiting for the whole
burst, rather than a fixed few milliseconds, keeps batches full: measured on 2 cores at 64
clients, ``fmnist-conv`` batches averaged 26 rows under a fixed 2 ms wait. The worker
concatenates the batch, runs one solve in a thread of its own (the event loop stays free),
and hands every caller back its own rows. Rows solved under different
``tol``/``max_iter``/``method`` never share a solve.

Scheduling: no request waits long behind a solve in flight. A request whose settings match
a solve in flight gathers into the key's next batch meanwhile when that solve holds it: when
the solve's largest request has at most ``COMPARABLE`` times its rows (there is nothing to
overtake, and a second solve would only split the batch: the CPU is shared anyway), or while
the solve is young. A solve is young until it has computed ``slice × its rows / rows of its
largest request``: one slice behind a single large request. Any other request starts a solve
of its own at once. Requests of one size therefore keep one solve of their key in flight at
a time, however slowly they arrive and however long a solve takes: what arrives during a
solve is the next batch. (Were a solve held only while young, a trickle of single images
whose solve outlasts ``slice × rows``, as on a slow model or a CPU shared with the load
generator, would start a solve per arrival; least attained service then runs the newest
first, the oldest wait behind every newcomer, and batches of 1–2 rows cut the throughput
that would clear the queue: p99 several times p50.) There is no cap on the number of
solves, only on their rows (``max_solving_rows``: the state a paused solve keeps). The
solves in flight share the CPU through a :class:`ComputeGate`: one computes at a time (the
cores stay with one solve's intra-op threads), and between two iterations the running solve
gives way to a waiting one that has computed less (least attained service). A new, short
solve thus starts within one iteration and one slice of a long one, and finishes before it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("mondeq.service")

# A solve in flight holds a request of its key until it ends when the solve's largest request
# has at most this many times the request's rows (see the module docstring).
COMPARABLE = 4


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` rows already; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher stopped accepting work (shutdown or the version was replaced)."""


class SolveFailed(Exception):
    """The solve itself raised (a bug, not the client's fault)."""


class Abandoned(Exception):
    """Raised inside a solve, at an iteration boundary, once every caller of its batch is
    gone (cancelled: a client that went away, a gRPC deadline, a shutdown's grace run out):
    nobody awaits its result, and at shutdown it would hold the process past its grace."""


@dataclass
class BatchOutput:
    """What the solve function returns for a batch of ``N`` rows.

    Attributes:
        rows: per-row tensors, each with leading dimension ``N`` (sliced per caller).
        info: batch-wide values (α, method, solve time, ...), copied to every caller.
    """

    rows: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    """One caller's share of a batch: its own ``b`` rows and the batch-wide info."""

    rows: dict[str, Tensor]
    info: dict[str, Any]
    queue_s: float
    batch_rows: int


class Turn:
    """One solve's share of a :class:`ComputeGate` (from :meth:`ComputeGate.ticket`).

    Attributes:
        started: ``time.perf_counter()`` when the solve first got the gate (its queue wait
            ends there); ``None`` before.
        attained: seconds it has held the gate, up to its latest hand-over.
    """

    def __init__(self, gate: ComputeGate, seq: int):
        self._gate = gate
        self._wake = threading.Condition(gate._lock)
        self.seq = seq
        self.started: float | None = None
        self.attained = 0.0
        self._since = 0.0

    def between(self) -> None:
        """Call between two iterations: returns at once, or after the solves that have
        computed less have had their turn (the ``between`` hook of
        :func:`model_core.solvers.iterate`)."""
        self._gate._between(self)

    def computed(self) -> float:
        """Seconds this solve has held the gate so far, now included (any thread; an
        unlocked read, exact to a hand-over)."""
        if self._gate._running is self:
            return self.attained + (time.perf_counter() - self._since)
        return self.attained


class ComputeGate:
    """Solves share the CPU: one computes at a time, least attained service first.

    A solve holds the gate from :meth:`turn` to its end; at each iteration boundary it
    calls :meth:`Turn.between`, which hands the gate over when a waiting solve has computed
    at least ``slice_s`` less than the running one. The waiter with the least attained
    time (ties: the oldest) goes next. A new solve has computed nothing, so it starts within
    one iteration plus ``slice_s`` of the running solve; a short one then finishes first, and
    long ones alternate in slices of about ``slice_s``. A hand-over wakes only the thread
    that goes next, so many paused solves cost nothing per switch. Thread-safe.

    Args:
        slice_s: the hysteresis, in seconds: how much less a waiter must have computed to
            take over (bounds the switches between two long solves).
    """

    def __init__(self, slice_s: float = 0.02):
        self.slice_s = slice_s
        self._lock = threading.Lock()
        self._running: Turn | None = None
        self._waiting: list[tuple[float, int, Turn]] = []  # heap by (attained, seq)
        self._seq = itertools.count()

    def ticket(self) -> Turn:
        """A new solve's :class:`Turn`, to pass to :meth:`turn` (its :meth:`Turn.computed`
        reads 0 until then)."""
        return Turn(self, next(self._seq))

    @contextmanager
    def turn(self, ticket: Turn | None = None) -> Iterator[Turn]:
        """Wait for the gate (blocking the calling thread); hold it inside the block."""
        me = ticket or self.ticket()
        with self._lock:
            if self._running is None and not self._waiting:
                self._run(me)
            else:
                self._wait(me)
        try:
            yield me
        finally:
            with self._lock:
                held = me.attained + (time.perf_counter() - me._since)
                self._hand_over()
                me.attained = held

    @property
    def waiting(self) -> int:
        """Solves waiting for the gate now."""
        return len(self._waiting)

    # The helpers below run under self._lock. They update a turn's fields in the order
    # that keeps Turn.computed, read without the lock, from counting a pause as computing.
    def _run(self, me: Turn) -> None:
        me._since = time.perf_counter()
        if me.started is None:
            me.started = me._since
        self._running = me

    def _wait(self, me: Turn) -> None:
        heapq.heappush(self._waiting, (me.attained, me.seq, me))
        if self._running is None:
            self._hand_over()
        while self._running is not me:
            me._wake.wait()

    def _hand_over(self) -> None:
        if self._waiting:
            nxt = heapq.heappop(self._waiting)[2]
            self._run(nxt)
            nxt._wake.notify()
        else:
            self._running = None

    def _between(self, me: Turn) -> None:
        if not self._waiting:  # nobody waits (the common case): no lock taken
            return
        with self._lock:
            if not self._waiting:
                return
            held = me.attained + (time.perf_counter() - me._since)
            if self._waiting[0][0] + self.slice_s > held:
                return
            self._hand_over()
            me.attained = held
            self._wait(me)


@dataclass
class _Item:
    x: Tensor
    key: Hashable
    future: asyncio.Future
    t_enqueued: float

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


@dataclass(eq=False)
class _Solve:
    """A batch in flight: taken off the queue, computing or paused at the gate.

    ``hold_s``: how long it computes before requests of its key much smaller than
    ``largest`` (its largest request's rows) start a batch of their own (see
    :meth:`Batcher._holds`).
    """

    key: Hashable
    rows: int
    turn: Turn
    hold_s: float
    largest: int = 1
    task: asyncio.Task | None = None


class Batcher:
    """Queue plus worker for one model.

    Args:
        name: for logs and thread names.
        solve: ``solve(x, key, between) -> BatchOutput`` with ``x`` of shape ``(N, ...)``,
            run in one of the batcher's threads; it calls ``between()`` between two solver
            iterations (:meth:`Turn.between`), where it may be paused for another solve.
        max_batch_size: rows per solve (a single larger request is solved alone).
        max_delay_s: how long the oldest request may wait for company, at most.
        max_gap_s: the batch stops waiting once no request has arrived for this long.
        max_queue: rows allowed to wait; past it :meth:`submit` raises :class:`QueueFull`.
        max_solving_rows: rows in solves at once (each paused solve keeps its batch's
            solver state and a thread); a batch that would pass it waits for a solve to
            end, unless nothing solves.
        on_batch: called in the event loop after each solve with ``(n_rows, [queue_s])``.
        gate: the :class:`ComputeGate` the solves share (default: one of its own).
    """

    def __init__(
        self,
        name: str,
        solve: Callable[[Tensor, Hashable, Callable[[], None]], BatchOutput],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_gap_s: float,
        max_queue: int,
        max_solving_rows: int = 512,
        on_batch: Callable[[int, list[float]], None] | None = None,
        gate: ComputeGate | None = None,
    ):
        self.name = name
        self._solve = solve
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_gap_s = max_gap_s
        self.max_queue = max_queue
        self.max_solving_rows = max_solving_rows
        self._on_batch = on_batch
        self._gate = gate or ComputeGate()
        self._pending: deque[_Item] = deque()
        self._last_arrival = 0.0
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        # The batch filling now: its key, the rows it waits for and the rows queued under its
        # key. Arrivals wake the worker only when they complete it (the gap is re-checked on
        # the worker's own timer): a wake-up per arrival cost the event loop ~20 µs each.
        self._fill_key: Hashable | None = None
        self._fill_target = 0
        self._fill_rows = 0
        # One thread per solve in flight (a paused solve blocks its thread at the gate);
        # threads start only as solves need them.
        self._executor = ThreadPoolExecutor(max_solving_rows, thread_name_prefix=f"solve-{name}")
        self._solves: list[_Solve] = []
        self._solve_s_ema: float | None = None  # for Retry-After
        # Offered load: the most rows queued or solving at once, per recent batch.
        self._solving_rows = 0
        self._load_peak = 0
        self._recent_load: deque[int] = deque(maxlen=8)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batch-{name}")

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def solving(self) -> int:
        """Solves in flight (computing or paused at the gate)."""
        return len(self._solves)

    def submit(self, x: Tensor, key: Hashable) -> asyncio.Future:
        """Queue ``x`` ``(b, ...)`` for solving under ``key``; await the future for an
        :class:`Answer`. Enqueues synchronously, so a caller that looked this batcher up
        in the same event-loop step cannot miss it being closed.

        Raises:
            Closed: the batcher no longer accepts work.
            QueueFull: ``max_queue`` rows are waiting already.
        """
        if self._closing:
            raise Closed(f"model {self.name} is shutting down")
        b = int(x.shape[0])
        if self._pending_rows > 0 and self._pending_rows + b > self.max_queue:
            raise QueueFull(
                f"model {self.name} has {self._pending_rows} rows queued (limit "
                f"{self.max_queue}); retry later",
                self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        item = _Item(x, key, loop.create_future(), time.perf_counter())
        self._last_arrival = item.t_enqueued
        self._pending.append(item)
        self._pending_rows += b
        self._load_peak = max(self._load_peak, self._pending_rows + self._solving_rows)
        if self._fill_key is None:
            self._wakeup.set()
        elif key == self._fill_key:
            self._fill_rows += b
            if self._fill_rows >= self._fill_target:
                self._wakeup.set()
        # Another key's request while a batch fills: the worker sees it once that batch left.
        return item.future

    def retry_after(self) -> int:
        """Seconds a client should wait: the time to solve what is queued, at least 1."""
        per_batch = self._solve_s_ema or 0.05
        batches = -(-max(1, self._pending_rows) // self.max_batch_size)
        return max(1, round(per_batch * batches + 0.5))

    def target_rows(self) -> int:
        """Rows worth waiting for: the most rows that were queued or solving at once during
        the latest batches (the load callers offer), capped by ``max_batch_size``. A lone
        caller never waits; under load a batch waits up to ``max_delay`` to grow to it."""
        return max(1, min(self.max_batch_size, max(self._recent_load, default=1)))

    async def close(self) -> None:
        """Stop accepting, answer everything already queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.shield(self._worker)
        finally:
            self._executor.shutdown(wait=False)

    # ---- worker --------------------------------------------------------------------------------
    def _rows_for(self, key: Hashable) -> int:
        return sum(it.rows for it in self._pending if it.key == key)

    def _take(self, key: Hashable) -> list[_Item]:
        """Remove and return the oldest requests under ``key`` that fit one batch (and the
        room left under ``max_solving_rows``); the oldest one always."""
        cap = min(self.max_batch_size, self.max_solving_rows - self._solving_rows)
        batch: list[_Item] = []
        rows = 0
        keep: deque[_Item] = deque()
        for it in self._pending:
            fits = rows + it.rows <= cap or not batch
            if it.key == key and fits and rows < cap:
                batch.append(it)
                rows += it.rows
            else:
                keep.append(it)
        self._pending = keep
        self._pending_rows -= rows
        return batch

    def _holds(self, s: _Solve, it: _Item) -> bool:
        """Does solve ``s`` in flight keep request ``it`` for its key's next batch? Yes when
        ``it`` has the same key and ``s`` has no request over ``COMPARABLE × it.rows`` rows
        (a request of its size: ``it`` waits for ``s`` to end), or ``s`` is young
        (:meth:`_young`)."""
        if s.key != it.key:
            return False
        return s.largest <= COMPARABLE * it.rows or s.turn.computed() < s.hold_s

    def _young(self) -> list[_Solve]:
        """Solves that have computed less than their ``hold_s``: their key's next requests
        wait to join its next batch rather than start one of their own.

        ``hold_s = slice × batch rows / rows of its largest request``: a request waits for
        a batch of its key until the largest request in it has had a slice of computing
        at an equal share per row: behind one large request (256 rows alone), one slice.
        (Behind requests of its own size a request waits for the whole solve:
        :meth:`_holds`.)
        """
        return [s for s in self._solves if s.turn.computed() < s.hold_s]

    def _startable(self) -> _Item | None:
        """The oldest request that may start a solve now: no solve in flight holds it
        (:meth:`_holds`), and its rows fit under ``max_solving_rows``."""
        for it in self._pending:
            if any(self._holds(s, it) for s in self._solves):
                continue
            if self._solving_rows and self._solving_rows + it.rows > self.max_solving_rows:
                return None  # in order: a large request is not overtaken forever
            return it
        return None

    def _reopens_in(self) -> float | None:
        """Seconds until a young solve may have computed its ``hold_s``, when requests of
        its key wait (``None``: only a wake-up can make one startable)."""
        keys = {it.key for it in self._pending}
        left = [s.hold_s - s.turn.computed() for s in self._young() if s.key in keys]
        return max(min(left), 0.002) if left else None

    def _drop_gone(self) -> None:
        """Take the requests whose callers are gone (their futures cancelled) off the queue:
        no one awaits their rows. A caller that went away while its request waited (a
        client's deadline, a shutdown's grace run out) would otherwise still be solved,
        and at shutdown the process would stay until the whole queue was."""
        if any(it.future.cancelled() for it in self._pending):
            gone = [it for it in self._pending if it.future.cancelled()]
            self._pending = deque(it for it in self._pending if not it.future.cancelled())
            self._pending_rows -= sum(it.rows for it in gone)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Checked and cleared within one event-loop step: no wake-up is lost.
            self._drop_gone()
            while (first := self._startable()) is None:
                if self._closing and not self._pending:
                    if self._solves:
                        await asyncio.gather(
                            *(s.task for s in self._solves if s.task), return_exceptions=True
                        )
                    return
                self._wakeup.clear()
                timeout = self._reopens_in()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                self._drop_gone()
            deadline = first.t_enqueued + self.max_delay_s
            target = self.target_rows()
            self._fill_key, self._fill_target = first.key, target
            self._fill_rows = self._rows_for(first.key)
            while not self._closing and self._fill_rows < target:
                until = min(deadline, self._last_arrival + self.max_gap_s)
                remaining = until - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                # A timeout ends the wait, not the batch: arrivals since (which do not wake
                # the worker) may have moved the gap's end; the loop re-checks it.
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            self._fill_key = None
            self._drop_gone()  # callers may have gone while the batch filled
            batch = self._take(first.key)
            if not batch:
                continue
            rows = sum(it.rows for it in batch)
            self._solving_rows += rows
            self._recent_load.append(self._load_peak)
            self._load_peak = self._pending_rows + self._solving_rows
            largest = max(it.rows for it in batch)
            hold_s = self._gate.slice_s * rows / largest
            solve = _Solve(first.key, rows, self._gate.ticket(), hold_s, largest)
            self._solves.append(solve)
            solve.task = loop.create_task(self._solve_batch(batch, solve))

    async def _solve_batch(self, batch: list[_Item], solve: _Solve) -> None:
        """Solve one batch in a thread and answer its callers (a task of its own). Once
        every caller is gone (cancelled), the solve stops at its next iteration
        (:class:`Abandoned`)."""
        loop = asyncio.get_running_loop()
        x = batch[0].x if len(batch) == 1 else torch.cat([it.x for it in batch])
        n = int(x.shape[0])
        gone = threading.Event()  # read by the solving thread between two iterations
        waiting = len(batch)

        def left(future: asyncio.Future) -> None:  # O(1): a batch may hold hundreds
            nonlocal waiting
            if future.cancelled():
                waiting -= 1
                if not waiting:
                    gone.set()

        for it in batch:
            it.future.add_done_callback(left)
        try:
            out, t_start = await loop.run_in_executor(
                self._executor, self._solve_gated, x, solve.key, solve.turn, gone
            )
        except Abandoned:
            log.info("%s: a solve of %d rows stopped: its callers are gone", self.name, n)
            return
        except BaseException as e:  # every caller must get an answer, even on cancellation
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(
                        e if isinstance(e, SolveFailed) else SolveFailed(str(e))
                    )
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            self._solving_rows -= n
            self._solves.remove(solve)
            self._wakeup.set()
        solve_s = time.perf_counter() - t_start
        self._solve_s_ema = (
            solve_s if self._solve_s_ema is None else 0.8 * self._solve_s_ema + 0.2 * solve_s
        )
        waits = [t_start - it.t_enqueued for it in batch]
        # One split per output for the whole batch (a C++ loop): slicing each output per caller
        # cost the event loop ~40 µs a request at batch 64.
        sizes = [it.rows for it in batch]
        parts = {k: v.split(sizes) for k, v in out.rows.items()}
        for i, (it, wait) in enumerate(zip(batch, waits, strict=True)):
            if not it.future.done():  # the caller may have gone away
                rows = {k: p[i] for k, p in parts.items()}
                it.future.set_result(Answer(rows, out.info, wait, n))
        if self._on_batch is not None:
            try:
                self._on_batch(n, waits)
            except Exception:  # metrics must never stop the worker
                log.exception("batch hook failed")

    def _solve_gated(
        self, x: Tensor, key: Hashable, ticket: Turn, gone: threading.Event
    ) -> tuple[BatchOutput, float]:
        """Run the solve (in a batcher thread) once the gate lets it: the output and the
        time it started computing, where its callers' queue wait ends. A failure is logged
        with its traceback and reaches every caller of the batch as :class:`SolveFailed`;
        once ``gone`` is set (every caller cancelled) it raises :class:`Abandoned` at the
        next iteration boundary."""

        def between() -> None:
            if gone.is_set():
                raise Abandoned
            turn.between()

        with self._gate.turn(ticket) as turn:
            assert turn.started is not None
            try:
                out = self._solve(x, key, between)
                n = int(x.shape[0])
                # Checked here, where a failure reaches every caller: the event loop splits
                # each output by the callers' rows, which needs exactly n.
                wrong = {k: int(v.shape[0]) for k, v in out.rows.items() if v.shape[0] != n}
                if wrong:
                    raise RuntimeError(f"outputs {wrong} do not have the batch's {n} rows")
                return out, turn.started
            except Abandoned:
                raise
            except Exception as e:
                log.exception("solve of %s failed", self.name)
                raise SolveFailed(f"solver error in model {self.name}: {e}") from e
