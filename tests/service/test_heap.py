"""The heap is settled after model loads (service.repository.settle_heap): what the process
holds for good is frozen out of the cyclic collector's full collections, which otherwise
stopped the event loop for ~0.1 s every second or so under load."""

from __future__ import annotations

import gc
import time
import weakref

from service_support import ADMIN_TOKEN, FC_CONFIG, LiveServer, make_checkpoint

from service import repository
from service.repository import settle_heap


class Node:
    """An object that can sit in a reference cycle."""


def cycle() -> tuple[Node, weakref.ref]:
    node = Node()
    node.self = node
    return node, weakref.ref(node)


def test_settle_heap_frees_old_cycles_and_freezes_the_rest():
    gc.unfreeze()
    try:
        garbage, garbage_ref = cycle()
        del garbage
        kept, kept_ref = cycle()
        settle_heap()
        assert garbage_ref() is None  # collected before freezing
        assert gc.get_freeze_count() > 0
        # What lived at the settle is out of the collector's sight until the next one ...
        del kept
        gc.collect()
        assert kept_ref() is not None
        # ... which unfreezes first, so a cycle dropped since is freed then.
        settle_heap()
        assert kept_ref() is None
        # Objects made after a settle are collected as usual.
        late, late_ref = cycle()
        del late
        gc.collect()
        assert late_ref() is None
    finally:
        gc.unfreeze()


def test_a_server_settles_its_heap_once_its_models_loaded(model_repo):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    srv = LiveServer(model_dir=model_repo).start()  # returns once ready: models loaded
    try:
        assert gc.get_freeze_count() > 10_000  # torch, the app and the models
    finally:
        srv.stop()
        gc.unfreeze()


def served_ref(srv: LiveServer, name: str) -> weakref.ref:
    """A weak reference to the model object serving ``name`` version 1 in ``srv``."""
    return weakref.ref(srv.app.state.runtime.repo.entries[name][1].served)


def freed(ref: weakref.ref, timeout: float = 10) -> bool:
    """Whether ``ref``'s object is freed within ``timeout`` (no collection forced here: the
    server must free it by itself)."""
    deadline = time.monotonic() + timeout
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return ref() is None


def test_a_retired_version_is_freed_once_it_has_closed(tmp_path, monkeypatch):
    """A version replaced by a reload, or unloaded, closes after the change (it answers its
    queue first): its reference cycles (the model and its weights among them) must be freed
    then, not at some later change of the loaded models, which may never come. One settle
    (one pause of the event loop) per change."""
    make_checkpoint(tmp_path / "a/1/model.pt", FC_CONFIG)
    make_checkpoint(tmp_path / "b/1/model.pt", FC_CONFIG, seed=1)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    gc.unfreeze()
    srv = LiveServer(model_dir=tmp_path, admin_token=ADMIN_TOKEN).start()
    settles = []
    real = repository.settle_heap

    def counted() -> None:
        real()
        settles.append(gc.get_freeze_count())

    monkeypatch.setattr(repository, "settle_heap", counted)
    try:
        with srv.client() as c:
            replaced = served_ref(srv, "a")
            assert c.post("/v1/models/a/reload", headers=auth).status_code == 200
            assert freed(replaced)
            unloaded = served_ref(srv, "b")
            r = c.post("/v2/repository/models/b/unload", headers=auth)
            assert r.status_code == 200
            assert freed(unloaded)
            deadline = time.monotonic() + 10
            while len(settles) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # a third would follow at once
            assert len(settles) == 2
            # The model left is served, and frozen again (once the settle's collection ends).
            deadline = time.monotonic() + 10
            while gc.get_freeze_count() < 10_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gc.get_freeze_count() > 10_000
            assert c.get("/v2/models/a/ready").json() == {"name": "a", "ready": True}
    finally:
        srv.stop()
        gc.unfreeze()
