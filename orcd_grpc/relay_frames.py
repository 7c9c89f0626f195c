"""The frames a front-end process (frontend.py) and the worker (relay.py) exchange over their one
local stream: many calls multiplexed on it, each message a batch of frames.

A frame is `kind` (1 byte), the call's id (4 bytes), the payload's length (4 bytes), the payload.
Front end to worker:
  OPEN    a call: a JSON header (method, metadata, peer, certificate name, seconds left) and the
          request's serialized bytes, as `header length (4 bytes) | header | request`
  CANCEL  the client went away (or its deadline passed): end the call, send nothing more
Worker to front end:
  DATA    one response message, serialized as the client gets it
  END     the call's status: a JSON {code, details, trailing} (code as grpc.StatusCode's value[0])
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct

OPEN, CANCEL, DATA, END = 1, 2, 3, 4
_HEAD = struct.Struct("<BII")
_U32 = struct.Struct("<I")
METHOD = "/orcd.relay.v1.Relay/Calls"  # the worker's relay stream (its private socket only)
KEY_HEADER = "orcd-relay-key"          # the secret a front end presents on that stream
KEY_ENV = "ORCD_RELAY_KEY"             # where a front end process reads it (not its command line)
BATCH_BYTES = 4 << 20  # frames of one batch at most (one more frame may carry a whole message)


def channel_options(max_message_bytes: int) -> list:
    """The relay stream's message limits, both ends: a batch plus one frame of the largest call message."""
    limit = BATCH_BYTES + max_message_bytes + (1 << 16)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class Batcher:
    """Frames bound for one end of a relay stream, leaving as one message: those added within `turns`
    turns of the event loop (the worker waits two, so the tokens of every stream a drain woke go
    together), sooner when BATCH_BYTES would be passed. Messages go to `out` (an asyncio.Queue)."""

    def __init__(self, out: asyncio.Queue, turns: int = 1):
        self.out, self.turns = out, turns
        self._loop = asyncio.get_running_loop()
        self._batch: list[bytes] = []
        self._size = 0

    def add(self, data: bytes) -> None:
        if self._size + len(data) > BATCH_BYTES:
            self.flush()
        if not self._batch:
            self._later(self.turns)
        self._batch.append(data)
        self._size += len(data)

    def _later(self, turns: int) -> None:
        self._loop.call_soon(self.flush if turns <= 1 else lambda: self._later(turns - 1))

    def flush(self) -> None:
        if self._batch:
            self.out.put_nowait(b"".join(self._batch))
            self._batch, self._size = [], 0


def frame(kind: int, call: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(kind, call, len(payload)) + payload


def frames(message: bytes):
    """(kind, call id, payload) of each frame of a batch."""
    view, at, end = memoryview(message), 0, len(message)
    while at < end:
        kind, call, n = _HEAD.unpack_from(view, at)
        at += _HEAD.size
        yield kind, call, bytes(view[at:at + n])
        at += n


def _md_out(metadata) -> list:
    # binary values (keys ending in -bin) cross as base64 text
    return [[k, base64.b64encode(v).decode() if isinstance(v, bytes) else v, isinstance(v, bytes)]
            for k, v in metadata or ()]


def _md_in(items) -> tuple:
    return tuple((k, base64.b64decode(v) if binary else v) for k, v, binary in items)


def open_payload(method: str, metadata, peer: str, cn: str | None, seconds_left: float | None,
                 request: bytes) -> bytes:
    head = json.dumps({"method": method, "metadata": _md_out(metadata), "peer": peer, "cn": cn,
                       "timeout": seconds_left}).encode()
    return _U32.pack(len(head)) + head + request


def parse_open(payload: bytes) -> tuple[dict, bytes]:
    """(header with metadata as (key, value) pairs, request bytes) of an OPEN frame."""
    (n,) = _U32.unpack_from(payload, 0)
    head = json.loads(payload[4:4 + n])
    head["metadata"] = _md_in(head["metadata"])
    return head, payload[4 + n:]


def end_payload(code: int, details: str, trailing) -> bytes:
    return json.dumps({"code": code, "details": details, "trailing": _md_out(trailing)}).encode()


def parse_end(payload: bytes) -> tuple[int, str, tuple]:
    d = json.loads(payload)
    return d["code"], d["details"], _md_in(d["trailing"])
