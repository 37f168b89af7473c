"""XML signatures in tests: signing keys (``Pki``), the parser the stage uses, the refusal texts, partners that sign."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway import devpki
from gateway.config.model import DEFAULT_XML_LIMITS
from gateway.model import SignaturePolicy
from gateway.partners.directory import PartnerDirectory
from gateway.stages.signature import SigningKey, TrustedSigner, trusted
from gateway.stages.xmlparse import XmlParser
from tests.helpers import Running
from tests.helpers import add_partner as add_client_partner

CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
DIGEST_MISMATCH = "digest mismatch for reference '': the signed content was changed"
PARSER = XmlParser(DEFAULT_XML_LIMITS)


def parse(data: bytes) -> etree._Element:
    return PARSER.parse(data).root


def bad_method(uri: str) -> str:
    """The refusal of a signature method outside the allowed set."""
    return f"signature method {uri!r} is not allowed (RSA-SHA256/384/512 or ECDSA-SHA256/384/512 only)"


async def reload_partners(running: Running, ready: Callable[[PartnerDirectory], bool]) -> None:
    """Make the running gateway take the edited partners file now (it polls), and wait until it has."""
    book = running.gw.parts.partners
    for _ in range(200):
        await asyncio.to_thread(book.refresh)
        if ready(book.current):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the gateway did not pick up the partners file")


async def add_signing_partner(running: Running, name: str, party_ids: list[str], signing: list[Path],
                              policy: SignaturePolicy = SignaturePolicy.IF_PRESENT) -> devpki.Issued:
    """A partner with these signing certificates, taken by the running gateway; its client certificate returned."""
    client = await asyncio.to_thread(add_client_partner, running.inst, name, party_ids, signing_certs=signing,
                                     policy=policy)
    await reload_partners(running, lambda d: d.get(name) is not None)
    return client


IBAN, EVIL_IBAN = "DE89370400440532013000", "GB82WEST12345698765432"  # both pass the IBAN check


@dataclass(frozen=True)
class Signer:
    cert_path: Path
    cert: x509.Certificate
    key: Any

    @property
    def spki(self) -> str:
        der = self.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()

    @property
    def trusted(self) -> list[TrustedSigner]:
        return trusted([self.cert])

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.cert, self.key)  # not SigningKey.load: the weak and expired keys are wanted here


@dataclass(frozen=True)
class Pki:
    ca: devpki.Issued
    ec: Signer  # the partner's registered key
    rsa: Signer  # RSA-3072, for the RSA paths
    attacker: Signer  # CA-valid, same CN as `ec`, registered nowhere
    other: Signer  # registered for another partner in the HTTPS tests
    weak: Signer  # RSA-1024
    expired: Signer


def signing_pki(folder: Path) -> Pki:
    """A development CA and the signing certificates of ``Pki``, in ``folder`` (each key beside its certificate)."""
    ca = devpki.make_ca(folder, "ca")
    now = datetime.now(UTC)

    def make(name: str, kind: str = "ec", **kw: Any) -> Signer:
        issued = devpki.issue(ca, folder, name, role="signing", key_kind=kind, **kw)
        return Signer(issued.cert, x509.load_pem_x509_certificate(issued.cert.read_bytes()),
                      serialization.load_pem_private_key(issued.key.read_bytes(), None))

    return Pki(ca, make("ec", cn="partner signing"), make("rsa", "rsa3072"), make("attacker", cn="partner signing"),
               make("other"), make("weak", "rsa1024"),
               make("expired", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)))
