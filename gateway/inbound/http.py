"""What the HTTP listeners share: the one error → reply function, the client's identity, bounded bodies.

Every error a listener answers is JSON ``{error, message, details[]}`` with the status of its class
(gateway/errors.py); ``reply_for`` is the one place errors become HTTP replies, and ``answer_errors``
(a middleware body) turns the framework's own refusals and any fault into such errors first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from cryptography import x509

from .. import logs
from ..errors import Forbidden, GatewayError, InternalError, LimitExceeded, Malformed, Overloaded, UnsupportedMediaType
from ..model import stamp
from ..ratelimit import RateLimiter
from ..tls import spki_sha256_der

XML_MEDIA_TYPES = ("application/xml", "text/xml")
PDF_MEDIA_TYPE = "application/pdf"  # Factur-X / ZUGFeRD: the CII invoice embedded in a PDF/A-3
BUDGET_WAIT_S = 5.0  # how long an upload may wait for in-flight byte budget before a 503

log = logs.get("inbound.http")


class BodyTimeout(Malformed):
    code = "BODY_TIMEOUT"
    http_status = 408


class HttpRefusal(GatewayError):
    """A refusal of the HTTP layer itself (no such route, method not allowed), as a JSON error."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason, code={404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(status, "HTTP_ERROR"))
        self.http_status = status


def reply_for(exc: GatewayError) -> web.Response:
    """The one place errors become HTTP replies."""
    headers = {"Retry-After": "30"} if exc.http_status == 503 else None
    return web.json_response(exc.as_json(), status=exc.http_status, headers=headers)


async def answer_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        max_body_bytes: int) -> web.StreamResponse:
    """A listener's middleware: whatever the handler raises is answered by ``reply_for``."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return reply_for(exc)
    except web.HTTPRequestEntityTooLarge:
        return reply_for(too_large(max_body_bytes))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = reply_for(HttpRefusal(exc.status, exc.reason))
        if "Allow" in exc.headers:  # RFC 9110 §15.5.6: a 405 names the methods the resource has
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request.internal_error", path=request.path)
        return reply_for(InternalError())


class JsonRefusals(web.RequestHandler):
    """aiohttp's request handler, whose own refusals (a request its HTTP parser cannot read: a bad request
    line, header or chunk; headers over the limits) are JSON errors like every other reply, logged as one
    event: never aiohttp's text/plain page and traceback.  A listener's protocol factory makes these."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        reason = str(getattr(exc, "message", "") or message or status).strip().splitlines()[0][:200]
        if isinstance(exc, LineTooLong):  # a request line or header over the parser's limits: RFC 6585's 431
            status = 431
        error: GatewayError
        if status >= 500:
            error = InternalError()
        elif status in (413, 431):
            error = LimitExceeded(f"the request's headers are too large: {reason}", code="TOO_LARGE")
        else:
            error = Malformed(f"the request is not valid HTTP/1.1: {reason}", code="MALFORMED_REQUEST")
        if PARSER_LOGS.allow(request.remote or ""):
            log.info("http.refused_by_parser", status=status, code=error.code, peer=request.remote,
                     error_type=type(exc).__name__ if exc is not None else None)
        response = web.json_response(error.as_json(), status=status)
        response.force_close()
        return response


PARSER_LOGS = RateLimiter(burst=10, every_s=6.0)  # log events of parser refusals per address: ten a minute


def too_large(limit: int, size: int | None = None) -> LimitExceeded:
    what = f"the body of {size} bytes" if size is not None else "the body"
    return LimitExceeded(f"{what} exceeds the limit of {limit} bytes", code="TOO_LARGE")


class CertificateExpired(Forbidden):
    code = "CERT_EXPIRED"


@functools.lru_cache(maxsize=4096)
def certificate_identity(der: bytes) -> tuple[str, str]:
    """(SPKI SHA-256, subject) of a client certificate, remembered: keep-alive clients present the same one."""
    return spki_sha256_der(der)


@functools.lru_cache(maxsize=1024)
def loaded_certificate(der: bytes) -> x509.Certificate:
    """A client certificate, parsed once: keep-alive clients present the same one on every request."""
    return x509.load_der_x509_certificate(der)


def check_validity(cert: x509.Certificate, now: datetime) -> None:
    """The handshake checked the certificate's validity period, but a TLS session outlives its handshake (a
    resumed session, a kept-alive connection): every request checks it again."""
    if now > cert.not_valid_after_utc:
        raise CertificateExpired(
            f"your client certificate (serial {cert.serial_number:#x}) expired at {stamp(cert.not_valid_after_utc)}; "
            "this connection began before: get a new certificate registered, then reconnect")
    if now < cert.not_valid_before_utc:
        raise CertificateExpired(
            f"your client certificate (serial {cert.serial_number:#x}) is valid only from "
            f"{stamp(cert.not_valid_before_utc)}")


def client_certificate(request: web.Request) -> bytes | None:
    """The DER of the certificate the client presented in the TLS handshake, if any."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    der = sslobj.getpeercert(binary_form=True) if isinstance(sslobj, ssl.SSLObject) else None
    return der or None


def media_type_of(request: web.Request) -> str:
    """What the stages read the body as, once its headers are acceptable: a Factur-X PDF, or XML.  A
    compressed body is refused on its headers alone (the listeners never inflate one: no bombs)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send the XML uncompressed",
                                   code="UNSUPPORTED_ENCODING")
    if request.content_type not in (*XML_MEDIA_TYPES, PDF_MEDIA_TYPE):
        raise UnsupportedMediaType(f"Content-Type {request.content_type!r} is not accepted; send the invoice as "
                                   "application/xml (or a Factur-X / ZUGFeRD PDF as application/pdf)",
                                   code="UNSUPPORTED_MEDIA_TYPE")
    return PDF_MEDIA_TYPE if request.content_type == PDF_MEDIA_TYPE else "application/xml"


async def read_body(request: web.Request, max_bytes: int, timeout_s: float, *, min_rate: int = 0,
                    charge: Charge | None = None) -> bytes:
    """The whole body, within the size limit and in time, or the error the sender gets.

    Read as it arrives, each chunk charged to the in-flight budget (``charge``) before it is kept: an upload
    that declares much and sends little holds little.  The body must arrive within ``timeout_s``, or, when it
    takes longer, keep arriving at ``min_rate`` bytes/s on average since it began (a large invoice over a
    slow line passes, a trickle does not); a stalled body is refused when its time is up, not at its next byte."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks: list[bytes] = []
    received = 0
    while True:
        allowed = max(timeout_s, received / min_rate if min_rate else 0.0)  # seconds since start, for what came
        try:
            chunk = await asyncio.wait_for(request.content.readany(), start + allowed - loop.time())
        except TimeoutError:
            raise _too_slow(timeout_s, min_rate, received, loop.time() - start) from None
        if not chunk:
            return b"".join(chunks)
        received += len(chunk)
        if received > max_bytes:
            raise too_large(max_bytes)
        if charge is not None:
            await charge.take(len(chunk))
        chunks.append(chunk)


def _too_slow(timeout_s: float, min_rate: int, received: int, elapsed: float) -> BodyTimeout:
    if not min_rate or received < min_rate * timeout_s:
        return BodyTimeout(f"the body did not arrive within {timeout_s:.0f} s")
    return BodyTimeout(f"the body arrived too slowly: {received} bytes in {elapsed:.0f} s; a body that takes longer "
                       f"than {timeout_s:.0f} s must keep arriving at {min_rate} bytes/s or more")


class ByteBudget:
    """Bounds the bytes of request bodies held in memory at once, counted as they arrive: in all (``limit``)
    and per holder (a partner: ``per_holder``), so that no holder can take the room the others need."""

    def __init__(self, limit: int, per_holder: int | None = None):
        self.limit = limit
        self.per_holder = per_holder or limit
        self.used = 0
        self.by_holder: dict[str, int] = {}
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def held(self, holder: str) -> AsyncIterator[Charge]:
        """A charge that bytes are added to as they arrive; all of them given back however the block ends."""
        charge = Charge(self, holder)
        try:
            yield charge
        finally:
            await self._give(holder, charge.taken)

    @contextlib.asynccontextmanager
    async def reserved(self, n: int, holder: str = "") -> AsyncIterator[None]:
        """``n`` bytes of the budget while the block runs (a body already read whole)."""
        async with self.held(holder) as charge:
            await charge.take(n)
            yield

    async def _take(self, holder: str, n: int) -> None:
        """Room for ``n`` more bytes of ``holder``; Overloaded (503) after waiting BUDGET_WAIT_S for it."""
        def room() -> bool:
            return self.used + n <= self.limit and self.by_holder.get(holder, 0) + n <= self.per_holder

        async with self._cond:
            if not room():
                try:
                    await asyncio.wait_for(self._cond.wait_for(room), BUDGET_WAIT_S)
                except TimeoutError:
                    mine = self.by_holder.get(holder, 0)
                    if self.per_holder < self.limit and mine + n > self.per_holder:
                        raise Overloaded(f"your uploads in progress already hold {mine} bytes, and this gateway holds at "
                                         f"most {self.per_holder} bytes per partner at once; send fewer at a time") from None
                    raise Overloaded("the gateway is busy receiving other invoices; retry shortly") from None
            self.used += n
            self.by_holder[holder] = self.by_holder.get(holder, 0) + n

    async def _give(self, holder: str, n: int) -> None:
        if not n:
            return
        async with self._cond:
            self.used -= n
            left = self.by_holder.pop(holder) - n
            if left:
                self.by_holder[holder] = left
            self._cond.notify_all()


class Charge:
    """The bytes one upload holds of a ByteBudget."""

    def __init__(self, budget: ByteBudget, holder: str):
        self.budget, self.holder, self.taken = budget, holder, 0

    async def take(self, n: int) -> None:
        await self.budget._take(self.holder, n)
        self.taken += n
