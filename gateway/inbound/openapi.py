"""The OpenAPI 3.1 descriptions of the partner API and the ERP's outbound API, written as data.

Each listener serves its own at ``GET /v1/openapi.json`` (``serve``).  They describe every answer the
handlers and the shared HTTP helpers give (gateway/inbound/http.py): the 202 receipt, the status
document, and each error status with the codes it can carry as an enum, in the one error shape
``{error, message, details[{message, line?, path?}]}`` (``GatewayError.as_json``) and with
``Retry-After`` on a 503 (``reply_for``).  What each code means is docs/partners.md's error table
(Refusals), which tests/inbound/test_openapi.py holds these tables to; schemathesis holds the running listeners to them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from .. import __version__
from ..errors import ERROR_SCHEMAS
from ..model import DocumentType
from ..storage.records import SUMMARIES

OPENAPI = "3.1.1"
PATH = "/v1/openapi.json"
DELIVERY_STATES = ("pending", "delivered", "dead")  # a destination's job as a status document shows it (no held/rejected)

Json = dict[str, Any]
Codes = Mapping[int, Sequence[str]]

# --- what every request can be told ----------------------------------------------------------------

# JsonRefusals (http.py): the HTTP parser's refusals, on any path, before a handler runs; and what
# answer_errors makes of the framework's other refusals (HttpRefusal) and of a fault (500).
ANY_REQUEST: Codes = {
    400: ("MALFORMED_REQUEST", "HTTP_ERROR"),
    431: ("TOO_LARGE",),
    500: ("INTERNAL_ERROR",),
}

# --- what a submitted invoice can be told, beyond the partner's identity -----------------------------

# The stages every invoice goes through, in or out (pipeline.validated, read_body, media_type_of).
DOCUMENT: Codes = {
    400: ("MALFORMED_XML", "DTD_FORBIDDEN", "XINCLUDE_FORBIDDEN", "NOT_PDF"),
    408: ("BODY_TIMEOUT",),
    409: ("DUPLICATE_CONFLICT",),
    413: ("TOO_LARGE", "XML_LIMIT_EXCEEDED"),
    415: ("UNSUPPORTED_MEDIA_TYPE", "UNSUPPORTED_ENCODING"),
    422: ("SCHEMA_INVALID", "UNSUPPORTED_DOCUMENT_TYPE", "NO_EMBEDDED_INVOICE", "SEVERAL_EMBEDDED_INVOICES",
          "EXTENSION_REFUSED", "EXTRA_XML_ATTACHMENT", "UNSUPPORTED_UBL_VERSION", "MISSING_INVOICE_NUMBER",
          "RULES_FAILED", "RULES_UNAVAILABLE"),
    503: ("OVERLOADED", "STORAGE_UNAVAILABLE", "RULES_ENGINE_UNAVAILABLE"),
}

# The partner listener: who the client certificate is (partners/directory.py gate, https.py), checked
# again on every request (http.check_validity, stages/revocation.py).
PARTNER_IDENTITY: Codes = {
    403: ("PARTNER_UNKNOWN", "PARTNER_SUSPENDED", "PARTNER_PENDING", "CERTIFICATE_NOT_ACTIVE", "CERT_REVOKED",
          "CERT_EXPIRED"),
    503: ("REVOCATION_UNKNOWN",),
}
# A received invoice, after its document checks: signature policy, supplier binding, IBAN check digits.
RECEIVED: Codes = {
    403: ("SUPPLIER_NOT_IDENTIFIED", "SUPPLIER_NOT_AUTHORIZED"),
    422: ("SIGNATURE_INVALID", "SIGNATURE_REQUIRED", "INVALID_IBAN"),
}

# The ERP's listener on TCP: its certificate's key must be allowlisted (submit.py _authenticate).
SUBMITTER_IDENTITY: Codes = {403: ("SUBMITTER_UNKNOWN", "CERT_EXPIRED")}
# A submitted invoice: this business as the seller, one partner as the buyer, signed when it wants that.
SUBMITTED: Codes = {
    403: ("SELLER_NOT_THIS_BUSINESS", "RECIPIENT_UNKNOWN", "RECIPIENT_SUSPENDED", "RECIPIENT_NO_ENDPOINT"),
    422: ("CANNOT_SIGN",),
    503: ("SIGNING_UNAVAILABLE",),
}

NOT_FOUND: Codes = {404: ("NOT_FOUND",)}
STORE: Codes = {503: ("STORAGE_UNAVAILABLE",)}  # a status read when the store does not answer

WHAT = {
    400: "The request or its body is malformed.",
    403: "The client may not do this (the error code says why).",
    404: "No such message for you.",
    408: "The body did not arrive in time.",
    409: "The same invoice number and issue date were accepted from you with other content.",
    413: "The request body (or what it holds) is over a limit.",
    415: "The Content-Type or Content-Encoding is not accepted.",
    422: "The document was read but is refused (the error code and details say what to fix).",
    431: "A request line or header is over the HTTP parser's limits; the connection is closed.",
    500: "A fault of the gateway itself, never caused by the input; retry later.",
    503: "Nothing was stored: retry after the time Retry-After gives.",
}


def merged(*tables: Codes) -> dict[int, tuple[str, ...]]:
    """The codes of several tables, by status, each once and in order."""
    out: dict[int, tuple[str, ...]] = {}
    for table in tables:
        for status, codes in table.items():
            out[status] = tuple(dict.fromkeys((*out.get(status, ()), *codes)))
    return dict(sorted(out.items()))


# --- the pieces of a document ----------------------------------------------------------------------

def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(status: int, codes: Sequence[str]) -> Json:
    response: Json = {
        "description": WHAT[status],
        "content": {"application/json": {"schema": {
            "allOf": [ref("Error"), {"properties": {"error": {"enum": list(codes)}}}]}}},
    }
    if status == 503:  # reply_for
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


def responses(success: Mapping[str, Json], *tables: Codes) -> Json:
    errors = merged(ANY_REQUEST, *tables)
    return {**success, **{str(status): error_response(status, codes) for status, codes in errors.items()}}


def json_body(description: str, schema: Json) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


MESSAGE_ID: Json = {
    "name": "message_id", "in": "path", "required": True,
    "description": "The message_id of the receipt.",
    "schema": {"type": "string"},
}

INVOICE_BODY: Json = {
    "required": True,
    "description": "One invoice: a UBL 2.1 Invoice or CreditNote, or a UN/CEFACT CrossIndustryInvoice (D16B), as XML; "
                   "or a Factur-X / ZUGFeRD PDF/A-3 with the CII invoice attached (factur-x.xml, zugferd-invoice.xml or "
                   "xrechnung.xml; exactly one).  Sent uncompressed (no Content-Encoding).",
    "content": {
        "application/xml": {"schema": {"description": "the invoice document (its XSD decides what is valid)"}},
        "text/xml": {"schema": {"description": "the invoice document (its XSD decides what is valid)"}},
        "application/pdf": {"schema": {"type": "string", "format": "binary",
                                       "description": "a Factur-X / ZUGFeRD PDF"}},
    },
}


def schemas(*, outbound: bool) -> Json:
    """The JSON shapes: the error, the receipt, the status document (records.InvoiceStatus)."""
    nullable_object: Json = {"type": ["object", "null"]}
    message: Json = {  # what a receipt and a status say alike of the message
        "message_id": {"type": "string", "format": "uuid"},
        "sha256": {"$ref": "#/components/schemas/Sha256"},
        "received_at": {"type": "string", "format": "date-time"},
    }
    status: Json = {
        "type": "object",
        "description": "What happened to a message so far.",
        "required": ["message_id", "status", "sha256", "received_at", "document_type", "invoice_number", "deliveries",
                     "signature", "rules"],
        "properties": {
            **message,
            "status": {"type": "string", "enum": list(SUMMARIES),
                       "description": "rejected: refused on review after it was held"},
            "document_type": {"type": "string", "enum": [t.label for t in DocumentType]},
            "invoice_number": {"type": "string"},
            "deliveries": {"type": "array", "items": ref("Delivery")},
            "signature": {**nullable_object, "description": "outbound: the gateway's signature it added; received: the "
                                                            "XML signature that was verified (signer, method, time)"},
            "rules": {"oneOf": [ref("RulesReport"), {"type": "null"}]},
        },
        "additionalProperties": False,
    }
    receipt: Json = {
        "type": "object",
        "description": "Sent only once the invoice is stored durably (or was before: duplicate).",
        "required": ["message_id", "status", "sha256", "received_at", "duplicate"],
        "properties": {
            **message,
            "status": {"type": "string", "enum": list(SUMMARIES),
                       "description": "accepted or held for a new invoice; a duplicate's is its first message's now"},
            "duplicate": {"type": "boolean", "description": "the same bytes were accepted before: nothing new was stored"},
            "message": {"type": "string", "description": "with status held: accepted and held for review before delivery"},
            "rules": ref("RulesReport"),
        },
        "additionalProperties": False,
    }
    if outbound:
        status["required"].append("partner")
        status["properties"]["partner"] = {"type": "string", "description": "the recipient partner"}
        receipt["required"].append("partner")
        receipt["properties"]["partner"] = {"type": ["string", "null"], "description": "the recipient partner"}
    return {
        **copy.deepcopy(ERROR_SCHEMAS),
        "Sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "RulesReport": {
            "type": "object",
            "description": "The business rule packs that ran and every warning they gave (absent: no rules).",
            "required": ["packs", "warnings"],
            "properties": {
                "packs": {"type": "array", "items": {"type": "string", "description": "name and version"}},
                "warnings": {"type": "array", "items": {
                    "type": "object", "required": ["rule", "flag", "location", "text"],
                    "properties": {k: {"type": "string"} for k in ("rule", "flag", "location", "text")},
                }},
            },
        },
        "Delivery": {
            "type": "object",
            "required": ["destination", "status", "attempts", "delivered_at"],
            "properties": {
                "destination": {"type": "string"},
                "status": {"type": "string", "enum": list(DELIVERY_STATES)},
                "attempts": {"type": "integer", "minimum": 0},
                "delivered_at": {"type": ["string", "null"], "format": "date-time"},
            },
            "additionalProperties": False,
        },
        "Receipt": receipt,
        "Status": status,
    }


def document_operation(*tables: Codes) -> Json:
    return {
        "summary": "This OpenAPI document",
        "operationId": "openapi",
        "responses": responses({"200": json_body("The OpenAPI 3.1 description of this listener.", {"type": "object"})},
                               *tables),
    }


def document(title: str, description: str, paths: Json, *, outbound: bool, mutual_tls: bool) -> Json:
    doc: Json = {
        "openapi": OPENAPI,
        "info": {"title": title, "version": __version__, "description": description,
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "paths": paths,
        "components": {
            "schemas": schemas(outbound=outbound),
            "headers": {"Retry-After": {"required": True, "description": "seconds to wait before retrying",
                                        "schema": {"type": "integer", "minimum": 0}}},
        },
    }
    if mutual_tls:
        doc["components"]["securitySchemes"] = {"mutualTLS": {
            "type": "mutualTLS",
            "description": "TLS 1.2+ with a client certificate; the server checks its chain and its key (SPKI SHA-256) "
                           "against the allowlist before reading any body byte.",
        }}
        doc["security"] = [{"mutualTLS": []}]
    return copy.deepcopy(doc)  # its own copy of the shared pieces (MESSAGE_ID, INVOICE_BODY): a reader may change it


# --- the two APIs ----------------------------------------------------------------------------------

def partner_document() -> Json:
    """What the partner listener serves: POST /v1/invoices, GET /v1/invoices/{message_id}."""
    return document("einvoice-gateway partner API", (
        "Trading partners send invoices here over mutual TLS; the client certificate identifies the partner.  "
        "The 202 is sent only once the encrypted invoice is stored durably.  Other methods on these paths are "
        "405 METHOD_NOT_ALLOWED, other paths 404 NOT_FOUND, in the same error shape."), {
        "/v1/invoices": {"post": {
            "summary": "Send an invoice",
            "operationId": "postInvoice",
            "requestBody": INVOICE_BODY,
            "responses": responses({"202": json_body("Stored durably (or stored before: duplicate).", ref("Receipt"))},
                                   PARTNER_IDENTITY, DOCUMENT, RECEIVED),
        }},
        "/v1/invoices/{message_id}": {"get": {
            "summary": "The status of an invoice you sent",
            "operationId": "getInvoice",
            "parameters": [MESSAGE_ID],
            "responses": responses({"200": json_body("Its status and deliveries.", ref("Status"))},
                                   PARTNER_IDENTITY, NOT_FOUND, STORE),
        }},
        PATH: {"get": document_operation()},
    }, outbound=False, mutual_tls=True)


def outbound_document(mutual_tls: bool) -> Json:
    """What the ERP's listener serves: POST /v1/outbound, GET /v1/outbound/{message_id}; ``mutual_tls``:
    on TCP (else a Unix socket, whose file mode decides who may connect)."""
    identity = SUBMITTER_IDENTITY if mutual_tls else {}
    return document("einvoice-gateway outbound API", (
        "The ERP submits the invoices this business sends to its trading partners.  On TCP the client certificate's "
        "key must be listed in outbound.client_spki; on a Unix socket the socket file's mode decides.  Other methods "
        "on these paths are 405 METHOD_NOT_ALLOWED, other paths 404 NOT_FOUND, in the same error shape."), {
        "/v1/outbound": {"post": {
            "summary": "Submit an invoice for sending",
            "operationId": "postOutbound",
            "requestBody": INVOICE_BODY,
            "responses": responses({"202": json_body("Stored durably (or stored before: duplicate), to be delivered to "
                                                     "the partner the buyer identifiers name.", ref("Receipt"))},
                                   identity, DOCUMENT, SUBMITTED),
        }},
        "/v1/outbound/{message_id}": {"get": {
            "summary": "The status of a submitted invoice",
            "operationId": "getOutbound",
            "parameters": [MESSAGE_ID],
            "responses": responses({"200": json_body("Its status, recipient and deliveries.", ref("Status"))},
                                   identity, NOT_FOUND, STORE),
        }},
        PATH: {"get": document_operation(identity)},
    }, outbound=True, mutual_tls=mutual_tls)


def serve(doc: Json) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of ``GET /v1/openapi.json``: the document, serialised once."""
    body = json.dumps(doc, indent=1).encode()

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handler
