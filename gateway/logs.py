"""Structured JSON logs on stdout (journald keeps them), with secrets and content kept out.

One INFO event per outcome, with ``message_id``, ``partner``, ``transport`` and the reason code
bound.  The redaction processor is the last line of defence: fields whose names say they hold
content or secrets are replaced, long strings are cut, control characters are escaped by JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .errors import GatewayError

REDACTED = "[redacted]"
MAX_FIELD_CHARS = 512  # SECURITY-TESTS.md L-02: fields are truncated
_SECRET_WORDS = ("body", "payload", "content", "xml", "key", "secret", "password", "passphrase", "token", "pem", "sealed")
_ALLOWED = {"key_id", "content_type", "content_length"}


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k, v in list(event.items()):
        lowered = k.lower()
        if lowered not in _ALLOWED and any(w in lowered for w in _SECRET_WORDS):
            event[k] = REDACTED
        elif isinstance(v, (bytes, bytearray, memoryview)):
            event[k] = f"[{len(v)} bytes]"
        elif isinstance(v, str) and len(v) > MAX_FIELD_CHARS:
            event[k] = v[:MAX_FIELD_CHARS] + "…"
    return event


class LineLogger:
    """Writes each event as one line with one write(2) call: the worker processes share stdout, and a
    line written in pieces could interleave with another process's (a pipe keeps writes of up to
    PIPE_BUF, 4096 bytes, whole; fields are cut to MAX_FIELD_CHARS to stay under it)."""

    def __init__(self, stream: TextIO | None):
        self._stream = stream  # None: whatever sys.stdout is when a line is written

    def msg(self, message: str) -> None:
        stream: TextIO = self._stream or sys.stdout
        real = sys.__stdout__
        if real is None or stream is not real:  # in-memory or captured by a test: no fd of its own
            stream.write(message + "\n")
            stream.flush()
            return
        real.flush()
        data = memoryview((message + "\n").encode("utf-8", "backslashreplace"))
        fd = real.fileno()
        while data:
            data = data[os.write(fd, data):]

    debug = info = warning = warn = error = critical = exception = fatal = failure = log = msg


def one_line_exception(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Where a traceback would go, one line instead: the exception's type and message (cut like any field),
    and the innermost line of the gateway's own code it passed through.  No traceback reaches the log."""
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if isinstance(exc_info, BaseException):
        exc: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = sys.exc_info()[1]
    if exc is None:
        return event
    event["error_type"] = type(exc).__name__
    event["error"] = exc.message if isinstance(exc, GatewayError) else str(exc)
    where, tb = None, exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if f"{os.sep}gateway{os.sep}" in code.co_filename:
            where = f"{code.co_filename.rpartition(os.sep + 'gateway' + os.sep)[2]}:{tb.tb_lineno} in {code.co_name}"
        tb = tb.tb_next
    if where is not None:
        event["where"] = f"gateway/{where}"
    return event


class _Bridge(logging.Handler):
    """The libraries' own log records (aiohttp, aiosmtpd, asyncio), warnings and worse, as JSON events of ours."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "text": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            get("library").log(record.levelno, "library.log", **fields)
        except Exception:  # a log line must never break what it reports on
            self.handleError(record)


_BRIDGE = _Bridge(logging.WARNING)


class LineLoggerFactory:
    def __init__(self, stream: TextIO | None):
        self._stream = stream

    def __call__(self, *args: Any) -> LineLogger:
        return LineLogger(self._stream)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            one_line_exception,
            redact,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=LineLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    if _BRIDGE not in root.handlers:
        root.addHandler(_BRIDGE)
    root.setLevel(min(root.level or logging.WARNING, logging.WARNING))


def get(name: str) -> Any:
    return structlog.get_logger(component=name)
