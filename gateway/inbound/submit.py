"""The ERP-facing listener: invoices this business sends to its trading partners.

    POST /v1/outbound            application/xml (or a Factur-X application/pdf) body
                                 → 202 {message_id, status, sha256, received_at, duplicate, rules}
    GET  /v1/outbound/{id}       status, with the recipient partner and each delivery attempt's state
    GET  /v1/openapi.json        this API's OpenAPI 3.1 description (gateway/inbound/openapi.py)

Separate from the partner listener: a Unix socket (access by file permissions), or TCP with mutual
TLS where the ERP's client certificate must chain to ``outbound.client_ca`` and its key be one of
``outbound.client_spki``.  Errors have the partner API's shape (``reply_for``, gateway/inbound/http.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import clock, logs
from ..clock import Clock, SystemClock
from ..config.model import HttpsConfig, OutboundConfig
from ..errors import Forbidden, Rejected
from ..model import stamp
from ..pipeline import Pipeline
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

log = logs.get("inbound.outbound")


class SubmitInbound:
    def __init__(self, cfg: OutboundConfig, limits: HttpsConfig, pipeline: Pipeline, store: Store,
                 on_accepted: Callable[[], None],
                 count: Callable[[str, str, str], None] = lambda transport, outcome, code: None, clock: Clock | None = None):
        self.cfg = cfg
        self.clock = clock or SystemClock()  # what a certificate's validity is judged at
        self.count = count  # (transport, outcome, code): the metrics counter
        self.limits = limits  # body size and timeouts: the partner listener's
        self.pipeline = pipeline
        self.store = store
        self.on_accepted = on_accepted
        self.budget = ByteBudget(limits.max_in_flight_bytes)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/outbound", self.post)
        app.router.add_get("/v1/outbound/{message_id}", self.get)
        app.router.add_get(openapi.PATH, openapi.serve(openapi.outbound_document(mutual_tls=self.cfg.socket is None)))
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        async def checked(req: web.Request) -> web.StreamResponse:
            self._authenticate(req)
            return await handler(req)

        return await answer_errors(request, checked, self.limits.max_body_bytes)

    def _authenticate(self, request: web.Request) -> None:
        """On TCP, the ERP's certificate key must be allowlisted; on the Unix socket the file mode decides."""
        if self.cfg.socket is not None:
            return
        der = client_certificate(request)
        spki = certificate_identity(der)[0] if der else None
        if spki not in self.cfg.client_spki:
            raise Forbidden("this client certificate may not submit invoices for sending "
                            f"(certificate key SHA-256 {spki}); list it in outbound.client_spki", code="SUBMITTER_UNKNOWN")
        assert der is not None
        check_validity(loaded_certificate(der), clock.now(self.clock))

    async def post(self, request: web.Request) -> web.Response:
        received_at = stamp()
        media_type = media_type_of(request)
        if request.content_length is not None and request.content_length > self.limits.max_body_bytes:
            raise too_large(self.limits.max_body_bytes, request.content_length)
        async with self.budget.held("erp") as charge:
            body = await read_body(request, self.limits.max_body_bytes, self.limits.read_timeout_s,
                                   min_rate=self.limits.min_body_rate, charge=charge)
            try:
                async with self.pipeline.attempt("erp") as sub:
                    outcome = await self.pipeline.submit(sub, body, received_at, media_type)
            except Rejected as exc:
                log.info("outbound.rejected", code=exc.code, status=exc.http_status, reason=exc.message)
                self.count("outbound", "rejected", exc.code)
                raise
        receipt = outcome.receipt
        partner: str | None = None
        if outcome.accepted is not None:
            partner = outcome.accepted.partner
            log.info("outbound.accepted", message_id=receipt.message_id, partner=partner,
                     invoice_number=outcome.accepted.facts.invoice_number, sha256=receipt.sha256,
                     signed=outcome.accepted.signature is not None)
            self.on_accepted()
            self.count("outbound", "accepted", "OK")
        else:  # the same bytes were submitted before: the same message, and the same recipient
            earlier = await self.store.intake.status(receipt.message_id, None, "out")
            partner = earlier.partner if earlier else None
            log.info("outbound.duplicate", message_id=receipt.message_id, partner=partner)
        return web.json_response({**receipt.as_json(), "partner": partner}, status=202)

    async def get(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        status = await self.store.intake.status(message_id, None, "out") if len(message_id) <= 64 else None
        if status is None:
            raise HttpRefusal(404, "no outbound message with this id")
        return web.json_response(status.as_json())
