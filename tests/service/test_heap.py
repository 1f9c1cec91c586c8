"""The heap is settled after model loads (service.repository.settle_heap): what the process
holds for good is frozen out of the cyclic collector's full collections, which otherwise
stopped the event loop for ~0.1 s every second or so under load."""

from __future__ import annotations

import gc
import weakref

from service_support import LiveServer

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
