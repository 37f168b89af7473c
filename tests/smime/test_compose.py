"""Composing the S/MIME messages the gateway sends (gateway/smime/compose.py): a text and attachments,
signed with the gateway's key (multipart/signed, SHA-256), then encrypted to the recipient.

Each message is opened twice, by independent readers: with ``openssl cms`` (decrypt as the recipient,
then verify against the development CA: tests/helpers/mail.py), and with the gateway's own reader of
received mail (gateway/smime/unwrap.py), as another einvoice-gateway would open it.  Certificates and
keys are those of a fresh instance (``shared_inst``: the gateway's, and the demo partner's).
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import shutil
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509

from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from gateway.partners.book import load_directory
from gateway.smime import unwrap
from gateway.smime.compose import compose
from tests.helpers.mail import GATEWAY_ADDRESS, attachments, identity_of, open_with_openssl, openssl, pem_of

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl cms is the independent S/MIME reader")

DEMO = instance.DEMO_EMAIL
TEXT = "Invoice DEMO-2026-0001, sent by einvoice-gateway.\r\n"
PDF = b"%PDF-1.7\n% a stand-in for a rendering of the invoice\n"
SMIME_TYPES = {"aes-256-gcm": "authenveloped-data", "aes-128-gcm": "authenveloped-data",
               "aes-256-cbc": "enveloped-data", "aes-128-cbc": "enveloped-data"}


def parsed(message: bytes) -> EmailMessage:
    found = email.parser.BytesParser(policy=email.policy.default).parsebytes(message)
    assert isinstance(found, EmailMessage)
    return found


def to_demo_partner(inst: instance.Instance, **options: object) -> bytes:
    """What the gateway sends the demo partner: the sample invoice and a PDF, encrypted to its certificate."""
    kw: dict[str, object] = {"to": DEMO, "subject": "Invoice DEMO-2026-0001",
                             "recipient": x509.load_pem_x509_certificate(inst.demo_smime.cert.read_bytes())}
    kw.update(options)
    return compose([(SAMPLE, "application/xml", "DEMO-2026-0001.xml"), (PDF, "application/pdf", "DEMO-2026-0001.pdf")], TEXT,
                   identity=identity_of(inst.smime, GATEWAY_ADDRESS), **kw)  # type: ignore[arg-type]


# --- opened by openssl -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", list(SMIME_TYPES))
def test_the_recipient_decrypts_and_verifies_it_with_openssl(shared_inst: instance.Instance, tmp_path: Path, cipher: str) -> None:
    message = to_demo_partner(shared_inst, cipher=cipher)
    top = parsed(message)
    assert top.get_content_type() == "application/pkcs7-mime"
    assert str(top.get_param("smime-type")).lower() == SMIME_TYPES[cipher]
    content, signer = open_with_openssl(message, shared_inst.demo_smime, shared_inst.ca.cert, tmp_path)
    assert signer.strip() == pem_of(shared_inst.smime.cert)  # signed by the gateway's certificate
    assert attachments(content) == {"DEMO-2026-0001.xml": ("application/xml", SAMPLE),
                                    "DEMO-2026-0001.pdf": ("application/pdf", PDF)}
    body = parsed(content).get_body(("plain",))
    assert body is not None and body.get_content() == TEXT
    structure = openssl("-cmsout", "-print", "-in", str(tmp_path / "mail.eml")).decode()
    assert f"algorithm: {cipher} " in structure, structure[:2000]
    assert "rsaesOaep" in structure  # the content key travels under RSA-OAEP


def test_the_signature_is_over_the_entity_as_sent(shared_inst: instance.Instance, tmp_path: Path) -> None:
    """A verifier checks the signed part byte for byte: one changed byte of it, and openssl refuses."""
    message = to_demo_partner(shared_inst, recipient=None)
    (tmp_path / "signed.eml").write_bytes(message)
    openssl("-verify", "-CAfile", str(shared_inst.ca.cert), "-purpose", "smimesign", "-in", str(tmp_path / "signed.eml"))
    assert message.count(b"Content-Type: text/plain") == 1
    (tmp_path / "changed.eml").write_bytes(message.replace(b"Content-Type: text/plain", b"Content-Type: text/plaiN"))
    changed = subprocess.run(["openssl", "cms", "-verify", "-CAfile", str(shared_inst.ca.cert), "-purpose", "smimesign",
                              "-in", str(tmp_path / "changed.eml")], capture_output=True, timeout=30)
    assert changed.returncode != 0 and b"content verify error" in changed.stderr.lower(), changed.stderr


def test_without_a_recipient_it_is_signed_only(shared_inst: instance.Instance, tmp_path: Path) -> None:
    message = to_demo_partner(shared_inst, recipient=None)
    top = parsed(message)
    assert top.get_content_type() == "multipart/signed"
    assert (top.get_param("protocol"), top.get_param("micalg")) == ("application/pkcs7-signature", "sha-256")
    (tmp_path / "signed.eml").write_bytes(message)
    content = openssl("-verify", "-CAfile", str(shared_inst.ca.cert), "-purpose", "smimesign", "-in", str(tmp_path / "signed.eml"))
    assert attachments(content)["DEMO-2026-0001.xml"] == ("application/xml", SAMPLE)


def test_nothing_of_the_content_is_readable_outside_the_encryption(shared_inst: instance.Instance) -> None:
    message = to_demo_partner(shared_inst)
    for secret in (b"DEMO-2026-0001</cbc:ID>", b"stand-in for a rendering", b"sent by einvoice-gateway",
                   b"application/pdf", b"multipart/signed"):
        assert secret not in message


# --- opened by the gateway's own reader --------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-cbc"])
def test_another_gateway_opens_it_and_knows_the_sender(shared_inst: instance.Instance, cipher: str) -> None:
    """The demo partner's mail program composes (as ``einvoice-gateway demo`` does); the gateway opens it
    with its own identity and finds the partner that signed it."""
    gateway_cert = x509.load_pem_x509_certificate(shared_inst.smime.cert.read_bytes())
    message = compose([(SAMPLE, "application/xml", "invoice.xml")], "Invoice attached.", identity=identity_of(shared_inst.demo_smime, DEMO),
                      to=GATEWAY_ADDRESS, subject="Invoice", recipient=gateway_cert, cipher=cipher, message_id="m-42")
    opened = unwrap.open_message(message, identity_of(shared_inst.smime, GATEWAY_ADDRESS), 1 << 20)
    assert (opened.invoice, opened.media_type, opened.filename) == (SAMPLE, "application/xml", "invoice.xml")
    assert (opened.from_address, opened.message_id) == (DEMO, "<m-42@demo-supplier.example>")
    assert opened.decrypted is not None and opened.decrypted.cipher == cipher
    assert opened.verified.signer == x509.load_pem_x509_certificate(shared_inst.demo_smime.cert.read_bytes())
    roots = [x509.load_pem_x509_certificate(shared_inst.ca.cert.read_bytes())]
    partner = unwrap.authenticate(opened, load_directory(shared_inst.partners), roots, None)
    assert partner.name == instance.DEMO_PARTNER


def test_a_signed_only_message_opens_as_not_encrypted(shared_inst: instance.Instance) -> None:
    message = compose([(SAMPLE, "application/xml", "invoice.xml")], "Invoice attached.", identity=identity_of(shared_inst.demo_smime, DEMO),
                      to=GATEWAY_ADDRESS, subject="Invoice", recipient=None)
    opened = unwrap.open_message(message, identity_of(shared_inst.smime, GATEWAY_ADDRESS), 1 << 20)
    assert opened.invoice == SAMPLE and opened.decrypted is None


# --- the headers ---------------------------------------------------------------------------------------------


def test_the_headers_of_a_message(shared_inst: instance.Instance) -> None:
    top = parsed(to_demo_partner(shared_inst, message_id="0b7c9a52-5d2e-4bd3-9b8c-2d0f1e0c4a11"))
    assert (top["From"], top["To"], top["Subject"], top["MIME-Version"]) == (GATEWAY_ADDRESS, DEMO, "Invoice DEMO-2026-0001", "1.0")
    assert top["Message-ID"] == f"<0b7c9a52-5d2e-4bd3-9b8c-2d0f1e0c4a11@{instance.MAIL_HOST}>"  # a resend is the same message
    assert top["Date"].datetime is not None
    assert "In-Reply-To" not in top and "Auto-Submitted" not in top


def test_without_a_message_id_each_message_gets_a_new_one(shared_inst: instance.Instance) -> None:
    first, second = parsed(to_demo_partner(shared_inst))["Message-ID"], parsed(to_demo_partner(shared_inst))["Message-ID"]
    assert first != second
    assert all(re.fullmatch(rf"<[^<>@\s]+@{re.escape(instance.MAIL_HOST)}>", m) for m in (first, second)), (first, second)


def test_a_reply_answers_the_partners_message_and_says_it_is_automatic(shared_inst: instance.Instance) -> None:
    top = parsed(to_demo_partner(shared_inst, in_reply_to="<invoice-0001@demo-supplier.example>", auto_reply=True))
    assert top["In-Reply-To"] == "<invoice-0001@demo-supplier.example>"
    assert top["Auto-Submitted"] == "auto-replied"  # RFC 3834: no mail program answers it automatically


def test_header_values_cannot_add_header_lines(shared_inst: instance.Instance) -> None:
    message = to_demo_partner(shared_inst, subject="Invoice 1\r\nBcc: attacker@evil.example", in_reply_to="<a@b>\nX-Evil: 1",
                              recipient=None)
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert [line for line in head if line.lower().startswith((b"bcc", b"x-evil"))] == []
    top = parsed(message)
    assert (top["Subject"], top["In-Reply-To"]) == ("Invoice 1  Bcc: attacker@evil.example", "<a@b> X-Evil: 1")
    assert "Bcc" not in top and "X-Evil" not in top


def test_header_values_are_plain_ascii_and_cut(shared_inst: instance.Instance) -> None:
    top = parsed(to_demo_partner(shared_inst, subject="Rechnung für März\x00" + "x" * 300, recipient=None))
    assert top["Subject"] == ("Rechnung f r M rz " + "x" * 300)[:200]


# --- on the wire ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipient", [True, False], ids=["encrypted", "signed only"])
def test_the_message_is_ready_for_smtp(shared_inst: instance.Instance, recipient: bool) -> None:
    """CRLF line ends only, and no line longer than SMTP allows (RFC 5321 4.5.3.1.6: 998 octets)."""
    message = to_demo_partner(shared_inst) if recipient else to_demo_partner(shared_inst, recipient=None)
    assert message.endswith(b"\r\n")
    assert message.count(b"\n") == message.count(b"\r\n")
    assert max(len(line) for line in message.split(b"\r\n")) <= 998


def test_each_message_is_built_afresh(shared_inst: instance.Instance) -> None:
    """The same invoice twice: the same Message-ID (a resend is recognisable), never the same bytes (a new
    content key and boundary each time)."""
    first, second = (to_demo_partner(shared_inst, message_id="m-1") for _ in range(2))
    assert parsed(first)["Message-ID"] == parsed(second)["Message-ID"]
    assert first.split(b"\r\n\r\n", 1)[1] != second.split(b"\r\n\r\n", 1)[1]
