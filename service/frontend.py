"""``mondeq serve --workers N``: N HTTP worker processes in front of one solver process.

The solver process (the one ``mondeq serve`` started) owns the model repository: loading,
α tuning, the batchers and the solves, and the solver metrics. It binds the HTTP socket and
spawns ``N`` worker processes that accept on it; each worker runs the same FastAPI app as the
single-process server, so every route, decoder and encoder is the one of ``--workers 1``.
Request parsing (JSON, images, answers) thus runs in the workers, and the solver process's
GIL serves the solves and the batchers.

The boundary is the repository and the solve entry (:func:`service.runtime.solve`):

* A worker's repository is a :class:`WorkerRepository`: a mirror of the solver's entries,
  pushed by the solver after each change (a load, reload, unload, α search, the poller),
  in which each served version is a :class:`RemoteServed`. Lookups (404 unknown, 503 not
  ready), readiness and metadata therefore run in the worker on the same code. Its
  coroutine methods (``refresh`` and any other public one) run in the solver process; the
  solver pushes the new state to every worker before it answers, so the next request on any
  worker sees it.
* ``RemoteServed.infer`` checks the request's work (422) in the worker, writes the pixels
  into the worker's shared-memory arena (a ``memfd`` the solver maps once) and sends the
  solver a small message (model, version, :class:`~service.engine.SolveKey`, where the
  tensor lies) on a Unix socket. The solver queues it in the model's batcher like any local
  request and sends back the caller's rows. The batcher's errors come back as the same
  exception classes, so :func:`service.runtime.solve` turns them into the same answers
  (429 with ``Retry-After``, 503, 500).
* Admin α searches run in the solver process (``RemoteServed.tuner``).

Metrics: one Prometheus view per server. The request metrics are counted where the request
is (each worker's :class:`~service.middleware.Guard`), the solver metrics where the solve
is. A scrape on any worker asks the solver process, which collects every worker's registry
over their sockets at that moment, adds its own and sums the samples of equal name and
labels (counters and histograms add, ``*_created`` takes the earliest); the worker's
``/metrics`` route then exposes that sum. Nothing is counted twice: the solver serves no
HTTP and the workers solve nothing.

Shutdown: SIGTERM (or SIGINT) on the solver process is passed to every worker; each stops
accepting, finishes its requests in flight (the solver keeps solving meanwhile) and exits;
then the solver process answers what its queues hold and exits 0. A worker that dies is
replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import io
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client.metrics_core import Metric
from torch import Tensor

from model_core import InputSpec, SolverSettings

from .alpha import in_search_thread
from .batcher import Answer, Closed
from .engine import ServedModel, SolveKey
from .metrics import Metrics
from .repository import NotFound, NotReady, Repository, settle_heap
from .settings import Settings

log = logging.getLogger("mondeq.service")

_HEADER = struct.Struct("!I")
# How often the solver checks its repository for a change the workers have not seen (the
# poller's loads; admin calls push at once).
PUBLISH_INTERVAL_S = 0.1
ARENA_BYTES = 64 << 20  # per worker: 256 requests of 256 Fashion-MNIST rows in flight


# ---- messages ---------------------------------------------------------------------------------


class _Pickler(pickle.Pickler):
    """Tensors travel as NumPy arrays (a flat buffer, not torch's storage pickling), and, from
    the solver, a :class:`ServedModel` as the metadata a worker needs (:func:`_served_meta`)."""

    def persistent_id(self, obj):
        if isinstance(obj, Tensor):
            return ("tensor", obj.detach().cpu().numpy())
        if isinstance(obj, ServedModel):
            return ("served", _served_meta(obj))
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, served: Callable[[dict], Any] | None):
        super().__init__(io.BytesIO(data))
        self._served = served

    def persistent_load(self, pid):
        kind, value = pid
        if kind == "tensor":
            return torch.from_numpy(value)
        if kind == "served" and self._served is not None:
            return self._served(value)
        raise pickle.UnpicklingError(f"unexpected {kind!r} in a message")


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


@dataclass(frozen=True)
class _Raised:
    """An exception as it crosses the socket: its class by name, its message and attributes
    (``QueueFull.retry_after``), so that the other side raises the same class."""

    module: str
    qualname: str
    args: tuple
    attrs: dict

    @classmethod
    def of(cls, e: BaseException) -> _Raised:
        attrs = {k: v for k, v in vars(e).items() if _plain(v)}
        args = tuple(a for a in e.args if _plain(a)) or (str(e),)
        return cls(type(e).__module__, type(e).__qualname__, args, attrs)

    def exception(self) -> BaseException:
        try:
            kind = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                kind = getattr(kind, part)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                raise TypeError(self.qualname)
        except Exception:
            return RuntimeError(f"{self.qualname}: {self.args[0] if self.args else ''}")
        e = kind.__new__(kind)
        e.args = self.args
        e.__dict__.update(self.attrs)
        return e


def _plain(v) -> bool:
    """Plain data, safe to rebuild on the other side (``ApiError.headers`` included)."""
    if isinstance(v, dict):
        return all(_plain(k) and _plain(x) for k, x in v.items())
    if isinstance(v, list | tuple):
        return all(_plain(x) for x in v)
    return isinstance(v, str | int | float | bool | type(None))


# Calls worth nothing but their answer: when the side that made them goes away (a worker
# that stopped once its shutdown grace ran out) they are cancelled, so that the solver drops
# their queued rows and stops a solve none of whose callers is left, as it does for a request
# cancelled in its own process. Without this it solved the queue for no one before it
# exited: minutes past the grace. Admin calls (repository, α search) go on to their end.
ANSWER_ONLY_OPS = frozenset({"infer"})


class Channel:
    """Calls both ways over one stream: ``await call(op, *args)`` runs ``handler(op, *args)``
    on the other side and returns its value or raises its exception (:class:`_Raised`).

    Frames are a 4-byte length and a pickle; a call is ``("call", id, op, args)``, its
    answer ``("ok" | "err", id, value)``. Calls are answered in any order (each runs as a
    task of its own); when the stream closes, those of :data:`ANSWER_ONLY_OPS` still running
    are cancelled. ``served`` turns a served model's metadata into the local stand-in.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Callable[..., Awaitable[Any]],
        served: Callable[[dict], Any] | None = None,
    ):
        self._reader, self._writer, self._handler, self._served = reader, writer, handler, served
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._answer_only: set[asyncio.Task] = set()
        self.closed = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._read())

    def _send(self, message) -> None:
        data = _dumps(message)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def call(self, op: str, *args):
        """Run ``op`` on the other side.

        Raises:
            Closed: the other side went away before answering.
            whatever the other side's handler raised (the same class).
        """
        if self.closed.done():
            raise Closed("the solver process is gone")
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        try:
            self._send(("call", i, op, args))
        except Exception:
            del self._waiting[i]
            raise
        return await fut

    async def _read(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(_HEADER.size)
                data = await self._reader.readexactly(_HEADER.unpack(head)[0])
                kind, i, *rest = _Unpickler(data, self._served).load()
                if kind == "call":
                    task = asyncio.create_task(self._answer(i, *rest))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    if rest[0] in ANSWER_ONLY_OPS:
                        self._answer_only.add(task)
                        task.add_done_callback(self._answer_only.discard)
                    continue
                fut = self._waiting.pop(i, None)
                if fut is None or fut.done():
                    continue
                if kind == "ok":
                    fut.set_result(rest[0])
                else:
                    fut.set_exception(rest[0].exception())
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("front-end channel failed")
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(Closed("the solver process is gone"))
            self._waiting.clear()
            for task in list(self._answer_only):  # no one is left to answer
                task.cancel()
            if not self.closed.done():
                self.closed.set_result(None)

    async def _answer(self, i: int, op: str, args: tuple) -> None:
        try:
            value = await self._handler(op, *args)
        except Exception as e:
            message = ("err", i, _Raised.of(e))
        else:
            message = ("ok", i, value)
        if self.closed.done():
            return
        try:
            self._send(message)
        except Exception as e:  # an answer that does not pickle is a bug, not a hang
            log.exception("front-end answer to %s failed", op)
            self._send(("err", i, _Raised.of(RuntimeError(f"{op}: {e}"))))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        await asyncio.gather(self._pump, return_exceptions=True)


async def _open_channel(path: str, handler, served) -> Channel:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    return Channel(reader, writer, handler, served)


# ---- shared memory ----------------------------------------------------------------------------


class Arena:
    """A worker's shared memory for request tensors: a ``memfd`` the solver maps once, cut
    into blocks first-fit (64-byte aligned). Only the worker's event loop allocates and
    frees, so no lock is taken. A block stays allocated until the solver has answered."""

    ALIGN = 64

    def __init__(self, size: int):
        self.size = size
        self.fd = os.memfd_create("mondeq-frontend", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted

    def put(self, x: Tensor) -> tuple[int, int] | None:
        """Copy ``x`` into a free block: ``(offset, length)``, or ``None`` when none fits."""
        n = x.numel() * x.element_size()
        need = max(self.ALIGN, -(-n // self.ALIGN) * self.ALIGN)
        for k, (off, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[k]
                else:
                    self._free[k] = (off + need, length - need)
                flat = x.detach().contiguous().reshape(-1)
                self.bytes[off : off + n].copy_(flat.view(torch.uint8))
                return off, need
        return None

    def release(self, off: int, length: int) -> None:
        free = self._free
        k = 0
        while k < len(free) and free[k][0] < off:
            k += 1
        free.insert(k, (off, length))
        if k + 1 < len(free) and off + length == free[k + 1][0]:
            free[k] = (off, length + free.pop(k + 1)[1])
        if k > 0 and free[k - 1][0] + free[k - 1][1] == off:
            prev = free.pop(k - 1)
            free[k - 1] = (prev[0], prev[1] + free[k - 1][1])


def _map_arena(pid: int, fd: int, size: int) -> Tensor:
    """The solver's view of a worker's arena (through ``/proc``: Linux's memfd)."""
    mfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    try:
        return torch.frombuffer(mmap.mmap(mfd, size), dtype=torch.uint8)
    finally:
        os.close(mfd)


# ---- the solver process -----------------------------------------------------------------------


def _served_meta(s: ServedModel) -> dict:
    """What a worker knows of a served version (:class:`RemoteServed`)."""
    spec = s.input_spec
    return {
        "name": s.name,
        "version": s.version,
        "spec": (spec.shape, spec.mean, spec.std, spec.class_names),
        "solver": s.solver,
        "lipschitz": s.lipschitz,
        "loaded_at": s.loaded_at,
        "path": s.path,
        "card": s.card,
        "device": str(s.device),
        "dtype": s.dtype,
        "accuracy": s.accuracy(),
        "describe": s.describe(),
        "tuner": {"last": s.tuner.last, "tunable": s.tuner.tunable, "label": s.tuner.label},
        "stats": s.stats.snapshot(s.name, str(s.version)),
    }


class SolverHost:
    """The solver process's side: the repository and one :class:`Channel` per worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.repo = Repository(settings, self.metrics)
        self.workers: dict[Channel, Tensor | None] = {}
        self.greeted: set[int] = set()  # pids of the workers that connected
        self._server: asyncio.AbstractServer | None = None
        self._published: tuple | None = None
        self._publisher: asyncio.Task | None = None

    async def start(self, path: str) -> None:
        await self.repo.start()
        self._server = await asyncio.start_unix_server(self._connected, path, limit=1 << 20)
        self._publisher = asyncio.create_task(self._publish_changes())

    async def close(self) -> None:
        """Answer what the queues hold, then stop (after the workers have exited)."""
        if self._publisher is not None:
            self._publisher.cancel()
        if self._server is not None:
            self._server.close()
        await self.repo.close()
        for ch in list(self.workers):
            await ch.close()

    async def _connected(self, reader, writer) -> None:
        ch: Channel | None = None

        async def handle(op: str, *args):
            return await self._handle(ch, op, *args)

        ch = Channel(reader, writer, handle)
        self.workers[ch] = None
        await ch.closed
        self.workers.pop(ch, None)

    # ---- the repository state the workers mirror ------------------------------------------
    def state(self) -> dict:
        """The repository's public state (its entries, ``initial_load_done``, ``closing``,
        ``unloaded``, ...): every public attribute but the settings and metrics, which each
        worker has its own of."""
        return {
            k: v
            for k, v in vars(self.repo).items()
            if not k.startswith("_") and k not in ("settings", "metrics")
        }

    def _fingerprint(self) -> tuple:
        r = self.repo
        items = []
        for name, versions in sorted(r.entries.items()):
            for v, e in sorted(versions.items()):
                s = e.served
                items.append(
                    (
                        name,
                        v,
                        e.status,
                        e.error,
                        e.reload.to_dict() if e.reload else None,
                        id(s),
                        s.solver if s is not None else None,
                        id(s.tuner.last) if s is not None else None,
                    )
                )
        unloaded = tuple(sorted(getattr(r, "unloaded", ())))
        return (r.initial_load_done, r.closing, unloaded, tuple(items))

    async def publish(self) -> None:
        """Send the repository's state to every worker and wait until each has it."""
        self._published = self._fingerprint()
        state = self.state()
        await asyncio.gather(
            *(ch.call("state", state) for ch in list(self.workers)), return_exceptions=True
        )

    async def _publish_changes(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                if self.workers and self._fingerprint() != self._published:
                    await self.publish()
            except Exception:
                log.exception("publishing the repository to the workers failed")

    # ---- calls from the workers -------------------------------------------------------------
    async def _handle(self, ch: Channel, op: str, *args):
        if op == "infer":
            return await self._infer(ch, *args)
        if op == "hello":
            pid, fd, size = args
            self.workers[ch] = _map_arena(pid, fd, size) if fd is not None else None
            self.greeted.add(pid)
            return self.state()
        if op == "repo":
            method, a, kw = args
            try:
                return await getattr(self.repo, method)(*a, **kw)
            finally:
                await self.publish()
        if op == "tune":
            name, version, reason, source, apply = args
            served = self.repo.served(name, version)
            try:
                return await in_search_thread(served.tuner.tune, reason, source, apply)
            finally:
                await self.publish()
        if op == "metrics":
            return await self._metrics()
        if op == "state":
            return self.state()
        raise ValueError(f"unknown front-end call {op!r}")

    async def _infer(self, ch: Channel, name: str, version: int, key: SolveKey, x) -> Answer:
        if isinstance(x, tuple):  # (offset, nbytes, dtype, shape) in the worker's arena
            off, n, dtype, shape = x
            arena = self.workers.get(ch)
            if arena is None:
                raise Closed("no shared memory mapped for this worker")
            x = arena[off : off + n].view(dtype).view(shape)
        try:
            served = self.repo.served(name, str(version))
        except (NotFound, NotReady) as e:
            # The worker saw this version serve; it left meanwhile (as a retired batcher).
            raise Closed(f"model {name} version {version}: {e}") from None
        return await served.infer(x, key)

    async def _metrics(self) -> list[Metric]:
        views = await asyncio.gather(
            *(ch.call("collect") for ch in list(self.workers)), return_exceptions=True
        )
        families = [list(self.metrics.registry.collect())]
        families += [v for v in views if isinstance(v, list)]
        return merge_families(families)


def merge_families(views: list[list[Metric]]) -> list[Metric]:
    """One exposition from several registries: samples of equal name and labels add up
    (counters, histogram buckets, sums and counts, the in-flight gauge), except
    ``*_created``, which takes the earliest. Families keep the order they first appear in."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, list]] = {}
    for families in views:
        for f in families:
            if f.name not in merged:
                merged[f.name] = Metric(f.name, f.documentation, f.type, f.unit)
                values[f.name] = {}
            acc = values[f.name]
            for s in f.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in acc:
                    acc[key] = [s.name, dict(s.labels), s.value]
                elif s.name.endswith("_created"):
                    acc[key][2] = min(acc[key][2], s.value)
                else:
                    acc[key][2] += s.value
    for name, m in merged.items():
        for sample_name, labels, value in values[name].values():
            m.add_sample(sample_name, labels, value)
    return list(merged.values())


# ---- a worker process -------------------------------------------------------------------------


class SolverClient:
    """A worker's connection to the solver process, with its shared-memory arena."""

    def __init__(self, path: str, on_state: Callable[[dict], None], metrics: Metrics):
        self.path, self.on_state, self.metrics = path, on_state, metrics
        self.channel: Channel | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        try:
            self.arena: Arena | None = Arena(ARENA_BYTES)
        except (AttributeError, OSError):  # no memfd here: tensors go in the message
            self.arena = None

    async def connect(self, served: Callable[[dict], Any]) -> dict:
        self.loop = asyncio.get_running_loop()
        self.channel = await _open_channel(self.path, self._handle, served)
        a = self.arena
        hello = (os.getpid(), a.fd, a.size) if a is not None else (os.getpid(), None, 0)
        return await self.channel.call("hello", *hello)

    async def _handle(self, op: str, *args):
        if op == "state":
            self.on_state(args[0])
            return None
        if op == "collect":
            return list(self.metrics.registry.collect())
        raise ValueError(f"unknown solver call {op!r}")

    async def call(self, op: str, *args):
        if self.channel is None:
            raise Closed("the server is starting")
        return await self.channel.call(op, *args)

    def call_blocking(self, op: str, *args):
        """:meth:`call` from a thread other than the event loop's (admin α searches)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self.call(op, *args), self.loop).result()

    async def infer(self, name: str, version: int, key: SolveKey, x: Tensor) -> Answer:
        block = self.arena.put(x) if self.arena is not None else None
        if block is None:  # no arena, or it is full: the tensor goes in the message
            return await self.call("infer", name, version, key, x)
        off, length = block
        n = x.numel() * x.element_size()
        try:
            return await self.call("infer", name, version, key, (off, n, x.dtype, tuple(x.shape)))
        finally:
            self.arena.release(off, length)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class _RemoteTuner:
    """A served version's α tuner as a worker sees it: its state as of the latest push;
    :meth:`tune` runs the search in the solver process."""

    def __init__(self, client: SolverClient, name: str, version: int, state: dict):
        self._client, self._name, self._version = client, name, version
        self.last, self.tunable, self.label = state["last"], state["tunable"], state["label"]

    def tune(self, reason: str, source: str = "auto", apply: bool = True) -> dict:
        """:meth:`service.alpha.AlphaTuner.tune` in the solver process (blocks the calling
        thread; the same exceptions)."""
        return self._client.call_blocking(
            "tune", self._name, str(self._version), reason, source, apply
        )


class _RemoteStats:
    """A served version's statistics (:class:`service.stats.ModelStats`) as of the latest
    state the worker has (fetched afresh before a ``.../stats`` request: :class:`_Scrape`)."""

    def __init__(self, snapshot: dict):
        self._snapshot = snapshot

    def snapshot(self, name: str, version: str) -> dict:
        return {**self._snapshot, "name": name, "version": version}


class RemoteServed:
    """A served version as a worker sees it: what the routes read of a
    :class:`~service.engine.ServedModel` (name, version, shape, class names, solver
    settings, ``describe()``), its request checks (the same code), and :meth:`infer`, which
    solves in the solver process."""

    key = ServedModel.key
    default_key = ServedModel.default_key
    check_work = ServedModel.check_work
    normalize = ServedModel.normalize

    def __init__(self, meta: dict, settings: Settings, client: SolverClient):
        self.name, self.version = meta["name"], meta["version"]
        self.settings, self._client = settings, client
        self.input_spec = InputSpec(*meta["spec"])
        self.shape = self.input_spec.shape
        self.mean_list, self.std_list = list(self.input_spec.mean), list(self.input_spec.std)
        self.class_names = list(self.input_spec.class_names)
        self.solver: SolverSettings = meta["solver"]
        self.lipschitz, self.loaded_at = meta["lipschitz"], meta["loaded_at"]
        self.path, self.card = meta["path"], meta["card"]
        self.device, self.dtype = torch.device(meta["device"]), meta["dtype"]
        self._accuracy, self._describe = meta["accuracy"], meta["describe"]
        self.tuner = _RemoteTuner(client, self.name, self.version, meta["tuner"])
        self.stats = _RemoteStats(meta["stats"])
        self.batcher = None

    def accuracy(self) -> float | None:
        return self._accuracy

    def describe(self) -> dict:
        """The ``/v1/models`` view, as of the solver's latest push (``queue_rows`` and
        ``solves_in_flight`` included)."""
        return dict(self._describe)

    async def infer(self, x: Tensor, key: SolveKey) -> Answer:
        """:meth:`ServedModel.infer` in the solver process (its work check and statistics
        included), with the same exceptions."""
        return await self._client.infer(self.name, self.version, key, x)

    async def close(self) -> None:
        return None


class WorkerRepository(Repository):
    """The repository as a worker sees it: the solver's entries, pushed after every change
    (each served version a :class:`RemoteServed`). The lookups, ``ready``, ``describe`` and
    every other method that reads the entries run here; the coroutine methods (``refresh``
    and any other public one) run in the solver process, which pushes the new state to
    every worker before answering."""

    def __init__(self, settings: Settings, metrics: Metrics, path: str):
        super().__init__(settings, metrics)
        self.client = SolverClient(path, self._apply, metrics)
        self._local_closing = False

    def _remote(self, meta: dict) -> RemoteServed:
        return RemoteServed(meta, self.settings, self.client)

    def _apply(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.closing = self.closing or self._local_closing

    async def sync(self) -> None:
        """Fetch the solver's state now (the statistics change with every request; the
        pushes follow the repository's changes only)."""
        self._apply(await self.client.call("state"))

    async def start(self) -> None:
        self._apply(await self.client.connect(self._remote))
        settle_heap()  # the worker's app and modules are all loaded by now

    async def close(self) -> None:
        self._local_closing = self.closing = True
        await self.client.close()

    async def _forward(self, method: str, *args, **kwargs):
        return await self.client.call("repo", method, args, kwargs)


def _forwarder(method: str):
    async def forward(self: WorkerRepository, *args, **kwargs):
        return await self._forward(method, *args, **kwargs)

    forward.__name__ = method
    forward.__doc__ = f"``Repository.{method}``, run in the solver process."
    return forward


for _name, _fn in inspect.getmembers(Repository, inspect.iscoroutinefunction):
    if not _name.startswith("_") and _name not in ("start", "close"):
        setattr(WorkerRepository, _name, _forwarder(_name))


# The scrape's merged families, fetched from the solver before the /metrics route runs.
_SCRAPE: contextvars.ContextVar[list[Metric] | None] = contextvars.ContextVar(
    "mondeq_scrape", default=None
)


class _ServerView:
    """The registry a worker's ``/metrics`` route exposes: the whole server's metrics
    fetched for this scrape (:class:`_Scrape`), else this worker's own."""

    def __init__(self, local):
        self.local = local

    def collect(self):
        fetched = _SCRAPE.get()
        return iter(fetched) if fetched is not None else self.local.collect()


class _Scrape:
    """ASGI middleware of a worker (inside the Guard): before ``GET /metrics`` reaches the route,
    fetch the server's merged metrics from the solver process (a call the route, being
    synchronous, cannot make itself); before a ``GET .../stats``, the solver's state with
    its statistics as they are now."""

    def __init__(self, app, repo: Callable[[], WorkerRepository | None]):
        self.app, self.repo = app, repo

    async def __call__(self, scope, receive, send):
        repo = self.repo()
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["type"] != "http" or repo is None:
            await self.app(scope, receive, send)
            return
        if path != "/metrics":
            if path.endswith("/stats") and path.startswith("/v2/models"):
                with contextlib.suppress(Exception):  # the solver gone: the latest state
                    await repo.sync()
            await self.app(scope, receive, send)
            return
        try:
            fetched = await repo.client.call("metrics")
        except Exception:  # the solver is gone: this worker's own view, not an error
            log.exception("collecting the server's metrics failed")
            fetched = None
        token = _SCRAPE.set(fetched)
        try:
            await self.app(scope, receive, send)
        finally:
            _SCRAPE.reset(token)


def worker_app(settings: Settings, path: str):
    """The FastAPI app of a worker: ``create_app`` with a :class:`WorkerRepository` on the
    solver socket ``path`` and the server-wide ``/metrics``."""
    from .app import create_app

    app = create_app(
        settings, repository=lambda s, m: WorkerRepository(s, m, path), share_grpc_port=True
    )
    runtime = app.state.runtime
    runtime.metrics.registry = _ServerView(runtime.metrics.registry)
    app.add_middleware(_Scrape, repo=lambda: runtime.repo)
    return app


def _worker_main(settings: Settings, sock, path: str, index: int) -> None:
    """A worker process: the app on the inherited listening socket, until SIGTERM."""
    import uvicorn

    from .cli import _log_to_stderr, _Server

    torch.set_num_threads(1)  # parsing needs no intra-op threads; the cores are the solver's
    _log_to_stderr(settings.log_level)
    app = worker_app(settings, path)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.graceful_timeout_s,
    )
    server = _Server(config).server

    async def watch_solver() -> None:
        # The solver process went away (killed): stop as a SIGTERM would.
        repo = app.state.runtime.repo
        while repo is None or repo.client.channel is None:
            await asyncio.sleep(0.1)
            repo = app.state.runtime.repo
        await repo.client.channel.closed
        if not repo._local_closing:
            log.error("worker %d: the solver process is gone; stopping", index)
            server.should_exit = True

    original = server.startup
    watchers: list[asyncio.Task] = []

    async def startup(sockets=None):
        await original(sockets=sockets)
        watchers.append(asyncio.create_task(watch_solver()))

    server.startup = startup
    server.run(sockets=[sock])


# ---- the solver process's main ----------------------------------------------------------------


def serve_workers(settings: Settings) -> int:
    """Run the solver process with ``settings.workers`` worker processes until SIGTERM or
    SIGINT; 0 after a graceful stop, 1 when the gRPC port cannot be held
    (:func:`reserve_port`; uvicorn exits 1 itself for the HTTP one).
    """
    import uvicorn

    config = uvicorn.Config(
        "service.app:create_app", host=settings.host, port=settings.port, log_level="warning"
    )
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    grpc_sock = None
    if settings.grpc_port:
        try:
            grpc_sock = reserve_port(settings.host, settings.grpc_port)
        except OSError as e:  # as uvicorn does for a taken HTTP port: said, and exit 1
            sock.close()
            log.error("%s", e.strerror)
            return 1
        # Port 0 (any free one) becomes the one reserved: every worker serves that.
        settings = settings.model_copy(update={"grpc_port": grpc_sock.getsockname()[1]})
    folder = tempfile.mkdtemp(prefix="mondeq-frontend-")
    path = os.path.join(folder, "solver.sock")
    try:
        return asyncio.run(_solver_main(settings, sock, path, host, port))
    finally:
        sock.close()
        if grpc_sock is not None:
            grpc_sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for the workers' gRPC servers: a TCP socket bound (not listening)
    with ``SO_REUSEPORT``. Each worker then listens on the port with ``SO_REUSEPORT`` too, and
    the kernel spreads new connections over the listening ones; a program that binds the port
    without the option fails, as it would against one server process.

    Raises:
        OSError: the port is taken, or the host is no local address (its ``strerror`` names
            the address and why).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host.strip("[]"), port))
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"cannot serve gRPC on {host}:{port}: {e.strerror}") from None
    return s


async def _solver_main(settings: Settings, sock, path: str, host: str, port: int) -> int:
    from model_core.runtime import tune_allocator

    tune_allocator()
    host_ = SolverHost(settings)
    await host_.start(path)
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def spawn(i: int):
        # Every worker serves gRPC too, on the port serve_workers reserved.
        p = ctx.Process(
            target=_worker_main, args=(settings, sock, path, i), name=f"mondeq-worker-{i}"
        )
        p.start()
        return p

    procs = [spawn(i) for i in range(settings.workers)]
    code = 0
    log.info(
        "serving on http://%s:%d with %d worker processes (pids %s) and this solver "
        "process (pid %d)",
        host,
        port,
        len(procs),
        ", ".join(str(p.pid) for p in procs),
        os.getpid(),
    )
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            for i, p in enumerate(procs):
                if not stop.is_set() and not p.is_alive() and p.pid not in host_.greeted:
                    log.error(
                        "worker %d (pid %s) failed to start (exit code %s); stopping",
                        i,
                        p.pid,
                        p.exitcode,
                    )
                    code = 1
                    stop.set()
                elif not stop.is_set() and not p.is_alive():
                    log.error(
                        "worker %d (pid %s) exited with %s; starting another", i, p.pid, p.exitcode
                    )
                    procs[i] = spawn(i)
    finally:
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.graceful_timeout_s + 10
        for p in procs:
            await asyncio.to_thread(p.join, max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %s did not stop in time; killed", p.pid)
                p.kill()
        await host_.close()
    return code
