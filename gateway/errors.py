"""The gateway's one exception tree.

::

    GatewayError                      base; never raised itself
    ├── Rejected                      permanent: the sender must change something before resending
    │   ├── Malformed                 400  not well-formed XML, not XML, forbidden DTD/PI constructs
    │   ├── LimitExceeded             413  bytes, depth, element or attribute limits
    │   ├── UnsupportedMediaType      415  wrong Content-Type or a Content-Encoding
    │   ├── SchemaInvalid             422  XSD violations (details: line, path, message)
    │   ├── UnsupportedDocument       422  a root element or UBL version the gateway does not take
    │   ├── Forbidden                 403  unknown/suspended partner, supplier not bound to partner
    │   └── Conflict                  409  same seller and invoice number, different content
    ├── Transient                     the sender should retry later; nothing was stored
    │   ├── StorageUnavailable        503  the durable write failed
    │   ├── Overloaded                503  too many bytes in flight
    │   └── InternalError             500  a fault of the gateway itself (logged with its traceback)
    ├── ConfigError                   start-up and CLI: names the exact key path
    └── VaultError                    one opaque error for every failure to open a sealed object

Each rejection carries a stable ``code`` (documented in docs/partners.md, Refusals) and a list of ``details``; a
transport turns them into a reply in exactly one function.  Messages meant for the remote sender
say what to fix and never include key material or internal paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Detail:
    """One precise finding the sender can act on."""

    message: str
    line: int | None = None
    path: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.line is not None:
            out["line"] = self.line
        if self.path is not None:
            out["path"] = self.path
        return out


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    code = "GATEWAY_ERROR"
    http_status = 500

    def __init__(self, message: str, details: list[Detail] | None = None, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details: list[Detail] = list(details or [])
        if code is not None:
            self.code = code

    def as_json(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "details": [d.as_json() for d in self.details],
        }


# The JSON Schema of ``GatewayError.as_json`` and ``Detail.as_json``: what every listener's error replies
# look like, for the OpenAPI documents (gateway/inbound/openapi.py, gateway/operations/openapi.py).
ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message", "details"],
        "properties": {
            "error": {"type": "string", "description": "a stable code (docs/partners.md, Refusals)"},
            "message": {"type": "string", "description": "what to fix; never key material or file paths"},
            "details": {"type": "array", "items": {"$ref": "#/components/schemas/Detail"}},
        },
        "additionalProperties": False,
    },
    "Detail": {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "string"}, "line": {"type": "integer"}, "path": {"type": "string"}},
        "additionalProperties": False,
    },
}


class Rejected(GatewayError):
    """Permanent: resending the same bytes will fail the same way."""

    code = "REJECTED"
    http_status = 400


class Malformed(Rejected):
    code = "MALFORMED"
    http_status = 400


class LimitExceeded(Rejected):
    code = "TOO_LARGE"
    http_status = 413


class UnsupportedMediaType(Rejected):
    code = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415


class SchemaInvalid(Rejected):
    code = "SCHEMA_INVALID"
    http_status = 422


class UnsupportedDocument(Rejected):
    code = "UNSUPPORTED_DOCUMENT"
    http_status = 422


class Forbidden(Rejected):
    code = "FORBIDDEN"
    http_status = 403


class Conflict(Rejected):
    code = "DUPLICATE_CONFLICT"
    http_status = 409


class Transient(GatewayError):
    """The gateway could not take the message now; nothing was stored. Retry later."""

    code = "TEMPORARILY_UNAVAILABLE"
    http_status = 503


class StorageUnavailable(Transient):
    code = "STORAGE_UNAVAILABLE"


class Overloaded(Transient):
    code = "OVERLOADED"


class InternalError(Transient):
    """What the sender is told of a fault of the gateway itself: nothing about it, but to retry."""

    code = "INTERNAL_ERROR"
    http_status = 500

    def __init__(self, message: str = "the gateway failed to process the request; retry later"):
        super().__init__(message)


class ConfigError(GatewayError):
    """A configuration problem; ``message`` starts with the key path (``https.listen: …``)."""

    code = "CONFIG_ERROR"


class VaultError(GatewayError):
    """A sealed object could not be opened: wrong key, tampered, truncated or misplaced.

    Deliberately opaque (which of these it was is not told), like a failed AEAD open.
    """

    code = "VAULT_ERROR"
