"""Request events handed from the engine thread to streams on an asyncio event loop.

The scheduler puts a request's events on `Request.events` from its own thread, a token for every
running request every step. Waking the loop once per event (call_soon_threadsafe writes the
loop's self-pipe each time) costs a system call and a loop turn per token; here the events of a
step are appended to their streams' queues and the loop is woken once, for all the streams
that got something since it last looked.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
import weakref


class Mailbox:
    """One event loop's wake-ups: streams with new events are collected and woken in one callback."""

    # How late a get() may time out. Its timeouts are liveness polls (a second), so one sweep of
    # all waiters this often replaces a timer armed and cancelled on every wait, that is on every
    # token of every stream.
    SWEEP_S = 0.1

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._touched: set[LoopEvents] = set()
        self._pending = False  # a drain is scheduled and has not taken the set yet
        self._waiting: set[LoopEvents] = set()  # queues whose get() waits now (on the loop only)
        self._sweeping = False  # a sweep is scheduled

    def _watch(self, q: "LoopEvents") -> None:
        self._waiting.add(q)
        if not self._sweeping:
            self._sweeping = True
            self._loop.call_later(self.SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        now = self._loop.time()
        for q in [q for q in self._waiting if q._deadline <= now]:
            w = q._waiter
            if w is not None and not w.done():
                w.set_result(_TIMED_OUT)
        if self._waiting:
            self._loop.call_later(self.SWEEP_S, self._sweep)
        else:
            self._sweeping = False

    def _wake(self, q: "LoopEvents") -> None:
        with self._lock:
            self._touched.add(q)
            if self._pending:
                return
            self._pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed (server stopped): nobody is waiting
            pass

    def _drain(self) -> None:
        with self._lock:
            touched, self._touched, self._pending = self._touched, set(), False
        for q in touched:
            w = q._waiter
            if w is not None and not w.done():
                w.set_result(None)


_TIMED_OUT = object()


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


class LoopEvents:
    """A request's event queue: put from any thread, read with `await get(timeout)` on the loop
    it was made on (make it there: the queues of one loop share its Mailbox)."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        mailbox = _MAILBOXES.get(loop)
        if mailbox is None:
            mailbox = _MAILBOXES[loop] = Mailbox(loop)
        self._mailbox = mailbox
        self._items: collections.deque = collections.deque()
        # the future a waiting get() awaits (one at a time), resolved by the mailbox's drain or, at
        # _deadline (loop time), its sweep: asyncio.wait_for would make a task and a timer of each
        # wait (BENCHMARKS.md, sessions 21 and 22)
        self._waiter: asyncio.Future | None = None
        self._deadline = 0.0

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        self._items.append(item)
        self._mailbox._wake(self)

    def tagged(self, i: int) -> "_Tagged":
        """A queue for request i of a batch sharing this one: what is put on it arrives here as (i, event)."""
        return _Tagged(self, i)

    def get_nowait(self):
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None

    async def get(self, timeout: float):
        """The next event; queue.Empty when none came within `timeout` seconds (up to
        Mailbox.SWEEP_S later)."""
        while True:
            if self._items:
                return self._items.popleft()
            mailbox = self._mailbox
            loop = mailbox._loop
            # A put after the look above wakes this waiter through the mailbox's next drain (on this
            # loop, so not before the await below has begun).
            waiter = self._waiter = loop.create_future()
            self._deadline = loop.time() + timeout
            mailbox._watch(self)
            try:
                await waiter
            finally:
                mailbox._waiting.discard(self)
                self._waiter = None
            if not self._items and waiter.result() is _TIMED_OUT:
                raise queue.Empty


class _Tagged:
    def __init__(self, shared: LoopEvents, i: int):
        self.shared, self.i = shared, i

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        self.shared.put((self.i, item))
