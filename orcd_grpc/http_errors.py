"""Errors of the HTTP front door in OpenAI's shape: {"error": {message, type, param, code}} with
the HTTP status that matches the gRPC status the same request gets over gRPC."""
from __future__ import annotations

import math

import grpc
import pydantic
from starlette.responses import JSONResponse

from . import openai_schema as oa
from .errors import OrcdError

#: gRPC status -> (HTTP status, OpenAI error type). The error's "code" is the gRPC status name (what
#: the same request gets over gRPC) unless code_of names something OpenAI clients know.
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}


class Unauthenticated(OrcdError):
    code = grpc.StatusCode.UNAUTHENTICATED


class HttpError(Exception):
    """An answer that is not an OrcdError's (413, 404 of a path)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def code_of(err: OrcdError, param: str | None) -> str:
    if isinstance(err, oa.NotSupportedYet):
        return "not_supported_yet"
    if err.code == grpc.StatusCode.NOT_FOUND and param == "model":
        return "model_not_found"
    if err.code == grpc.StatusCode.OUT_OF_RANGE and param in ("prompt", "messages"):
        return "context_length_exceeded"
    return err.code.name.lower()


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openai_error(err: OrcdError, kind: str = "", body=None) -> tuple[int, dict]:
    """(HTTP status, error body) of `err`, its field named as the body `kind` names it."""
    status, type_ = STATUS.get(err.code, (500, "server_error"))
    message, param = oa.rename(err, kind, body)
    return status, error_body(message, type_, param, code_of(err, param))


def error_response(err: OrcdError, kind: str = "", body=None) -> JSONResponse:
    status, content = openai_error(err, kind, body)
    headers = {}
    if err.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(int(err.retry_after_ms))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="orcd"'
    return JSONResponse(content, status_code=status, headers=headers)


def pydantic_error(exc: pydantic.ValidationError) -> HttpError:
    first = exc.errors()[0]
    parts = []
    for x in first.get("loc", ()):
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif isinstance(x, str) and x.isidentifier() and x not in ("str", "int", "float", "list", "dict", "bool"):
            parts.append(("." if parts else "") + x)
        else:
            break  # a union's branch tag (list[int], ...): the field is named already
    param = "".join(parts) or None
    msg = "unknown field (not a parameter of this endpoint)" if first.get("type") == "extra_forbidden" else first["msg"]
    return HttpError(400, f"{param}: {msg}" if param else msg, param=param)
