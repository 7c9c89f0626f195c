"""WatchEvents: load snapshots and prefix-cache events for request routers.

The engine thread publishes cache changes (kv_cache.BlockAllocator.listener) into each
subscriber's own bounded queue and never waits: a full queue drops the event and counts it, and
the subscriber's next event says how many it lost. Events are kept as small tuples and become
protobuf messages on the subscriber's own gRPC thread. The number of subscribers is capped, since
each holds a handler thread for as long as it watches (server.py sizes its pool for them).
"""
from __future__ import annotations

import collections
import threading
import time

from .errors import InvalidArgument, ResourceExhausted
from .proto import pb
from .request import Unavailable

MAX_SUBSCRIBERS = 16
QUEUE_EVENTS = 1024
MIN_INTERVAL_MS, MAX_INTERVAL_MS, DEFAULT_INTERVAL_MS = 100, 60_000, 1000


class Subscription:
    def __init__(self, cache: bool, capacity: int = QUEUE_EVENTS):
        self.cache = cache
        self.capacity = capacity
        self._q: collections.deque = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self.dropped = 0
        self.closed = False

    def offer(self, item) -> None:
        """Never blocks beyond a deque append: a full queue loses the event."""
        with self._cv:
            if len(self._q) >= self.capacity:
                self.dropped += 1
                return
            self._q.append(item)
            self._cv.notify()

    def take(self, timeout: float) -> tuple[list, int]:
        """(queued events, events dropped since the last take), waiting up to timeout for one."""
        with self._cv:
            if not self._q and not self.closed and timeout > 0:
                self._cv.wait(timeout)
            items = list(self._q)
            self._q.clear()
            dropped, self.dropped = self.dropped, 0
            return items, dropped

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()


class EventHub:
    def __init__(self, max_subscribers: int = MAX_SUBSCRIBERS, capacity: int = QUEUE_EVENTS):
        self.max_subscribers = max_subscribers
        self.capacity = capacity
        self._lock = threading.Lock()
        # Replaced, never mutated: the engine thread iterates it without taking the lock.
        self._subs: tuple[Subscription, ...] = ()
        self._closed = False

    # ---- subscribers --------------------------------------------------------------------------
    def subscribe(self, cache: bool) -> Subscription:
        with self._lock:
            if self._closed:
                raise Unavailable("the worker is shutting down")
            if len(self._subs) >= self.max_subscribers:
                raise ResourceExhausted(f"the worker has {self.max_subscribers} WatchEvents subscribers; "
                                        "retry later", retry_after_ms=5000)
            sub = Subscription(cache, self.capacity)
            self._subs = self._subs + (sub,)
            return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)
        sub.close()

    def close(self) -> None:
        """Ends every stream (the worker is stopping)."""
        with self._lock:
            self._closed = True
            subs = self._subs
        for s in subs:
            s.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    # ---- publishing (engine thread) -----------------------------------------------------------
    def attach(self, engine) -> None:
        """Publishes `engine`'s prefix-cache changes under its model id from now on."""
        model_id, bs = engine.info.model_id, engine.allocator.block_size

        def listener(kind, *args):
            subs = self._subs
            if not subs:
                return
            item = (time.time(), model_id, bs, kind, args)
            for s in subs:
                if s.cache:
                    s.offer(item)
        engine.allocator.listener = listener

    @staticmethod
    def detach(engine) -> None:
        """`engine` was closed: its subscribers forget its cache."""
        listener, engine.allocator.listener = engine.allocator.listener, None
        if listener is not None:
            listener("cleared")


# ---- the stream --------------------------------------------------------------------------------------

def check_interval(ms: int) -> float:
    if ms == 0:
        ms = DEFAULT_INTERVAL_MS
    if not MIN_INTERVAL_MS <= ms <= MAX_INTERVAL_MS:
        raise InvalidArgument(f"must be 0 (1000) or in [{MIN_INTERVAL_MS}, {MAX_INTERVAL_MS}], got {ms}",
                              field="load_interval_ms")
    return ms / 1000.0


def _event(stamp: float, dropped: int, **one) -> pb.WorkerEvent:
    return pb.WorkerEvent(dropped=dropped, unix_ms=int(stamp * 1000), **one)


def cache_event(item, dropped: int) -> pb.WorkerEvent:
    stamp, model_id, bs, kind, args = item
    if kind == "stored":
        parent, hashes = args
        return _event(stamp, dropped, blocks_stored=pb.BlocksStored(
            model_id=model_id, block_size=bs, parent_hash=parent, block_hashes=hashes))
    if kind == "evicted":
        return _event(stamp, dropped, blocks_evicted=pb.BlocksEvicted(model_id=model_id, block_hashes=args[0]))
    return _event(stamp, dropped, cache_cleared=pb.PrefixCacheCleared(model_id=model_id))


def snapshot_event(engine) -> pb.WorkerEvent:
    alloc = engine.allocator
    return _event(time.time(), 0, snapshot=pb.PrefixCacheSnapshot(
        model_id=engine.info.model_id, block_size=alloc.block_size,
        blocks=[pb.CachedBlock(block_hash=h, parent_hash=p) for h, p in alloc.cached_blocks()]))


def load_event(load: dict, dropped: int) -> pb.WorkerEvent:
    return _event(time.time(), dropped, load=pb.LoadSnapshot(
        model_id=load["model_id"], queue_depth=load["queue_depth"], running=load["running"],
        free_kv_blocks=load["free_kv_blocks"], total_kv_blocks=load["total_kv_blocks"],
        recent_step_ms=load["recent_step_ms"], accepting=load["accepting"]))


def watch(hub: EventHub, request, active, load_now, engines):
    """The WorkerEvent stream of one WatchEvents call. `active()`: the call is alive; `load_now()`:
    a routing.snapshot dict; `engines()`: the loaded engines (for the initial cache snapshot)."""
    interval = check_interval(int(request.load_interval_ms))
    sub = hub.subscribe(bool(request.prefix_cache))
    try:
        if request.prefix_cache and request.initial_snapshot:
            # After subscribing: a block changed meanwhile is in both, and applying an event twice
            # (store a stored block, evict a missing one) changes nothing in a mirror.
            for engine in engines():
                yield snapshot_event(engine)
        next_load = time.monotonic()
        while active() and not sub.closed:
            now = time.monotonic()
            if now >= next_load:
                yield load_event(load_now(), 0)
                next_load = max(next_load + interval, now)
                continue
            items, dropped = sub.take(min(next_load - now, 0.5))
            for item in items:
                yield cache_event(item, dropped)
                dropped = 0
            if dropped:  # everything queued was lost: say so now, not at the next snapshot
                yield load_event(load_now(), dropped)
    finally:
        hub.unsubscribe(sub)
