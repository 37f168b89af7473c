"""Structured JSON logs on stdout (journald keeps them), with secrets and content kept out.

One INFO event per outcome, with ``message_id``, ``partner``, ``transport`` and the reason code
bound.  The redaction processor is the last line of defence: fields whose names say they hold
content or secrets are replaced, long strings are cut, control characters are escaped by JSON.
"""

from __future__ import annotations

import logging
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
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(component=name)
