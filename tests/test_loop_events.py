"""loop_events.LoopEvents: events put from another thread reach the stream waiting on the event
loop, in order, one drain waking every touched stream; a wait with nothing put times out with
queue.Empty; a cancelled wait leaves the queue usable."""
from __future__ import annotations

import asyncio
import queue
import random
import threading

import pytest

from orcd_grpc.loop_events import LoopEvents


def test_events_from_a_thread_reach_their_streams_in_order():
    async def scenario():
        streams = [LoopEvents() for _ in range(16)]
        sent = {i: list(range(random.randrange(50, 200))) for i in range(16)}

        def engine():  # a step's events for every stream, then the next step
            for step in range(max(len(v) for v in sent.values())):
                for i, q in enumerate(streams):
                    if step < len(sent[i]):
                        q.put(sent[i][step])

        async def read(i):
            return [await streams[i].get(5.0) for _ in sent[i]]

        readers = [asyncio.ensure_future(read(i)) for i in range(16)]
        t = threading.Thread(target=engine)
        t.start()
        got = await asyncio.gather(*readers)
        t.join()
        assert got == [sent[i] for i in range(16)]
        assert all(q._waiter is None for q in streams)

    asyncio.run(scenario())


def test_a_wait_with_nothing_put_times_out_and_a_cancelled_wait_leaves_the_queue_usable():
    async def scenario():
        q = LoopEvents()
        with pytest.raises(queue.Empty):
            await q.get(0.05)
        waiting = asyncio.ensure_future(q.get(10.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert q._waiter is None
        threading.Thread(target=q.put, args=("late",)).start()
        assert await q.get(5.0) == "late"
        q.put("ready")  # already there: no wait at all
        assert q.get_nowait() == "ready"
        with pytest.raises(queue.Empty):
            q.get_nowait()

    asyncio.run(scenario())


def test_tagged_queues_share_one_stream():
    async def scenario():
        q = LoopEvents()
        a, b = q.tagged(0), q.tagged(1)
        threading.Thread(target=lambda: (a.put("x"), b.put("y"), a.put("z"))).start()
        assert [await q.get(5.0) for _ in range(3)] == [(0, "x"), (1, "y"), (0, "z")]

    asyncio.run(scenario())


def test_timeouts_come_from_one_sweep_no_earlier_and_at_most_a_sweep_late():
    """Waits of random timeouts on many queues time out after their timeout and within one sweep
    period of it; streams that get their event are not timed out; the sweep stops once nobody waits."""
    from orcd_grpc.loop_events import Mailbox

    async def scenario():
        loop = asyncio.get_running_loop()
        qs = [LoopEvents() for _ in range(40)]
        timeouts = [random.uniform(0.02, 0.5) for _ in qs]
        fed = set(random.sample(range(40), 10))

        async def wait(i):
            t0 = loop.time()
            try:
                return i, await qs[i].get(timeouts[i]), loop.time() - t0
            except queue.Empty:
                return i, None, loop.time() - t0

        tasks = [asyncio.ensure_future(wait(i)) for i in range(40)]
        await asyncio.sleep(0.005)
        for i in fed:
            threading.Thread(target=qs[i].put, args=(f"ev{i}",)).start()
        for i, got, took in await asyncio.gather(*tasks):
            if i in fed:
                assert got == f"ev{i}" and took < timeouts[i]
            else:
                assert got is None
                assert timeouts[i] <= took <= timeouts[i] + Mailbox.SWEEP_S + 0.1, (timeouts[i], took)
        mailbox = qs[0]._mailbox
        assert not mailbox._waiting
        await asyncio.sleep(Mailbox.SWEEP_S * 2)
        assert not mailbox._sweeping

    asyncio.run(scenario())
