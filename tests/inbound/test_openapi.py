"""The OpenAPI documents of the partner and outbound APIs: valid OpenAPI 3.1, in step with docs/partners.md's
error table, served by each listener, and true of the running listeners (schemathesis).

The schemathesis runs use real gateways on 127.0.0.1: the partner listener as the demo partner (mutual
TLS), the outbound listener on TCP as an allowlisted ERP.  The sample invoice gives the answers that
generated input never reaches (202, the duplicate, the status document); generated requests, valid and
invalid by the document, give the refusals.  Every answer must be one the document describes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import requests
import schemathesis

from gateway import devpki
from gateway.cli.demo import SAMPLE, samples
from gateway.errors import StorageUnavailable
from gateway.inbound import openapi
from gateway.operations import instance
from gateway.partners.edit import register_partner
from gateway.tls import inspect_certificate
from tests.helpers import ROOT, Running, numbered, serving
from tests.helpers import openapi as fuzzing
from tests.helpers.messages import BUYER, SELLER, merge_config

DOCUMENTS = {"partner": openapi.partner_document(), "outbound (TCP)": openapi.outbound_document(mutual_tls=True),
             "outbound (socket)": openapi.outbound_document(mutual_tls=False)}


def error_codes(doc: dict[str, Any]) -> dict[int, set[str]]:
    """status → the error codes any operation of ``doc`` documents for it."""
    out: dict[int, set[str]] = {}
    for item in doc["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                schema = response["content"]["application/json"]["schema"]
                if "allOf" in schema:
                    out.setdefault(int(status), set()).update(schema["allOf"][1]["properties"]["error"]["enum"])
    return out


def readme_table() -> list[tuple[str, str, str]]:
    """(HTTP, code, meaning) of each row of docs/partners.md's error table."""
    readme = (ROOT / "docs" / "partners.md").read_text(encoding="utf-8")
    table = readme[readme.index("| HTTP | `error` | meaning |"):]
    table = table[:table.index("\n\n")]
    return [(m[1], m[2], m[3]) for m in re.finditer(r"^\| ([^|]+?) \| `([A-Z_]+)` \| (.*) \|$", table, re.M)]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_documents_are_valid_openapi_3_1(name: str) -> None:
    doc = DOCUMENTS[name]
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(json.loads(json.dumps(doc))).validate()


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_error_response_has_the_one_error_shape(name: str) -> None:
    doc = DOCUMENTS[name]
    assert doc["components"]["schemas"]["Error"]["required"] == ["error", "message", "details"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                where = f"{method.upper()} {path} {status}"
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, where
                    assert ("headers" in response) == (status == "503"), where  # Retry-After, from reply_for
                    assert set(schema["allOf"][1]["properties"]["error"]["enum"]), where
            assert {"400", "431", "500"} <= operation["responses"].keys(), f"{method} {path}: the parser's refusals"


def test_the_error_codes_are_the_readme_table() -> None:
    """Each code docs/partners.md lists for an HTTP status is documented at that status by the partner API or
    (marked "outbound") the outbound API; each code a document lists is in docs/partners.md at its status."""
    partner = error_codes(DOCUMENTS["partner"])
    outbound = error_codes(DOCUMENTS["outbound (TCP)"])
    rows = [(http, code, meaning) for http, code, meaning in readme_table() if not http.startswith("SMTP")]
    assert len(rows) > 40, "docs/partners.md's error table was not found"
    for http, code, meaning in rows:
        statuses = range(400, 500) if http == "4xx" else [int(http)]
        documented = outbound if meaning.startswith("outbound") else partner
        if http == "405":  # no operation to attach it to (a method the path has not): the description says it
            assert all(code in doc["info"]["description"] for doc in DOCUMENTS.values())
            continue
        assert any(code in documented.get(s, ()) for s in statuses), f"docs/partners.md: {http} {code} is not in the document"
    for name, codes in (("partner", partner), ("outbound", outbound)):
        for status, names in codes.items():
            for code in names:
                assert any(http in (str(status), "4xx") and c == code for http, c, _ in rows), \
                    f"{name}: {status} {code} is not in docs/partners.md's error table"


def test_the_socket_listener_has_no_client_certificate() -> None:
    tcp, unix = DOCUMENTS["outbound (TCP)"], DOCUMENTS["outbound (socket)"]
    assert tcp["security"] == [{"mutualTLS": []}] and "security" not in unix
    assert "SUBMITTER_UNKNOWN" in error_codes(tcp)[403] and "SUBMITTER_UNKNOWN" not in error_codes(unix)[403]


# --- the running listeners ---------------------------------------------------------------------------

def served(base_url: str, session: requests.Session) -> dict[str, Any]:
    answer = session.get(base_url + openapi.PATH, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json"), answer.text
    return dict(answer.json())


def sample_cases(schema: Any, session: requests.Session, post: str, get: str) -> dict[str, Any]:
    """The sample invoice, accepted (202), again (the duplicate), and its status: each answer checked."""
    operation = schema[post]["POST"]
    first = fuzzing.call(operation.Case(body=SAMPLE, media_type="application/xml"), session)
    assert first.status_code == 202, first.text
    again = fuzzing.call(operation.Case(body=SAMPLE, media_type="text/xml"), session)
    assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
    status = schema[get]["GET"].Case(path_parameters={"message_id": first.json()["message_id"]})
    reply = fuzzing.call(status, session)
    assert reply.status_code == 200, reply.text
    return {"receipt": first.json(), "status": reply.json()}


INVALID, FOREIGN = samples()[1][1], samples()[2][1]
RESENT = SAMPLE.replace(b"?>", b"?><!-- sent again, with a comment -->", 1)  # the sample's number, other bytes
# body, extra headers, status, code at the partner API, code at the outbound API
KNOWN = [
    (INVALID, {}, 422, "SCHEMA_INVALID", "SCHEMA_INVALID"),
    (FOREIGN, {}, 403, "SUPPLIER_NOT_AUTHORIZED", "SELLER_NOT_THIS_BUSINESS"),
    (RESENT, {}, 409, "DUPLICATE_CONFLICT", "DUPLICATE_CONFLICT"),
    (gzip.compress(SAMPLE), {"Content-Encoding": "gzip"}, 415, "UNSUPPORTED_ENCODING", "UNSUPPORTED_ENCODING"),
    (b"", {}, 400, "MALFORMED_XML", "MALFORMED_XML"),
]


def known_refusals(schema: Any, session: requests.Session, post: str, outbound: bool) -> None:
    """Refusals generated input does not reach (a valid document with one thing wrong), each answer checked."""
    operation = schema[post]["POST"]
    for body, headers, status, *codes in KNOWN:
        case = operation.Case(body=body, media_type="application/xml", headers=headers)
        answer = fuzzing.call(case, session)
        assert (answer.status_code, answer.json()["error"]) == (status, codes[outbound]), answer.text
        if status == 422:
            assert all({"message", "line", "path"} <= d.keys() for d in answer.json()["details"]), answer.text


async def storage_down(running: Running, schema: Any, session: requests.Session, post: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """503 STORAGE_UNAVAILABLE, with its Retry-After, as the document says."""
    async def put(*_: Any) -> Any:
        raise StorageUnavailable("the invoice could not be stored durably; retry later")

    with monkeypatch.context() as patch:
        patch.setattr(running.gw.store.intake, "put", put)
        case = schema[post]["POST"].Case(body=numbered("OPENAPI-503"), media_type="application/xml")
        answer = await asyncio.to_thread(fuzzing.call, case, session, fuzzing.DOCUMENTED)
    assert (answer.status_code, answer.json()["error"]) == (503, "STORAGE_UNAVAILABLE"), answer.text


async def test_the_partner_listener_answers_as_its_document_says(gateway: Running,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inst = gateway.inst
    with fuzzing.client(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key) as session:
        assert await asyncio.to_thread(served, gateway.url, session) == DOCUMENTS["partner"]
        schema = await asyncio.to_thread(fuzzing.load, gateway.url, session)
        seen = await asyncio.to_thread(sample_cases, schema, session, "/v1/invoices", "/v1/invoices/{message_id}")
        assert seen["receipt"]["status"] == "accepted" and "partner" not in seen["status"]
        await asyncio.to_thread(known_refusals, schema, session, "/v1/invoices", False)
        await storage_down(gateway, schema, session, "/v1/invoices", monkeypatch)
        sent = await asyncio.to_thread(fuzzing.fuzz, schema, session)
    assert sent["POST /v1/invoices"] > fuzzing.EXAMPLES and sent["GET /v1/invoices/{message_id}"] > fuzzing.EXAMPLES, sent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def erp_listener(inst: instance.Instance) -> AsyncIterator[tuple[Running, devpki.Issued]]:
    """The gateway with its outbound listener on TCP, taking the ERP's certificate; the buyer of the sample
    is a partner whose endpoint refuses connections (what is submitted stays pending)."""
    erp = devpki.issue(inst.ca, inst.root / "pki", "erp", role="client", cn="ERP")
    buyer = devpki.issue(inst.ca, inst.root / "pki" / "clients", "buyer", role="client")
    register_partner(inst.partners, "buyer", [buyer.cert], [BUYER], [], "pytest",
                     endpoint=f"https://127.0.0.1:{closed_port()}/v1/invoices")
    merge_config(inst.config, {
        "destinations": [{"name": "partners", "type": "partner", "ca": str(inst.ca.cert),
                          "client_certificate": str(inst.demo_client.cert), "client_key": str(inst.demo_client.key)}],
        "outbound": {"listen_host": "127.0.0.1", "listen_port": 0, "client_ca": [str(inst.ca.cert)],
                     "client_spki": [inspect_certificate(erp.cert, "erp").spki_sha256], "identities": [SELLER]},
    })
    async with serving(inst, "warning") as running:
        yield running, erp


@pytest.mark.slow
async def test_the_outbound_listener_answers_as_its_document_says(inst: instance.Instance,
                                                                   erp_listener: tuple[Running, devpki.Issued],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    running, erp = erp_listener
    assert running.gw.submit_port
    url = f"https://127.0.0.1:{running.gw.submit_port}"
    with fuzzing.client(inst.ca.cert, erp.cert, erp.key) as session:
        assert await asyncio.to_thread(served, url, session) == DOCUMENTS["outbound (TCP)"]
        schema = await asyncio.to_thread(fuzzing.load, url, session)
        seen = await asyncio.to_thread(sample_cases, schema, session, "/v1/outbound", "/v1/outbound/{message_id}")
        assert seen["receipt"]["partner"] == seen["status"]["partner"] == "buyer"
        await asyncio.to_thread(known_refusals, schema, session, "/v1/outbound", True)
        await storage_down(running, schema, session, "/v1/outbound", monkeypatch)
        sent = await asyncio.to_thread(fuzzing.fuzz, schema, session)
    assert sent["POST /v1/outbound"] > fuzzing.EXAMPLES and sent["GET /v1/outbound/{message_id}"] > fuzzing.EXAMPLES, sent
    # Another certificate of the same CA: refused as the document says, on every path.
    other = devpki.issue(inst.ca, inst.root / "pki", "other", role="client")
    with fuzzing.client(inst.ca.cert, other.cert, other.key) as session:
        for operation in fuzzing.operations(schema):
            path = operation.path.replace("{message_id}", "0")
            answer = await asyncio.to_thread(session.request, operation.method.upper(), url + path, timeout=10)
            assert (answer.status_code, answer.json()["error"]) == (403, "SUBMITTER_UNKNOWN"), answer.text
            operation.Case().validate_response(answer, checks=fuzzing.CHECKS)

