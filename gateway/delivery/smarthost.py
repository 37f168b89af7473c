"""Sending e-mail: every message the gateway sends goes through one smarthost, with STARTTLS required.

Used by ``type = "email"`` destinations, by partners whose endpoint is ``mailto:`` (invoices the
ERP submits), and by the SMTP listener's reply e-mails.  Each message is built afresh
(gateway/smime/compose.py: signed with the gateway's S/MIME key, then encrypted to the recipient); its
Message-ID is derived from the gateway's message id, so a resend after a crash can be recognised
by the receiving side as the same message.
"""

from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import Executor
from dataclasses import dataclass

import aiosmtplib
from cryptography import x509

from .. import logs
from ..config.model import SmarthostConfig
from ..smime.compose import compose
from ..smime.identity import Identity
from ..storage.records import DeliveryJob
from ..tls import client_context
from .sender import DeliveryFailed

log = logs.get("mail")
IMPLICIT_TLS_PORT = 465  # submissions port with TLS from the first byte; any other port must offer STARTTLS


class Smarthost:
    def __init__(self, cfg: SmarthostConfig):
        self.cfg = cfg
        self.tls = client_context(cfg.ca)
        self.password = cfg.password_file.read_text(encoding="utf-8").strip() if cfg.password_file else None

    async def send(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Hand one message to the relay.  Raises DeliveryFailed (permanent for a 5xx refusal)."""
        implicit = self.cfg.port == IMPLICIT_TLS_PORT
        try:
            errors, reply = await aiosmtplib.send(
                message, sender=sender, recipients=recipients, hostname=self.cfg.host, port=self.cfg.port,
                use_tls=implicit, start_tls=not implicit, tls_context=self.tls, validate_certs=True,
                username=self.cfg.username or None, password=self.password, timeout=self.cfg.timeout_s)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            raise DeliveryFailed(f"the relay refused the recipient ({text})", permanent=all(c >= 500 for c in codes)) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryFailed(f"the relay answered {exc.code} {exc.message}", permanent=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            raise DeliveryFailed(f"cannot send through {self.cfg.host}:{self.cfg.port}: {exc.__class__.__name__}: {exc}") from None
        return f"relay: {reply}"[:200]

    async def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Mailer:
    """The smarthost and the gateway's S/MIME identity: what it takes to send signed, encrypted mail."""

    smarthost: Smarthost
    identity: Identity
    executor: Executor

    async def send_invoice(self, job: DeliveryJob, document: bytes, to: str, recipient: x509.Certificate,
                           cipher: str) -> str:
        media_type = job.facts.media_type or "application/xml"
        number = job.facts.invoice_number or job.message_id
        name = f"{_safe(number)}.{'pdf' if media_type == 'application/pdf' else 'xml'}"
        text = (f"Invoice {number}, sent by einvoice-gateway.\r\nMessage id: {job.message_id}\r\n"
                f"SHA-256 of the attached document: {job.sha256}\r\n")
        message = await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: compose([(document, media_type, name)], text, identity=self.identity, to=to,
                                                 subject=f"Invoice {number}", recipient=recipient, cipher=cipher,
                                                 message_id=job.message_id))
        return await self.smarthost.send(self.identity.address, [to], message)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "invoice"
