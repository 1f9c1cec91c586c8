"""The model repository: ``<model_dir>/<name>/<version>/model.pt`` (+ optional card.json).

Versions are positive integers; the highest version that loaded is a model's default. A
checkpoint that fails to load is listed with its error and never stops the others. New,
changed (mtime or size) and removed versions are picked up by :meth:`Repository.refresh`,
which the poller calls every ``poll_interval_s`` and the admin reload calls on demand. A
replaced version keeps answering what it had queued before it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from model_core import CheckpointError, load_checkpoint

from .engine import ServedModel
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("mondeq.service")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[0-9]{1,9}$")
CHECKPOINT = "model.pt"
CARD = "card.json"


class NotFound(Exception):
    """No such model or version in the repository."""


class NotReady(Exception):
    """The model or version exists but cannot serve (loading or failed); says why."""


@dataclass
class VersionEntry:
    """One ``<name>/<version>`` on disk and its load state."""

    name: str
    version: int
    path: Path
    stamp: tuple[int, int]
    status: str = "loading"  # loading | ready | failed
    error: str | None = None
    served: ServedModel | None = None
    changed_at: float = field(default_factory=time.time)

    def summary(self) -> dict:
        out = {"version": str(self.version), "status": self.status, "error": self.error}
        if self.served is not None:
            out.update(self.served.describe())
        return out


def scan(model_dir: Path) -> dict[str, dict[int, tuple[Path, tuple[int, int]]]]:
    """``{name: {version: (model.pt path, (mtime_ns, size))}}`` for every checkpoint found."""
    found: dict[str, dict[int, tuple[Path, tuple[int, int]]]] = {}
    try:
        names = sorted(p for p in model_dir.iterdir() if p.is_dir() and NAME_RE.match(p.name))
    except OSError:
        return found
    for d in names:
        versions = {}
        try:
            subdirs = list(d.iterdir())
        except OSError:
            continue
        for v in subdirs:
            if not VERSION_RE.match(v.name) or int(v.name) < 1:
                continue
            ckpt = v / CHECKPOINT
            try:
                st = ckpt.stat()
            except OSError:
                continue  # a version folder still being written
            versions[int(v.name)] = (ckpt, (st.st_mtime_ns, st.st_size))
        if versions:
            found[d.name] = versions
    return found


def read_card(folder: Path) -> dict:
    """``card.json`` as a dict (``{}`` when absent or unreadable)."""
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


class Repository:
    """Every model version the server knows, and their loading.

    All mutation happens in the event loop; loading runs in worker threads.
    """

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.device = settings.resolve_device()
        self.entries: dict[str, dict[int, VersionEntry]] = {}
        self.initial_load_done = False
        self.closing = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        self._initial: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin the first load in the background (the server answers meanwhile: not ready
        until it is done) and the poller."""
        self._loop = asyncio.get_running_loop()
        self._initial = asyncio.create_task(self._first_load(), name="initial-load")

    async def _first_load(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.exception("initial load failed")
        self.initial_load_done = True
        if self.settings.poll_interval_s > 0 and not self.closing:
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def _poll(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("repository poll failed")

    async def close(self) -> None:
        """Stop polling and loading; answer what every queue holds; stop the workers."""
        self.closing = True
        for task in (self._poller, self._initial):
            if task is not None and not task.done():
                task.cancel()
        async with self._lock:
            served = [e.served for vs in self.entries.values() for e in vs.values() if e.served]
            await asyncio.gather(*(s.close() for s in served), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """The server is ready: first load done, not closing, some model can serve."""
        return (
            self.initial_load_done
            and not self.closing
            and any(self.default_entry(n) is not None for n in self.entries)
        )

    def names(self) -> list[str]:
        return sorted(self.entries)

    def default_entry(self, name: str) -> VersionEntry | None:
        """The highest ready version of ``name``, or ``None``."""
        versions = self.entries.get(name) or {}
        for v in sorted(versions, reverse=True):
            if versions[v].status == "ready":
                return versions[v]
        return None

    def entry(self, name: str, version: str | None = None) -> VersionEntry:
        """The entry a request names (``version`` ``None``: the default).

        Raises:
            NotFound: unknown model or version.
            NotReady: the model has no ready version, or this version is not ready.
        """
        versions = self.entries.get(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}; available: {self.names()}")
        if version is None:
            e = self.default_entry(name)
            if e is None:
                top = versions[max(versions)]
                raise NotReady(
                    f"model {name!r} has no version ready to serve (version {top.version} "
                    f"is {top.status}" + (f": {top.error})" if top.error else ")")
                )
            return e
        if not VERSION_RE.match(version) or int(version) not in versions:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: "
                f"{[str(v) for v in sorted(versions)]}"
            )
        e = versions[int(version)]
        if e.status != "ready":
            raise NotReady(
                f"model {name!r} version {e.version} is {e.status}"
                + (f": {e.error}" if e.error else "")
            )
        return e

    def served(self, name: str, version: str | None = None) -> ServedModel:
        e = self.entry(name, version)
        assert e.served is not None
        return e.served

    # ---- loading -------------------------------------------------------------------------------
    async def refresh(self, only: str | None = None, force: bool = False) -> dict:
        """Rescan the folder: load new and changed versions, drop removed ones.

        Args:
            only: limit the rescan to this model name.
            force: reload ``only``'s versions (or all) even if unchanged on disk.

        Returns:
            ``{"loaded": [...], "failed": [...], "removed": [...]}`` of ``name/version``.
        """
        async with self._lock:
            found = await asyncio.to_thread(scan, self.settings.model_dir)
            if only is not None:
                found = {only: found[only]} if only in found else {}
            report: dict[str, list[str]] = {"loaded": [], "failed": [], "removed": []}
            names = [only] if only is not None else list(self.entries)
            for name in names:
                for v in list(self.entries.get(name, {})):
                    if v not in found.get(name, {}):
                        self._retire(self.entries[name].pop(v))
                        report["removed"].append(f"{name}/{v}")
                if name in self.entries and not self.entries[name]:
                    del self.entries[name]
                    self.metrics.forget_model(name)
            # Newest versions first: the default becomes servable soonest.
            todo = [(n, v, p, s) for n, vs in found.items() for v, (p, s) in vs.items()]
            todo.sort(key=lambda t: (-t[1], t[0]))
            for name, version, path, stamp in todo:
                if self.closing:
                    break
                old = self.entries.get(name, {}).get(version)
                if old is not None and old.stamp == stamp and not force:
                    continue
                if old is None:
                    self.entries.setdefault(name, {})[version] = VersionEntry(
                        name, version, path, stamp
                    )
                    self._update_metrics(name)
                new = await self._load(name, version, path, stamp)
                if self.closing:
                    if new.served is not None:
                        self._retire(new)
                    break
                self.entries.setdefault(name, {})[version] = new
                if old is not None and old.served is not None:
                    self._retire(old)
                report["loaded" if new.status == "ready" else "failed"].append(f"{name}/{version}")
                self._update_metrics(name)
            return report

    async def _load(
        self, name: str, version: int, path: Path, stamp: tuple[int, int]
    ) -> VersionEntry:
        entry = VersionEntry(name, version, path, stamp)
        try:
            served = await asyncio.to_thread(self._build, name, version, path)
        except CheckpointError as e:  # the message names the file and the reason
            entry.status, entry.error = "failed", str(e)
        except Exception as e:  # a bad checkpoint must never stop the others
            entry.status, entry.error = "failed", f"{path}: {type(e).__name__}: {e}"
        if entry.status == "failed":
            log.error("%s/%s failed to load: %s", name, version, entry.error)
            return entry
        served.start()
        entry.served, entry.status = served, "ready"
        log.info(
            "%s/%s ready: %s, %s parameters, α %s, on %s",
            name,
            version,
            served.model.arch,
            f"{served.model.num_parameters():,}",
            served.solver.alpha,
            served.device,
        )
        return entry

    def _build(self, name: str, version: int, path: Path) -> ServedModel:
        """Load and tune one checkpoint (in a worker thread)."""
        model = load_checkpoint(path, map_location=self.device)
        served = ServedModel(
            name,
            version,
            model,
            path=path,
            card=read_card(path.parent),
            settings=self.settings,
            metrics=self.metrics,
            on_alpha=self._alpha_changed,
        )
        served.tune_at_load()
        return served

    def _retire(self, entry: VersionEntry) -> None:
        """Close a replaced or removed version once its queue is answered."""
        if entry.served is None:
            return
        task = asyncio.create_task(entry.served.close(), name=f"retire-{entry.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- metrics -------------------------------------------------------------------------------
    def _alpha_changed(self, served: ServedModel) -> None:
        """α of ``served`` changed (called from the tuning thread): refresh its gauges."""
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
            self._loop.call_soon_threadsafe(self._update_metrics, served.name)

    def _update_metrics(self, name: str) -> None:
        m = self.metrics
        e = self.default_entry(name)
        m.model_ready.labels(name).set(1 if e is not None else 0)
        if e is None or e.served is None:
            return
        s = e.served.solver
        m.set_model_info(name, str(e.version), e.served.model.arch, s.method)
        m.solver_alpha.labels(name).set(s.alpha or 0.0)
        m.solver_max_iter.labels(name).set(s.max_iter)
        m.solver_tol.labels(name).set(s.tol)

    def describe(self) -> list[dict]:
        """``/v1/models``: every model with its versions, newest first."""
        out = []
        for name in self.names():
            versions = self.entries[name]
            default = self.default_entry(name)
            top = versions[max(versions)]
            shown = default or top
            item = {
                "name": name,
                "default_version": str(default.version) if default else None,
                "status": "ready" if default else top.status,
                "error": None if default else top.error,
                "versions": [versions[v].summary() for v in sorted(versions, reverse=True)],
            }
            if shown.served is not None:
                item.update(shown.served.describe())
            out.append(item)
        return out
