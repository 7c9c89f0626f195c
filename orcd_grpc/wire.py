"""Registers the Worker service so that request bytes that do not parse answer INVALID_ARGUMENT.

grpc-python runs a method's request deserializer before any handler or interceptor code, and when
it raises, ends the call with INTERNAL ("Exception deserializing request!"): the server takes the
blame for the client's bytes, and monitoring counts a client error as a server fault. Here each
deserializer catches the parse error and passes a `Malformed` stand-in along instead; the wrapped
handler answers it with INVALID_ARGUMENT naming the message type. Wrapping sits at the servicer,
innermost, so bearer tokens and rate limits are still checked first; the interceptors in between
see the stand-in as an empty message of the right type.
"""
from __future__ import annotations

import inspect

import grpc

from .grpc_loop import on_pool
from .proto import pb

SERVICE = pb.DESCRIPTOR.services_by_name["Worker"]


class Malformed:
    """Stands in for a request whose bytes did not parse; reads as an empty message."""

    __slots__ = ("full_name", "error", "_empty")

    def __init__(self, cls, error: Exception):
        self.full_name = cls.DESCRIPTOR.full_name
        self.error = error
        self._empty = cls()

    def __getattr__(self, name):
        if name == "_empty":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._empty, name)

    def message(self) -> str:
        detail = str(self.error).split(": ", 1)[-1] if str(self.error) else type(self.error).__name__
        return f"request: not a valid {self.full_name} message ({detail})"


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError; any failure to parse is about the client's bytes
            return Malformed(cls, exc)
    return parse


def _count(servicer, name: str) -> None:
    count = getattr(servicer, "_count", None)
    if callable(count):
        count(name, grpc.StatusCode.INVALID_ARGUMENT)


def _refuse(servicer, name: str, request: Malformed, context) -> None:
    _count(servicer, name)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())


def _unary(servicer, name: str, fn):
    def handle(request, context):
        if isinstance(request, Malformed):
            _refuse(servicer, name, request, context)
        return fn(request, context)
    return handle


def _streaming(servicer, name: str, fn):
    if inspect.isasyncgenfunction(fn):  # Execute, on the server's event loop
        async def handle_on_loop(request, context):
            if isinstance(request, Malformed):
                _count(servicer, name)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            async for response in fn(request, context):
                yield response
        return handle_on_loop

    def handle(request, context):
        if isinstance(request, Malformed):
            _refuse(servicer, name, request, context)
        yield from fn(request, context)
    return handle


def method_handlers(servicer, pool=None) -> dict[str, grpc.RpcMethodHandler]:
    """The Worker's handlers, as the generated add_WorkerServicer_to_server makes them, with the
    parse-failure path above. Built from the descriptor, so a new RPC needs no change here.
    pool: for a grpc.aio server, the synchronous methods run on it (grpc_loop.on_pool)."""
    handlers = {}
    for m in SERVICE.methods:
        if m.client_streaming:
            raise NotImplementedError(f"{m.name}: client streaming is not wrapped")
        req_cls, resp_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        fn = getattr(servicer, m.name)
        if m.server_streaming:
            make, behaviour = grpc.unary_stream_rpc_method_handler, _streaming(servicer, m.name, fn)
        else:
            make, behaviour = grpc.unary_unary_rpc_method_handler, _unary(servicer, m.name, fn)
        if pool is not None and not inspect.isasyncgenfunction(behaviour):
            behaviour = on_pool(behaviour, pool, m.server_streaming)
        handlers[m.name] = make(behaviour, request_deserializer=_parser(req_cls),
                                response_serializer=resp_cls.SerializeToString)
    return handlers


def add_worker_servicer(servicer, server) -> dict[str, grpc.RpcMethodHandler]:
    """Replaces pb_grpc.add_WorkerServicer_to_server (a grpc_loop.LoopServer: its pool runs the
    synchronous methods); returns the handlers it added, by method name."""
    handlers = method_handlers(servicer, getattr(server, "pool", None))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE.full_name, handlers)
    return handlers
