"""The OpenAPI 3.1 description of the admin listener's machine endpoints, written as data.

``/healthz``, ``/readyz``, ``/metrics`` and this document itself (``/v1/openapi.json``); the console's
pages under ``/console/`` are for browsers and not described.  The parser's refusals and a fault of a
handler are the JSON errors every listener gives (``JsonRefusals``, gateway/inbound/http.py: the
``Error`` shape of gateway/errors.py's ERROR_SCHEMAS, as in gateway/inbound/openapi.py).
"""

from __future__ import annotations

import copy
from typing import Any

from .. import __version__
from ..errors import ERROR_SCHEMAS

OPENAPI = "3.1.1"
PATH = "/v1/openapi.json"

Json = dict[str, Any]

# JsonRefusals: what the HTTP parser refuses, and a fault of a handler (500).
ANY_REQUEST = {
    "400": ("The request is not valid HTTP/1.1; the connection is closed.", "MALFORMED_REQUEST"),
    "431": ("A request line or header is over the HTTP parser's limits; the connection is closed.", "TOO_LARGE"),
    "500": ("A fault of the gateway itself.", "INTERNAL_ERROR"),
}
NO_STORE = {"Cache-Control": {"description": "no-store", "schema": {"type": "string", "const": "no-store"}}}


def error(description: str, code: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": {
        "allOf": [{"$ref": "#/components/schemas/Error"}, {"properties": {"error": {"const": code}}}]}}}}


def operation(summary: str, operation_id: str, success: Json, *, token: bool) -> Json:
    """``success``: the answers of the handler, by status; then what any request can be told."""
    out: Json = {**success, **{status: error(*what) for status, what in ANY_REQUEST.items()}}
    if token:  # AdminInbound._auth
        out["401"] = {**error("No valid bearer token (admin.token_file).", "UNAUTHORIZED"),
                      "headers": {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}}}}
    return {"summary": summary, "operationId": operation_id, "responses": dict(sorted(out.items()))}


def json_answer(description: str, schema: Json) -> Json:
    return {"description": description, "headers": NO_STORE, "content": {"application/json": {"schema": schema}}}


def readiness(status: str, *, reason: bool) -> Json:
    properties: Json = {"status": {"const": status}, "at": {"type": "string", "format": "date-time"}}
    if reason:
        properties["reason"] = {"type": "string", "description": "why not (starting, stopping, the store does not answer)"}
    return {"type": "object", "required": list(properties), "properties": properties, "additionalProperties": False}


def admin_document(*, token: bool) -> Json:
    """What the admin listener serves; ``token``: whether it requires ``Authorization: Bearer`` (admin.token_file)."""
    doc: Json = {
        "openapi": OPENAPI,
        "info": {
            "title": "einvoice-gateway admin endpoints", "version": __version__,
            "description": "Health, readiness and Prometheus metrics for the operators' tools.  Loopback by default "
                           "and then unauthenticated; with admin.token_file every request needs the bearer token "
                           "(and off loopback it is served over HTTPS).  The web console under /console/ is not "
                           "described here.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": {
            "/healthz": {"get": operation("The process and its event loop answer", "healthz", {
                "200": json_answer("Alive.", {
                    "type": "object", "required": ["status", "uptime_s"], "additionalProperties": False,
                    "properties": {"status": {"const": "ok"}, "uptime_s": {"type": "number", "minimum": 0}}}),
            }, token=token)},
            "/readyz": {"get": operation("Whether to send traffic here", "readyz", {
                "200": json_answer("Listeners accepting, not stopping, the store answering.", readiness("ready", reason=False)),
                "503": json_answer("Not ready: starting, stopping, or the store does not answer.",
                                   readiness("not ready", reason=True)),
            }, token=token)},
            "/metrics": {"get": operation("Prometheus metrics", "metrics", {
                "200": {"description": "The Prometheus text exposition format, summed over the worker processes.",
                        "headers": NO_STORE,
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
            }, token=token)},
            PATH: {"get": operation("This OpenAPI document", "openapi", {
                "200": json_answer("The OpenAPI 3.1 description of the admin endpoints.", {"type": "object"}),
            }, token=token)},
        },
        "components": {"schemas": copy.deepcopy(ERROR_SCHEMAS)},
    }
    if token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                           "description": "the token in admin.token_file"}}
        doc["security"] = [{"bearer": []}]
    return doc
