"""Call policy (correlation ids, auth, rate limits) around handlers that run on a thread or on the
server's event loop.

The worker's gRPC server is grpc.aio: Execute streams are coroutines on its event loop, the other
methods run on its thread pool (grpc_loop.on_pool). A policy (`Policy`) says what it does around
one call as a `begin(request, context) -> Hooks` function; on the worker's server `OnLoop` chains
every policy's begin into one wrapper around the handler (a streamed response passes one wrapper,
not one per policy); on a plain grpc.server each policy wraps the handler itself. begin runs where
the handler's call starts, so context variables it sets reach the servicer, and it may refuse the
call with `context.abort(code, details)`: on the event loop it gets a CallView, whose abort sets
the status and ends the call before the handler starts (grpc.aio's own abort is a coroutine).
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Callable, Sequence

import grpc


class Hooks:
    """What a policy does after admitting a call: each(response) for every streamed response (a
    unary call's only one included), end() once, however the call ends."""

    def each(self, response) -> None:
        pass

    def end(self) -> None:
        pass


NO_HOOKS = Hooks()
Begin = Callable[[object, object], Hooks]


class Refused(Exception):
    """A handler (or a begin) aborted its call through a CallView: the status is set on the call."""


class CallView:
    """An aio ServicerContext as synchronous code uses it, on the loop or on a pool thread: abort
    records the status and raises Refused (grpc.aio's own abort is a coroutine); add_callback runs
    its callback when the call ends; is_active; the rest is the call's own."""

    def __init__(self, context, loop):
        self._context, self._loop = context, loop

    def abort(self, code, details="", trailing_metadata=None):
        if trailing_metadata:
            self._context.set_trailing_metadata(trailing_metadata)
        self._context.set_code(code)
        self._context.set_details(details)
        raise Refused(details)

    def add_callback(self, callback) -> bool:
        if self._context.done():
            return False
        self._loop.call_soon_threadsafe(self._context.add_done_callback, lambda _ctx: callback())
        return True

    def is_active(self) -> bool:
        return not self._context.done()

    def __getattr__(self, name):
        return getattr(self._context, name)


def _begin_on_loop(begin: Begin, request, context) -> Hooks | None:
    """begin on the event loop; None when it refused the call (its status is set)."""
    try:
        return begin(request, CallView(context, asyncio.get_running_loop()))
    except Refused:
        return None


def _sync_unary(fn, begin: Begin):
    def inner(request, context):
        hooks = begin(request, context)
        try:
            response = fn(request, context)
            hooks.each(response)
            return response
        finally:
            hooks.end()
    return inner


def _sync_stream(fn, begin: Begin):
    def inner(request, context):
        hooks = begin(request, context)
        try:
            for response in fn(request, context):
                hooks.each(response)
                yield response
        finally:
            hooks.end()
    return inner


def _loop_unary(fn, begin: Begin):
    async def inner(request, context):
        hooks = _begin_on_loop(begin, request, context)
        if hooks is None:
            return None
        try:
            response = await fn(request, context)
            hooks.each(response)
            return response
        finally:
            hooks.end()
    return inner


def _loop_stream(fn, begin: Begin):
    async def inner(request, context):
        hooks = _begin_on_loop(begin, request, context)
        if hooks is None:
            return
        try:
            async for response in fn(request, context):
                hooks.each(response)
                yield response
        finally:
            hooks.end()
    return inner


def wrap_handler(handler: grpc.RpcMethodHandler | None, begin: Begin):
    """`handler` with `begin` (and the Hooks it returns) run around its behaviour, on the thread or
    event loop the behaviour runs on. For request-streaming methods begin gets the request iterator."""
    if handler is None:
        return None
    for kind, make, streams in (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
                                ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
                                ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
                                ("stream_stream", grpc.stream_stream_rpc_method_handler, True)):
        fn = getattr(handler, kind)
        if fn is None:
            continue
        if streams:
            wrapped = _loop_stream(fn, begin) if inspect.isasyncgenfunction(fn) else _sync_stream(fn, begin)
        else:
            wrapped = _loop_unary(fn, begin) if inspect.iscoroutinefunction(fn) else _sync_unary(fn, begin)
        return make(wrapped, handler.request_deserializer, handler.response_serializer)
    return handler


class Policy(grpc.ServerInterceptor):
    """A policy interceptor: begin_for(handler_call_details) is what it does around that call
    (a Begin), or None when the call is none of its business. On grpc.server it wraps each
    handler itself; on the worker's grpc.aio server OnLoop runs all policies as one wrapper."""

    def begin_for(self, handler_call_details) -> Begin | None:
        raise NotImplementedError

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        begin = self.begin_for(handler_call_details) if handler is not None else None
        return handler if begin is None else wrap_handler(handler, begin)


class _Held(Hooks):
    """The hooks of the policies that admitted a call, in order (ended in reverse)."""

    def __init__(self, held: list[Hooks]):
        self.held = held

    def each(self, response) -> None:
        for h in self.held:
            h.each(response)

    def end(self) -> None:
        for h in reversed(self.held):
            h.end()


def _chain(begins: list[Begin]) -> Begin:
    """One begin running each of `begins` in order; if one refuses the call, the hooks of those
    before it are ended."""
    if len(begins) == 1:
        return begins[0]

    def begin(request, context) -> Hooks:
        held: list[Hooks] = []
        try:
            for b in begins:
                held.append(b(request, context))
        except BaseException:
            _Held(held).end()
            raise
        held = [h for h in held if h is not NO_HOOKS]
        return _Held(held) if held else NO_HOOKS

    return begin


class OnLoop(grpc.aio.ServerInterceptor):
    """The policies, in order, installed on a grpc.aio server as one interceptor: a call's
    responses pass through one wrapper, not one per policy."""

    def __init__(self, policies: Sequence[Policy]):
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"{type(p).__name__} is not a call_hooks.Policy (begin_for), which the "
                                "worker's grpc.aio server needs")
        self.policies = list(policies)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        begins = [b for p in self.policies if (b := p.begin_for(handler_call_details)) is not None]
        return wrap_handler(handler, _chain(begins)) if begins else handler
