"""Opening received S/MIME messages (gateway/smime/unwrap.py) on hostile input.

Hostile bytes go straight into the S/MIME stage as the SMTP listener runs it (``Pipeline.open_mail``:
``open_message``, then ``authenticate``), with hypothesis: random bytes, MIME-shaped garbage, and
byte changes and truncations of valid messages, in the MIME text and in the DER below the base64.
Only a ``Rejected`` may come out, nothing but the signed invoice may reach ``authenticate``, and only
the registered certificate passes it.  The valid messages are made with ``openssl cms`` (the
independent peer, tests/helpers/mail.py) as the demo partner of a fresh instance.  The refusals one
by one, with their codes and SMTP replies, are tests/inbound/test_smtp.py.
"""

from __future__ import annotations

import base64
import shutil
import types
from dataclasses import dataclass
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.errors import Rejected
from gateway.model import Partner
from gateway.operations import instance
from gateway.partners.book import load_directory
from gateway.pipeline import MailIdentity, Pipeline, Submission
from gateway.smime import unwrap as smime
from gateway.smime.identity import Identity
from tests.helpers import numbered
from tests.helpers.mail import GATEWAY_ADDRESS, b64lines, encrypt, part, sign, tamper_der

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl cms is the independent S/MIME peer")

DEMO = instance.DEMO_EMAIL


@dataclass(frozen=True)
class Fuzz:
    identity: Identity
    demo_cert: x509.Certificate
    invoice: bytes
    messages: tuple[bytes, ...]  # valid: GCM, CBC, opaque signed-only (one base64 body each), detached signed-only
    signed_der: bytes  # a valid detached signature (for truncations)
    enveloped_der: bytes
    owner: types.SimpleNamespace  # stands in for the Pipeline in Pipeline.open_mail (the S/MIME stage)


@pytest.fixture(scope="module")
def fuzz(shared_inst: instance.Instance) -> Fuzz:
    inst = shared_inst
    demo = inst.demo_smime
    identity = Identity(x509.load_pem_x509_certificate(inst.smime.cert.read_bytes()),
                              serialization.load_pem_private_key(inst.smime.key.read_bytes(), None), GATEWAY_ADDRESS)
    doc = numbered("SMTP-FUZZ-1")
    messages = (encrypt(sign(part(doc), demo), inst.smime.cert), encrypt(sign(part(doc), demo), inst.smime.cert, "-aes128"),
                sign(part(doc), demo, opaque=True, sender=DEMO), sign(part(doc), demo, sender=DEMO))
    for m in messages:
        opened = smime.open_message(m, identity, 1 << 20)
        assert opened.invoice == doc
    signed = sign(part(doc), demo)
    signature_part = signed[signed.index(b"application/pkcs7-signature", signed.index(b"\r\n\r\n")):]
    signature = base64.b64decode(signature_part.split(b"\r\n\r\n")[1])
    enveloped = base64.b64decode(messages[0].split(b"\r\n\r\n", 1)[1])
    owner = types.SimpleNamespace(max_xml_bytes=1 << 20, mail=MailIdentity(
        identity, [x509.load_pem_x509_certificate(inst.ca.cert.read_bytes())], None),
        partners=types.SimpleNamespace(current=load_directory(inst.partners)))
    return Fuzz(identity, x509.load_pem_x509_certificate(demo.cert.read_bytes()), doc, messages, signature,
                enveloped, owner)


FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def open_through_the_listener(f: Fuzz, raw: bytes) -> tuple[list[smime.Opened], Partner | None]:
    """The S/MIME stage (Pipeline.open_mail: open_message, then authenticate) with a spy on authenticate:
    what reached it, and the partner it found.  Only Rejected may come out."""
    reached: list[smime.Opened] = []
    real = smime.authenticate

    def spy(opened: smime.Opened, *args: object, **kwargs: object) -> object:
        reached.append(opened)
        return real(opened, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(smime, "authenticate", spy):
        try:
            submission = Submission("smtp")
            Pipeline.open_mail(f.owner, submission, raw)  # type: ignore[arg-type]
            found = submission.partner
        except Rejected as exc:
            event(exc.code)  # (--hypothesis-show-statistics: how deep the examples got)
            return reached, None
    event("accepted")
    return reached, found


VALID_FROM = f"From: {DEMO}\r\n"


@FUZZ
@given(raw=st.one_of(st.binary(max_size=4096), st.binary(max_size=4096).map(lambda b: VALID_FROM.encode() + b)))
def test_random_bytes_open_nothing(fuzz: Fuzz, raw: bytes) -> None:
    assert open_through_the_listener(fuzz, raw) == ([], None)


HEADER_FROM = st.one_of(st.just(VALID_FROM), st.sampled_from([
    "", f"From: {DEMO}\r\nFrom: {DEMO}\r\n", "From: <>\r\n", "From: a@b, c@d\r\n", "From: =?utf-8?b?AAAA?=\r\n",
    "From: \x00\xff@x\r\n", f"{VALID_FROM}Sender: x@y.example\r\n"]))
CONTENT_TYPES = st.sampled_from([
    "application/pkcs7-mime; smime-type=enveloped-data", "application/pkcs7-mime; smime-type=authEnveloped-data",
    "application/pkcs7-mime; smime-type=signed-data", "application/pkcs7-mime", "application/x-pkcs7-mime",
    "application/pkcs7-mime; smime-type=certs-only", "application/pkcs7-mime; smime-type=\"",
    'multipart/signed; protocol="application/pkcs7-signature"; boundary="b"',
    'multipart/signed; protocol="application/pkcs7-signature"', 'multipart/signed; boundary="b"',
    'multipart/mixed; boundary="b"', "text/plain", "application/xml", "", "multipart/signed; boundary=\"\"",
])
ENCODINGS = st.sampled_from(["base64", "binary", "7bit", "quoted-printable", "", "BASE64", "x-uuencode"])


@st.composite
def mime_ish(draw: st.DrawFn, fragments: tuple[bytes, bytes]) -> bytes:
    signature, enveloped = fragments

    def body() -> bytes:
        kind = draw(st.sampled_from(["b64-signed-cut", "b64-enveloped-cut", "b64-random", "raw", "text"]))
        if kind == "b64-signed-cut":
            return b64lines(signature[:draw(st.integers(0, len(signature) - 1))])
        if kind == "b64-enveloped-cut":
            return b64lines(enveloped[:draw(st.integers(0, len(enveloped) - 1))])
        if kind == "b64-random":
            return b64lines(draw(st.binary(max_size=400)))
        if kind == "raw":
            return draw(st.binary(max_size=400))
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")

    def entity(depth: int) -> bytes:
        ctype, cte = draw(CONTENT_TYPES), draw(ENCODINGS)
        head = (f"Content-Type: {ctype}\r\n" if ctype else "") + (f"Content-Transfer-Encoding: {cte}\r\n" if cte else "")
        if "multipart" in ctype and depth < 3:
            parts = [entity(depth + 1) for _ in range(draw(st.integers(0, 3)))]
            inner = b"".join(b"--b\r\n" + p + b"\r\n" for p in parts)
            closing = draw(st.sampled_from([b"--b--\r\n", b"", b"--b\r\n", b"--b--"]))
            return head.encode() + b"\r\n" + draw(st.sampled_from([b"", b"preamble\r\n"])) + inner + closing
        return head.encode() + b"\r\n" + body()

    return draw(HEADER_FROM).encode() + b"MIME-Version: 1.0\r\n" + entity(0)


@FUZZ
@given(data=st.data())
def test_mime_shaped_garbage_opens_nothing(fuzz: Fuzz, data: st.DataObject) -> None:
    raw = data.draw(mime_ish((fuzz.signed_der, fuzz.enveloped_der)))
    assert open_through_the_listener(fuzz, raw) == ([], None)


@FUZZ
@given(data=st.data())
def test_mutated_messages_open_only_the_signed_invoice(fuzz: Fuzz, data: st.DataObject) -> None:
    """Byte changes and truncations of valid messages, in the MIME text and in the DER below the base64:
    refused (Rejected only), or opened to exactly the signed invoice under the demo partner's key;
    nothing else ever reaches authenticate, and only the real certificate passes it."""
    which = data.draw(st.integers(0, len(fuzz.messages) - 1))
    message = fuzz.messages[which]
    how = data.draw(st.sampled_from(["cut", "byte"] + (["der-cut", "der-byte", "der-bytes"] if which < 3 else [])))

    def changed(blob: bytes, count: int = 1) -> bytes:
        for _ in range(count):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob = blob[:i] + bytes([data.draw(st.integers(0, 255))]) + blob[i + 1:]
        return blob

    if how == "cut":
        raw = message[:data.draw(st.integers(0, len(message) - 1))]
    elif how == "byte":
        raw = changed(message)
    elif how == "der-cut":  # below the base64: the CMS parser, the decrypter and the verifier see it
        raw = tamper_der(message, lambda der: der[:data.draw(st.integers(0, len(der) - 1))])
    else:
        raw = tamper_der(message, lambda der: changed(der, 1 if how == "der-byte" else data.draw(st.integers(2, 8))))
    event(how)
    reached, found = open_through_the_listener(fuzz, raw)
    for opened in reached:  # verified: the signed invoice, signed with the demo key (the certificate is checked next)
        assert opened.invoice == fuzz.invoice
        assert opened.verified.signer.public_key() == fuzz.demo_cert.public_key()
    if found is not None:  # and a changed certificate never gets through authenticate
        assert found.name == instance.DEMO_PARTNER and reached[0].verified.signer == fuzz.demo_cert
