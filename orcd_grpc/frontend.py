"""A front-end process of a worker (`orcd serve --frontends N`): it terminates gRPC (and TLS) for the
connections the kernel gives it on the worker's port (SO_REUSEPORT; the worker holds the port
without listening, so they get all of them), and relays every call to the worker over one local
stream (relay_frames, relay.py). It holds no model and no policy: the
worker authenticates, limits, owns and runs each call; this process only carries bytes, so the
per-message cost of many streams is spread over processes instead of the worker's one event loop.

    python3 -m orcd_grpc.frontend --relay unix:PATH --listen HOST:PORT [--tls-cert F --tls-key F
        [--tls-client-ca F]] [--max-message-bytes N]    (the key in $ORCD_RELAY_KEY)

Reflection is answered here (the descriptors are this package's); health and the Worker service are
relayed. If the worker's stream ends, every open call ends UNAVAILABLE and the process exits (the
worker starts another while it runs).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from . import relay_frames as rf
from .proto import pb
from .security import peer_common_name

SERVICE = pb.DESCRIPTOR.services_by_name["Worker"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def relayed_methods() -> dict[str, bool]:
    """{full method name: server-streaming} of what a front end relays."""
    return {f"/{svc.full_name}/{m.name}": m.server_streaming for svc in (SERVICE, HEALTH) for m in svc.methods
            if not m.client_streaming}


class Relay:
    """The stream to the worker: calls out as OPEN / CANCEL frames, their DATA and END back."""

    def __init__(self, channel: grpc.aio.Channel, key: str):
        self._channel, self._key = channel, key
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Queue] = {}
        self._out: asyncio.Queue = asyncio.Queue()
        self._send = rf.Batcher(self._out).add  # the frames of one turn of the loop leave together
        self.closed = asyncio.Event()

    async def run(self) -> None:
        """Until the worker's stream ends; then every open call ends UNAVAILABLE."""
        async def outgoing():
            while True:
                yield await self._out.get()

        call = self._channel.stream_stream(rf.METHOD)(outgoing(), metadata=((rf.KEY_HEADER, self._key),))
        try:
            async for message in call:
                for kind, cid, payload in rf.frames(message):
                    q = self._calls.get(cid)
                    if q is not None:
                        q.put_nowait((kind, payload))
        except grpc.aio.AioRpcError as exc:
            print(f"orcd frontend: the worker's relay stream ended: {exc.code().name} {exc.details()}",
                  file=sys.stderr)
        finally:
            gone = rf.end_payload(grpc.StatusCode.UNAVAILABLE.value[0], "the worker is not reachable", ())
            for q in self._calls.values():
                q.put_nowait((rf.END, gone))
            self.closed.set()

    async def call(self, method: str, request: bytes, context):
        """The responses of one relayed call (serialized); sets the call's status at its end."""
        if self.closed.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is not reachable")
        cid, q = next(self._ids), asyncio.Queue()
        self._calls[cid] = q
        self._send(rf.frame(rf.OPEN, cid, rf.open_payload(method, context.invocation_metadata(), context.peer(),
                                                          peer_common_name(context), context.time_remaining(),
                                                          request)))
        ended = False
        try:
            while True:
                kind, payload = await q.get()
                if kind == rf.DATA:
                    yield payload
                    continue
                ended = True
                code, details, trailing = rf.parse_end(payload)
                break
        finally:
            self._calls.pop(cid, None)
            if not ended:  # the client left (or its deadline passed) first
                self._send(rf.frame(rf.CANCEL, cid))
        status = _CODES[code]
        if status is not grpc.StatusCode.OK:
            await context.abort(status, details, trailing)
        if trailing:
            context.set_trailing_metadata(trailing)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def generic_handler(relay: Relay) -> grpc.GenericRpcHandler:
    """Every relayed method, requests and responses passed as bytes."""
    def stream(method):
        async def behaviour(request, context):
            async for r in relay.call(method, request, context):
                yield r
        return grpc.unary_stream_rpc_method_handler(behaviour)

    def unary(method):
        async def behaviour(request, context):
            last = None
            async for r in relay.call(method, request, context):
                last = r
            return last
        return grpc.unary_unary_rpc_method_handler(behaviour)

    handlers = {m: (stream if streaming else unary)(m) for m, streaming in relayed_methods().items()}

    class _Generic(grpc.GenericRpcHandler):
        def service(self, details):
            return handlers.get(details.method)

    return _Generic()


async def serve(args, key: str) -> int:
    limit = [("grpc.max_receive_message_length", args.max_message_bytes),
             ("grpc.max_send_message_length", args.max_message_bytes)]
    channel = grpc.aio.insecure_channel(args.relay, options=rf.channel_options(args.max_message_bytes))
    relay = Relay(channel, key)
    server = grpc.aio.server(options=limit + [
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0)])
    server.add_generic_rpc_handlers((generic_handler(relay),))
    reflection.enable_server_reflection((SERVICE.full_name, HEALTH.full_name, reflection.SERVICE_NAME), server)
    if args.tls_cert:
        def read(p):
            with open(p, "rb") as f:
                return f.read()
        creds = grpc.ssl_server_credentials([(read(args.tls_key), read(args.tls_cert))],
                                            root_certificates=read(args.tls_client_ca) if args.tls_client_ca else None,
                                            require_client_auth=bool(args.tls_client_ca))
        port = server.add_secure_port(args.listen, creds)
    else:
        port = server.add_insecure_port(args.listen)
    if not port:
        print(f"orcd frontend: cannot listen on {args.listen}", file=sys.stderr)
        return 1
    await server.start()
    # the worker counts this front end up once its stream opens, so open it only now that the port
    # is listened on; a call accepted before that waits in the relay's queue
    relaying = asyncio.ensure_future(relay.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closed = asyncio.ensure_future(relay.closed.wait())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), closed], return_when=asyncio.FIRST_COMPLETED)
    # stopping: no new connections; open calls finish as the worker ends them (its own grace)
    await server.stop(args.grace)
    relaying.cancel()
    await channel.close()
    return 0 if stop.is_set() else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relay", required=True, help="the worker's relay socket (unix:PATH)")
    ap.add_argument("--listen", required=True, help="HOST:PORT to serve (shared with the other front ends: SO_REUSEPORT)")
    ap.add_argument("--tls-cert", default="")
    ap.add_argument("--tls-key", default="")
    ap.add_argument("--tls-client-ca", default="")
    ap.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--grace", type=float, default=30.0)
    args = ap.parse_args(argv)
    key = os.environ.get(rf.KEY_ENV, "")
    if not key:
        print(f"orcd frontend: ${rf.KEY_ENV} is not set", file=sys.stderr)
        return 2
    return asyncio.run(serve(args, key))


if __name__ == "__main__":
    sys.exit(main())
