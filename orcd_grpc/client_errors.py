"""Typed errors of the Python clients (orcd_grpc.client, orcd_grpc.aio_client).

Every failed call raises an OrcdRpcError, or the subclass named after its status code, with the
gRPC error it came from as __cause__. OrcdRpcError subclasses grpc.RpcError and keeps its
.code() / .details() / .trailing_metadata() methods, so code written against the raw gRPC errors
keeps working; new code can read .message and .retry_after_ms, or catch e.g. NotFoundError.
"""
from __future__ import annotations

import contextlib

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


class ClientConfigError(ValueError):
    """Client settings that do not fit together or cannot be read (TLS files, a token that
    would travel in plaintext); raised before anything is sent."""


class OrcdRpcError(grpc.RpcError):
    """A call the worker (or the transport) answered with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata=()):
        self._code = code
        self.message = message
        self._trailing = tuple(trailing_metadata or ())
        self.retry_after_ms = _retry_after_ms(self._trailing)
        super().__init__(f"{code.name}: {message}")

    # The grpc.Call accessors, so callers of the raw errors need no change.
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> tuple:
        return self._trailing


def _retry_after_ms(trailing) -> int | None:
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):  # a malformed hint is no hint
                return None
    return None


class InvalidArgumentError(OrcdRpcError): pass  # noqa: E701
class OutOfRangeError(OrcdRpcError): pass  # noqa: E701
class NotFoundError(OrcdRpcError): pass  # noqa: E701
class AlreadyExistsError(OrcdRpcError): pass  # noqa: E701
class FailedPreconditionError(OrcdRpcError): pass  # noqa: E701
class ResourceExhaustedError(OrcdRpcError): pass  # noqa: E701
class UnauthenticatedError(OrcdRpcError): pass  # noqa: E701
class PermissionDeniedError(OrcdRpcError): pass  # noqa: E701
class UnavailableError(OrcdRpcError): pass  # noqa: E701
class DeadlineExceededError(OrcdRpcError): pass  # noqa: E701
class UnimplementedError(OrcdRpcError): pass  # noqa: E701
class InternalError(OrcdRpcError): pass  # noqa: E701


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_grpc(exc: grpc.RpcError) -> OrcdRpcError:
    """The typed error for a gRPC error (sync or grpc.aio); an OrcdRpcError is returned as is.
    Raise it `from exc` to keep the original as __cause__."""
    if isinstance(exc, OrcdRpcError):
        return exc
    code = _call(exc, "code") or grpc.StatusCode.UNKNOWN
    message = _call(exc, "details")
    trailing = _call(exc, "trailing_metadata") or ()
    return _BY_CODE.get(code, OrcdRpcError)(code, message if message is not None else str(exc),
                                            tuple((k, v) for k, v in trailing))


def _call(exc, name):
    # Errors raised before a call started (a closed channel, some aio failures) lack some of
    # the grpc.Call accessors, or raise from them.
    fn = getattr(exc, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:
        return None


@contextlib.contextmanager
def typed_errors():
    """Re-raises gRPC errors from the block as OrcdRpcError (the original as __cause__). A sync
    context manager, so it also wraps the awaits of the asyncio client."""
    try:
        yield
    except OrcdRpcError:
        raise
    except grpc.RpcError as exc:
        raise from_grpc(exc) from exc
