"""``type = "email"``: each invoice as a signed, encrypted S/MIME message to one mailbox, through the smarthost."""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509

from ..config.model import Destination
from ..errors import ConfigError
from ..storage.records import DeliveryJob
from ..tls import encryptable
from .sender import DeliveryFailed
from .smarthost import Mailer


class EmailSender:
    """A ``type = "email"`` destination: each invoice as an S/MIME message to one mailbox."""

    def __init__(self, dest: Destination, mailer: Callable[[], Mailer | None]):
        assert dest.recipient_certificate is not None
        self.name = dest.name
        self.concurrency = dest.concurrency
        self.dest = dest
        self.mailer = mailer
        self.recipient = x509.load_pem_x509_certificate(dest.recipient_certificate.read_bytes())
        if not encryptable(self.recipient):
            raise ConfigError(f"destinations: {dest.name!r}: recipient_certificate has no RSA key of 2048 bits or more; mail "
                             "cannot be encrypted to it")

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        mailer = self.mailer()
        if mailer is None:  # the configuration requires [smtp] and [smarthost] with an e-mail destination
            raise DeliveryFailed("there is no [smarthost] to send e-mail through")
        return await mailer.send_invoice(job, document, self.dest.to, self.recipient, self.dest.cipher)

    async def close(self) -> None:
        pass
