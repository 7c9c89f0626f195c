"""Errors the engine raises, each carrying the gRPC status the servicer answers with.

The message always names the field or the thing that is wrong, so that an operator reading a
grpcurl error knows what to change.
"""
from __future__ import annotations

import grpc


class OrcdError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None, retry_after_ms: int | None = None):
        self.field = field
        self.retry_after_ms = retry_after_ms
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(OrcdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(OrcdError):
    code = grpc.StatusCode.OUT_OF_RANGE


class FailedPrecondition(OrcdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(OrcdError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OrcdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(OrcdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(OrcdError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(OrcdError):
    code = grpc.StatusCode.INTERNAL
