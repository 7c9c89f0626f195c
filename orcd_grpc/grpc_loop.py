"""The worker's gRPC server: grpc.aio on an event loop of its own, driven from synchronous code.

Execute streams are coroutines on the loop: a token reaches its stream without waking a handler
thread, and the loop sends it without the sync server's per-message hand-off between a handler
thread and grpcio's polling thread (BENCHMARKS.md, the serving host). Every other method keeps
its synchronous handler, run on the thread pool given here through `on_pool`.

Why not grpc.aio's own thread pool for them (migration_thread_pool): the context it gives a
synchronous handler never runs add_callback's callbacks and has no is_active, and a streaming
handler whose client leaves is never resumed nor closed. A load nobody waits for would then run
on, a WatchEvents subscription would hold its place, a Drain would wait for a caller long gone.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from typing import Sequence

import grpc

from .call_hooks import CallView, OnLoop, Refused


class LoopServer:
    """A grpc.aio server on a daemon thread running its event loop. Ports and handlers are added as
    on grpc.server; stop(grace) returns something to wait() on, as grpc.server's does."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, *, interceptors: Sequence = (),
                 options: Sequence = (), maximum_concurrent_rpcs: int | None = None):
        self.pool = pool
        # the policies, also for calls relayed from front-end processes (relay.RelayTarget)
        self.on_loop = OnLoop(interceptors) if interceptors else None
        policies = [self.on_loop] if self.on_loop is not None else None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orcd-grpc-loop", daemon=True)
        self._thread.start()

        async def make() -> grpc.aio.Server:  # grpc.aio binds a server to the loop it is made on
            return grpc.aio.server(migration_thread_pool=pool, interceptors=policies, options=list(options),
                                   maximum_concurrent_rpcs=maximum_concurrent_rpcs)

        self.server = self.call(make())

    def call(self, coro, timeout: float | None = None):
        """Runs a coroutine on the loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.server.add_registered_method_handlers(service, handlers)

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def add_secure_port(self, address: str, credentials) -> int:
        return self.server.add_secure_port(address, credentials)

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace: float | None) -> "_Stopping":
        """Stops accepting calls; open ones get `grace` seconds, then are cancelled. wait() on the
        result returns once they are, and the loop's thread has ended."""
        return _Stopping(self, asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop))


class _Stopping:
    def __init__(self, owner: LoopServer, done: concurrent.futures.Future):
        self._owner, self._done = owner, done

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        owner = self._owner
        if owner.loop.is_running():
            owner.loop.call_soon_threadsafe(owner.loop.stop)
        owner._thread.join(timeout)
        return True


_END = object()


def on_pool(fn, pool: concurrent.futures.Executor, streaming: bool):
    """A synchronous handler `fn(request, context)` (a generator function when streaming) as a
    coroutine of the loop that runs it on `pool`, in the context variables of the call (the
    policy interceptors' identity). A stream steps its generator on the pool one response at a
    time; when the call ends early the generator is closed (at once, or when its step returns)."""
    if streaming:
        async def stream(request, context):
            call, ctx = CallView(context, asyncio.get_running_loop()), contextvars.copy_context()
            gen = fn(request, call)
            step = None
            try:
                while True:
                    step = pool.submit(ctx.run, next, gen, _END)
                    item = await asyncio.wrap_future(step)
                    if item is _END:
                        return
                    yield item
            except Refused:
                return
            finally:
                if step is not None and not step.done():
                    step.add_done_callback(lambda _step: gen.close())
                else:
                    gen.close()
        return stream

    async def unary(request, context):
        call, ctx = CallView(context, asyncio.get_running_loop()), contextvars.copy_context()
        try:
            return await asyncio.wrap_future(pool.submit(ctx.run, fn, request, call))
        except Refused:
            return None
    return unary
