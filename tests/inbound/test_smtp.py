"""The S/MIME e-mail listener end to end (gateway/inbound/smtp.py, gateway/smime/unwrap.py, gateway/smime/cms.py).

A real gateway on 127.0.0.1, Python's ``smtplib`` as the partner's mail client (in a thread: the
gateway runs in the test's event loop), STARTTLS against the instance CA, and ``openssl cms`` as the
independent peer that signs and encrypts (``sign``, ``encrypt``: tests/helpers/mail.py).
SECURITY-TESTS.md §F (M-01…M-08) and I-02/I-03.  Hostile bytes straight into the S/MIME stage
(``open_message``, then ``authenticate``) are tests/smime/test_unwrap.py.

Starting a gateway takes about a second (rule compilation), so most tests share one instance and
one listener per module (``running``); partners are registered before it starts, with the CLI.
Every message carries its own invoice number, so "nothing delivered" is checked per message: the
number is in no delivered file and in no stored message.  The two timeout tests start an instance
of their own (a 1 s command timeout would race every other session).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import shutil
import smtplib
import socket
import ssl
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import devpki
from gateway.cli import main as cli
from gateway.cli.demo import SAMPLE
from gateway.model import Partner
from gateway.operations import instance
from tests.helpers import Running, audit_of, eventually, numbered, rewrite_config, serving
from tests.helpers.mail import b64lines, encrypt, part, sign, tamper_der

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl cms is the independent S/MIME peer")
shared = pytest.mark.asyncio(loop_scope="module")  # runs against the module's one gateway

GATEWAY = f"invoices@{instance.MAIL_HOST}"
DEMO = instance.DEMO_EMAIL
MAX_MESSAGE = 64 * 1024  # smtp.max_message_bytes of the shared instance (the configurable minimum)
MAX_INVOICE = 16 * 1024  # https.max_body_bytes of the shared instance: the largest invoice (the sample has 5.6 KB)
DEMO_GLN, DEMO_VAT = "4000001000006", "DE123456789"
assert SAMPLE.count(f">{DEMO_GLN}<".encode()) == 2 and SAMPLE.count(f">{DEMO_VAT}<".encode()) == 1

OAEP = ("-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256", "-keyopt", "rsa_mgf1_md:sha256")
OAEP_DEFAULTS = ("-keyopt", "rsa_padding_mode:oaep")  # SHA-1 for OAEP's hashes: what most S/MIME and AS2 software sends


# --- invoices and messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Supplier:
    gln: str
    vat: str

    @property
    def party_ids(self) -> tuple[str, str]:
        return f"0088:{self.gln}", self.vat


DEMO_SUPPLIER = Supplier(DEMO_GLN, DEMO_VAT)


def new_number(tag: str) -> str:
    return f"SMTP-{tag}-{uuid.uuid4().hex[:10]}"


def invoice(number: str, supplier: Supplier = DEMO_SUPPLIER) -> bytes:
    """The sample invoice with its own number, from ``supplier`` (EndpointID, PartyIdentification, CompanyID)."""
    doc = numbered(number)
    return doc.replace(f">{DEMO_GLN}<".encode(), f">{supplier.gln}<".encode()).replace(
        f">{DEMO_VAT}<".encode(), f">{supplier.vat}<".encode())


def mixed(parts: Sequence[bytes], headers: bytes = b"", boundary: str = "mixed-boundary-1") -> bytes:
    body = b"".join(f"--{boundary}\r\n".encode() + p.rstrip(b"\r\n") + b"\r\n" for p in parts)
    return headers + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode() + body + \
        f"--{boundary}--\r\n".encode()


def mail_headers(sender: str | None = DEMO, to: str = GATEWAY) -> bytes:
    return ((f"From: {sender}\r\n" if sender else "") + f"To: {to}\r\nSubject: Invoice\r\nMIME-Version: 1.0\r\n").encode()


def ciphertext_span(der: bytes) -> tuple[int, int]:
    """Where the EnvelopedData's encryptedContent lies in the DER (start, end)."""
    content = asn1_cms.ContentInfo.load(der)["content"]["encrypted_content_info"]["encrypted_content"].native
    start = der.find(content)
    assert start > 0 and der.count(content[-32:]) == 1
    return start, start + len(content)


def flip(position: Callable[[int], int]) -> Callable[[bytes], bytes]:
    def change(der: bytes) -> bytes:
        i = position(len(der))
        return der[:i] + bytes([der[i] ^ 0x01]) + der[i + 1:]
    return change


# --- the world: one instance, its partners, one running gateway -------------------------------------------


@dataclass
class World:
    inst: instance.Instance
    scratch: Path
    second: devpki.Issued  # partner "second-supplier" (registered with the CLI)
    signed_only: devpki.Issued  # partner "signed-only-supplier", --smime-signed-only
    paused: devpki.Issued  # partner "paused-supplier" (suspended by a test)
    foreign: devpki.Issued  # partner "foreign-ca-supplier": registered, but issued by a CA that is not smtp.partner_ca
    stranger: devpki.Issued  # from the instance's CA, never registered
    ec: devpki.Issued  # partner "ec-supplier": an ECDSA P-256 signer
    second_rollover: devpki.Issued  # an RSA-3072 certificate added to "second-supplier" with partners edit
    two_addresses: devpki.Issued  # partner "two-address-supplier": a certificate naming two addresses

    @property
    def demo(self) -> devpki.Issued:
        return self.inst.demo_smime

    @property
    def gateway_cert(self) -> Path:
        return self.inst.smime.cert

    def signed_encrypted(self, doc: bytes, *cipher: str, signer: devpki.Issued | None = None,
                         sender: str | None = DEMO) -> bytes:
        return encrypt(sign(part(doc), signer or self.demo), self.gateway_cert, *cipher, sender=sender)


SECOND = Supplier("4000003000006", "DE300000001")
SIGNED_ONLY = Supplier("4000004000006", "DE400000001")
PAUSED = Supplier("4000005000006", "DE500000001")
FOREIGN = Supplier("4000006000006", "DE600000001")
LATE = Supplier("4000007000006", "DE700000001")
EC = Supplier("4000008000006", "DE800000001")
TWO = Supplier("4000009000006", "DE900000001")
TWO_EMAILS = ("billing@two.example", "invoices@two.example")
SECOND_EMAIL = "billing@second-supplier.example"
DEMO_OTHER_EMAIL = "accounts@demo-supplier.example"  # registered for demo-supplier, not in its certificate


def run_cli(*args: object) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in args])
    assert code == 0, out.getvalue()
    return out.getvalue()


async def run_cli_aside(*args: object) -> str:
    """``run_cli`` from inside the event loop: in a thread, as the CLI runs its own loop (asyncio.run)."""
    return await asyncio.to_thread(run_cli, *args)


def add_partner(config: Path, name: str, cert: Path, email: str, supplier: Supplier, *extra: str) -> None:
    """``partners add`` with an S/MIME certificate (not tests.helpers.add_partner, which registers a client
    certificate it issues): the partner sends by e-mail."""
    ids = [a for i in supplier.party_ids for a in ("--party-id", i)]
    run_cli("partners", "add", name, "--smime-cert", cert, "--email", email, *ids, *extra, "-c", config)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("smtp")
    inst = instance.init(root / "gw", port=0)
    text = inst.config.read_text()
    assert "# max_message_bytes = " in text
    assert "\nmax_body_bytes = 67108864\n" in text
    text = text.replace("\nmax_body_bytes = 67108864\n", f"\nmax_body_bytes = {MAX_INVOICE}\n", 1)
    inst.config.write_text(text.replace("# max_message_bytes = ", f"max_message_bytes = {MAX_MESSAGE}\n# was: ", 1))
    clients = inst.root / "pki" / "clients"

    def smime_cert(name: str, email: str, ca: devpki.Issued = inst.ca) -> devpki.Issued:
        return devpki.issue(ca, clients, name, role="smime", emails=(email,), key_kind="rsa2048")

    w = World(inst, root / "scratch",
              second=smime_cert("second-smime", SECOND_EMAIL),
              signed_only=smime_cert("signed-only-smime", "billing@signed-only.example"),
              paused=smime_cert("paused-smime", "billing@paused.example"),
              foreign=smime_cert("foreign-smime", "billing@foreign.example",
                                 devpki.make_ca(root / "other-ca", "other", cn="a CA this gateway does not trust")),
              stranger=smime_cert("stranger-smime", "billing@stranger.example"),
              ec=devpki.issue(inst.ca, clients, "ec-smime", role="smime", emails=("billing@ec.example",), key_kind="ec"),
              second_rollover=devpki.issue(inst.ca, clients, "second-smime-2", role="smime", emails=(SECOND_EMAIL,),
                                           key_kind="rsa3072"),
              two_addresses=devpki.issue(inst.ca, clients, "two-smime", role="smime", emails=TWO_EMAILS,
                                         key_kind="rsa2048"))
    w.scratch.mkdir()
    add_partner(inst.config, "second-supplier", w.second.cert, SECOND_EMAIL, SECOND)
    add_partner(inst.config, "signed-only-supplier", w.signed_only.cert, "billing@signed-only.example", SIGNED_ONLY,
                "--smime-signed-only")
    add_partner(inst.config, "paused-supplier", w.paused.cert, "billing@paused.example", PAUSED)
    add_partner(inst.config, "foreign-ca-supplier", w.foreign.cert, "billing@foreign.example", FOREIGN)
    add_partner(inst.config, "ec-supplier", w.ec.cert, "billing@ec.example", EC)
    add_partner(inst.config, "two-address-supplier", w.two_addresses.cert, TWO_EMAILS[0], TWO, "--email", TWO_EMAILS[1])
    run_cli("partners", "edit", "second-supplier", "--smime-cert", w.second_rollover.cert, "-c", inst.config)
    run_cli("partners", "edit", instance.DEMO_PARTNER, "--email", DEMO_OTHER_EMAIL, "-c", inst.config)
    return w


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(world: World) -> AsyncIterator[Running]:
    async with serving(world.inst, level="warning") as r:
        assert r.gw.smtp_port
        yield r


# --- the client -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # smtplib's reply text: one line per reply line, without the code

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    @property
    def enhanced(self) -> str:
        return self.text.split(" ", 1)[0]

    @property
    def error(self) -> str:
        match = re.match(r"\d\.\d+\.\d+ ([A-Z0-9_]+):", self.text)
        return match.group(1) if match else ""

    @property
    def message_id(self) -> str:
        match = re.search(r"Accepted as (\S+)", self.text)
        assert match, self.text
        return match.group(1)


def tls_context(inst: instance.Instance) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(inst.ca.cert))


def smtp_port(r: Running) -> int:
    assert r.gw.smtp_port is not None, "the SMTP listener is not running"
    return r.gw.smtp_port


def connect(r: Running) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", smtp_port(r), timeout=30)


def secured(r: Running) -> smtplib.SMTP:
    """A session after EHLO, STARTTLS (the instance CA trusted) and EHLO again, as a partner's MTA opens it."""
    s = connect(r)
    s.ehlo()
    s.starttls(context=tls_context(r.inst))
    s.ehlo()
    return s


def current_partner(r: Running, name: str) -> Partner:
    """The running gateway's current view of a partner (after its last reload of the partners file)."""
    found = r.gw.parts.partners.current.get(name)
    assert found is not None, name
    return found


async def send(r: Running, message: bytes, *, sender: str = DEMO, rcpt: str = GATEWAY) -> Reply:
    """One SMTP session: EHLO, STARTTLS, EHLO, MAIL, RCPT, DATA; the reply to DATA."""

    def session() -> Reply:
        with secured(r) as s:
            assert s.mail(sender)[0] == 250
            assert s.rcpt(rcpt)[0] == 250
            text: bytes | str
            try:
                code, text = s.data(message)
            except smtplib.SMTPDataError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            return Reply(code, text.decode("ascii") if isinstance(text, bytes) else text)

    return await asyncio.to_thread(session)


async def delivered(r: Running, message_id: str, timeout_s: float = 15.0) -> bytes:
    """The delivered invoice (polls the directory destination, bounded)."""
    xml, meta = r.inst.delivery_folder / f"{message_id}.xml", r.inst.delivery_folder / f"{message_id}.json"
    await eventually(lambda: xml.exists() and meta.exists(), f"{message_id} to be delivered", timeout_s)
    return xml.read_bytes()


async def accepted(r: Running, message: bytes, doc: bytes, partner: str = instance.DEMO_PARTNER) -> str:
    reply = await send(r, message)
    assert reply.code == 250, reply
    assert reply.enhanced == "2.0.0"
    assert await delivered(r, reply.message_id) == doc
    sidecar = json.loads((r.inst.delivery_folder / f"{reply.message_id}.json").read_bytes())
    assert (sidecar["message_id"], sidecar["partner"], sidecar["sha256"]) == (
        reply.message_id, partner, hashlib.sha256(doc).hexdigest())
    stored = await r.gw.store.reports.message(reply.message_id)
    assert stored is not None and stored.partner == partner
    return reply.message_id


async def not_delivered(r: Running, *numbers: str) -> None:
    """None of these invoice numbers was stored or delivered (after giving the outbox a moment)."""
    await asyncio.sleep(0.2)
    stored = {m.invoice_number for m in await r.gw.store.reports.messages(limit=100_000)}
    assert not stored & set(numbers)
    for path in r.inst.delivery_folder.iterdir():
        content = path.read_bytes()
        assert not any(n.encode() in content for n in numbers), f"{path.name} holds a refused invoice"


async def last_seq(r: Running) -> int:
    rows = await r.gw.store.audit.newest(1)
    return rows[0].seq if rows else 0


async def refused(r: Running, message: bytes, code: str, enhanced: str | None, *numbers: str, status: int = 554) -> Reply:
    """Sent, refused with ``status enhanced CODE:``, audited as an smtp rejection, and nothing delivered.
    (``enhanced`` None: not checked here.)"""
    before = await last_seq(r)
    reply = await send(r, message)
    assert (reply.code, reply.error) == (status, code), reply
    assert all(re.match(r"5\.\d+\.\d+ ", line) and line.startswith(f"{reply.enhanced} ") for line in reply.lines), reply
    if enhanced is not None:
        assert reply.enhanced == enhanced, reply
    audits = [a for a in await audit_of(r.gw.store, "invoice.rejected") if a["seq"] > before]
    assert [(a["detail"]["transport"], a["detail"]["code"]) for a in audits] == [("smtp", code)], audits
    await not_delivered(r, *numbers)
    return reply


# --- 1. accepted and delivered ----------------------------------------------------------------------------


@shared
@pytest.mark.parametrize("cipher", [("-aes256",), ("-aes128",), ("-aes256", *OAEP), ("-aes-256-gcm", *OAEP_DEFAULTS),
                                    ("-aes-256-gcm",), ("-aes-128-gcm",)],
                         ids=["aes256-cbc", "aes128-cbc", "rsa-oaep-sha256", "rsa-oaep-sha1", "aes256-gcm", "aes128-gcm"])
async def test_signed_then_encrypted_is_accepted_and_delivered(world: World, running: Running, cipher: tuple[str, ...]) -> None:
    """M-01: the delivered invoice is byte for byte the one that was signed."""
    doc = invoice(new_number("ok"))
    message = world.signed_encrypted(doc, *cipher)
    head = message.split(b"\r\n\r\n")[0]
    assert f"\r\nFrom: {DEMO}\r\n".encode() in head
    assert (b"smime-type=authEnveloped-data" if "gcm" in cipher[0] else b"smime-type=enveloped-data") in head
    await accepted(running, message, doc)


SIGNATURES: dict[str, tuple[str, dict[str, object], Supplier, str, str]] = {
    # case: (signer attribute of World, sign() keywords, supplier, From, partner)
    "sha384": ("demo", {"md": "sha384"}, DEMO_SUPPLIER, DEMO, instance.DEMO_PARTNER),
    "sha512": ("demo", {"md": "sha512"}, DEMO_SUPPLIER, DEMO, instance.DEMO_PARTNER),
    "rsassa-pss": ("demo", {"options": ("-keyopt", "rsa_padding_mode:pss")}, DEMO_SUPPLIER, DEMO, instance.DEMO_PARTNER),
    "no-smime-capabilities": ("demo", {"options": ("-nosmimecap",)}, DEMO_SUPPLIER, DEMO, instance.DEMO_PARTNER),
    "ecdsa-p256": ("ec", {}, EC, "billing@ec.example", "ec-supplier"),
    "rsa3072-rollover-certificate": ("second_rollover", {}, SECOND, SECOND_EMAIL, "second-supplier"),
}


@shared
@pytest.mark.parametrize("case", list(SIGNATURES))
async def test_signature_variants_are_accepted(world: World, running: Running, case: str) -> None:
    signer, options, supplier, sender, partner = SIGNATURES[case]
    doc = invoice(new_number(case[:12]), supplier)
    signed = sign(part(doc), getattr(world, signer), **options)  # type: ignore[arg-type]
    await accepted(running, encrypt(signed, world.gateway_cert, sender=sender), doc, partner)


@shared
async def test_opaque_signed_data_inside_the_encryption_is_accepted(world: World, running: Running) -> None:
    doc = invoice(new_number("opaque"))
    signed = sign(part(doc), world.demo, opaque=True)
    assert b"smime-type=signed-data" in signed
    await accepted(running, encrypt(signed, world.gateway_cert, "-aes256"), doc)


@shared
async def test_a_resent_message_gets_the_same_id_and_is_delivered_once(world: World, running: Running) -> None:
    number = new_number("resend")
    doc = invoice(number)
    message = world.signed_encrypted(doc)
    first = await accepted(running, message, doc)
    again = await send(running, message)
    assert again.code == 250 and again.message_id == first, again
    # the same invoice, encrypted afresh (new key, new bytes), is the same submission too
    third = await send(running, world.signed_encrypted(doc, "-aes256"))
    assert third.code == 250 and third.message_id == first, third
    await asyncio.sleep(0.3)
    assert [m.message_id for m in await running.gw.store.reports.messages(limit=100_000) if m.invoice_number == number] == [first]
    holding = [p.name for p in running.inst.delivery_folder.glob("*.xml") if number.encode() in p.read_bytes()]
    assert holding == [f"{first}.xml"]


@shared
async def test_a_signed_only_partner_may_send_signed_without_encryption(world: World, running: Running) -> None:
    name, config = "signed-only-supplier", world.inst.config
    shown = json.loads(run_cli("partners", "show", name, "--json", "-c", config))
    assert shown["smime_signed_only"] is True and len(shown["smime_certs"]) == 1

    def message(number: str) -> bytes:
        return sign(part(invoice(number, SIGNED_ONLY)), world.signed_only, sender="billing@signed-only.example")

    doc, first = invoice(number := new_number("signed-only"), SIGNED_ONLY), message(number)
    assert b"multipart/signed" in first and b"pkcs7-mime" not in first.split(b"\r\n\r\n")[0]
    await accepted(running, first, doc, name)
    # the opaque form too
    doc = invoice(number := new_number("signed-only"), SIGNED_ONLY)
    await accepted(running, sign(part(doc), world.signed_only, opaque=True, sender="billing@signed-only.example"), doc, name)
    # switched off with the CLI: the same kind of message is refused
    await run_cli_aside("partners", "edit", name, "--no-smime-signed-only", "-c", config)
    try:
        await eventually(lambda: not current_partner(running, name).smime_signed_only, "the partner no longer signed-only")
        number = new_number("signed-only")
        await refused(running, message(number), "SMIME_NOT_ENCRYPTED", "5.7.1", number)
    finally:
        await run_cli_aside("partners", "edit", name, "--smime-signed-only", "-c", config)
        await eventually(lambda: current_partner(running, name).smime_signed_only, "the partner signed-only again")


@shared
async def test_an_address_removed_with_the_cli_is_refused(world: World, running: Running) -> None:
    name, (kept, dropped) = "two-address-supplier", TWO_EMAILS
    for sender in (kept, dropped):
        doc = invoice(new_number("two"), TWO)
        await accepted(running, world.signed_encrypted(doc, signer=world.two_addresses, sender=sender), doc, name)
    await run_cli_aside("partners", "edit", name, "--remove-email", dropped, "-c", world.inst.config)
    await eventually(lambda: current_partner(running, name).emails == (kept,), "the address removed")
    number = new_number("two")
    message = world.signed_encrypted(invoice(number, TWO), signer=world.two_addresses, sender=dropped)
    await refused(running, message, "SMIME_FROM_MISMATCH", "5.7.1", number)


@shared
async def test_a_partner_registered_with_the_cli_while_running_is_accepted(world: World, running: Running) -> None:
    cert = devpki.issue(world.inst.ca, world.scratch, "late-smime", role="smime", emails=("ap@late.example",),
                        key_kind="rsa2048")
    await asyncio.to_thread(add_partner, world.inst.config, "late-supplier", cert.cert, "ap@late.example", LATE)
    await eventually(lambda: running.gw.parts.partners.current.get("late-supplier") is not None, "the new partner")
    doc = invoice(new_number("late"), LATE)
    message = encrypt(sign(part(doc), cert), world.gateway_cert, sender="ap@late.example")
    await accepted(running, message, doc, "late-supplier")


@shared
async def test_the_second_partner_registered_with_the_cli_is_accepted(world: World, running: Running) -> None:
    shown = json.loads(run_cli("partners", "show", "second-supplier", "--json", "-c", world.inst.config))
    assert shown["emails"] == [SECOND_EMAIL] and sorted(shown["party_ids"]) == sorted(SECOND.party_ids)
    assert [c["addresses"] for c in shown["smime_certs"]] == [[SECOND_EMAIL], [SECOND_EMAIL]]  # the first and the rollover
    doc = invoice(new_number("second"), SECOND)
    await accepted(running, world.signed_encrypted(doc, signer=world.second, sender=SECOND_EMAIL), doc, "second-supplier")


@shared
async def test_only_the_signed_bytes_count(world: World, running: Running) -> None:
    """An invoice put after the closing boundary of multipart/signed (its epilogue) is not signed: it is
    never the invoice taken, whatever the answer."""
    signed_number, evil_number = new_number("signed"), new_number("epilogue")
    doc = invoice(signed_number)
    signed = sign(part(doc), world.demo)
    signed = signed.rstrip(b"\r\n") + b"\r\n" + part(invoice(evil_number))
    reply = await send(running, encrypt(signed, world.gateway_cert))
    if reply.code == 250:
        assert await delivered(running, reply.message_id) == doc
    else:
        assert reply.code == 554, reply
    await not_delivered(running, evil_number)


# --- 2. refused, with the code in the reply, and nothing delivered --------------------------------------


def _unsigned(w: World, n: str) -> bytes:
    return encrypt(part(invoice(n)), w.gateway_cert)


def _signed_only(w: World, n: str) -> bytes:
    return sign(part(invoice(n)), w.demo, sender=DEMO)


def _stranger(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n), signer=w.stranger, sender="billing@stranger.example")


def _foreign_ca(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n, FOREIGN), signer=w.foreign, sender="billing@foreign.example")


def _from_other_partner(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n), sender=SECOND_EMAIL)


def _from_not_in_certificate(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n), sender=DEMO_OTHER_EMAIL)


def _from_display_name(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n), sender=f'"{DEMO}" <billing@attacker.example>')


def _from_missing(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n), sender=None)


def _from_twice(w: World, n: str) -> bytes:
    return f"From: {SECOND_EMAIL}\r\n".encode() + w.signed_encrypted(invoice(n))


def _from_twice_same(w: World, n: str) -> bytes:
    return f"From: {DEMO}\r\n".encode() + w.signed_encrypted(invoice(n))


def _sender_header(w: World, n: str) -> bytes:
    return b"Sender: relay@attacker.example\r\n" + w.signed_encrypted(invoice(n))


def _sha1(w: World, n: str) -> bytes:
    return encrypt(sign(part(invoice(n)), w.demo, md="sha1"), w.gateway_cert)


def _des3(w: World, n: str) -> bytes:
    return w.signed_encrypted(invoice(n), "-des3")


def _gcm_flipped(w: World, n: str) -> bytes:
    return tamper_der(w.signed_encrypted(invoice(n), "-aes-256-gcm"), flip(lambda size: size - 300))


def _two_signers(w: World, n: str) -> bytes:
    return encrypt(sign(part(invoice(n)), w.demo, w.second), w.gateway_cert)


def _other_recipient(w: World, n: str) -> bytes:
    return encrypt(sign(part(invoice(n)), w.demo), w.second.cert)


def _rsa1024_signer(w: World, n: str) -> bytes:
    weak = devpki.issue(w.inst.ca, w.scratch, f"weak-{n}", role="smime", emails=(DEMO,), key_kind="rsa1024")
    return w.signed_encrypted(invoice(n), signer=weak)


def _md5(w: World, n: str) -> bytes:
    return encrypt(sign(part(invoice(n)), w.demo, md="md5"), w.gateway_cert)


def _oaep_md5(w: World, n: str) -> bytes:  # OAEP with SHA-1 is accepted (its default); with MD5 it is not
    return w.signed_encrypted(invoice(n), "-aes256", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:md5")


def _no_certificates(w: World, n: str) -> bytes:
    return encrypt(sign(part(invoice(n)), w.demo, options=("-nocerts",)), w.gateway_cert)


def _no_signed_attributes(w: World, n: str) -> bytes:
    return encrypt(sign(part(invoice(n)), w.demo, options=("-noattr",)), w.gateway_cert)


def _no_invoice(w: World, n: str) -> bytes:
    return encrypt(sign(part(f"Invoice {n} follows by post.".encode(), "text/plain", None), w.demo), w.gateway_cert)


def _pdf_named_xml_missing(w: World, n: str) -> bytes:
    note = part(f"Invoice {n}".encode(), "text/plain", "note.txt")
    return encrypt(sign(mixed([note, part(b"%PDF-1.4 not a Factur-X", "application/octet-stream", "invoice.bin")]),
                        w.demo), w.gateway_cert)


CASES: dict[str, tuple[Callable[[World, str], bytes], str, str]] = {
    # M-02 insufficient message security
    "encrypted-unsigned": (_unsigned, "SMIME_NOT_SIGNED", "5.7.1"),
    "signed-only-by-default": (_signed_only, "SMIME_NOT_ENCRYPTED", "5.7.1"),
    # I-02 / I-03: who signed, and the From
    "signer-not-registered": (_stranger, "PARTNER_UNKNOWN", "5.7.1"),
    "from-of-another-partner": (_from_other_partner, "SMIME_FROM_MISMATCH", "5.7.1"),
    "from-registered-not-in-certificate": (_from_not_in_certificate, "SMIME_FROM_MISMATCH", "5.7.1"),
    "from-signer-address-as-display-name": (_from_display_name, "SMIME_FROM_INVALID", "5.7.1"),
    "from-missing": (_from_missing, "SMIME_FROM_INVALID", "5.7.1"),
    "from-twice": (_from_twice, "SMIME_FROM_INVALID", "5.7.1"),
    "from-twice-same-address": (_from_twice_same, "SMIME_FROM_INVALID", "5.7.1"),
    "sender-not-from": (_sender_header, "SMIME_FROM_INVALID", "5.7.1"),
    # M-03 weak algorithms
    "sha1-signature": (_sha1, "SMIME_ALGORITHM_REFUSED", "5.7.6"),
    "3des-content": (_des3, "SMIME_ALGORITHM_REFUSED", "5.7.6"),
    "rsa1024-signer": (_rsa1024_signer, "SMIME_ALGORITHM_REFUSED", "5.7.6"),
    "md5-signature": (_md5, "SMIME_ALGORITHM_REFUSED", "5.7.6"),
    "oaep-with-md5": (_oaep_md5, "SMIME_ALGORITHM_REFUSED", "5.7.6"),
    # M-06 CMS structure
    "signer-certificate-not-included": (_no_certificates, "SMIME_MALFORMED", "5.6.0"),
    "no-signed-attributes": (_no_signed_attributes, "SMIME_MALFORMED", "5.6.0"),
    # M-04 malleability: GCM's tag catches any flip (CBC: test_a_flipped_cbc_byte_is_refused)
    "gcm-flipped-byte": (_gcm_flipped, "SMIME_DECRYPTION_FAILED", "5.7.5"),
    # M-06 / wrong receiver
    "other-recipient": (_other_recipient, "SMIME_WRONG_RECIPIENT", "5.7.5"),
    # content of the signed entity
    "no-invoice": (_no_invoice, "SMIME_NO_INVOICE", "5.7.1"),
    "no-xml-no-pdf": (_pdf_named_xml_missing, "SMIME_NO_INVOICE", "5.7.1"),
}


@shared
@pytest.mark.parametrize("case", list(CASES))
async def test_refused(world: World, running: Running, case: str) -> None:
    build, code, enhanced = CASES[case]
    number = new_number(case[:12])
    await refused(running, build(world, number), code, enhanced, number)


@shared
@pytest.mark.parametrize("where", ["middle", "len-300"])
async def test_a_flipped_cbc_byte_is_refused(world: World, running: Running, where: str) -> None:
    """M-04: CBC decrypts a flipped byte into a garbled block, without an error; the inner signature must
    catch it.  "middle" lands in the signed invoice; "len-300" (SECURITY-TESTS as written) in the signature."""
    number = new_number("cbc-flip")

    def change(der: bytes) -> bytes:
        start, end = ciphertext_span(der)
        return flip(lambda _: (start + end) // 2 if where == "middle" else len(der) - 300)(der)

    reply = await send(running, tamper_der(world.signed_encrypted(invoice(number), "-aes256"), change))
    assert reply.code == 554, reply
    assert reply.error in ("SMIME_SIGNATURE_INVALID", "SMIME_DECRYPTION_FAILED", "SMIME_MALFORMED", "SMIME_NOT_SIGNED"), reply
    if where == "middle":  # the digest of the signed content no longer matches (or one opaque decryption error)
        assert reply.error in ("SMIME_SIGNATURE_INVALID", "SMIME_DECRYPTION_FAILED"), reply
    await not_delivered(running, number)


@shared
async def test_cbc_padding_is_not_an_oracle(world: World, running: Running) -> None:
    """M-04: every failure after a CBC decryption must look the same from outside (the random CEK on a failed
    key unwrap, RFC 3218, protects only the RSA step)."""
    broken, intact = new_number("padding"), new_number("padding")

    def padding_broken(der: bytes) -> bytes:  # the last byte of the next-to-last block XORs the padding byte
        _, end = ciphertext_span(der)
        return der[:end - 17] + bytes([der[end - 17] ^ 0xFF]) + der[end - 16:]

    def padding_intact(der: bytes) -> bytes:  # the middle of the invoice turns into garbage
        start, end = ciphertext_span(der)
        middle = (start + end) // 2
        return der[:middle] + bytes([der[middle] ^ 0x01]) + der[middle + 1:]

    a = await send(running, tamper_der(world.signed_encrypted(invoice(broken), "-aes256"), padding_broken))
    b = await send(running, tamper_der(world.signed_encrypted(invoice(intact), "-aes256"), padding_intact))
    assert a.code == b.code == 554
    await not_delivered(running, broken, intact)
    assert (a.enhanced, a.error) == (b.enhanced, b.error), (a, b)


@shared
@pytest.mark.parametrize("case", ["signer-from-untrusted-ca", "several-signer-infos"])
async def test_signer_refusals_have_a_security_status(world: World, running: Running, case: str) -> None:
    number = new_number(case[:12])
    build, code = {"signer-from-untrusted-ca": (_foreign_ca, "SMIME_SIGNER_CERT_INVALID"),
                   "several-signer-infos": (_two_signers, "SMIME_SIGNER_COUNT")}[case]
    reply = await send(running, build(world, number))
    assert (reply.code, reply.error) == (554, code), reply
    await not_delivered(running, number)
    assert reply.enhanced.startswith("5.7."), reply


def same_key_certificate(w: World, name: str, *, issuer: devpki.Issued | None = None, days: tuple[int, int] = (-1, 365),
                         eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.EMAIL_PROTECTION) -> devpki.Issued:
    """Another certificate for the demo partner's S/MIME key (the partner is found by the key): the
    certificate in the message must itself pass, not only the registered one."""
    issuer = issuer or w.inst.ca
    ca_cert = x509.load_pem_x509_certificate(issuer.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(issuer.key.read_bytes(), None)
    public = x509.load_pem_x509_certificate(w.demo.cert.read_bytes()).public_key()
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).issuer_name(ca_cert.subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(DEMO)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    out = devpki.Issued(w.scratch / f"{name}.crt", w.demo.key)
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


SIGNER_CERTS: dict[str, Callable[[World, str], devpki.Issued]] = {
    "expired": lambda w, n: same_key_certificate(w, n, days=(-400, -1)),
    "not-yet-valid": lambda w, n: same_key_certificate(w, n, days=(2, 400)),
    "client-auth-only": lambda w, n: same_key_certificate(w, n, eku=ExtendedKeyUsageOID.CLIENT_AUTH),
    "from-an-untrusted-ca": lambda w, n: same_key_certificate(
        w, n, issuer=devpki.make_ca(w.scratch / n, "ca", cn="einvoice-gateway development CA")),
}


@shared
@pytest.mark.parametrize("case", list(SIGNER_CERTS))
async def test_the_certificate_in_the_message_must_pass_too(world: World, running: Running, case: str) -> None:
    """M-07: the registered key, but the certificate that came with the signature is expired, not yet
    valid, not for e-mail, or from a CA that is not smtp.partner_ca (with the same name as the real one)."""
    number = new_number(case[:12])
    signer = SIGNER_CERTS[case](world, f"demo-{case}")
    await refused(running, world.signed_encrypted(invoice(number), signer=signer), "SMIME_SIGNER_CERT_INVALID", None,
                  number)


@shared
async def test_a_registered_certificate_from_another_ca_is_refused(world: World, running: Running) -> None:
    number = new_number("foreign-ca")
    await refused(running, _foreign_ca(world, number), "SMIME_SIGNER_CERT_INVALID", None, number)


@shared
async def test_several_signer_infos_are_refused(world: World, running: Running) -> None:
    number = new_number("two-signers")
    await refused(running, _two_signers(world, number), "SMIME_SIGNER_COUNT", None, number)


@shared
@pytest.mark.parametrize("sender", [f"{DEMO} <billing@attacker.example>", f"{DEMO} (billing) <billing@attacker.example>"],
                         ids=["bare-display-name", "display-name-with-comment"])
async def test_the_signer_address_as_an_unquoted_display_name_is_refused(world: World, running: Running,
                                                                          sender: str) -> None:
    number = new_number("display")
    reply = await send(running, f"From: {sender}\r\n".encode() + world.signed_encrypted(invoice(number), sender=None))
    assert reply.code == 554 and reply.error in ("SMIME_FROM_INVALID", "SMIME_FROM_MISMATCH"), reply
    await not_delivered(running, number)


@shared
async def test_an_invoice_over_the_size_limit_is_refused(world: World, running: Running) -> None:
    number = new_number("huge")
    doc = invoice(number).replace(b"<cbc:IssueDate>", b"<!-- " + b"padding " * (MAX_INVOICE // 8) + b"--><cbc:IssueDate>", 1)
    message = world.signed_encrypted(doc)
    assert len(doc) > MAX_INVOICE and len(message) < MAX_MESSAGE
    reply = await refused(running, message, "TOO_LARGE", "5.3.4", number, status=552)
    assert str(MAX_INVOICE) in reply.text


# M-05 MIME wrapping: the top level must itself be the S/MIME structure


@shared
async def test_unsigned_invoice_wrapped_around_a_signed_one_is_refused(world: World, running: Running) -> None:
    evil, good = new_number("evil"), new_number("wrapped")
    message = mixed([part(invoice(evil)), sign(part(invoice(good)), world.demo)], mail_headers())
    await refused(running, message, "SMIME_STRUCTURE", "5.7.1", evil, good)


@shared
async def test_efail_text_around_the_encrypted_part_is_refused(world: World, running: Running) -> None:
    number = new_number("efail")
    encrypted = world.signed_encrypted(invoice(number))
    head, _, body = encrypted.partition(b"\r\n\r\n")
    pkcs7 = b"\r\n".join(h for h in head.split(b"\r\n") if h.lower().startswith((b"content-", b" ", b"\t"))) + \
        b"\r\n\r\n" + body
    assert pkcs7.startswith(b"Content-") and b"pkcs7-mime" in pkcs7
    message = mixed([b'Content-Type: text/html\r\n\r\n<img src="http://attacker.example/', pkcs7,
                     b'Content-Type: text/html\r\n\r\n">'], mail_headers())
    await refused(running, message, "SMIME_STRUCTURE", "5.7.1", number)


@shared
async def test_an_invoice_outside_the_signature_at_the_top_level_is_refused(world: World, running: Running) -> None:
    good, extra = new_number("inside"), new_number("outside")
    message = mixed([sign(part(invoice(good)), world.demo), part(invoice(extra), filename="invoice2.xml")], mail_headers())
    await refused(running, message, "SMIME_STRUCTURE", "5.7.1", good, extra)


@shared
async def test_an_invoice_outside_the_signature_inside_the_encryption_is_refused(world: World, running: Running) -> None:
    good, extra = new_number("inside"), new_number("outside")
    inner = mixed([sign(part(invoice(good)), world.demo), part(invoice(extra), filename="invoice2.xml")])
    await refused(running, encrypt(inner, world.gateway_cert), "SMIME_NOT_SIGNED", "5.7.1", good, extra)


@shared
async def test_a_third_part_in_multipart_signed_is_refused(world: World, running: Running) -> None:
    good, extra = new_number("signed"), new_number("third")
    signed = sign(part(invoice(good)), world.demo)
    boundary = re.search(rb'boundary="([^"]+)"', signed)
    assert boundary
    close = b"--" + boundary.group(1) + b"--"
    signed = signed.replace(close, b"--" + boundary.group(1) + b"\r\n" + part(invoice(extra)) + close)
    await refused(running, encrypt(signed, world.gateway_cert), "SMIME_MALFORMED", "5.6.0", good, extra)


@shared
async def test_two_invoices_in_the_signed_content_are_refused(world: World, running: Running) -> None:
    first, second = new_number("one"), new_number("two")
    inner = mixed([part(invoice(first)), part(invoice(second), "text/xml", "second.xml")])
    reply = await refused(running, encrypt(sign(inner, world.demo), world.gateway_cert), "SMIME_SEVERAL_INVOICES",
                          "5.7.1", first, second)
    assert any("second.xml" in line for line in reply.lines[1:]), reply


@shared
async def test_a_file_name_cannot_inject_reply_lines(world: World, running: Running) -> None:
    """The detail lines name the parts; a name with CR LF (RFC 2231) must not end the reply early."""
    first, second = new_number("one"), new_number("two")
    evil = "x%0D%0A250%202.0.0%20Accepted%20as%20forged%0D%0A.xml"
    injected = (f"Content-Type: application/xml\r\nContent-Disposition: attachment; filename*=utf-8''{evil}\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\n").encode() + b64lines(invoice(second))
    inner = mixed([part(invoice(first)), injected])
    reply = await refused(running, encrypt(sign(inner, world.demo), world.gateway_cert), "SMIME_SEVERAL_INVOICES",
                          "5.7.1", first, second)
    assert any("Accepted as forged" in line for line in reply.lines[1:]), reply  # shown, inside a 554 line


@shared
async def test_a_suspended_partner_is_refused(world: World, running: Running) -> None:
    doc = invoice(new_number("before"), PAUSED)
    await accepted(running, world.signed_encrypted(doc, signer=world.paused, sender="billing@paused.example"), doc,
                   "paused-supplier")
    await run_cli_aside("partners", "suspend", "paused-supplier", "-c", world.inst.config)
    await eventually(lambda: current_partner(running, "paused-supplier").status.value == "suspended", "the partner suspended")
    number = new_number("paused")
    message = world.signed_encrypted(invoice(number, PAUSED), signer=world.paused, sender="billing@paused.example")
    await refused(running, message, "PARTNER_SUSPENDED", "5.7.1", number)


@shared
async def test_an_invoice_of_another_partners_supplier_is_refused(world: World, running: Running) -> None:
    number = new_number("foreign-id")
    reply = await refused(running, world.signed_encrypted(invoice(number, SECOND)), "SUPPLIER_NOT_AUTHORIZED", "5.7.1",
                          number)
    assert any(SECOND.vat in line or SECOND.gln in line for line in reply.lines[1:]), reply


@shared
async def test_a_schema_invalid_invoice_is_refused_with_details(world: World, running: Running) -> None:
    number = new_number("schema")
    doc = invoice(number).replace(f"{number}</cbc:ID>".encode(), f"{number}</cbc:ID><cbc:Bogus>1</cbc:Bogus>".encode())
    reply = await refused(running, world.signed_encrypted(doc), "SCHEMA_INVALID", "5.6.0", number)
    assert len(reply.lines) >= 2 and any("Bogus" in line for line in reply.lines[1:]), reply


@shared
async def test_smtp_rejections_are_in_the_audit_log(world: World, running: Running) -> None:
    """Both kinds: refused before the pipeline (sha256 of the message) and by it (sha256 of the invoice)."""
    unsigned = _unsigned(world, new_number("audit"))
    doc = invoice(new_number("audit")).replace(b"<cbc:IssueDate>", b"<cbc:Bogus/><cbc:IssueDate>", 1)
    assert (await send(running, unsigned)).code == 554
    assert (await send(running, world.signed_encrypted(doc))).code == 554
    rows = json.loads(await run_cli_aside("audit", "list", "--json", "--limit", "20", "-c", world.inst.config))
    rejected = [r for r in rows if r["action"] == "invoice.rejected" and r["detail"].get("transport") == "smtp"]
    by_hash = {r["detail"]["sha256"]: r for r in rejected}
    assert by_hash[hashlib.sha256(unsigned).hexdigest()]["detail"]["code"] == "SMIME_NOT_SIGNED"
    assert by_hash[hashlib.sha256(unsigned).hexdigest()]["partner"] is None
    schema = by_hash[hashlib.sha256(doc).hexdigest()]
    assert schema["detail"]["code"] == "SCHEMA_INVALID" and schema["partner"] == instance.DEMO_PARTNER


# --- 3. the SMTP protocol ---------------------------------------------------------------------------------


@shared
async def test_ehlo_advertises_starttls_and_size(running: Running) -> None:
    ctx = tls_context(running.inst)

    def session() -> tuple[dict[str, str], dict[str, str]]:
        with connect(running) as s:
            s.ehlo()
            before = dict(s.esmtp_features)
            s.starttls(context=ctx)
            s.ehlo()
            return before, dict(s.esmtp_features)

    before, after = await asyncio.to_thread(session)
    assert "starttls" in before and before["size"].strip() == str(MAX_MESSAGE)
    assert "starttls" not in after and after["size"].strip() == str(MAX_MESSAGE)


@shared
async def test_ehlo_does_not_offer_authentication(running: Running) -> None:
    ctx = tls_context(running.inst)

    def session() -> dict[str, str]:
        with connect(running) as s:
            s.starttls(context=ctx)
            s.ehlo()
            return dict(s.esmtp_features)

    assert "auth" not in await asyncio.to_thread(session)


@shared
async def test_mail_before_starttls_is_refused(running: Running) -> None:
    def session() -> tuple[int, int]:
        with connect(running) as s:
            s.ehlo()
            return s.mail(DEMO)[0], s.rcpt(GATEWAY)[0]

    assert await asyncio.to_thread(session) == (530, 530)


@shared
async def test_relaying_is_denied_and_data_impossible(world: World, running: Running) -> None:
    number = new_number("relay")
    message = world.signed_encrypted(invoice(number))

    def session() -> tuple[tuple[int, bytes], int]:
        with secured(running) as s:
            s.mail(DEMO)
            rcpt = s.rcpt("someone@elsewhere.example")
            with pytest.raises(smtplib.SMTPDataError) as refused_data:
                s.data(message)
            return rcpt, refused_data.value.smtp_code

    (code, text), data_code = await asyncio.to_thread(session)
    assert code == 550 and text.startswith(b"5.7.1 "), text
    assert data_code == 503
    await not_delivered(running, number)


@shared
async def test_an_oversize_message_is_refused(running: Running) -> None:
    number = new_number("big")
    big = mail_headers() + b"Content-Type: text/plain\r\n\r\n" + number.encode() + b"\r\n" + \
        b"".join(b"x" * 76 + b"\r\n" for _ in range(100 * 1024 // 78))
    assert len(big) > 100_000

    def session() -> tuple[int, int]:
        with secured(running) as s:
            with pytest.raises(smtplib.SMTPSenderRefused) as declared:  # MAIL FROM … SIZE=102400 (smtplib adds it)
                s.sendmail(DEMO, [GATEWAY], big)
            s.rset()
            s.mail(DEMO)  # no SIZE: the server counts
            s.rcpt(GATEWAY)
            counted = s.data(big)[0]  # (DATA got 354: smtplib returns the final reply rather than raising)
            return declared.value.smtp_code, counted

    assert await asyncio.to_thread(session) == (552, 552)
    await not_delivered(running, number)


@shared
async def test_a_line_over_1000_bytes_is_refused_and_the_session_goes_on(running: Running) -> None:
    number = new_number("longline")
    message = mail_headers() + b"Content-Type: text/plain\r\n\r\n" + number.encode() + b"\r\n" + b"q" * 999 + b"\r\n"

    def session() -> tuple[int, int]:
        with secured(running) as s:
            s.mail(DEMO)
            s.rcpt(GATEWAY)
            code = s.data(message)[0]
            return code, s.noop()[0]

    assert await asyncio.to_thread(session) == (500, 250)
    await not_delivered(running, number)


@shared
async def test_tls_below_1_2_is_refused(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    def context(highest: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = tls_context(running.inst)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so this client really offers TLS 1.1
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = highest
        return ctx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old, current = context(ssl.TLSVersion.TLSv1_1), context(ssl.TLSVersion.TLSv1_2)

    def session(ctx: ssl.SSLContext) -> str:
        with connect(running) as s:
            s.ehlo()
            try:
                s.starttls(context=ctx)
            except ssl.SSLError as exc:
                return exc.reason or str(exc)
            return (s.sock.version() if isinstance(s.sock, ssl.SSLSocket) else None) or "?"

    assert await asyncio.to_thread(session, current) == "TLSv1.2"  # the same client works at 1.2
    caplog.clear()
    reason = await asyncio.to_thread(session, old)
    assert reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "UNEXPECTED_EOF_WHILE_READING"), reason
    # the refusal is the server's: its handshake failed on the protocol version the client offered
    def server_refused() -> bool:
        causes = [r.exc_info[1].__cause__ for r in caplog.records if r.exc_info and r.exc_info[1] is not None]
        return any(isinstance(c, ssl.SSLError) and c.reason == "UNSUPPORTED_PROTOCOL" for c in causes)

    await eventually(server_refused, "the server's refusal of the protocol version", 5.0)


@pytest.fixture
def quick(inst: instance.Instance) -> instance.Instance:
    """An instance of its own with smtp.command_timeout_s = 1 (the minimum); data_timeout_s stays 600."""
    text = inst.config.read_text()
    assert "command_timeout_s = 300.0" in text and "data_timeout_s = 600.0" in text
    inst.config.write_text(text.replace("command_timeout_s = 300.0", "command_timeout_s = 1.0", 1))
    return inst


def read_reply(stream: io.BufferedReader) -> tuple[int, bytes]:
    lines: list[bytes] = []
    while True:
        line = stream.readline(4096)
        if not line:
            raise ConnectionError(f"closed by the server after {lines!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def test_an_idle_session_is_closed(quick: instance.Instance) -> None:
    async with serving(quick, level="warning") as r:
        port = smtp_port(r)

        def idle() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as stream:
                assert read_reply(stream)[0] == 220
                sock.sendall(b"EHLO client.example\r\n")
                assert read_reply(stream)[0] == 250
                started, rest = time.monotonic(), b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := stream.read1(4096):
                        rest += chunk
                return rest, time.monotonic() - started

        rest, waited = await asyncio.to_thread(idle)
    assert 0.5 < waited < 5.0, waited
    assert rest == b"" or rest.startswith(b"421"), rest


async def test_a_steady_data_transfer_may_outlast_the_command_timeout(quick: instance.Instance) -> None:
    """data_timeout_s covers the DATA transfer (docs/configuration.md: "the whole DATA transfer and its processing"): a
    sender that keeps sending for longer than command_timeout_s is not cut."""
    async with serving(quick, level="warning") as r:
        port, ctx = smtp_port(r), tls_context(quick)
        doc = invoice(new_number("slow"))
        message = encrypt(sign(part(doc), quick.demo_smime), quick.smime.cert)
        pieces = [message[i:i + len(message) // 8 + 1] for i in range(0, len(message), len(message) // 8 + 1)]

        def slow() -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with raw.makefile("rb") as stream:
                    assert read_reply(stream)[0] == 220
                    raw.sendall(b"EHLO client.example\r\n")
                    read_reply(stream)
                    raw.sendall(b"STARTTLS\r\n")
                    assert read_reply(stream)[0] == 220
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls, tls.makefile("rb") as stream:
                    for command, expected in ((b"EHLO client.example", 250), (f"MAIL FROM:<{DEMO}>".encode(), 250),
                                              (f"RCPT TO:<{GATEWAY}>".encode(), 250), (b"DATA", 354)):
                        tls.sendall(command + b"\r\n")
                        assert read_reply(stream)[0] == expected
                    try:
                        for piece in pieces:  # about 2.4 s in all, never more than 0.3 s without data
                            tls.sendall(piece)
                            time.sleep(0.3)
                        tls.sendall(b".\r\n")
                        return read_reply(stream)
                    except (OSError, ConnectionError) as exc:
                        return 0, repr(exc).encode()

        code, text = await asyncio.to_thread(slow)
        assert code == 250, text
        message_id = text.split(b"Accepted as ")[1].split()[0].decode()
        assert await delivered(r, message_id) == doc


async def test_sessions_are_counted_once_and_released(inst: instance.Instance) -> None:
    """A STARTTLS session is one session (the TLS transport is announced again after the upgrade); closed
    sessions free their place, and past smtp.max_sessions a new connection gets 421."""
    inst.config.write_text(inst.config.read_text().replace("max_sessions = 200", "max_sessions = 2"))
    async with serving(inst, level="warning") as r:
        ctx = tls_context(inst)

        def sessions_in_a_row() -> None:
            for _ in range(5):  # more than max_sessions, one after the other
                with connect(r) as s:
                    s.starttls(context=ctx)
                    assert s.noop()[0] == 250

        await asyncio.to_thread(sessions_in_a_row)
        await eventually(lambda: r.gw.smtp is not None and r.gw.smtp.sessions == 0, "the closed sessions released", 2.5)

        def over_the_limit() -> int:
            with connect(r) as a, connect(r) as b:
                a.starttls(context=ctx)
                b.ehlo()
                try:
                    with connect(r) as c:
                        return c.noop()[0]
                except smtplib.SMTPConnectError as exc:
                    return exc.smtp_code

        assert await asyncio.to_thread(over_the_limit) == 421


def smtp_settings(inst: instance.Instance, **settings: object) -> None:
    rewrite_config(inst.config, lambda c: c["smtp"].update(settings))


async def test_one_address_cannot_take_every_session(inst: instance.Instance) -> None:
    """Past smtp.max_sessions_per_client, one address gets 421 while another still gets in (issue 20, item 8)."""
    smtp_settings(inst, max_sessions_per_client=2)
    async with serving(inst, level="warning") as r:
        def sessions() -> tuple[int, bytes, int, int]:
            with connect(r) as a, connect(r) as b:
                a.noop(), b.noop()
                try:
                    with connect(r) as c:
                        third, text = c.noop()
                except smtplib.SMTPConnectError as exc:
                    third, text = exc.smtp_code, exc.smtp_error
                with smtplib.SMTP("127.0.0.1", smtp_port(r), timeout=30, source_address=("127.0.0.2", 0)) as other:
                    elsewhere = other.noop()[0]
            with connect(r) as again:  # the first two are closed: their places are free
                return third, text, elsewhere, again.noop()[0]

        third, text, elsewhere, again = await asyncio.to_thread(sessions)
        await eventually(lambda: r.gw.smtp is not None and r.gw.smtp.per_client == {}, "every session released", 2.5)
    assert (third, elsewhere, again) == (421, 250, 250)
    assert text.startswith(b"4.7.0 Too many connections from your address"), text


def noops_until_closed(s: smtplib.SMTP, most: int = 40) -> int:
    """NOOPs every 0.1 s until the server closes the session; how many it answered."""
    for n in range(most):
        try:
            code = s.noop()[0]
        except smtplib.SMTPServerDisconnected:
            return n
        if code != 250:
            return n
        time.sleep(0.1)
    raise AssertionError(f"the session was still open after {most} NOOPs")


@pytest.mark.slow
async def test_a_session_that_starts_no_message_is_closed_whatever_it_sends(inst: instance.Instance) -> None:
    """STARTTLS and MAIL within smtp.transaction_deadline_s of connecting (or of the last transaction), however
    many NOOPs keep the idle timer happy; a MAIL stops the clock until the transaction ends."""
    smtp_settings(inst, transaction_deadline_s=1.0)
    async with serving(inst, level="warning") as r:
        def idle_then_busy() -> tuple[int, int, int]:
            with connect(r) as plain:
                before_mail = noops_until_closed(plain)
            with secured(r) as s:
                assert s.mail(DEMO)[0] == 250
                for _ in range(15):  # 1.5 s, past the deadline, inside a transaction
                    assert s.noop()[0] == 250
                    time.sleep(0.1)
                assert s.rset()[0] == 250  # the transaction ended: the clock runs again
                after_rset = noops_until_closed(s)
            return before_mail, 15, after_rset

        before_mail, kept, after_rset = await asyncio.to_thread(idle_then_busy)
    assert 3 <= before_mail <= 15 and 3 <= after_rset <= 15, (before_mail, after_rset)
    assert kept == 15


@shared
async def test_a_long_session_is_not_cut_off(running: Running) -> None:
    """A partner's MTA may send message after message on one session: the recipient limit is per message."""
    ctx = tls_context(running.inst)

    def many_transactions() -> list[int]:
        codes = []
        with connect(running) as s:
            s.starttls(context=ctx)
            s.ehlo()
            for _ in range(250):
                s.mail(DEMO)
                codes.append(s.rcpt("invoices@gateway.localhost")[0])
                s.rset()
        return codes

    assert set(await asyncio.to_thread(many_transactions)) == {250}
