"""``type = "partner"``: invoices the ERP submitted, to the trading partner they are addressed to:
over mutual TLS to its endpoint (another einvoice-gateway), or by S/MIME e-mail to a ``mailto:`` one."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from ..config.model import Destination
from ..model import Partner, PartnerStatus
from ..partners.book import PartnerBook
from ..storage.records import DeliveryJob
from ..tls import encryptable
from .sender import DeliveryFailed
from .smarthost import Mailer
from .webhook import HttpPoster


class PartnerSender(HttpPoster):
    """POSTs an invoice to a trading partner's registered endpoint over mutual TLS (another
    einvoice-gateway answers 202 with its receipt, and a resend of the same bytes with the same
    receipt, so a retry never books twice there either)."""

    def __init__(self, dest: Destination, partners: PartnerBook, mailer: Callable[[], Mailer | None] = lambda: None):
        super().__init__(dest)
        self.partners = partners
        self.mailer = mailer  # the current one, for partners whose endpoint is mailto: (None: no [smarthost])

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        name = self.dest.partner or job.partner
        partner = self.partners.current.get(name)
        if partner is None or not partner.endpoint:
            raise DeliveryFailed(f"partner {name!r} has no endpoint registered (partners edit {name} --endpoint URL)")
        if partner.status is not PartnerStatus.ACTIVE:
            raise DeliveryFailed(f"partner {name!r} is {partner.status.value}; retried until the horizon "
                                 f"({'partners resume' if partner.status is PartnerStatus.SUSPENDED else 'partners activate'} {name})")
        if partner.endpoint.startswith("mailto:"):
            return await self._mail(job, document, partner)
        headers = {"Content-Type": job.facts.media_type or "application/xml",
                   "Idempotency-Key": job.message_id}
        status, reply = await self.post(partner.endpoint, document, headers)
        try:
            receipt = json.loads(reply)
            return f"HTTP {status} {receipt.get('status', '')} message_id={receipt.get('message_id', '')}"
        except (ValueError, AttributeError):
            return f"HTTP {status}"

    async def _mail(self, job: DeliveryJob, document: bytes, partner: Partner) -> str:
        mailer = self.mailer()
        if mailer is None:
            raise DeliveryFailed(f"partner {partner.name!r} receives invoices by e-mail and there is no [smarthost] (or no "
                                 "[smtp] identity) to send them with; retried until the horizon")
        now = datetime.now(UTC)
        certs = [c for c in self.partners.current.certificates.values() if c.spki_sha256 in partner.smime_spki
                 and encryptable(c.cert) and partner.refusal(c.spki_sha256, now, "smime") is None]
        if not certs:
            raise DeliveryFailed(f"partner {partner.name!r} has no S/MIME certificate with an RSA key to encrypt to "
                                 f"(partners edit {partner.name} --smime-cert PEM)")
        newest = max(certs, key=lambda c: c.not_after)  # during a rollover, the certificate that lasts longest
        if newest.not_after < datetime.now(UTC):
            raise DeliveryFailed(f"partner {partner.name!r}: its S/MIME certificate expired on {newest.not_after.date()}; "
                                 f"register its new one (partners edit {partner.name} --smime-cert PEM)")
        return await mailer.send_invoice(job, document, partner.endpoint.removeprefix("mailto:"), newest.cert, "aes-256-gcm")

    @staticmethod
    def reason(reply: bytes) -> str:
        """Another gateway's refusal, condensed: its code, message and first details."""
        try:
            body = json.loads(reply)
            details = "; ".join(str(d.get("message", "")) for d in body.get("details", [])[:3])
            return f"{body['error']}: {body['message']}" + (f" ({details})" if details else "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return HttpPoster.reason(reply)
