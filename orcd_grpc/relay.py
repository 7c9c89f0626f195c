"""The worker's end of its front-end processes (frontend.py): calls they relay arrive here and run
through the same policies and handlers as calls on the worker's own port.

Each front end holds one stream to the worker's private socket (relay_frames.METHOD, refused
without the worker's key). A relayed call runs on a `RelayedContext`: the client's metadata, peer
address and certificate name as the front end saw them, its deadline, and the status the
handler sets, so authentication, rate limits, request-id ownership and cancellation behave as
for a direct call. What the handlers yield is not sent as a gRPC message each: the responses of
all the connection's calls that are ready in one turn of the event loop leave as one message
(an engine step's tokens for every stream of that front end), which is the point of front ends.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import grpc

from . import logs
from . import relay_frames as rf

log = logs.get_logger("orcd.relay")



class _Ended(Exception):
    """abort() on a relayed call: the status is set, the handler ends."""


class RelayedContext:
    """The grpc.aio ServicerContext of a relayed call, as the worker's policies and handlers use it."""

    def __init__(self, head: dict):
        self._metadata = head["metadata"]
        self._peer, self._cn = head.get("peer") or "unknown", head.get("cn")
        t = head.get("timeout")
        self._deadline = None if t is None else time.monotonic() + float(t)
        self._code, self._details, self._trailing = None, "", ()
        self._done, self._cancelled, self._callbacks = False, False, []

    # what the call carries
    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return {"x509_common_name": [self._cn.encode()]} if self._cn else {}

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    # its status
    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        self._details = details or ""

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata or ())

    def code(self):
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing

    async def abort(self, code, details: str = "", trailing_metadata=()):
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        self._code, self._details = code, details or ""
        raise _Ended(details)

    # its end
    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def add_done_callback(self, callback) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def _finish(self, cancelled: bool) -> None:
        if self._done:
            return
        self._done, self._cancelled = True, cancelled
        for cb in self._callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("a relayed call's done callback failed")
        self._callbacks.clear()


class RelayTarget:
    """The handlers a relayed call may reach ({full method name: RpcMethodHandler}, already
    running on the loop) and the worker's policies (call_hooks.OnLoop) around them."""

    def __init__(self, handlers: dict, on_loop=None, max_calls: int = 0):
        self.handlers, self.on_loop = handlers, on_loop
        self.calls = 0  # relayed calls so far (a front end's share of the traffic)
        self.streams = 0  # front ends connected now (each opens its stream once it listens)
        self.changed = threading.Condition()
        # at most this many relayed calls open at once, as the worker's own port allows its callers
        # (maximum_concurrent_rpcs); 0: no cap
        self.max_calls, self.open = max_calls, 0

    def count_stream(self, delta: int) -> None:
        with self.changed:
            self.streams += delta
            self.changed.notify_all()

    async def handler(self, method: str, metadata):
        self.calls += 1

        async def own(details):
            return self.handlers.get(details.method)

        details = SimpleNamespace(method=method, invocation_metadata=metadata)
        return await (own(details) if self.on_loop is None else self.on_loop.intercept_service(own, details))


class _Connection:
    """One front end's stream: its calls by id, and the batch of frames due to it."""

    def __init__(self, target: RelayTarget):
        self.target = target
        self.out: asyncio.Queue = asyncio.Queue()
        self.calls: dict[int, asyncio.Task] = {}
        # two turns: after what this turn of the loop still runs (the other streams' tokens)
        self.emit = rf.Batcher(self.out, turns=2).add

    async def read(self, requests) -> None:
        try:
            async for message in requests:
                for kind, cid, payload in rf.frames(message):
                    if kind == rf.OPEN and cid not in self.calls:
                        self.calls[cid] = asyncio.ensure_future(self.run(cid, payload))
                    elif kind == rf.CANCEL and cid in self.calls:
                        self.calls[cid].cancel()
        finally:
            self.out.put_nowait(None)

    async def run(self, cid: int, payload: bytes) -> None:
        target = self.target
        try:
            head, body = rf.parse_open(payload)
        except Exception as exc:  # only a front end with the key gets here: a bug, not a client
            self.calls.pop(cid, None)
            self.emit(rf.frame(rf.END, cid, rf.end_payload(grpc.StatusCode.INTERNAL.value[0],
                                                           f"a malformed relay frame: {exc}", ())))
            return
        ctx = RelayedContext(head)
        target.open += 1
        try:
            if target.max_calls and target.open > target.max_calls:
                ctx.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                ctx.set_details(f"the worker has {target.max_calls} calls open; retry later")
                ctx.set_trailing_metadata((("retry-after-ms", "1000"),))
                handler = None
            else:
                handler = await target.handler(head["method"], head["metadata"])
            if handler is None:
                if ctx.code() is None:
                    ctx.set_code(grpc.StatusCode.UNIMPLEMENTED)
                    ctx.set_details(f"no method {head['method']}")
            else:
                request = handler.request_deserializer(body) if handler.request_deserializer else body
                out = handler.response_serializer or (lambda r: r)
                if handler.unary_stream is not None:
                    async for r in handler.unary_stream(request, ctx):
                        self.emit(rf.frame(rf.DATA, cid, out(r)))
                elif handler.unary_unary is not None:
                    r = handler.unary_unary(request, ctx)
                    r = await r if inspect.isawaitable(r) else r
                    if r is not None and ctx.code() in (None, grpc.StatusCode.OK):
                        self.emit(rf.frame(rf.DATA, cid, out(r)))
                else:
                    ctx.set_code(grpc.StatusCode.UNIMPLEMENTED)
                    ctx.set_details("client streaming is not relayed")
        except _Ended:
            pass
        except asyncio.CancelledError:  # the client went away: nothing more goes to it
            target.open -= 1
            ctx._finish(cancelled=True)
            self.calls.pop(cid, None)
            raise
        except Exception as exc:
            log.exception("a relayed call failed", extra={"fields": {"method": head.get("method")}})
            ctx.set_code(grpc.StatusCode.UNKNOWN)
            ctx.set_details(f"{type(exc).__name__}: {exc}")
        target.open -= 1
        ctx._finish(cancelled=False)
        self.calls.pop(cid, None)
        code = ctx.code() or grpc.StatusCode.OK
        self.emit(rf.frame(rf.END, cid, rf.end_payload(code.value[0], ctx.details(), ctx.trailing_metadata())))

    def close(self) -> None:
        for task in list(self.calls.values()):
            task.cancel()


def relay_handler(target: RelayTarget, key: str) -> grpc.GenericRpcHandler:
    """The generic handler of relay_frames.METHOD: front ends presenting `key` only."""
    async def calls(requests, context):
        md = dict(context.invocation_metadata() or ())
        if not hmac.compare_digest(str(md.get(rf.KEY_HEADER, "")), key):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a front end of this worker")
        conn = _Connection(target)
        reader = asyncio.ensure_future(conn.read(requests))
        target.count_stream(+1)
        try:
            while True:
                batch = await conn.out.get()
                if batch is None:
                    return
                yield batch
        finally:
            target.count_stream(-1)
            reader.cancel()
            conn.close()

    handlers = {rf.METHOD: grpc.stream_stream_rpc_method_handler(calls)}

    class _Generic(grpc.GenericRpcHandler):
        def service(self, details):
            return handlers.get(details.method)

    return _Generic()


class FrontEnds:
    """The worker's front-end processes and its private relay socket: started with the worker,
    restarted if one exits while the worker runs, stopped with it."""

    def __init__(self, loop_server, target: RelayTarget, *, count: int, listen: str, tls=None,
                 max_message_bytes: int = 64 * 1024 * 1024, grace: float = 30.0):
        self.count, self.listen, self.tls = count, listen, tls
        self.max_message_bytes, self.grace = max_message_bytes, grace
        self.key = secrets.token_hex(32)
        self._dir = tempfile.mkdtemp(prefix="orcd-relay-")  # 0700: only this user reaches the socket
        self.address = f"unix:{self._dir}/relay.sock"
        self._loop_server = loop_server
        opts = rf.channel_options(max_message_bytes)

        async def make():
            server = grpc.aio.server(options=opts)
            server.add_generic_rpc_handlers((relay_handler(target, self.key),))
            if not server.add_insecure_port(self.address):
                raise RuntimeError(f"cannot listen on {self.address}")
            await server.start()
            return server

        self.target = target
        self._server = loop_server.call(make())
        self._procs: list = [None] * count
        self._stopping = False
        self._threads: list = []

    def _spawn(self):
        cmd = [sys.executable, "-m", "orcd_grpc.frontend", "--relay", self.address, "--listen", self.listen,
               "--max-message-bytes", str(self.max_message_bytes), "--grace", str(self.grace)]
        if self.tls:
            cert, key, ca = self.tls
            cmd += ["--tls-cert", cert, "--tls-key", key] + (["--tls-client-ca", ca] if ca else [])
        return subprocess.Popen(cmd, env=dict(os.environ, **{rf.KEY_ENV: self.key}))

    def start(self) -> None:
        for i in range(self.count):
            t = threading.Thread(target=self._keep, args=(i,), name=f"orcd-frontend-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _keep(self, i: int) -> None:
        """Front end i, restarted when it exits while the worker runs: after 1 s, doubling up to 30 s
        while it keeps exiting within a minute (a port it cannot bind, say)."""
        wait = 1.0
        while not self._stopping:
            started = time.monotonic()
            proc = self._procs[i] = self._spawn()
            rc = proc.wait()
            if self._stopping:
                return
            wait = 1.0 if time.monotonic() - started > 60 else min(30.0, wait * 2)
            log.warning("a front end exited; starting another", extra={"fields": {"index": i, "code": rc,
                                                                                 "in_seconds": wait}})
            time.sleep(wait)

    def wait_ready(self, timeout: float) -> bool:
        """Whether every front end is listening (its relay stream open) within `timeout` seconds."""
        with self.target.changed:
            return self.target.changed.wait_for(lambda: self.target.streams >= self.count, timeout)

    def stop_accepting(self) -> None:
        """Front ends stop taking connections; their open calls run on until the worker ends them."""
        self._stopping = True
        for p in self._procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def close(self, timeout: float = 5.0) -> None:
        self.stop_accepting()
        self._loop_server.call(self._server.stop(0))
        end = time.monotonic() + timeout
        for p in self._procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except Exception:
                p.kill()
                p.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
