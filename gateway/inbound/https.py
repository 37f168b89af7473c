"""The partner-facing mutual-TLS HTTPS API.

    POST /v1/invoices            application/xml (or a Factur-X application/pdf) body
                                 → 202 {message_id, status: accepted|held, sha256, received_at, duplicate, rules}
    GET  /v1/invoices/{id}       status, for the partner that sent it; 404 for everyone else

Every error is JSON ``{error, message, details[]}``; ``reply_for`` is the one place errors become
replies.  The partner is identified before any body byte is read; a Content-Length over the limit
is refused before reading, too.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography import x509

from .. import logs
from ..config.model import HttpsConfig
from ..errors import Forbidden, GatewayError, LimitExceeded, Malformed, Overloaded, Rejected, UnsupportedMediaType
from ..model import InboundMessage, Partner, PeerIdentity
from ..partners.directory import PartnerBook
from ..pipeline import Pipeline
from ..stages.revocation import Revocation, RevocationUnknown
from ..storage.base import Store
from ..tls import spki_sha256_der

XML_MEDIA_TYPES = ("application/xml", "text/xml")
PDF_MEDIA_TYPE = "application/pdf"  # Factur-X / ZUGFeRD: the CII invoice embedded in a PDF/A-3
BUDGET_WAIT_S = 5.0  # how long an upload may wait for in-flight byte budget before a 503

log = logs.get("inbound.https")


def reply_for(exc: GatewayError) -> web.Response:
    headers = {"Retry-After": "30"} if exc.http_status == 503 else None
    return web.json_response(exc.as_json(), status=exc.http_status, headers=headers)


async def answer_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        max_body_bytes: int) -> web.StreamResponse:
    """The one place a listener's errors become JSON replies (this listener's and the ERP's)."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return reply_for(exc)
    except web.HTTPRequestEntityTooLarge:
        return reply_for(LimitExceeded(f"the body exceeds the limit of {max_body_bytes} bytes", code="TOO_LARGE"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status, "HTTP_ERROR")
        return web.json_response({"error": code, "message": exc.reason, "details": []}, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request.internal_error", path=request.path)
        return web.json_response(
            {"error": "INTERNAL_ERROR", "message": "the gateway failed to process the request; retry later", "details": []},
            status=500,
        )


@functools.lru_cache(maxsize=4096)
def _identity(der: bytes) -> tuple[str, str]:
    return spki_sha256_der(der)


def peer_identity(request: web.Request) -> PeerIdentity:
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    der = sslobj.getpeercert(binary_form=True) if isinstance(sslobj, ssl.SSLObject) else None
    if not der:
        raise Forbidden("a client certificate is required", code="PARTNER_UNKNOWN")
    spki, subject = _identity(der)
    return PeerIdentity(spki, subject, "https")


class ByteBudget:
    """Bounds the bytes of request bodies held in memory at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.limit), BUDGET_WAIT_S)
            except TimeoutError:
                raise Overloaded("the gateway is busy receiving other invoices; retry shortly") from None
            self.used += n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class HttpsInbound:
    def __init__(self, cfg: HttpsConfig, pipeline: Pipeline, partners: PartnerBook, store: Store,
                 on_accepted: Callable[[], None],
                 count: Callable[[str, str, str], None] = lambda transport, outcome, code: None,
                 revocation: Revocation | None = None):
        self.cfg = cfg
        self.revocation = revocation  # CRL checks of partner certificates (off without revocation.crls)
        self.count = count  # (transport, outcome, code): the metrics counter
        self.pipeline = pipeline
        self.partners = partners
        self.store = store
        self.on_accepted = on_accepted
        self.budget = ByteBudget(cfg.max_in_flight_bytes)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/invoices", self.post_invoice)
        app.router.add_get("/v1/invoices/{message_id}", self.get_invoice)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        return await answer_errors(request, handler, self.cfg.max_body_bytes)

    def _authenticate(self, request: web.Request) -> tuple[PeerIdentity, Partner]:
        peer = peer_identity(request)
        return peer, self.partners.current.gate(peer)

    async def post_invoice(self, request: web.Request) -> web.Response:
        received_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        bound = log.bind(transport="https", peer=request.remote)
        peer: PeerIdentity | None = None
        partner: Partner | None = None
        piped = False  # the pipeline records its own refusals in the audit log
        try:
            peer = peer_identity(request)
            partner = self.partners.current.gate(peer)
            self._check_revocation(request, peer, bound)
            bound = bound.bind(partner=partner.name)
            self._check_headers(request)
            reserve = request.content_length if request.content_length is not None else self.cfg.max_body_bytes
            await self.budget.acquire(reserve)
            try:
                body = await asyncio.wait_for(request.read(), self.cfg.read_timeout_s)
                media_type = PDF_MEDIA_TYPE if request.content_type == PDF_MEDIA_TYPE else "application/xml"
                piped = True
                outcome = await self.pipeline.accept(InboundMessage(body, peer, partner, received_at, media_type))
            finally:
                await self.budget.release(reserve)
        except web.HTTPRequestEntityTooLarge:
            exc = LimitExceeded(f"the body exceeds the limit of {self.cfg.max_body_bytes} bytes", code="TOO_LARGE")
            bound.info("invoice.rejected", code=exc.code, status=exc.http_status)
            await self._refused(exc.code, peer, partner)
            return reply_for(exc)
        except TimeoutError:
            exc2 = Malformed(f"the body did not arrive within {self.cfg.read_timeout_s:.0f} s", code="BODY_TIMEOUT")
            bound.info("invoice.rejected", code=exc2.code, status=408)
            await self._refused(exc2.code, peer, partner)
            return web.json_response(exc2.as_json(), status=408)
        except Rejected as exc:
            bound.info("invoice.rejected", code=exc.code, status=exc.http_status, reason=exc.message, details=len(exc.details))
            if not piped:
                await self._refused(exc.code, peer, partner)
            else:
                self.count("https", "rejected", exc.code)
            raise
        except GatewayError as exc:
            bound.warning("invoice.deferred", code=exc.code, status=exc.http_status, reason=exc.message)
            self.count("https", "deferred", exc.code)
            raise
        receipt = outcome.receipt
        if outcome.accepted is not None:
            facts = outcome.accepted.facts
            bound.info("invoice.accepted", message_id=receipt.message_id, code="HELD" if receipt.status == "held" else
                       "ACCEPTED", sha256=receipt.sha256, document_type=facts.document_type.label,
                       invoice_number=facts.invoice_number, size=outcome.accepted.size, key_id=outcome.accepted.key_id,
                       media_type=outcome.accepted.media_type,
                       rule_packs=outcome.accepted.rules["packs"] if outcome.accepted.rules else None)
            self.on_accepted()
            self.count("https", "held" if receipt.status == "held" else "accepted", "OK")
        else:
            bound.info("invoice.duplicate", message_id=receipt.message_id, code="DUPLICATE", sha256=receipt.sha256)
            self.count("https", "duplicate", "DUPLICATE")
        return web.json_response(receipt.as_json(), status=202)

    def _check_revocation(self, request: web.Request, peer: PeerIdentity, bound: Any) -> None:
        """After the cheap allowlist check: is the partner's certificate revoked by its CA?"""
        if self.revocation is None or not self.revocation.policy.crl_files:
            return
        der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)  # type: ignore[union-attr]
        cert = x509.load_der_x509_certificate(der)
        try:
            status = self.revocation.check_peer(cert)
        except RevocationUnknown as exc:
            bound.error("revocation.unknown", reason=exc.reason, serial=f"{cert.serial_number:#x}")
            raise
        if status == "unknown":
            bound.warning("revocation.soft_fail", serial=f"{cert.serial_number:#x}", issuer=cert.issuer.rfc4514_string())

    async def _refused(self, code: str, peer: PeerIdentity | None, partner: Partner | None) -> None:
        """Count and audit a refusal that happened before the pipeline (identity, headers, size, time)."""
        self.count("https", "rejected", code)
        await self.store.audit.append("gateway", "invoice.rejected", partner.name if partner else None, None, {
            "transport": "https", "code": code, **({"peer_spki": peer.spki_sha256, "peer": peer.subject} if peer else {})})

    def _check_headers(self, request: web.Request) -> None:
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding!r} is not accepted; send the XML uncompressed", code="UNSUPPORTED_ENCODING"
            )
        if request.content_type not in (*XML_MEDIA_TYPES, PDF_MEDIA_TYPE):
            raise UnsupportedMediaType(
                f"Content-Type {request.content_type!r} is not accepted; send the invoice as application/xml "
                "(or a Factur-X / ZUGFeRD PDF as application/pdf)",
                code="UNSUPPORTED_MEDIA_TYPE",
            )
        if request.content_length is not None and request.content_length > self.cfg.max_body_bytes:
            raise LimitExceeded(
                f"the body of {request.content_length} bytes exceeds the limit of {self.cfg.max_body_bytes} bytes",
                code="TOO_LARGE",
            )

    async def get_invoice(self, request: web.Request) -> web.Response:
        _, partner = self._authenticate(request)
        message_id = request.match_info["message_id"]
        status = await self.store.intake.status(message_id, partner.name) if len(message_id) <= 64 else None
        if status is None:
            return web.json_response(
                {"error": "NOT_FOUND", "message": "no message with this id was received from you", "details": []},
                status=404,
            )
        return web.json_response(status.as_json())
