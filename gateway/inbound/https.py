"""The partner-facing mutual-TLS HTTPS API.

    POST /v1/invoices            application/xml (or a Factur-X application/pdf) body
                                 → 202 {message_id, status: accepted|held, sha256, received_at, duplicate, rules}
    GET  /v1/invoices/{id}       status, for the partner that sent it; 404 for everyone else
    GET  /v1/openapi.json        this API's OpenAPI 3.1 description (gateway/inbound/openapi.py)

Every error is JSON ``{error, message, details[]}`` (``reply_for`` in gateway/inbound/http.py is the
one place errors become replies).  The partner is identified before any body byte is read; a
Content-Length over the limit is refused before reading, too.  Every refusal is recorded in the
audit log by the pipeline (``attempt``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import clock, logs
from ..clock import Clock, SystemClock
from ..config.model import HttpsConfig
from ..errors import Forbidden, GatewayError, Rejected
from ..model import PeerIdentity, stamp
from ..partners.book import PartnerBook
from ..pipeline import Outcome, Pipeline
from ..stages.revocation import Revocation, RevocationUnknown
from ..storage.base import Store
from . import openapi
from .http import (
    ByteBudget,
    HttpRefusal,
    answer_errors,
    certificate_identity,
    check_validity,
    client_certificate,
    loaded_certificate,
    media_type_of,
    read_body,
    too_large,
)

log = logs.get("inbound.https")


def peer_identity(request: web.Request) -> PeerIdentity:
    der = client_certificate(request)
    if der is None:
        raise Forbidden("a client certificate is required", code="PARTNER_UNKNOWN")
    spki, subject = certificate_identity(der)
    return PeerIdentity(spki, subject, "https")


class HttpsInbound:
    def __init__(self, cfg: HttpsConfig, pipeline: Pipeline, partners: PartnerBook, store: Store,
                 on_accepted: Callable[[], None],
                 count: Callable[[str, str, str], None] = lambda transport, outcome, code: None,
                 revocation: Revocation | None = None, clock: Clock | None = None):
        self.cfg = cfg
        self.clock = clock or SystemClock()  # what a certificate's validity is judged at
        self.revocation = revocation  # CRL checks of partner certificates (off without revocation.crls)
        self.count = count  # (transport, outcome, code): the metrics counter
        self.pipeline = pipeline
        self.partners = partners
        self.store = store
        self.on_accepted = on_accepted
        self.budget = ByteBudget(cfg.max_in_flight_bytes, cfg.partner_share)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/invoices", self.post_invoice)
        app.router.add_get("/v1/invoices/{message_id}", self.get_invoice)
        app.router.add_get(openapi.PATH, openapi.serve(openapi.partner_document()))
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        return await answer_errors(request, handler, self.cfg.max_body_bytes)

    async def post_invoice(self, request: web.Request) -> web.Response:
        received_at = stamp()
        bound = log.bind(transport="https", peer=request.remote)
        try:
            async with self.pipeline.attempt("https") as sub:
                sub.peer = peer_identity(request)
                sub.partner = self.partners.current.gate(sub.peer)
                self._check_certificate(request, bound)
                bound = bound.bind(partner=sub.partner.name)
                media_type = self._check_headers(request)
                async with self.budget.held(sub.partner.name) as charge:
                    body = await read_body(request, self.cfg.max_body_bytes, self.cfg.read_timeout_s,
                                           min_rate=self.cfg.min_body_rate, charge=charge)
                    outcome = await self.pipeline.accept(sub, body, received_at, media_type)
        except Rejected as exc:
            bound.info("invoice.rejected", code=exc.code, status=exc.http_status, reason=exc.message, details=len(exc.details))
            self.count("https", "rejected", exc.code)
            raise
        except GatewayError as exc:
            bound.warning("invoice.deferred", code=exc.code, status=exc.http_status, reason=exc.message)
            self.count("https", "deferred", exc.code)
            raise
        self._answered(outcome, bound)
        return web.json_response(outcome.receipt.as_json(), status=202)

    def _answered(self, outcome: Outcome, bound: Any) -> None:
        receipt = outcome.receipt
        if outcome.accepted is None:
            bound.info("invoice.duplicate", message_id=receipt.message_id, code="DUPLICATE", sha256=receipt.sha256)
            self.count("https", "duplicate", "DUPLICATE")
            return
        facts = outcome.accepted.facts
        bound.info("invoice.accepted", message_id=receipt.message_id, code="HELD" if receipt.status == "held" else
                   "ACCEPTED", sha256=receipt.sha256, document_type=facts.document_type.label,
                   invoice_number=facts.invoice_number, size=outcome.accepted.size, key_id=outcome.accepted.key_id,
                   media_type=outcome.accepted.media_type,
                   rule_packs=outcome.accepted.rules["packs"] if outcome.accepted.rules else None)
        self.on_accepted()
        self.count("https", "held" if receipt.status == "held" else "accepted", "OK")

    def _check_certificate(self, request: web.Request, bound: Any) -> None:
        """After the cheap allowlist check, on every request (a TLS session outlives the handshake that checked
        the certificate: resumed, or kept alive): is the partner's certificate still valid, and not revoked?"""
        der = client_certificate(request)
        if der is None:
            return
        cert = loaded_certificate(der)
        now = clock.now(self.clock)
        check_validity(cert, now)
        if self.revocation is None or not self.revocation.policy.crl_files:
            return
        try:
            status = self.revocation.check_peer(cert, now)
        except RevocationUnknown as exc:
            bound.error("revocation.unknown", reason=exc.reason, serial=f"{cert.serial_number:#x}")
            raise
        if status == "unknown":
            bound.warning("revocation.soft_fail", serial=f"{cert.serial_number:#x}", issuer=cert.issuer.rfc4514_string())

    def _check_headers(self, request: web.Request) -> str:
        """The media type the body is read as, once the headers are acceptable."""
        media_type = media_type_of(request)
        if request.content_length is not None and request.content_length > self.cfg.max_body_bytes:
            raise too_large(self.cfg.max_body_bytes, request.content_length)
        return media_type

    async def get_invoice(self, request: web.Request) -> web.Response:
        partner = self.partners.current.gate(peer_identity(request))
        self._check_certificate(request, log.bind(transport="https", peer=request.remote, partner=partner.name))
        message_id = request.match_info["message_id"]
        status = await self.store.intake.status(message_id, partner.name) if len(message_id) <= 64 else None
        if status is None:
            raise HttpRefusal(404, "no message with this id was received from you")
        return web.json_response(status.as_json())
