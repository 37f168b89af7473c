"""The SMTP listener's reply e-mails, sent from the outbox like any delivery: retried, then dead-lettered.

Each reply is built when it is sent: the outcome JSON (sealed in the store) attached to a short text,
signed with the gateway's S/MIME key, encrypted to the partner's certificate when it has an RSA key,
marked ``Auto-Submitted: auto-replied`` (RFC 3834) and answering the partner's Message-ID.  Its own
Message-ID is the notice's id, so a resend after a crash is recognisable as the same message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cryptography import x509

from ..smime.compose import compose
from ..storage.records import REPLIES, NoticeJob
from .sender import DeliveryFailed
from .smarthost import Mailer

CONCURRENCY = 4  # replies in flight at once


class ReplySender:
    def __init__(self, mailer: Callable[[], Mailer | None]):
        self.name = REPLIES
        self.concurrency = CONCURRENCY
        self.mailer = mailer  # the current one (a reload may change the smarthost or the identity)

    async def send(self, job: NoticeJob, document: bytes) -> str:
        mailer = self.mailer()
        if mailer is None:
            raise DeliveryFailed("there is no [smarthost] to send the reply e-mail through")
        recipient = x509.load_der_x509_certificate(job.certificate) if job.certificate else None
        text = (f"Your invoice message {job.in_reply_to} was {job.outcome} by einvoice-gateway.\r\n"
                "The attached outcome.json lists the details (the same JSON as the HTTPS API answers).\r\n")
        message = await asyncio.get_running_loop().run_in_executor(
            mailer.executor, lambda: compose([(document, "application/json", "outcome.json")], text,
                                             identity=mailer.identity, to=job.to, subject=f"Invoice {job.outcome}",
                                             recipient=recipient, cipher=job.cipher, in_reply_to=job.in_reply_to,
                                             message_id=job.message_id, auto_reply=True))
        return await mailer.smarthost.send(mailer.identity.address, [job.to], message)

    async def close(self) -> None:
        pass
