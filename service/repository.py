"""The model repository: ``<model_dir>/<name>/<version>/model.pt`` (+ optional card.json).

Versions are positive integers; the highest version that loaded is a model's default. A
checkpoint that fails to load is listed with its error and never stops the others. New,
changed (mtime, ctime, size or inode) and removed versions are picked up by
:meth:`Repository.refresh`, which the poller calls every ``poll_interval_s`` and the admin
reload calls on demand. A replaced version keeps answering what it had queued before it is
closed.

A file is loaded only once it has stopped changing: its stamp unchanged for ``settle_s``
(the newest of its mtime and ctime that long ago, or the same stamp seen by scans that far
apart). A version that serves is replaced only by a load that succeeded: when its file
changes and the new file fails to load (a copy still running, a truncated or foreign file),
the loaded weights keep serving and the failure shows in ``/v1/models`` (the version's
``reload``) and in ``mondeq_model_load_failures_total`` / ``mondeq_model_load_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from model_core import CheckpointError, load_checkpoint

from .alpha import in_search_thread
from .engine import ServedModel
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("mondeq.service")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A version is named one way only: 1, not 01 or 001 (two folders "1" and "01" would both be
# version 1, one silently hidden, and an answer would echo a spelling no folder has).
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
CHECKPOINT = "model.pt"
CARD = "card.json"
# Model folders being written under a temporary name (dotfiles never match NAME_RE).
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".new", "~")

Stamp = tuple[int, int, int, int]  # (mtime_ns, ctime_ns, size, inode) of model.pt


class NotFound(Exception):
    """No such model or version in the repository."""


class NotReady(Exception):
    """The model or version exists but cannot serve (loading or failed); says why."""


class Unloaded(Exception):
    """The model was unloaded (:meth:`Repository.unload`) while a load of it ran: the
    load's result was dropped and the model stays unloaded."""


@dataclass
class Reload:
    """The file on disk of a version that serves, when it is not the file that serves."""

    stamp: Stamp
    status: str  # pending (still changing) | failed (did not load; the old weights serve)
    error: str | None = None
    since: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"status": self.status, "error": self.error, "since": self.since}


@dataclass
class VersionEntry:
    """One ``<name>/<version>`` on disk and its load state.

    ``status``: ``pending`` (the file is still changing; not loaded yet), ``loading``,
    ``ready`` or ``failed``; ``error`` says why it cannot serve. ``reload`` describes a newer
    file of a ready version that is pending or failed to load (the loaded weights serve).
    """

    name: str
    version: int
    path: Path
    stamp: Stamp
    status: str = "loading"  # pending | loading | ready | failed
    error: str | None = None
    served: ServedModel | None = None
    changed_at: float = field(default_factory=time.time)
    reload: Reload | None = None

    def summary(self) -> dict:
        out = {
            "version": str(self.version),
            "status": self.status,
            "error": self.error,
            "reload": self.reload.to_dict() if self.reload else None,
        }
        if self.served is not None:
            out.update(self.served.describe())
        return out


def temporary(name: str) -> bool:
    """A folder name that marks work in progress (``fmnist-fc.tmp``): never a model."""
    return name.endswith(TEMP_SUFFIXES)


def in_progress(name: str) -> bool:
    """A name that marks work in progress (a dotfile, ``fmnist-fc.tmp``, ``3.part``): skipped
    without a word, as publishing writes under such names before the rename."""
    return name.startswith(".") or temporary(name)


def scan(
    model_dir: Path, ignored: list[tuple[Path, str]] | None = None
) -> dict[str, dict[int, tuple[Path, Stamp]]]:
    """``{name: {version: (model.pt path, stamp)}}`` for every checkpoint found.

    The stamp is ``(mtime_ns, ctime_ns, size, inode)``: an in-place rewrite changes the
    times and usually the size, a rename into place changes the inode and the ctime, even
    when the new file has the old one's size and (``cp -p``, ``rsync -t``) mtime.

    Args:
        model_dir: the repository root.
        ignored: if given, receives ``(path, why)`` for every folder (and stray
            ``model.pt``) skipped for its name: a model folder whose name is not a model
            name, a folder under a model that is not a version number (``latest/``,
            ``0/``, ``01/``), a ``model.pt`` outside a version folder. Work in progress
            (:func:`in_progress`) is not reported.
    """
    found: dict[str, dict[int, tuple[Path, Stamp]]] = {}
    report = ignored if ignored is not None else []
    try:
        names = []
        for p in sorted(model_dir.iterdir()):
            if not p.is_dir() or in_progress(p.name):
                continue
            if NAME_RE.match(p.name):
                names.append(p)
            else:
                report.append(
                    (
                        p,
                        "not a model name (a letter or digit, then up to 127 letters, "
                        "digits, '.', '_' or '-')",
                    )
                )
    except OSError:
        return found
    for d in names:
        versions = {}
        try:
            subdirs = sorted(d.iterdir())
        except OSError:
            continue
        for v in subdirs:
            if in_progress(v.name):
                continue
            if v.name == CHECKPOINT:
                report.append((v, f"not in a version folder: move it to {d / '1' / CHECKPOINT}"))
                continue
            if not VERSION_RE.match(v.name):
                if v.is_dir():
                    report.append(
                        (v, "not a version number (versions are folders named 1, 2, 3, ...)")
                    )
                continue
            ckpt = v / CHECKPOINT
            try:
                st = ckpt.stat()
            except OSError:
                continue  # a version folder still being written
            versions[int(v.name)] = (ckpt, (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
        if versions:
            found[d.name] = versions
    return found


def settle_heap() -> None:
    """Take what the process holds for good (models, the app, imported modules) out of the
    cyclic garbage collector's sight: ``gc.unfreeze()``, ``gc.collect()``, ``gc.freeze()``.

    Why: serving allocates fast (a few dicts per request), so the collector runs its oldest
    generation every second or so, and with torch and a model loaded that generation holds
    about a million objects: each full collection stopped the event loop and the solver for
    75–135 ms (fmnist-fc at saturation on the 2-core machine: p99 8× p50, every request of a
    batch in flight late). Frozen objects are never scanned, so a full collection then costs
    about a millisecond. Called after every change of the loaded models, once the versions
    it retired have closed (in the event loop, one full collection of ~0.1 s each time);
    unfreezing first lets the collector free the reference cycles of versions retired since
    (objects without cycles are freed by their reference counts whether frozen or not).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def read_card(folder: Path) -> dict:
    """``card.json`` as a dict (``{}`` when absent or unreadable)."""
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


class Repository:
    """Every model version the server knows, and their loading.

    All mutation happens in the event loop; loading runs in worker threads. Changes of the
    entries are short critical sections under one lock; the slow part of a load (reading
    the file, the α search) runs outside it, under a lock of its model's own, so that an
    unload, a listing or another model's load never waits for an α search. A load whose
    version was unloaded or removed meanwhile is dropped when it finishes.
    """

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.device = settings.resolve_device()
        self.entries: dict[str, dict[int, VersionEntry]] = {}
        self.initial_load_done = False
        self.closing = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # retired versions still answering their queues
        self._settle_due = False  # a settle_heap() waits for them (:meth:`_settle`)
        self._poller: asyncio.Task | None = None
        self._initial: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (name, version) -> (stamp, monotonic time it was first seen): the settle rule.
        self._seen: dict[tuple[str, int], tuple[Stamp, float]] = {}
        self._warned: set[Path] = set()  # ignored folders already logged (once each)
        self.started_at: float | None = None  # time.monotonic() at start()
        # Models unloaded on request (:meth:`unload`): the poller leaves them alone until
        # :meth:`load` names them again.
        self.unloaded: set[str] = set()
        self._unloads: dict[str, int] = {}  # name -> how many times it was unloaded
        # name -> loads of it in flight (:meth:`load`): until its scan puts its versions in
        # ``entries``, its requests are told it is loading, not that it is unknown.
        self._loading: dict[str, int] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}  # name -> held while it loads
        # name -> set by its next unload: a load of it in flight stops waiting (its result
        # is dropped when the search thread ends) and its caller is answered at once.
        self._unload_signals: dict[str, asyncio.Event] = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin the first load in the background (the server answers meanwhile: not ready
        until it is done) and the poller."""
        self._loop = asyncio.get_running_loop()
        self.started_at = time.monotonic()
        self._initial = asyncio.create_task(self._first_load(), name="initial-load")

    async def _first_load(self) -> None:
        try:
            report = await self.refresh()
            # Files written just before the start settle first: readiness waits for them
            # (a few rounds at most; a file that keeps changing is left to the poller).
            for _ in range(3):
                if not report["pending"] or self.closing:
                    break
                await asyncio.sleep(self.settings.settle_s)
                report = await self.refresh()
        except Exception:
            log.exception("initial load failed")
        self.initial_load_done = True
        if not self.closing:
            self._log_first_load_done()
        if self.settings.poll_interval_s > 0 and not self.closing:
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    def _log_first_load_done(self) -> None:
        """One line when the first load is over: what serves, what does not, how long."""
        took = time.monotonic() - (self.started_at or time.monotonic())
        serving = [n for n in self.names() if self.default_entry(n) is not None]
        others = [n for n in self.names() if n not in serving]
        if serving:
            log.info(
                "first load done in %.1f s: %d of %d models can serve (%s)%s; ready",
                took,
                len(serving),
                len(self.entries),
                ", ".join(serving),
                f"; not serving: {', '.join(others)}" if others else "",
            )
        else:
            log.warning(
                "first load done in %.1f s: no model can serve from %s%s; not ready",
                took,
                self.settings.model_dir,
                f" (failed or pending: {', '.join(others)})" if others else "",
            )

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
        if not versions and name in self.unloaded:
            raise NotFound(f"model {name!r} is unloaded; load it to serve it again")
        if not versions and name in self._loading:
            raise NotReady(f"model {name!r} is loading (no version of it serves yet)")
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

        A file loads once it is settled (:meth:`_settled`); until then it is ``pending``. A
        load that fails never replaces a version that serves: the old weights keep serving
        and the version's ``reload`` records the failure, which is not retried until the
        file changes again (or ``force``).

        Args:
            only: limit the rescan to this model name.
            force: reload ``only``'s versions (or all) even if unchanged on disk (files still
                changing stay pending).

        Returns:
            ``{"loaded": [...], "failed": [...], "removed": [...], "pending": [...]}`` of
            ``name/version``.
        """
        report: dict[str, list[str]] = {
            "loaded": [],
            "failed": [],
            "removed": [],
            "pending": [],
        }
        async with self._lock:
            ignored: list[tuple[Path, str]] = []
            found = await asyncio.to_thread(scan, self.settings.model_dir, ignored)
            self._warn_ignored(ignored)
            found = {n: vs for n, vs in found.items() if n not in self.unloaded}
            if only is not None:
                found = {only: found[only]} if only in found else {}
            names = [only] if only is not None else list(self.entries)
            for name in names:
                for v in list(self.entries.get(name, {})):
                    if v not in found.get(name, {}):
                        self._retire(self.entries[name].pop(v))
                        self._seen.pop((name, v), None)
                        self.metrics.forget_version(name, str(v))
                        report["removed"].append(f"{name}/{v}")
                if name in self.entries and not self.entries[name]:
                    del self.entries[name]
                    self.metrics.forget_model(name)
                elif name in self.entries:
                    self._update_metrics(name)  # the default may have fallen back
            # Newest versions first: the default becomes servable soonest.
            todo = [(n, v, p, s) for n, vs in found.items() for v, (p, s) in vs.items()]
            todo.sort(key=lambda t: (-t[1], t[0]))
            # Loads run one after another (minutes with α tuning): every version found is
            # listed as loading at once, so that a model not reached yet is 503 (not ready),
            # never 404 (unknown), to clients and probes meanwhile.
            for name, version, path, stamp in todo:
                if version not in self.entries.get(name, {}):
                    self.entries.setdefault(name, {})[version] = VersionEntry(
                        name, version, path, stamp
                    )
                    self._update_metrics(name)
        for name, version, path, stamp in todo:
            if self.closing:
                break
            await self._refresh_version(name, version, path, stamp, force, report)
        async with self._lock:
            for name in [only] if only is not None else list(self.entries):
                self._update_metrics(name)
        if report["loaded"] or report["removed"]:
            self._settle()
        return report

    def _drop_load(self, task: asyncio.Future) -> None:
        """Close what a load dropped by :meth:`unload` loaded, once it is done."""
        if not task.cancelled() and task.exception() is None:
            self._retire(task.result())

    def _model_lock(self, name: str) -> asyncio.Lock:
        return self._model_locks.setdefault(name, asyncio.Lock())

    async def _refresh_version(
        self, name: str, version: int, path: Path, stamp: Stamp, force: bool, report: dict
    ) -> None:
        """Load ``name/version`` if :meth:`refresh` should, deciding on the entries as they
        are once no other load of ``name`` runs; the load itself runs outside the
        repository's lock, and its result is dropped if the entry it would replace left
        meanwhile (:meth:`unload`, a removal)."""
        async with self._model_lock(name):
            async with self._lock:
                if self.closing or name in self.unloaded:
                    return
                old = self.entries.get(name, {}).get(version)
                if old is None:
                    return  # removed or unloaded since the scan
                if old.status == "loading" and old.served is None:
                    old = None  # listed as loading by a scan, not loaded yet
                if old is not None and old.status != "pending" and old.stamp == stamp:
                    if old.reload is not None:  # the file that serves is back on disk
                        old.reload = None
                        self.metrics.set_load_failed(name, str(version), False)
                    if not force:
                        return
                elif (
                    old is not None
                    and old.reload is not None
                    and old.reload.stamp == stamp
                    and old.reload.status == "failed"
                    and not force
                ):
                    return  # this file failed already: wait for it to change
                if not self._settled(name, version, stamp, time.monotonic()):
                    report["pending"].append(f"{name}/{version}")
                    self._mark_pending(name, version, path, stamp, old)
                    return
                if old is None or old.status == "pending":
                    self.entries.setdefault(name, {})[version] = VersionEntry(
                        name, version, path, stamp
                    )
                    self._update_metrics(name)
                replaced = self.entries[name][version]
                unloaded = self._unload_signals.setdefault(name, asyncio.Event())
            load = asyncio.ensure_future(self._load(name, version, path, stamp))
            signal = asyncio.ensure_future(unloaded.wait())
            await asyncio.wait({load, signal}, return_when=asyncio.FIRST_COMPLETED)
            signal.cancel()
            if not load.done():
                # Unloaded meanwhile: answer now; the search thread cannot be stopped, so
                # what it loads is closed once it ends.
                load.add_done_callback(self._drop_load)
                log.info("%s/%s: load dropped (unloaded meanwhile)", name, version)
                return
            new = load.result()
            async with self._lock:
                if self.closing or self.entries.get(name, {}).get(version) is not replaced:
                    # Unloaded, removed or shutting down meanwhile: this load is not wanted.
                    if new.served is not None:
                        self._retire(new)
                    log.info("%s/%s: load dropped (unloaded or removed meanwhile)", name, version)
                    return
                ok = new.status == "ready"
                report["loaded" if ok else "failed"].append(f"{name}/{version}")
                self.metrics.set_load_failed(name, str(version), not ok)
                if not ok:
                    self.metrics.load_failures.labels(name, str(version)).inc()
                if not ok and replaced.status == "ready":
                    # Keep serving what loaded; say what happened to the new file.
                    replaced.reload = Reload(stamp, "failed", new.error)
                    log.error("%s/%s keeps serving its loaded weights", name, version)
                else:
                    self.entries[name][version] = new
                    if replaced.served is not None:
                        self._retire(replaced)
                self._update_metrics(name)

    def _warn_ignored(self, ignored: list[tuple[Path, str]]) -> None:
        """Log each folder skipped for its name, once (the poller rescans every few
        seconds)."""
        for path, why in ignored:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("%s ignored: %s", path, why)

    def _settled(self, name: str, version: int, stamp: Stamp, now: float) -> bool:
        """Has ``name/version``'s file stopped changing? Its stamp must be ``settle_s`` old:
        by the file's own times (mtime and ctime) or by this repository's scans (for
        clocks that disagree, as on network file systems)."""
        settle = self.settings.settle_s
        key = (name, version)
        seen = self._seen.get(key)
        if seen is None or seen[0] != stamp:
            self._seen[key] = seen = (stamp, now)
        if settle <= 0:
            return True
        age = time.time() - max(stamp[0], stamp[1]) / 1e9
        return age >= settle or now - seen[1] >= settle

    def _mark_pending(
        self, name: str, version: int, path: Path, stamp: Stamp, old: VersionEntry | None
    ) -> None:
        why = (
            f"{path.name} is still changing on disk; it loads once unchanged for "
            f"{self.settings.settle_s:g} s"
        )
        if old is None or old.status != "ready":
            entry = VersionEntry(name, version, path, stamp, status="pending", error=why)
            if old is not None:
                entry.changed_at = old.changed_at
            self.entries.setdefault(name, {})[version] = entry
        elif old.reload is None or old.reload.stamp != stamp:
            old.reload = Reload(stamp, "pending", why)

    async def _load(
        self, name: str, version: int, path: Path, stamp: tuple[int, int]
    ) -> VersionEntry:
        entry = VersionEntry(name, version, path, stamp)
        log.info("%s/%s: loading %s", name, version, path)
        t0 = time.monotonic()
        try:
            served = await in_search_thread(self._build, name, version, path)
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
            "%s/%s ready in %.1f s: %s, %s parameters, α %s, on %s",
            name,
            version,
            time.monotonic() - t0,
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
        served.tuner.label = f"{name}/{version}"
        served.tune_at_load()
        if served.tuner.pending_initial:
            log.info(
                "%s/%s: no calibration batch in the checkpoint; α is searched on its first "
                "%d samples of traffic",
                name,
                version,
                self.settings.retune_window,
            )
        return served

    def _retire(self, entry: VersionEntry) -> None:
        """Close a replaced or removed version once its queue is answered."""
        if entry.served is None:
            return
        task = asyncio.create_task(entry.served.close(), name=f"retire-{entry.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._retired)  # after the discard: _tasks holds the others

    def _settle(self) -> None:
        """:func:`settle_heap` now, or, while retired versions still answer their queues,
        once the last of them has closed: a settle that ran before would freeze them alive,
        and their reference cycles (the model, its weights) would then wait for a later
        change of the loaded models, which after an unload may never come. One settle (one
        pause of the event loop) serves a reload's new version and its old one."""
        if self._tasks:
            self._settle_due = True
            return
        self._settle_due = False
        settle_heap()

    def _retired(self, _task: asyncio.Future) -> None:
        if self._tasks or self.closing:  # the process ends: nothing to keep settled
            return
        self._settle_due = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            asyncio.get_running_loop().call_soon(self._settle_if_due)

    def _settle_if_due(self) -> None:
        if self._settle_due:
            self._settle()

    # ---- metrics -------------------------------------------------------------------------------
    def _alpha_changed(self, served: ServedModel) -> None:
        """α of ``served`` changed (called from the tuning thread): refresh its gauges."""
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
            self._loop.call_soon_threadsafe(self._update_metrics, served.name)

    def _update_metrics(self, name: str) -> None:
        """Point ``name``'s gauges at what serves now: its default version, or nothing."""
        m = self.metrics
        if name not in self.entries:
            return
        e = self.default_entry(name)
        m.model_ready.labels(name).set(1 if e is not None else 0)
        if e is None or e.served is None:
            m.forget_serving(name)
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

    async def load(self, name: str, force: bool = True) -> dict:
        """Load ``name`` from its folder, as :meth:`refresh` of it alone: new versions load,
        changed ones reload, removed ones go, and with ``force`` (the admin reload) every
        version is reread from disk even if unchanged. A model unloaded by :meth:`unload` is
        polled again from now on. While the load runs, :meth:`entry` says the model is
        loading (503), not unknown, until its scan lists its versions.

        Returns:
            :meth:`refresh`'s report.

        Raises:
            NotFound: ``name`` is neither known nor a folder of the repository.
            Unloaded: :meth:`unload` of ``name`` came while this load ran: its result was
                dropped and ``name`` stays unloaded.
        """
        if not NAME_RE.match(name) or not (
            name in self.entries or (self.settings.model_dir / name).is_dir()
        ):
            raise NotFound(f"unknown model {name!r}; available: {self.names()}")
        self._loading[name] = self._loading.get(name, 0) + 1
        try:
            self.unloaded.discard(name)
            unloads = self._unloads.get(name, 0)
            report = await self.refresh(only=name, force=force)
        finally:
            if self._loading[name] == 1:
                del self._loading[name]
            else:
                self._loading[name] -= 1
        if self._unloads.get(name, 0) != unloads:
            raise Unloaded(f"model {name!r} was unloaded while loading; it stays unloaded")
        return report

    async def unload(self, name: str) -> list[str]:
        """Stop serving every version of ``name`` and keep it unloaded (the poller skips it)
        until :meth:`load`. Requests already queued are answered first; new ones are 404.
        Unloading a model that is unloaded already does nothing.

        Returns:
            the ``name/version`` entries unloaded.

        Raises:
            NotFound: ``name`` is neither known nor unloaded.
        """
        async with self._lock:
            if name not in self.entries:
                if name in self.unloaded:
                    return []
                raise NotFound(f"unknown model {name!r}; available: {self.names()}")
            self.unloaded.add(name)
            self._unloads[name] = self._unloads.get(name, 0) + 1
            self._unload_signals.pop(name, asyncio.Event()).set()
            versions = self.entries.pop(name)
            for v, entry in versions.items():
                self._retire(entry)
                self._seen.pop((name, v), None)
                self.metrics.forget_version(name, str(v))
            self.metrics.forget_model(name)
            log.info("%s unloaded (%d versions)", name, len(versions))
            return [f"{name}/{v}" for v in sorted(versions)]

    def versions(self, name: str) -> list[VersionEntry]:
        """Every version of ``name`` the repository knows, oldest first (``[]`` if none)."""
        versions = self.entries.get(name) or {}
        return [versions[v] for v in sorted(versions)]
