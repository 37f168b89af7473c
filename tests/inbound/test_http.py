"""What the HTTP listeners share (gateway/inbound/http.py), on real aiohttp listeners on 127.0.0.1.

It promises:

* ``reply_for`` is the one place an error becomes a reply: its class's status, the JSON
  ``{error, message, details[]}``, and ``Retry-After`` on a 503;
* ``answer_errors`` (a listener's middleware) answers whatever a handler raises that way: the
  gateway's own errors, the framework's refusals (404, 405, 413 …) as JSON too, any other fault as
  a bare 500 INTERNAL_ERROR that tells the client nothing and the log everything; redirects pass;
* ``read_body`` reads the whole body or refuses: 413 TOO_LARGE over the size limit, 408
  BODY_TIMEOUT when the body does not arrive in time or, past that time, falls below the minimum
  rate; each chunk is charged to the budget as it arrives;
* ``ByteBudget`` bounds the request bytes held in memory at once, in all and per holder (a
  partner): a charge waits for room, is refused as 503 OVERLOADED when none comes (saying so when
  the holder is past its share), and is given back however the block ends;
* ``client_certificate`` / ``certificate_identity``: the key hash and subject of the certificate
  the client presented in the TLS handshake (none without TLS).

The listeners that use these (tests/inbound/test_https.py, test_submit.py) are tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509

from gateway import devpki, logs
from gateway.errors import (
    Conflict,
    Detail,
    Forbidden,
    GatewayError,
    InternalError,
    LimitExceeded,
    Malformed,
    Overloaded,
    SchemaInvalid,
    StorageUnavailable,
    UnsupportedMediaType,
)
from gateway.inbound import http
from gateway.inbound.http import (
    PDF_MEDIA_TYPE,
    BodyTimeout,
    ByteBudget,
    HttpRefusal,
    answer_errors,
    certificate_identity,
    client_certificate,
    media_type_of,
    read_body,
    reply_for,
    too_large,
)
from gateway.ratelimit import RateLimiter
from gateway.tls import client_context, server_context, spki_sha256

LIMIT = 4096  # the listeners' max_body_bytes here
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def app_with(routes: list[web.RouteDef], timeout_s: float = 5.0) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer_errors(request, handler, LIMIT)

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await read_body(request, LIMIT, timeout_s))})

    app = web.Application(client_max_size=LIMIT, middlewares=[errors])
    app.add_routes([web.post("/echo", echo), *routes])
    return app


@contextlib.asynccontextmanager
async def listening(app: web.Application, ssl_context: object = None, **handler: Any) -> AsyncIterator[int]:
    """The app on 127.0.0.1, on a port of its own (returned); ``handler``: aiohttp's per-connection options."""
    runner = web.AppRunner(app, **handler)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)  # type: ignore[arg-type]
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def fetch(port: int, method: str, path: str, **kw: object) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.request(method, f"http://127.0.0.1:{port}{path}", **kw) as r:  # type: ignore[arg-type]
        return r.status, dict(r.headers), await r.text()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("debug", stream)
    yield stream
    logs.configure("debug")


# --- reply_for -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "status", "code", "retry_after"), [
    (Malformed("the body is not well-formed XML", [Detail("Premature end of data", line=3)], code="MALFORMED_XML"),
     400, "MALFORMED_XML", None),
    (Forbidden("not yours", code="SUPPLIER_NOT_AUTHORIZED"), 403, "SUPPLIER_NOT_AUTHORIZED", None),
    (Conflict("number used"), 409, "DUPLICATE_CONFLICT", None),
    (too_large(LIMIT, 5000), 413, "TOO_LARGE", None),
    (UnsupportedMediaType("send XML"), 415, "UNSUPPORTED_MEDIA_TYPE", None),
    (SchemaInvalid("bad", [Detail("Element 'cbc:ID': missing", line=7, path="/*/cbc:ID")]), 422, "SCHEMA_INVALID", None),
    (BodyTimeout("the body did not arrive within 60 s"), 408, "BODY_TIMEOUT", None),
    (HttpRefusal(404, "no message with this id was received from you"), 404, "NOT_FOUND", None),
    (StorageUnavailable("the disk is full"), 503, "STORAGE_UNAVAILABLE", "30"),
    (Overloaded("busy"), 503, "OVERLOADED", "30"),
    (InternalError(), 500, "INTERNAL_ERROR", None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_an_error_becomes_its_status_and_json(error: GatewayError, status: int, code: str, retry_after: str | None):
    reply = reply_for(error)
    assert (reply.status, reply.content_type) == (status, "application/json")
    assert reply.headers.get("Retry-After") == retry_after  # only a 503 tells when to come back
    assert reply.text is not None
    assert json.loads(reply.text) == {"error": code, "message": error.message, "details": [d.as_json() for d in error.details]}


def test_refusals_of_the_http_layer_have_codes_of_their_own():
    assert (HttpRefusal(404, "Not Found").code, HttpRefusal(405, "Method Not Allowed").code) == ("NOT_FOUND", "METHOD_NOT_ALLOWED")
    teapot = HttpRefusal(418, "I'm a teapot")
    assert (teapot.code, teapot.http_status, teapot.message) == ("HTTP_ERROR", 418, "I'm a teapot")


def test_too_large_names_the_limit_and_the_size():
    assert too_large(4096, 5000).message == "the body of 5000 bytes exceeds the limit of 4096 bytes"
    assert too_large(4096).message == "the body exceeds the limit of 4096 bytes"
    assert isinstance(too_large(1), LimitExceeded) and too_large(1).code == "TOO_LARGE"


# --- answer_errors ------------------------------------------------------------------------------------


async def test_whatever_a_handler_raises_is_answered_as_json():
    async def refuse(request: web.Request) -> web.Response:
        raise Forbidden("your certificate is not registered", code="PARTNER_UNKNOWN")

    async def unauthorized(request: web.Request) -> web.Response:
        raise web.HTTPUnauthorized()

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/echo")

    async def raw_read(request: web.Request) -> web.Response:  # aiohttp's own 413, not through read_body
        return web.json_response({"size": len(await request.read())})

    app = app_with([web.get("/refuse", refuse), web.get("/unauthorized", unauthorized), web.get("/moved", moved),
                    web.post("/raw", raw_read)])
    async with listening(app) as port:
        got = {path: await fetch(port, method, path, allow_redirects=False, data=b"x" * (LIMIT + 1) if method == "POST" else None)
               for method, path in [("GET", "/refuse"), ("GET", "/unauthorized"), ("GET", "/moved"), ("POST", "/raw"),
                                    ("GET", "/nowhere"), ("DELETE", "/echo")]}
    answers = {path: (status, json.loads(text) if headers.get("Content-Type", "").startswith("application/json") else text)
               for path, (status, headers, text) in got.items()}
    assert answers["/refuse"] == (403, {"error": "PARTNER_UNKNOWN", "message": "your certificate is not registered", "details": []})
    assert answers["/unauthorized"] == (401, {"error": "HTTP_ERROR", "message": "Unauthorized", "details": []})
    assert answers["/raw"] == (413, {"error": "TOO_LARGE", "message": f"the body exceeds the limit of {LIMIT} bytes", "details": []})
    assert answers["/nowhere"] == (404, {"error": "NOT_FOUND", "message": "Not Found", "details": []})
    assert answers["/echo"] == (405, {"error": "METHOD_NOT_ALLOWED", "message": "Method Not Allowed", "details": []})
    assert got["/echo"][1]["Allow"] == "POST"  # RFC 9110 §15.5.6: a 405 names the methods the resource has
    assert answers["/moved"][0] == 302 and got["/moved"][1]["Location"] == "/echo"  # not an error: passed on as it is


async def test_a_fault_tells_the_client_nothing_and_the_log_everything(log_lines: io.StringIO):
    async def fault(request: web.Request) -> web.Response:
        raise RuntimeError("cannot open /var/lib/gateway/keys/master.key")

    async with listening(app_with([web.get("/fault", fault)])) as port:
        status, headers, text = await fetch(port, "GET", "/fault")
    assert (status, json.loads(text)) == (500, {"error": "INTERNAL_ERROR", "details": [],
                                                "message": "the gateway failed to process the request; retry later"})
    assert "master.key" not in text and "Retry-After" not in headers
    (line,) = [json.loads(raw) for raw in log_lines.getvalue().splitlines() if "request.internal_error" in raw]
    assert (line["event"], line["path"], line["level"]) == ("request.internal_error", "/fault", "error")
    assert (line["error_type"], line["error"]) == ("RuntimeError", "cannot open /var/lib/gateway/keys/master.key")
    assert "exception" not in line  # one line: no traceback in the log (issue 20, item 14)


# --- read_body -----------------------------------------------------------------------------------------


async def test_a_body_within_the_limit_is_read_whole_and_one_over_it_is_too_large():
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 1024

    async with listening(app_with([])) as port:
        assert (await fetch(port, "POST", "/echo", data=b"x" * LIMIT))[::2] == (200, json.dumps({"size": LIMIT}))
        over = await fetch(port, "POST", "/echo", data=b"x" * (LIMIT + 1))
        chunked = await fetch(port, "POST", "/echo", data=chunks(LIMIT // 1024 + 1))  # no Content-Length to go by
    for status, _, text in (over, chunked):
        assert (status, json.loads(text)) == (413, {"error": "TOO_LARGE", "details": [],
                                                    "message": f"the body exceeds the limit of {LIMIT} bytes"})


async def test_a_body_that_does_not_arrive_in_time_is_408():
    async with listening(app_with([], timeout_s=1.0)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: 100\r\nConnection: close\r\n\r\n<Invoice>")  # and then nothing
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
            body = await asyncio.wait_for(reader.readexactly(length), 10)
        finally:
            writer.close()
            await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body) == {"error": "BODY_TIMEOUT", "message": "the body did not arrive within 1 s", "details": []}


async def trickle(port: int, declared: int, pieces: list[tuple[float, bytes]]) -> tuple[int, dict[str, Any]]:
    """A POST to /rated declaring ``declared`` bytes whose body comes as (pause in s, bytes) pieces, until the
    reply comes; the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
        return int(head.split()[1]), json.loads(await reader.readexactly(length))

    try:
        writer.write(b"POST /rated HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/xml\r\n"
                     b"Content-Length: %d\r\n\r\n" % declared)
        answer = asyncio.ensure_future(reply())
        for pause, piece in pieces:
            await asyncio.wait([answer], timeout=pause)
            if answer.done():
                break
            writer.write(piece)
        return await asyncio.wait_for(answer, 10)
    finally:
        writer.close()


def rated_app(timeout_s: float, min_rate: int) -> web.Application:
    async def rated(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await read_body(request, LIMIT, timeout_s, min_rate=min_rate))})
    return app_with([web.post("/rated", rated)])


async def test_a_body_slower_than_the_minimum_rate_is_408_once_it_falls_behind():
    """After timeout_s (1 s), what has arrived must keep up with min_rate (1,000 bytes/s) on average:
    2,000 bytes at once buy 2 s; then 100 bytes every 0.5 s fall behind at about 2.4 s."""
    async with listening(rated_app(1.0, 1000), lingering_time=0.1) as port:  # (not 10 s draining the rest at the end)
        status, reply = await trickle(port, 4000, [(0, b"x" * 2000)] + [(0.5, b"x" * 100)] * 8)
    assert (status, reply["error"]) == (408, "BODY_TIMEOUT"), reply
    assert reply["message"].startswith("the body arrived too slowly: 2")
    assert reply["message"].endswith("a body that takes longer than 1 s must keep arriving at 1000 bytes/s or more")


async def test_a_body_longer_than_the_timeout_passes_while_it_keeps_the_minimum_rate():
    async with listening(rated_app(1.0, 1000)) as port:
        status, reply = await trickle(port, 3000, [(0, b"x" * 1400), (0.7, b"x" * 1000), (0.7, b"x" * 600)])
    assert (status, reply) == (200, {"size": 3000})  # 1.4 s for 3000 bytes: past the timeout, above the rate


async def test_bytes_are_charged_as_they_arrive_and_given_back():
    budget = ByteBudget(10_000, per_holder=5_000)
    seen: list[int] = []

    async def charged(request: web.Request) -> web.Response:
        async with budget.held("acme") as charge:
            body = await read_body(request, LIMIT, 5.0, charge=charge)
            seen.append(budget.by_holder["acme"])
        return web.json_response({"size": len(body)})

    async with listening(app_with([web.post("/rated", charged)])) as port:
        status, reply = await trickle(port, 3000, [(0, b"x" * 1000), (0.2, b"x" * 2000)])
    assert (status, reply, seen, budget.used, budget.by_holder) == (200, {"size": 3000}, [3000], 0, {})


async def test_a_holder_past_its_share_waits_then_is_told_why_while_others_go_on(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(http, "BUDGET_WAIT_S", 0.05)
    budget = ByteBudget(100, per_holder=50)
    async with budget.reserved(40, "mallory"):
        with pytest.raises(Overloaded) as caught:
            async with budget.reserved(20, "mallory"):
                pytest.fail("entered past its share")
        async with budget.reserved(50, "acme"):  # room for the others
            assert budget.by_holder == {"mallory": 40, "acme": 50}
    assert caught.value.message == ("your uploads in progress already hold 40 bytes, and this gateway holds at most 50 "
                                    "bytes per partner at once; send fewer at a time")
    assert budget.used == 0 and budget.by_holder == {}


async def test_read_body_holds_to_the_limit_it_is_given():
    async def small(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await read_body(request, 100, 5.0))})

    async with listening(app_with([web.post("/small", small)])) as port:
        status, _, text = await fetch(port, "POST", "/small", data=b"x" * 1000)
    assert status == 413, text


def request_with(content_type: str, **headers: str) -> web.Request:
    return make_mocked_request("POST", "/v1/invoices", headers={"Content-Type": content_type, **headers})


def test_the_media_type_the_body_is_read_as():
    assert media_type_of(request_with("application/pdf")) == PDF_MEDIA_TYPE
    assert media_type_of(request_with("Application/PDF; name=invoice.pdf")) == PDF_MEDIA_TYPE
    for xml in ("application/xml", "text/xml; charset=utf-8", "Application/XML"):
        assert media_type_of(request_with(xml)) == "application/xml"
    assert media_type_of(request_with("application/xml", **{"Content-Encoding": " Identity "})) == "application/xml"


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/pdfx", "application/json", ""])
def test_other_media_types_are_refused_naming_what_to_send(content_type: str):
    with pytest.raises(UnsupportedMediaType) as caught:
        media_type_of(request_with(content_type))
    assert (caught.value.code, caught.value.http_status) == ("UNSUPPORTED_MEDIA_TYPE", 415)
    assert "send the invoice as application/xml (or a Factur-X / ZUGFeRD PDF as application/pdf)" in caught.value.message


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, identity", "x-gzip"])
def test_any_content_encoding_is_refused_on_the_headers(encoding: str):
    with pytest.raises(UnsupportedMediaType) as caught:
        media_type_of(request_with("application/xml", **{"Content-Encoding": encoding}))
    assert (caught.value.code, caught.value.message) == (
        "UNSUPPORTED_ENCODING", f"Content-Encoding {encoding!r} is not accepted; send the XML uncompressed")


# --- ByteBudget -------------------------------------------------------------------------------------------


async def test_a_reservation_waits_for_room_and_gives_it_back():
    budget = ByteBudget(100)
    second_in = asyncio.Event()

    async def second() -> None:
        async with budget.reserved(60):
            second_in.set()
            assert budget.used == 60

    async with budget.reserved(70):
        assert budget.used == 70
        waiting = asyncio.create_task(second())
        for _ in range(20):  # let it run up to where it waits
            await asyncio.sleep(0)
        assert not second_in.is_set() and budget.used == 70
    await asyncio.wait_for(waiting, 5)
    assert second_in.is_set() and budget.used == 0


async def test_a_block_that_fails_still_gives_its_bytes_back():
    budget = ByteBudget(100)
    with pytest.raises(ValueError, match="parser fault"):
        async with budget.reserved(100):
            raise ValueError("parser fault")
    assert budget.used == 0
    async with budget.reserved(100):  # all of it is there again
        assert budget.used == 100


async def test_no_room_in_time_is_overloaded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(http, "BUDGET_WAIT_S", 0.05)
    budget = ByteBudget(100)
    async with budget.reserved(80):
        with pytest.raises(Overloaded) as caught:
            async with budget.reserved(30):
                pytest.fail("entered without room")
    assert (caught.value.http_status, caught.value.code) == (503, "OVERLOADED")
    assert caught.value.message == "the gateway is busy receiving other invoices; retry shortly"
    assert budget.used == 0
    assert reply_for(caught.value).headers["Retry-After"] == "30"


# --- the client's certificate ------------------------------------------------------------------------------


async def test_the_identity_of_the_certificate_presented_in_the_handshake(tmp_path: Path):
    ca = devpki.make_ca(tmp_path / "ca")
    server = devpki.issue(ca, tmp_path, "server", role="server", sans=("127.0.0.1",))
    client = devpki.issue(ca, tmp_path, "client", role="client", cn="ACME invoicing")
    cert = x509.load_pem_x509_certificate(client.cert.read_bytes())

    async def whoami(request: web.Request) -> web.Response:
        der = client_certificate(request)
        if der is None:
            return web.json_response({"certificate": None})
        spki, subject = certificate_identity(der)
        assert certificate_identity(der) is certificate_identity(der)  # remembered for keep-alive clients
        return web.json_response({"spki": spki, "subject": subject})

    app = app_with([web.get("/whoami", whoami)])
    async with listening(app, server_context(server.cert, server.key, (ca.cert,))) as port:
        ctx = client_context(ca.cert, client.cert, client.key)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s, \
                s.get(f"https://127.0.0.1:{port}/whoami") as r:
            over_tls = await r.json()
        await asyncio.sleep(0.05)  # let the TLS transport finish closing
    assert over_tls["spki"] == spki_sha256(cert)
    assert "CN=ACME invoicing" in over_tls["subject"]

    async with listening(app_with([web.get("/whoami", whoami)])) as port:
        status, _, text = await fetch(port, "GET", "/whoami")
    assert (status, json.loads(text)) == (200, {"certificate": None})


def test_parser_refusals_are_logged_at_most_so_often_per_address():
    budget = RateLimiter(http.PARSER_LOGS.burst, http.PARSER_LOGS.every_s)
    assert [budget.allow("10.0.0.1", now=0.0) for _ in range(11)] == [True] * 10 + [False]
    assert budget.allow("10.0.0.2", now=0.0)  # another address has its own
    assert budget.allow("10.0.0.1", now=6.0)  # ten a minute on average
