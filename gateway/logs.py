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
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=LineLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(component=name)
