"""The HTTP contract of POST /v1/invoices and GET /v1/invoices/{id}, over the real mutual-TLS listener.

``gateway`` is overridden here: the same instance and listener as conftest's, built from a Config
that a test may change through ``https_overrides`` (parametrised), and with the background delivery
loop stopped, so that ``outbox.run_once()`` is the only deliverer and file checks are deterministic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import io
import json
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.compression_utils import ZLibBackend

from gateway import logs
from gateway.app.gateway import Gateway
from gateway.cli.demo import SAMPLE
from gateway.config import load as config_mod
from gateway.errors import StorageUnavailable
from gateway.inbound import http as inbound_http
from gateway.operations import instance
from gateway.partners.edit import register_partner
from tests.helpers import XML, Answer, Running, add_partner, audit_of, eventually, numbered
from tests.helpers import post as post_invoice


@pytest.fixture
def https_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def gateway(inst: instance.Instance, https_overrides: dict[str, Any]) -> AsyncIterator[Running]:
    logs.configure("warning")
    cfg = config_mod.load(inst.config)
    gw = Gateway(dataclasses.replace(cfg, https=dataclasses.replace(cfg.https, **https_overrides)))
    await gw.start()
    try:
        loops = [t for t in asyncio.all_tasks() if t.get_name() == "delivery"]
        assert len(loops) == 1, "the background delivery task was not found"
        loops[0].cancel()
        yield Running(inst, gw)
    finally:
        await gw.stop()


async def post(s: aiohttp.ClientSession, body: Any, headers: dict[str, str] = XML) -> Answer:
    """tests.helpers.post, checking on every reply what this module's contract says: it is JSON.  (Local
    for that check only.)"""
    answer = await post_invoice(s, body, headers)
    assert answer.json is not None, answer.text  # None: not application/json
    return answer


def db_rows(gateway: Running, message_id: str | None = None) -> dict[str, int]:
    """Row counts read with a connection of our own (not the store's), i.e. what is committed."""
    conn = sqlite3.connect(gateway.gw.store.path)
    try:
        where, args = ("WHERE message_id = ?", (message_id,)) if message_id else ("", ())
        return {t: conn.execute(f"SELECT count(*) FROM {t} {where}", args).fetchone()[0]
                for t in ("invoices", "blobs", "deliveries")}
    finally:
        conn.close()


async def deliver_all(gateway: Running) -> None:
    for _ in range(10):
        if await gateway.gw.outbox.run_once() == 0:
            return
    raise AssertionError("delivery did not drain in 10 rounds")


async def test_accepted_reply_and_committed_before_202(gateway, client):
    status, body = await post(client(), SAMPLE)
    rows = db_rows(gateway, body.get("message_id"))  # immediately after the 202
    assert status == 202, body
    assert set(body) == {"message_id", "status", "sha256", "received_at", "duplicate", "rules"}
    assert body["sha256"] == hashlib.sha256(SAMPLE).hexdigest()
    assert body["status"] == "accepted" and body["duplicate"] is False
    uuid.UUID(body["message_id"])
    assert body["received_at"].endswith("Z") and datetime.fromisoformat(body["received_at"])
    assert rows == {"invoices": 1, "blobs": 1, "deliveries": 1}


async def test_identical_resend_is_duplicate_and_delivered_once(gateway, client):
    s = client()
    first = await post(s, SAMPLE)
    await deliver_all(gateway)
    second = await post(s, SAMPLE)
    await deliver_all(gateway)
    assert (first.status, second.status) == (202, 202)
    assert second.json["message_id"] == first.json["message_id"]
    assert (first.json["duplicate"], second.json["duplicate"]) == (False, True)
    outbox = gateway.inst.delivery_folder
    assert sorted(p.name for p in outbox.iterdir()) == sorted(f"{first.json['message_id']}.{x}" for x in ("json", "xml"))
    assert (outbox / f"{first.json['message_id']}.xml").read_bytes() == SAMPLE
    assert (await gateway.gw.store.reports.counts()) == {"invoices": 1, "deliveries_delivered": 1}


async def test_concurrent_identical_posts_store_one(gateway, client):
    s = client()
    replies = await asyncio.gather(*(post(s, SAMPLE) for _ in range(50)))
    assert [r.status for r in replies] == [202] * 50
    assert len({r.json["message_id"] for r in replies}) == 1
    assert sum(r.json["duplicate"] is False for r in replies) == 1
    assert (await gateway.gw.store.reports.counts()) == {"invoices": 1, "deliveries_pending": 1}
    assert db_rows(gateway) == {"invoices": 1, "blobs": 1, "deliveries": 1}


async def test_concurrent_distinct_invoices_are_all_delivered_intact(gateway, client):
    s = client()
    bodies = [numbered(f"API-{i:06d}") for i in range(100)]
    replies = await asyncio.gather(*(post(s, b) for b in bodies))
    assert [r.status for r in replies] == [202] * 100
    ids = [r.json["message_id"] for r in replies]
    assert len(set(ids)) == 100
    await deliver_all(gateway)
    for body, message_id in zip(bodies, ids, strict=True):
        delivered = (gateway.inst.delivery_folder / f"{message_id}.xml").read_bytes()
        assert hashlib.sha256(delivered).hexdigest() == hashlib.sha256(body).hexdigest()
    assert (await gateway.gw.store.reports.counts()) == {"invoices": 100, "deliveries_delivered": 100}


async def test_same_number_other_content_is_409(gateway, client):
    s = client()
    assert (await post(s, SAMPLE)).status == 202
    other = SAMPLE.replace(b"Sample invoice shipped", b"Corrected invoice shipped")
    status, body = await post(s, other)
    assert (status, body["error"]) == (409, "DUPLICATE_CONFLICT"), body
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1


async def test_rejected_document_is_evaluated_afresh(gateway, client):
    s = client()
    broken = numbered("API-000002").replace(b"<cbc:IssueDate>2026-11-02<", b"<cbc:IssueDate>2 Nov 2026<")
    for _ in range(2):  # a rejection is not remembered as a "duplicate"
        status, body = await post(s, broken)
        assert (status, body["error"]) == (422, "SCHEMA_INVALID"), body
    status, body = await post(s, numbered("API-000002"))
    assert status == 202 and body["duplicate"] is False, body


async def test_status_for_the_sender_only(gateway, client):
    s = client()
    _, sent = await post(s, SAMPLE)
    url = f"/v1/invoices/{sent['message_id']}"
    async with s.get(url) as r:
        assert r.status == 200
        before = await r.json()
    assert before["message_id"] == sent["message_id"] and before["status"] == "accepted"
    assert [(d["destination"], d["status"]) for d in before["deliveries"]] == [("erp-inbox", "pending")]
    await deliver_all(gateway)
    async with s.get(url) as r:
        after = await r.json()
    assert after["status"] == "delivered" and after["deliveries"][0]["status"] == "delivered"

    other = gateway.issue_client("other")
    register_partner(gateway.inst.partners, "other", [other.cert], ["0088:9999999999999"], [], "test")
    assert gateway.gw.parts.partners.refresh()
    for session, path in ((client(other.cert, other.key), url), (s, f"/v1/invoices/{uuid.uuid4()}"), (s, "/v1/invoices/" + "x" * 65)):
        async with session.get(path) as r:
            assert r.status == 404
            assert (await r.json())["error"] == "NOT_FOUND"


async def test_xml_media_types_are_accepted(gateway, client):
    s = client()
    for n, content_type in enumerate(("application/xml; charset=utf-8", "text/xml", "Application/XML")):
        status, body = await post(s, numbered(f"API-{n:06d}"), {"Content-Type": content_type})
        assert status == 202, (content_type, body)


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream", "text/plain", "multipart/form-data; boundary=x"])
async def test_wrong_content_type_is_415(gateway, client, content_type):
    status, body = await post(client(), SAMPLE, {"Content-Type": content_type})
    assert (status, body["error"]) == (415, "UNSUPPORTED_MEDIA_TYPE"), body


async def test_compressed_body_is_415(gateway, client):
    status, body = await post(client(), gzip.compress(SAMPLE), {**XML, "Content-Encoding": "gzip"})
    assert (status, body["error"]) == (415, "UNSUPPORTED_ENCODING"), body
    assert (await gateway.gw.store.reports.counts())["invoices"] == 0


class CountingZlib:
    """zlib as aiohttp's inflater sees it, counting the inflaters made."""

    def __init__(self, real: Any):
        self.real, self.inflaters = real, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def decompressobj(self, *args: Any, **kwargs: Any) -> Any:
        self.inflaters += 1
        return self.real.decompressobj(*args, **kwargs)


async def test_a_compressed_body_is_refused_without_being_inflated(gateway, client, monkeypatch):
    """The 415 is decided on the headers; what the client sends on is drained as sent, never inflated."""
    spy = CountingZlib(ZLibBackend._zlib_backend)
    monkeypatch.setattr(ZLibBackend, "_zlib_backend", spy)
    s = client()
    status, body = await post(s, gzip.compress(bytes(20_000_000), 9), {**XML, "Content-Encoding": "gzip"})
    assert (status, body["error"]) == (415, "UNSUPPORTED_ENCODING"), body
    assert (await post(s, SAMPLE)).status == 202
    assert spy.inflaters == 0


def raw_exchange(running: Running, request: bytes) -> tuple[int, str, bytes]:
    """``request`` as sent, over mutual TLS as the demo partner: (status, Content-Type, body).  Blocking."""
    with socket.create_connection(("127.0.0.1", running.gw.port), timeout=10) as raw, \
            running.ssl().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(request)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


@pytest.mark.slow
@pytest.mark.parametrize(("request_bytes", "status", "code"), [
    (b"POST /v1/invoices HTTP/1.1\r\nHost: a\r\nContent-Length: twelve\r\n\r\n", 400, "MALFORMED_REQUEST"),
    (b"POST /v1/invoices HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "MALFORMED_REQUEST"),
    (b"BREW /v1/invoices HTCPCP/1.0\r\n\r\n", 400, "MALFORMED_REQUEST"),
    (b"GET /v1/invoices/x HTTP/1.1\r\nHost: a\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431, "TOO_LARGE"),
], ids=["bad-content-length", "bad-chunk", "not-http", "header-too-long"])
async def test_what_the_http_parser_refuses_is_a_json_error_too(gateway: Running, log_stream: io.StringIO,
                                                                request_bytes: bytes, status: int, code: str) -> None:
    got, content_type, body = await asyncio.to_thread(raw_exchange, gateway, request_bytes)
    assert (got, content_type.split(";")[0]) == (status, "application/json"), body
    reply = json.loads(body)
    assert reply["error"] == code and reply["message"] and reply["details"] == []
    [event] = [json.loads(line) for line in log_stream.getvalue().splitlines() if "http.refused_by_parser" in line]
    assert (event["status"], event["code"], event["peer"]) == (status, code, "127.0.0.1")
    assert "Traceback" not in log_stream.getvalue()


SMALL = {"max_body_bytes": 8192}
PADDED = SAMPLE + b"<!--" + b"x" * 20_000 + b"-->"  # valid XML, over the limit


@pytest.mark.parametrize("https_overrides", [SMALL])
async def test_declared_length_over_limit_is_413_before_the_body(gateway):
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gw.port, ssl=gateway.ssl())
    try:
        writer.write(b"POST /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/xml\r\n"
                     b"Content-Length: 1000000\r\n\r\n")  # and no body at all
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = json.loads(await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5))
    finally:
        writer.close()
    assert lines[0].split()[1] == "413"
    assert body["error"] == "TOO_LARGE"


@pytest.mark.parametrize("https_overrides", [SMALL])
async def test_body_over_limit_is_413(gateway, client):
    s = client()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(PADDED), 1024):
            yield PADDED[i : i + 1024]

    for body in (PADDED, chunked()):  # with a Content-Length, then chunked (no length)
        status, reply = await post(s, body)
        assert (status, reply["error"]) == (413, "TOO_LARGE"), reply
    assert (await gateway.gw.store.reports.counts())["invoices"] == 0
    assert (await post(s, SAMPLE)).status == 202  # under the limit: accepted


def fail_put(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def put(*_: Any) -> Any:
        raise StorageUnavailable("the invoice could not be stored durably; retry later")

    monkeypatch.setattr(store.intake, "put", put)


def fail_commit(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write itself runs (rows inserted), then SQLite fails before COMMIT."""
    real = store.engine.submit

    def submit(op: Any) -> Future[Any]:
        def failing(conn: sqlite3.Connection) -> Any:
            op(conn)
            raise sqlite3.OperationalError("disk I/O error")

        return real(failing)

    monkeypatch.setattr(store.engine, "submit", submit)


@pytest.mark.parametrize("fault", [fail_put, fail_commit])
async def test_storage_failure_is_503_and_nothing_is_stored(gateway, client, monkeypatch, fault):
    s = client()
    fault(gateway.gw.store, monkeypatch)
    answer = await post(s, SAMPLE)
    status, body = answer
    assert (status, body["error"]) == (503, "STORAGE_UNAVAILABLE"), body
    assert int(answer.headers["Retry-After"]) > 0
    assert db_rows(gateway) == {"invoices": 0, "blobs": 0, "deliveries": 0}
    monkeypatch.undo()
    status, body = await post(s, SAMPLE)  # the retry the 503 asked for
    assert status == 202 and body["duplicate"] is False, body
    assert db_rows(gateway, body["message_id"]) == {"invoices": 1, "blobs": 1, "deliveries": 1}


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/", 404, "NOT_FOUND"),
    ("POST", "/v1/invoice", 404, "NOT_FOUND"),
    ("GET", "/v2/invoices/x", 404, "NOT_FOUND"),
    ("DELETE", "/v1/invoices", 405, "METHOD_NOT_ALLOWED"),
])
async def test_unknown_route_is_json_error(gateway, client, method, path, status, code):
    async with client().request(method, path, data=SAMPLE, headers=XML) as r:
        assert r.status == status
        assert r.content_type == "application/json"
        body = await r.json()
    assert body["error"] == code and isinstance(body["details"], list)


async def test_every_refusal_is_one_audit_record(gateway: Running, client) -> None:
    """The pipeline records each refusal once, whoever refused it: the listener before reading the body (the
    certificate's key names what was refused) or a stage after (the content's hash does)."""
    s = client()
    bad_xml = b"<Invoice><unclosed></Invoice>"
    for headers, body in (({"Content-Type": "text/plain"}, SAMPLE), ({**XML, "Content-Encoding": "gzip"}, gzip.compress(SAMPLE)),
                          (XML, bad_xml)):
        assert (await post_invoice(s, body, headers)).status in (400, 415)
    refused = await audit_of(gateway.gw.store, "invoice.rejected")
    details = [r["detail"] for r in refused]
    assert [d["code"] for d in details] == ["UNSUPPORTED_MEDIA_TYPE", "UNSUPPORTED_ENCODING", "MALFORMED_XML"]
    assert all(r["partner"] == instance.DEMO_PARTNER and r["actor"] == "gateway" for r in refused)
    assert set(details[0]) == set(details[1]) == {"transport", "code", "peer_spki", "peer"}
    assert details[2] == {"transport": "https", "code": "MALFORMED_XML", "sha256": hashlib.sha256(bad_xml).hexdigest()}


# --- one partner cannot starve the others (issue 20, item 7) ---------------------------------------------

BUDGET = {"max_body_bytes": 64 * 1024, "max_in_flight_bytes": 256 * 1024, "read_timeout_s": 2.0}
MALLORY_IDS = ["0088:4000001000099"]


@pytest.fixture
def mallory(inst: instance.Instance) -> Any:
    """A second registered partner, the one that attacks (registered before the gateway starts)."""
    return add_partner(inst, "mallory", MALLORY_IDS)


async def stalled_upload(gateway: Running, cert: Any, declared: int, sent: bytes) -> tuple[asyncio.StreamReader,
                                                                                           asyncio.StreamWriter]:
    """A POST over its own TLS connection that declares ``declared`` bytes, sends ``sent``, and then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gw.port, ssl=gateway.ssl(cert.cert, cert.key))
    writer.write(b"POST /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/xml\r\n"
                 b"Content-Length: %d\r\n\r\n" % declared + sent)
    await writer.drain()
    return reader, writer


async def reply_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
    return int(lines[0].split()[1]), json.loads(await asyncio.wait_for(reader.readexactly(length), 5))


@pytest.mark.slow
@pytest.mark.parametrize("https_overrides", [BUDGET])
async def test_uploads_that_declare_much_and_send_little_hold_little(mallory, gateway, client):
    """Eight uploads declaring the whole body limit (twice the in-flight budget, had it been reserved by
    declaration) send one byte each: another partner's invoice is accepted meanwhile, and each trickle ends
    in 408 once its time is up, with nothing stored from it."""
    uploads = [await stalled_upload(gateway, mallory, 64 * 1024, b"<") for _ in range(8)]
    try:
        await eventually(lambda: gateway.gw.https.budget.used == 8, "the eight bytes to be counted")
        status, reply = await post(client(), numbered("FAIR-1"))
        assert status == 202, reply
        replies = [await reply_of(reader) for reader, _ in uploads]
    finally:
        for _, writer in uploads:
            writer.close()
    assert replies == [(408, {"error": "BODY_TIMEOUT", "message": "the body did not arrive within 2 s", "details": []})] * 8
    assert gateway.gw.https.budget.used == 0
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1


@pytest.mark.parametrize("https_overrides", [BUDGET | {"max_in_flight_bytes_per_partner": 64 * 1024}])
async def test_one_partner_holds_at_most_its_share_of_the_budget(mallory, gateway, client, monkeypatch):
    """Mallory's uploads fill its share (64 KiB of 256): its next bytes wait, then 503 saying why; another
    partner's invoice is accepted while they wait."""
    monkeypatch.setattr(inbound_http, "BUDGET_WAIT_S", 0.5)
    first = await stalled_upload(gateway, mallory, 60 * 1024, b"<" * (40 * 1024))
    try:
        await eventually(lambda: gateway.gw.https.budget.used == 40 * 1024, "the first upload to be counted")
        second = await stalled_upload(gateway, mallory, 60 * 1024, b"<" * (40 * 1024))
        status, reply = await post(client(), numbered("FAIR-2"))
        assert status == 202, reply
        status, refused = await reply_of(second[0])
        second[1].close()
    finally:
        first[1].close()
    assert status == 503 and refused["error"] == "OVERLOADED", refused
    assert refused["message"].startswith("your uploads in progress already hold 40960 bytes, and this gateway holds "
                                         "at most 65536 bytes per partner at once")
    await eventually(lambda: gateway.gw.https.budget.used == 0, "the budget to be given back")
