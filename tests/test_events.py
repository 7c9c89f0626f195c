"""The WatchEvents hub: a slow subscriber loses events (and is told how many) instead of slowing the
publisher, subscribers are capped, and the stream ends when the worker stops. Driven through the
real allocator's listener and the real stream generator (events.watch)."""
from __future__ import annotations

import threading
import time

import pytest

from orcd_grpc import events
from orcd_grpc.errors import ResourceExhausted
from orcd_grpc.kv_cache import BlockAllocator, block_hashes
from orcd_grpc.proto import pb


class Eng:
    """What EventHub.attach reads of an engine: its model id and its allocator."""

    def __init__(self, alloc):
        self.allocator = alloc
        self.info = type("Info", (), {"model_id": "m"})()


def load_now():
    return {"model_id": "m", "queue_depth": 0, "running": 0, "free_kv_blocks": 1, "total_kv_blocks": 1,
            "recent_step_ms": 0.0, "accepting": True}


def publish(alloc, n_prompts, bs=4):
    """n_prompts distinct two-block prompts computed and released: 1 stored event each."""
    for p in range(n_prompts):
        prompt = [1000 * p + i for i in range(2 * bs + 1)]
        table: list[int] = []
        alloc.match_prefix(prompt, table)
        alloc.ensure(table, len(prompt))
        alloc.register_prefix(prompt, table, len(prompt))
        alloc.release(table)


def test_slow_subscriber_drops_and_is_told_publisher_never_waits():
    alloc = BlockAllocator(1024, 4)
    hub = events.EventHub(capacity=4)
    hub.attach(Eng(alloc))
    alive = threading.Event()
    alive.set()
    stream = events.watch(hub, pb.WatchEventsRequest(load_interval_ms=60_000, prefix_cache=True), alive.is_set,
                          load_now, lambda: [])
    assert next(stream).WhichOneof("event") == "load"  # subscribed; nobody reads now
    t0 = time.perf_counter()
    publish(alloc, 10)
    assert time.perf_counter() - t0 < 1.0
    got = [next(stream) for _ in range(4)]
    assert [e.WhichOneof("event") for e in got] == ["blocks_stored"] * 4
    assert got[0].dropped == 6 and all(e.dropped == 0 for e in got[1:])
    # the four kept are the first four prompts' blocks, in order, with the documented hashes
    for p, ev in enumerate(got):
        prompt = [1000 * p + i for i in range(9)]
        assert list(ev.blocks_stored.block_hashes) == block_hashes(prompt, 4)
        assert ev.blocks_stored.parent_hash == 0 and ev.blocks_stored.model_id == "m"
    alive.clear()
    hub.close()
    assert list(stream) == []
    assert hub.subscribers == 0


def test_evictions_are_one_event_per_allocation():
    alloc = BlockAllocator(4, 4)
    hub = events.EventHub()
    hub.attach(Eng(alloc))
    sub = hub.subscribe(cache=True)
    publish(alloc, 2)  # 4 cached blocks; the second prompt's allocation evicted the first's
    items, dropped = sub.take(0)
    kinds = [i[3] for i in items]
    assert kinds == ["stored", "evicted", "stored"] and dropped == 0
    # the LRU block went: the first prompt's last full block (released last-first)
    assert items[1][4][0] == [block_hashes(list(range(9)), 4)[1]]
    events.EventHub.detach(type("E", (), {"allocator": alloc})())
    assert sub.take(0)[0][0][3] == "cleared" and alloc.listener is None


def test_subscribers_capped_and_interval_checked():
    hub = events.EventHub(max_subscribers=2)
    subs = [hub.subscribe(False), hub.subscribe(True)]
    with pytest.raises(ResourceExhausted):
        hub.subscribe(False)
    hub.unsubscribe(subs[0])
    hub.subscribe(False)
    for bad in (1, 99, 60_001):
        with pytest.raises(Exception) as ei:
            events.check_interval(bad)
        assert ei.value.field == "load_interval_ms"
    assert events.check_interval(0) == 1.0
