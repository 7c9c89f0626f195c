"""Structured logging: one JSON object per line.

Every line carries the correlation id and request id of the call it belongs to. They live in
context variables so that code deep in the call (validation, tokenization) does not have to pass
them around; the engine thread, which works for many requests at once, binds them per request
with `bound(...)`.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import sys
import uuid
from typing import Any, Iterator

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("orcd_correlation_id", default="")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("orcd_request_id", default="")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "fields"}


def new_correlation_id() -> str:
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            # A record made on the engine thread names its request explicitly (extra=); one made
            # on a call's thread takes the ids from that call's context.
            "correlation_id": getattr(record, "correlation_id", None) or correlation_id.get(),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str | int = "info", stream=None) -> None:
    """Routes the `orcd` logger tree to `stream` (stderr) as JSON lines; idempotent."""
    logger = logging.getLogger("orcd")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    logger.setLevel(level)
    for h in list(logger.handlers):
        if getattr(h, "_orcd", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._orcd = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("orcd") else f"orcd.{name}")


@contextlib.contextmanager
def bound(*, correlation: str | None = None, request: str | None = None) -> Iterator[None]:
    """Sets the ids for log lines made inside the block, restoring the previous ones after."""
    tokens = []
    if correlation is not None:
        tokens.append((correlation_id, correlation_id.set(correlation)))
    if request is not None:
        tokens.append((request_id, request_id.set(request)))
    try:
        yield
    finally:
        for var, tok in reversed(tokens):
            try:
                var.reset(tok)
            except ValueError:
                # Reset from another context (a generator resumed elsewhere): clearing is the
                # safe fallback, since a stale id on a later call would mislabel its lines.
                var.set("")
