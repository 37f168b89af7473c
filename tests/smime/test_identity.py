"""The gateway's own S/MIME identity (gateway/smime/identity.py): its certificate and key, and the address
its mail comes from.

It promises: partners encrypt to its certificate and only its key opens what they send; the gateway
signs with that key, as that certificate; its address is the From of the gateway's mail and the domain
of its Message-IDs; and once made it does not change (frozen, no attributes besides the three).  That
the configured certificate and key belong together, and name the address, is checked when the
configuration is loaded (gateway/app/build.py); here an identity whose key is not its certificate's
signs nothing.  Messages from partners are made with ``openssl cms`` (tests/helpers/mail.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.errors import Rejected
from gateway.operations import instance
from gateway.smime import unwrap
from gateway.smime.compose import compose
from gateway.smime.identity import Identity
from gateway.tls import load_private_key
from tests.helpers.mail import GATEWAY_ADDRESS, encrypt, identity_of, openssl, part, pem_of, sign

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl cms is the independent S/MIME peer")

DEMO = instance.DEMO_EMAIL


def from_the_demo_partner(inst: instance.Instance, recipient: Path) -> bytes:
    """A partner's invoice message as its mail program sends it: signed, then encrypted to ``recipient``."""
    return encrypt(sign(part(SAMPLE), inst.demo_smime), recipient)


def another_identity(inst: instance.Instance, folder: Path) -> devpki.Issued:
    return devpki.issue(inst.ca, folder, "another-gateway", role="smime", key_kind="rsa2048", emails=(GATEWAY_ADDRESS,))


def test_an_identity_does_not_change_once_made(shared_inst: instance.Instance) -> None:
    identity = identity_of(shared_inst.smime, GATEWAY_ADDRESS)
    assert [f.name for f in dataclasses.fields(identity)] == ["certificate", "key", "address"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.address = "someone@else.example"  # type: ignore[misc]
    assert not hasattr(identity, "__dict__")  # slots: nothing can be hung on it either


def test_partners_encrypt_to_its_certificate_and_its_key_opens_it(shared_inst: instance.Instance) -> None:
    opened = unwrap.open_message(from_the_demo_partner(shared_inst, shared_inst.smime.cert),
                                 identity_of(shared_inst.smime, GATEWAY_ADDRESS), 1 << 20)
    assert opened.invoice == SAMPLE and opened.decrypted is not None
    assert opened.verified.signer == x509.load_pem_x509_certificate(shared_inst.demo_smime.cert.read_bytes())


def test_another_identity_cannot_open_what_was_sent_to_this_one(shared_inst: instance.Instance, tmp_path: Path) -> None:
    message = from_the_demo_partner(shared_inst, shared_inst.smime.cert)
    other = identity_of(another_identity(shared_inst, tmp_path), GATEWAY_ADDRESS)  # same address, another certificate
    with pytest.raises(Rejected) as refused:
        unwrap.open_message(message, other, 1 << 20)
    assert refused.value.code == "SMIME_WRONG_RECIPIENT"


def test_it_signs_as_its_certificate(shared_inst: instance.Instance, tmp_path: Path) -> None:
    identity = identity_of(shared_inst.smime, GATEWAY_ADDRESS)
    message = compose([(SAMPLE, "application/xml", "invoice.xml")], "Invoice attached.\r\n", identity=identity, to=DEMO,
                      subject="Invoice", recipient=None)
    (tmp_path / "signed.eml").write_bytes(message)
    openssl("-verify", "-CAfile", str(shared_inst.ca.cert), "-purpose", "smimesign", "-in", str(tmp_path / "signed.eml"),
            "-signer", str(tmp_path / "signer.pem"))
    assert (tmp_path / "signer.pem").read_bytes().strip() == pem_of(shared_inst.smime.cert)


def test_its_address_is_the_from_of_its_mail_and_names_its_message_ids(shared_inst: instance.Instance) -> None:
    issued = shared_inst.smime
    identity = Identity(x509.load_pem_x509_certificate(issued.cert.read_bytes()), load_private_key(issued.key.read_bytes()),
                        "e-invoices@billing.example")
    message = compose([(SAMPLE, "application/xml", "invoice.xml")], "Invoice attached.\r\n", identity=identity, to=DEMO,
                      subject="Invoice", recipient=None, message_id="m-7")
    head = message.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    assert "From: e-invoices@billing.example" in head
    assert "Message-ID: <m-7@billing.example>" in head


def test_an_identity_whose_key_is_not_its_certificates_signs_nothing(shared_inst: instance.Instance, tmp_path: Path) -> None:
    mismatched = dataclasses.replace(identity_of(shared_inst.smime, GATEWAY_ADDRESS),
                                     key=load_private_key(another_identity(shared_inst, tmp_path).key.read_bytes()))
    with pytest.raises(ValueError, match="the signing key does not belong to the certificate"):
        compose([(SAMPLE, "application/xml", "invoice.xml")], "Invoice attached.\r\n", identity=mismatched, to=DEMO,
                subject="Invoice", recipient=None)
