"""E-mail the gateway sends (gateway/delivery/smarthost.py, gateway/delivery/email.py), through a real smarthost stub on 127.0.0.1.

``Relay`` is that stub: aiosmtpd on an ephemeral port, offering STARTTLS with a certificate from the
instance's development CA (and refusing MAIL before it), optionally SMTP AUTH, recording every
connection, login and message (envelope and bytes), and answering what a test tells it to (451 or
550 to RCPT or DATA).  Each gateway runs in-process (``serving``) with short retry delays, so what
the tests see is what a relay would see: the invoices of ``type = "email"`` destinations, those
submitted for partners whose endpoint is ``mailto:``, and the SMTP listener's reply e-mails.  What
arrives is opened with ``openssl cms`` (decrypt, then verify against the development CA), not with
the gateway's own code.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import functools
import io
import json
import os
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from gateway import devpki
from gateway.cli import main as cli
from gateway.cli.demo import SAMPLE, samples
from gateway.config import load as config_mod
from gateway.delivery import smarthost as mail
from gateway.errors import ConfigError
from gateway.operations import instance
from gateway.operations.instance import DEMO_EMAIL, DEMO_PARTNER, Instance
from gateway.partners.edit import register_partner
from gateway.storage.records import REPLIES
from gateway.tls import inspect_certificate
from tests.helpers import FOREIGN, Running, numbered, post, rewrite_config, run_cli, serving
from tests.helpers import eventually as shared_eventually

WAIT_S = 15.0  # longer than tests.helpers.WAIT_S: STARTTLS, S/MIME and retries, on a busy machine
GATEWAY_ADDRESS = f"invoices@{instance.MAIL_HOST}"
AP = "ap@erp.example"
SELLER = "0088:4000001000006"  # the sample's supplier, and the demo partner's first identifier
RELAY_USER, RELAY_PASSWORD = "gw", "relay-secret-0123"
INVALID = dict(samples())["schema-invalid invoice"]
# The sample with the demo partner as the buyer as well: an invoice this business sends to it.
assert SAMPLE.count(b">4000002000005<") == 1
TO_DEMO_PARTNER = SAMPLE.replace(b">4000002000005<", b">4000001000006<")
# The content-encryption algorithm OIDs (RFC 3565, RFC 5084) as `openssl cms -cmsout -print` shows them.
CIPHER_OIDS = {"aes-128-cbc": "2.16.840.1.101.3.4.1.2", "aes-128-gcm": "2.16.840.1.101.3.4.1.6",
               "aes-256-cbc": "2.16.840.1.101.3.4.1.42", "aes-256-gcm": "2.16.840.1.101.3.4.1.46"}


# --- the smarthost stub ----------------------------------------------------------------------------


@dataclass
class Seen:
    """One DATA transaction the relay saw (answered ``reply``)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None
    reply: str

    @property
    def message(self) -> EmailMessage:
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Relay:
    """A smarthost on 127.0.0.1: STARTTLS (required before MAIL) unless ``offer_tls`` is False, AUTH
    PLAIN/LOGIN after TLS, and scripted refusals.  Its state is read and changed by the tests."""

    tls: ssl.SSLContext
    offer_tls: bool = True
    rcpt_replies: list[str] = field(default_factory=list)  # consumed one per RCPT; then 250
    data_replies: list[str] = field(default_factory=list)  # consumed one per DATA; then 250
    connections: int = 0
    mail_commands: int = 0  # MAIL FROM received (on any connection, in clear or not)
    logins: list[tuple[str, str]] = field(default_factory=list)  # (user, password) of every AUTH
    seen: list[Seen] = field(default_factory=list)  # every DATA, refused or not
    password: str = RELAY_PASSWORD  # what AUTH must present (with RELAY_USER)
    port: int = 0
    server: asyncio.Server | None = None

    implicit: bool = False  # TLS from the first byte (port 465 style) instead of STARTTLS

    @classmethod
    async def start(cls, inst: Instance, *, implicit: bool = False) -> Relay:
        issued = devpki.issue(inst.ca, inst.root / "pki", "relay", role="server", sans=("localhost", "127.0.0.1"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(issued.cert, issued.key)
        relay = cls(ctx, implicit=implicit)
        relay.server = await asyncio.get_running_loop().create_server(relay._protocol, "127.0.0.1", 0,
                                                                      ssl=ctx if implicit else None)
        relay.port = relay.server.sockets[0].getsockname()[1]
        return relay

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def _protocol(self) -> SMTP:
        self.connections += 1
        starttls = self.offer_tls and not self.implicit
        return SMTP(self, hostname="relay.test", tls_context=self.tls if starttls else None, require_starttls=starttls,
                    authenticator=self._authenticate, auth_require_tls=not self.implicit, loop=asyncio.get_running_loop())

    @property
    def delivered(self) -> list[Seen]:
        return [s for s in self.seen if s.reply.startswith("250")]

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((user, password))
        if (user, password) != (RELAY_USER, self.password):
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8
        return AuthResult(success=True, auth_data=user)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 queued"
        self.seen.append(Seen(str(envelope.mail_from), list(envelope.rcpt_tos), envelope.original_content or b"",
                              self.implicit or session.ssl is not None,
                              session.auth_data if session.authenticated else None, reply))
        return reply


@pytest.fixture
async def relay(inst: Instance) -> AsyncIterator[Relay]:
    stub = await Relay.start(inst)
    try:
        yield stub
    finally:
        await stub.close()


# --- configuring an instance -------------------------------------------------------------------------


def secret_file(inst: Instance, name: str, text: str, mode: int = 0o600) -> Path:
    path = inst.root / "keys" / name
    path.write_text(text + "\n", encoding="utf-8")
    os.chmod(path, mode)
    return path


def smarthost(inst: Instance, port: int, *, auth: bool = True) -> dict[str, Any]:
    table: dict[str, Any] = {"host": "127.0.0.1", "port": port, "ca": str(inst.ca.cert), "timeout_s": 10.0}
    if auth:
        table.update(username=RELAY_USER, password_file=str(secret_file(inst, "smarthost.password", RELAY_PASSWORD)))
    return table


def ap_certificate(inst: Instance, key_kind: str = "rsa2048") -> devpki.Issued:
    return devpki.issue(inst.ca, inst.root / "pki", f"ap-mailbox-{key_kind}", role="smime", cn="accounts payable",
                        emails=(AP,), key_kind=key_kind)


def fast_retries(c: dict[str, Any]) -> None:
    c.setdefault("rules", {})["processes"] = 1
    c.setdefault("delivery", {}).update(retry_base_s=0.1, retry_cap_s=0.3, breaker_cooldown_s=0.1)


def configure(inst: Instance, relay_port: int | None, *, auth: bool = True, cipher: str | None = None,
              ap: devpki.Issued | None = None, extra: Callable[[dict[str, Any]], None] | None = None) -> None:
    """[smarthost] pointing at the stub (None: no [smarthost]); with ``cipher``, an e-mail destination
    "ap-mailbox" that receives every invoice (routing.default)."""
    def change(c: dict[str, Any]) -> None:
        fast_retries(c)
        if relay_port is not None:
            c["smarthost"] = smarthost(inst, relay_port, auth=auth)
        if cipher is not None:
            cert = ap or ap_certificate(inst)
            c["destinations"].append({"name": "ap-mailbox", "type": "email", "to": AP,
                                      "recipient_certificate": str(cert.cert), "cipher": cipher})
            c["routing"] = {"default": ["ap-mailbox"]}
        if extra is not None:
            extra(c)

    rewrite_config(inst.config, change)


# --- waiting, submitting, the command line -------------------------------------------------------------


eventually = functools.partial(shared_eventually, timeout=WAIT_S)  # delivery runs in the background


async def post_invoice(running: Running, body: bytes = SAMPLE) -> str:
    """POST /v1/invoices as the demo partner; returns the message id."""
    async with running.session() as s:
        status, reply = await post(s, body)
    assert status == 202, reply
    return str(reply["message_id"])


async def delivery(running: Running, message_id: str) -> dict[str, Any]:
    m = await running.gw.store.reports.message(message_id)
    assert m is not None
    [d] = m.deliveries
    return d.as_json()


async def delivery_when(running: Running, message_id: str, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The message's one delivery once ``test`` holds for it (for ``eventually``)."""
    d = await delivery(running, message_id)
    return d if test(d) else None


async def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = await run_cli(*argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def quiet() -> io.StringIO:
    return io.StringIO()  # the gateway's log lines, kept off stdout (where the CLI prints its JSON)


# --- opening what arrived, with openssl ---------------------------------------------------------------


def openssl(*args: str) -> bytes:
    done = subprocess.run(["openssl", "cms", *args], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def open_with_openssl(data: bytes, recipient: devpki.Issued, ca: Path, folder: Path) -> tuple[bytes, bytes]:
    """Decrypt as ``recipient``, then verify against ``ca``: (the signed MIME entity, the signer's PEM)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mail.eml").write_bytes(data)
    signed = openssl("-decrypt", "-recip", str(recipient.cert), "-inkey", str(recipient.key), "-in", str(folder / "mail.eml"))
    (folder / "signed.eml").write_bytes(signed)
    content = openssl("-verify", "-CAfile", str(ca), "-purpose", "smimesign", "-in", str(folder / "signed.eml"),
                      "-signer", str(folder / "signer.pem"))
    return content, (folder / "signer.pem").read_bytes()


def attachments(entity: bytes) -> dict[str, tuple[str, bytes]]:
    """File name → (media type, decoded bytes) of the attachments of a MIME entity."""
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(entity)
    out = {}
    for part in parsed.walk():
        name = part.get_filename()
        if name:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out[name] = (part.get_content_type(), payload)
    return out


def pem_of(cert: Path) -> bytes:
    return cert.read_bytes().strip()


# --- 1. type = "email" destinations ----------------------------------------------------------------------


@pytest.mark.parametrize("cipher,smime_type", [("aes-256-gcm", "authenveloped-data"), ("aes-256-cbc", "enveloped-data"),
                                               ("aes-128-gcm", "authenveloped-data"), ("aes-128-cbc", "enveloped-data")])
async def test_email_destination_receives_the_invoice_signed_and_encrypted(inst: Instance, relay: Relay, tmp_path: Path,
                                                                           cipher: str, smime_type: str) -> None:
    ap = ap_certificate(inst)
    configure(inst, relay.port, cipher=cipher, ap=ap)
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert (seen.mail_from, seen.rcpt_tos, seen.reply) == (GATEWAY_ADDRESS, [AP], "250 2.0.0 queued")
    assert seen.tls and seen.login == RELAY_USER and relay.logins == [(RELAY_USER, RELAY_PASSWORD)]
    msg = seen.message
    assert (msg["From"], msg["To"], msg["Subject"]) == (GATEWAY_ADDRESS, AP, "Invoice DEMO-2026-0001")
    assert msg["Message-ID"] == f"<{message_id}@{instance.MAIL_HOST}>"
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert str(msg.get_param("smime-type")).lower() == smime_type

    content, signer = open_with_openssl(seen.data, ap, inst.ca.cert, tmp_path / "opened")
    assert signer.strip() == pem_of(inst.smime.cert)  # signed by the gateway's S/MIME certificate
    structure = openssl("-cmsout", "-print", "-in", str(tmp_path / "opened" / "mail.eml")).decode()
    assert f"algorithm: {cipher} ({CIPHER_OIDS[cipher]})" in structure, structure[:2000]
    found = attachments(content)
    assert found["DEMO-2026-0001.xml"] == ("application/xml", SAMPLE)
    assert list(found) == ["DEMO-2026-0001.xml"]
    text = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
    body = text.get_body(("plain",))
    assert body is not None and message_id in body.get_content()


async def test_email_destination_cannot_be_read_with_another_key(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert SAMPLE[:200] not in seen.data and b"DEMO-2026-0001</cbc:ID>" not in seen.data
    (tmp_path / "mail.eml").write_bytes(seen.data)
    other = ap_certificate(inst, "rsa3072")  # same address, another key
    done = subprocess.run(["openssl", "cms", "-decrypt", "-recip", str(other.cert), "-inkey", str(other.key),
                           "-in", str(tmp_path / "mail.eml")], capture_output=True, timeout=30)
    assert done.returncode != 0


async def test_reload_takes_a_new_smarthost_and_password(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    configure(inst, relay.port, cipher="aes-256-gcm")
    second = await Relay.start(inst)
    try:
        second.password = "rotated-secret-4567"
        async with serving(inst, "info", quiet()) as running:
            first_id = await post_invoice(running)
            await eventually(lambda: delivery_when(running, first_id, lambda d: d["state"] == "delivered"), "the first delivery")
            secret_file(inst, "smarthost.password", second.password)
            rewrite_config(inst.config, lambda c: c["smarthost"].update(port=second.port))
            assert await running.gw.reload()
            second_id = await post_invoice(running, numbered("MAIL-0002"))
            await eventually(lambda: delivery_when(running, second_id, lambda d: d["state"] == "delivered"), "the second delivery")
        assert [s.message["Message-ID"] for s in relay.seen] == [f"<{first_id}@{instance.MAIL_HOST}>"]
        assert [s.message["Message-ID"] for s in second.seen] == [f"<{second_id}@{instance.MAIL_HOST}>"]
        assert second.logins == [(RELAY_USER, "rotated-secret-4567")]
    finally:
        await second.close()


async def test_reload_takes_a_renewed_recipient_certificate(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    old, new = ap_certificate(inst), ap_certificate(inst, "rsa3072")
    configured = inst.root / "pki" / "ap-mailbox.crt"  # where the operator keeps the mailbox's certificate
    configured.write_bytes(old.cert.read_bytes())
    configure(inst, relay.port, cipher="aes-256-gcm", ap=devpki.Issued(configured, old.key))
    async with serving(inst, "info", quiet()) as running:
        first_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, first_id, lambda d: d["state"] == "delivered"), "the first delivery")
        configured.write_bytes(new.cert.read_bytes())  # the mailbox's key is renewed; then SIGHUP
        assert await running.gw.reload()
        second_id = await post_invoice(running, numbered("MAIL-0002"))
        await eventually(lambda: delivery_when(running, second_id, lambda d: d["state"] == "delivered"), "the second delivery")
    first, second = relay.seen
    assert attachments(open_with_openssl(first.data, old, inst.ca.cert, tmp_path / "first")[0])
    found = attachments(open_with_openssl(second.data, new, inst.ca.cert, tmp_path / "second")[0])  # the renewed key
    assert list(found.values()) == [("application/xml", numbered("MAIL-0002"))]


# --- 2. STARTTLS required, AUTH -----------------------------------------------------------------------


async def test_relay_without_starttls_gets_nothing_in_clear(inst: Instance, relay: Relay,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    relay.offer_tls = False
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        waiting = await eventually(lambda: delivery_when(running, message_id, lambda d: d["attempts"] >= 2), "two attempts")
        assert waiting["state"] == "pending", waiting  # transient: retried, not dead-lettered
        assert relay.connections >= 2
        assert (relay.mail_commands, relay.seen, relay.logins) == (0, [], [])  # not a byte of the mail in clear

        shown = await cli_json(capsys, "messages", "show", message_id, "-c", str(inst.config))
        [d] = shown["deliveries"]
        assert d["state"] == "pending" and "STARTTLS" in d["last_error"], d

        relay.offer_tls = True
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery with TLS")
    [seen] = relay.seen
    assert seen.tls and seen.rcpt_tos == [AP]


async def test_without_credentials_no_login_is_attempted(inst: Instance, relay: Relay) -> None:
    configure(inst, relay.port, auth=False, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert seen.tls and seen.login is None and relay.logins == []


async def test_wrong_password_is_refused_by_the_relay_and_never_logged(inst: Instance, relay: Relay) -> None:
    """535 is the relay's permanent answer (RFC 4954 6): dead-lettered with it; the password is in no log line
    and no stored reason."""
    relay.password = "what-the-relay-expects"
    configure(inst, relay.port, cipher="aes-256-gcm")
    log = quiet()
    async with serving(inst, "debug", log) as running:
        message_id = await post_invoice(running)
        dead = await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "dead"), "the dead letter")
    assert "535" in dead["last_error"], dead
    assert set(relay.logins) == {(RELAY_USER, RELAY_PASSWORD)} and relay.seen == []  # (PLAIN, then LOGIN)
    assert RELAY_PASSWORD not in log.getvalue() and RELAY_PASSWORD not in json.dumps(dead)
    assert "delivery.dead_letter" in log.getvalue()


async def test_relay_with_a_certificate_from_another_ca_is_refused(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    other = devpki.make_ca(tmp_path / "other-ca", "other")
    issued = devpki.issue(other, tmp_path / "other-ca", "relay", role="server", sans=("localhost", "127.0.0.1"))
    relay.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    relay.tls.load_cert_chain(issued.cert, issued.key)
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        waiting = await eventually(lambda: delivery_when(running, message_id, lambda d: d["attempts"] >= 1), "an attempt")
    assert waiting["state"] == "pending" and waiting["last_error"], waiting
    assert (relay.mail_commands, relay.seen, relay.logins) == (0, [], [])


async def test_port_465_speaks_tls_from_the_first_byte(inst: Instance, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The submissions port (RFC 8314): no STARTTLS, TLS at once.  (The stub cannot bind 465 itself, so the
    gateway is told that the stub's port is the implicit-TLS one.)"""
    relay = await Relay.start(inst, implicit=True)
    try:
        monkeypatch.setattr(mail, "IMPLICIT_TLS_PORT", relay.port)
        configure(inst, relay.port, cipher="aes-256-gcm")
        async with serving(inst, "info", quiet()) as running:
            message_id = await post_invoice(running)
            await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
        [seen] = relay.seen
        assert seen.rcpt_tos == [AP] and seen.login == RELAY_USER
    finally:
        await relay.close()


# --- 3. the relay's answers -------------------------------------------------------------------------------


async def test_relay_451_is_retried_and_delivered_once_with_the_same_message_id(inst: Instance, relay: Relay) -> None:
    relay.data_replies = ["451 4.3.0 queue full, try again later"]
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        done = await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
        await asyncio.sleep(0.5)  # several polls of the delivery loop: nothing more is sent
    assert done["attempts"] == 2
    first, second = relay.seen
    assert first.reply.startswith("451") and second.reply.startswith("250")
    assert len(relay.delivered) == 1
    # the redelivery is recognisably the same message
    assert first.message["Message-ID"] == second.message["Message-ID"] == f"<{message_id}@{instance.MAIL_HOST}>"


async def test_relay_451_to_rcpt_is_retried(inst: Instance, relay: Relay) -> None:
    relay.rcpt_replies = ["451 4.4.3 temporary lookup failure", "451 4.4.3 temporary lookup failure"]
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        done = await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    assert done["attempts"] == 3 and len(relay.seen) == 1


async def test_relay_550_to_rcpt_is_dead_lettered_at_once(inst: Instance, relay: Relay,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    relay.rcpt_replies = ["550 5.1.1 <ap@erp.example>: mailbox unknown"] * 5
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "dead"), "the dead letter")
        [dead] = await cli_json(capsys, "dead-letters", "-c", str(inst.config), "--json")
    assert (dead["message_id"], dead["destination"], dead["attempts"]) == (message_id, "ap-mailbox", 1)
    assert "550" in dead["error"] and "mailbox unknown" in dead["error"] and AP in dead["error"], dead
    assert relay.seen == [] and relay.rcpt_replies == ["550 5.1.1 <ap@erp.example>: mailbox unknown"] * 4  # one try


async def test_relay_550_to_data_is_dead_lettered_at_once(inst: Instance, relay: Relay,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    relay.data_replies = ["550 5.7.1 message refused by policy"]
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "dead"), "the dead letter")
        [dead] = await cli_json(capsys, "dead-letters", "-c", str(inst.config), "--json")
    assert dead["message_id"] == message_id and dead["attempts"] == 1
    assert "550" in dead["error"] and "refused by policy" in dead["error"], dead
    assert len(relay.seen) == 1


# --- 4. partners whose endpoint is mailto: ------------------------------------------------------------------


async def test_invoice_for_a_mailto_partner_is_mailed_to_it(inst: Instance, relay: Relay, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    gw_client = devpki.issue(inst.ca, inst.root / "pki", "gw-client", role="client")

    def outbound(c: dict[str, Any]) -> None:
        c["destinations"].append({"name": "partners", "type": "partner", "client_certificate": str(gw_client.cert),
                                  "client_key": str(gw_client.key), "timeout_s": 5.0})
        c["outbound"] = {"socket": "outbound.sock", "identities": [SELLER]}

    configure(inst, relay.port, extra=outbound)
    assert await run_cli("partners", "edit", DEMO_PARTNER, "--endpoint", f"mailto:{DEMO_EMAIL}", "-c", str(inst.config)) == 0
    capsys.readouterr()
    async with serving(inst, "info", quiet()) as running:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(inst.root / "outbound.sock"))) as s:
            status, reply = await post(s, TO_DEMO_PARTNER, path="http://gw/v1/outbound")
        assert status == 202 and reply["partner"] == DEMO_PARTNER, reply
        message_id = reply["message_id"]
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert (seen.mail_from, seen.rcpt_tos) == (GATEWAY_ADDRESS, [DEMO_EMAIL])
    assert seen.tls and seen.login == RELAY_USER
    assert seen.message["To"] == DEMO_EMAIL and seen.message["Message-ID"] == f"<{message_id}@{instance.MAIL_HOST}>"
    content, signer = open_with_openssl(seen.data, inst.demo_smime, inst.ca.cert, tmp_path / "opened")
    assert signer.strip() == pem_of(inst.smime.cert)
    assert list(attachments(content).values()) == [("application/xml", TO_DEMO_PARTNER)]


async def test_mailto_partner_gets_mail_encrypted_to_its_longest_lasting_certificate(
        inst: Instance, relay: Relay, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """During a rollover the partner has two RSA S/MIME certificates: the one that lasts longest is used."""
    renewed = devpki.issue(inst.ca, inst.root / "pki" / "clients", "demo-smime-2027", role="smime", emails=(DEMO_EMAIL,),
                           key_kind="rsa2048", not_after=datetime.now(UTC) + timedelta(days=1000))
    gw_client = devpki.issue(inst.ca, inst.root / "pki", "gw-client", role="client")

    def outbound(c: dict[str, Any]) -> None:
        c["destinations"].append({"name": "partners", "type": "partner", "client_certificate": str(gw_client.cert),
                                  "client_key": str(gw_client.key)})
        c["outbound"] = {"socket": "outbound.sock", "identities": [SELLER]}

    configure(inst, relay.port, extra=outbound)
    assert await run_cli("partners", "edit", DEMO_PARTNER, "--endpoint", f"mailto:{DEMO_EMAIL}", "--smime-cert",
                         str(renewed.cert), "-c", str(inst.config)) == 0
    capsys.readouterr()
    async with serving(inst, "info", quiet()) as running:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(inst.root / "outbound.sock"))) as s:
            sent = await post(s, TO_DEMO_PARTNER, path="http://gw/v1/outbound")
            assert sent.status == 202, sent.text
            message_id = sent.json["message_id"]
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    content, _ = open_with_openssl(seen.data, renewed, inst.ca.cert, tmp_path / "opened")
    assert list(attachments(content).values()) == [("application/xml", TO_DEMO_PARTNER)]
    (tmp_path / "mail.eml").write_bytes(seen.data)
    done = subprocess.run(["openssl", "cms", "-decrypt", "-recip", str(inst.demo_smime.cert), "-inkey",
                           str(inst.demo_smime.key), "-in", str(tmp_path / "mail.eml")], capture_output=True, timeout=30)
    assert done.returncode != 0  # not also to the old one


# --- 5. reply e-mails of the SMTP listener -------------------------------------------------------------------


def smime_message(body: bytes, signer: devpki.Issued, from_address: str, gateway_cert: Path, folder: Path,
                  message_id: str) -> bytes:
    """What a partner's mail program sends: the invoice attached, signed, then encrypted to the gateway."""
    folder.mkdir(parents=True, exist_ok=True)
    inner = (b"Content-Type: application/xml\r\nContent-Disposition: attachment; filename=invoice.xml\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(body).replace(b"\n", b"\r\n"))
    (folder / "inner.txt").write_bytes(inner)
    openssl("-sign", "-md", "sha256", "-binary", "-in", str(folder / "inner.txt"), "-signer", str(signer.cert),
            "-inkey", str(signer.key), "-out", str(folder / "signed.eml"))
    openssl("-encrypt", "-binary", "-aes-256-gcm", "-in", str(folder / "signed.eml"), "-out", str(folder / "enc.eml"),
            "-from", from_address, "-to", GATEWAY_ADDRESS, "-subject", "Invoice", str(gateway_cert))
    raw = (folder / "enc.eml").read_bytes()
    if b"\r\n" not in raw:
        raw = raw.replace(b"\n", b"\r\n")
    return f"Message-ID: {message_id}\r\n".encode() + raw


class _Answering(smtplib.SMTP):
    """smtplib's SMTP keeping the reply to DATA (sendmail discards its text)."""

    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_reply = super().data(msg)
        return self.data_reply


async def send_to_listener(running: Running, sender: str, raw: bytes) -> tuple[int, str]:
    """Send over the gateway's SMTP listener (STARTTLS); (code, text) of the answer to DATA."""
    def send() -> tuple[int, str]:
        ctx = ssl.create_default_context(cafile=str(running.inst.ca.cert))
        assert running.gw.smtp_port
        with _Answering("127.0.0.1", running.gw.smtp_port, timeout=30) as s:
            s.starttls(context=ctx)
            try:
                s.sendmail(sender, [GATEWAY_ADDRESS], raw)
            except smtplib.SMTPDataError as exc:
                error = exc.smtp_error
                return exc.smtp_code, error.decode(errors="replace") if isinstance(error, bytes) else error
            return s.data_reply[0], s.data_reply[1].decode(errors="replace")

    return await asyncio.get_running_loop().run_in_executor(None, send)


async def replies_settled(running: Running) -> None:
    """The listener's reply e-mails are all sent (or none was queued), then a little more time."""
    assert running.gw.smtp is not None

    async def none_waiting() -> bool:
        return REPLIES not in await running.gw.store.outbox.pending_by_destination()

    await eventually(none_waiting, "the reply e-mails")
    await asyncio.sleep(0.3)


def read_reply(seen: Seen, inst: Instance, folder: Path) -> dict[str, Any]:
    """The outcome.json of a reply, after decrypting it as the demo partner and verifying the gateway's signature."""
    content, signer = open_with_openssl(seen.data, inst.demo_smime, inst.ca.cert, folder)
    assert signer.strip() == pem_of(inst.smime.cert)
    found = attachments(content)
    assert list(found) == ["outcome.json"]
    media_type, data = found["outcome.json"]
    assert media_type == "application/json"
    report: dict[str, Any] = json.loads(data)
    return report


REPLY_TO = "<invoice-0001@demo-supplier.example>"


@pytest.mark.parametrize("reply_cipher,smime_type", [("aes-256-gcm", "authenveloped-data"),
                                                     ("aes-256-cbc", "enveloped-data")])
async def test_accepted_mail_gets_a_signed_encrypted_reply(inst: Instance, relay: Relay, tmp_path: Path,
                                                           reply_cipher: str, smime_type: str) -> None:
    configure(inst, relay.port, extra=lambda c: c["smtp"].update(reply_cipher=reply_cipher))
    raw = smime_message(SAMPLE, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        # the envelope sender is not what the reply goes to: the signed partner's From address is
        code, text = await send_to_listener(running, "bounces@elsewhere.example", raw)
        assert code == 250 and text.startswith("2.0.0 Accepted as "), text
        message_id = text.removeprefix("2.0.0 Accepted as ").split()[0]
        await eventually(lambda: relay.seen, "the reply e-mail")
        await replies_settled(running)
        assert await running.gw.store.reports.message(message_id) is not None
    [seen] = relay.seen
    assert (seen.mail_from, seen.rcpt_tos) == (GATEWAY_ADDRESS, [DEMO_EMAIL])
    assert seen.tls and seen.login == RELAY_USER
    msg = seen.message
    assert (msg["From"], msg["To"], msg["Subject"], msg["In-Reply-To"]) == (GATEWAY_ADDRESS, DEMO_EMAIL, "Invoice accepted",
                                                                              REPLY_TO)
    assert msg.get_content_type() == "application/pkcs7-mime"  # encrypted to the partner's certificate
    assert str(msg.get_param("smime-type")).lower() == smime_type
    report = read_reply(seen, inst, tmp_path / "reply")
    assert report["outcome"] == "accepted" and report["message_id"] == message_id, report
    assert report["in_reply_to"] == REPLY_TO and report["duplicate"] is False and report["status"] == "accepted"


async def test_reply_to_a_partner_without_an_rsa_key_is_signed_only(inst: Instance, relay: Relay, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An EC S/MIME certificate cannot be encrypted to: the reply is signed (multipart/signed), not encrypted."""
    ec_cert = devpki.issue(inst.ca, inst.root / "pki" / "clients", "demo-ec-smime", role="smime", emails=(DEMO_EMAIL,))
    assert await run_cli("partners", "edit", DEMO_PARTNER, "--smime-cert", str(ec_cert.cert), "-c", str(inst.config)) == 0
    capsys.readouterr()
    configure(inst, relay.port)
    raw = smime_message(SAMPLE, ec_cert, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 250, text
        await eventually(lambda: relay.seen, "the reply e-mail")
        await replies_settled(running)
    [seen] = relay.seen
    assert seen.message.get_content_type() == "multipart/signed" and seen.rcpt_tos == [DEMO_EMAIL]
    (tmp_path / "reply.eml").write_bytes(seen.data)
    content = openssl("-verify", "-CAfile", str(inst.ca.cert), "-purpose", "smimesign", "-in", str(tmp_path / "reply.eml"))
    assert json.loads(attachments(content)["outcome.json"][1])["outcome"] == "accepted"


@pytest.mark.parametrize("body,error", [(INVALID, "SCHEMA_INVALID"), (FOREIGN, "SUPPLIER_NOT_AUTHORIZED")],
                         ids=["schema-invalid", "supplier not authorized"])
async def test_rejected_mail_gets_a_reply_with_the_errors(inst: Instance, relay: Relay, tmp_path: Path, body: bytes,
                                                          error: str) -> None:
    configure(inst, relay.port)
    raw = smime_message(body, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 554 and f"{error}: " in text, text
        await eventually(lambda: relay.seen, "the reply e-mail")
        await replies_settled(running)
        assert await running.gw.store.reports.messages() == []
    [seen] = relay.seen
    assert seen.rcpt_tos == [DEMO_EMAIL] and seen.message["Subject"] == "Invoice rejected"
    assert seen.message.get_content_type() == "application/pkcs7-mime"
    report = read_reply(seen, inst, tmp_path / "reply")
    assert (report["outcome"], report["error"], report["in_reply_to"]) == ("rejected", error, REPLY_TO), report
    assert report["message"] and report["message"] in " ".join(text.split()), (report, text)
    assert report["details"] and all(d["message"] for d in report["details"]), report


async def test_a_reply_waits_in_the_outbox_across_a_restart(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    """Replies are durable: queued before the SMTP answer, one the relay refused is sent after the gateway restarted."""
    configure(inst, relay.port)
    relay.data_replies = ["451 4.3.0 queue full, try again later"] * 50
    raw = smime_message(SAMPLE, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 250, text
        await eventually(lambda: relay.seen, "an attempt to send the reply")
    assert relay.delivered == []
    relay.data_replies.clear()
    async with serving(inst, "info", quiet()) as running:
        await eventually(lambda: relay.delivered, "the reply e-mail, after the restart")
        await replies_settled(running)
    [sent] = relay.delivered
    assert {s.message["Message-ID"] for s in relay.seen} == {sent.message["Message-ID"]}  # the same reply each time
    assert read_reply(sent, inst, tmp_path / "reply")["outcome"] == "accepted"


async def test_mail_signed_by_a_stranger_gets_no_reply(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    """No backscatter: a refused message whose signer is no partner is answered by SMTP only."""
    stranger = devpki.issue(inst.ca, inst.root / "pki", "stranger", role="smime", emails=("billing@stranger.example",),
                            key_kind="rsa2048")
    configure(inst, relay.port)
    raw = smime_message(SAMPLE, stranger, "billing@stranger.example", inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, "billing@stranger.example", raw)
        assert code == 554 and "PARTNER_UNKNOWN" in text, text
        await replies_settled(running)
    assert (relay.connections, relay.seen) == (0, [])


async def test_no_reply_when_replies_are_off(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    configure(inst, relay.port, extra=lambda c: c["smtp"].update(replies=False))
    raw = smime_message(SAMPLE, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 250, text
        await replies_settled(running)
    assert (relay.connections, relay.seen) == (0, [])


# --- 6. configuration errors ------------------------------------------------------------------------------


def test_email_destination_without_smarthost_is_refused(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, None, cipher="aes-256-gcm")
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "configuration error: smarthost:" in err and "'ap-mailbox'" in err, err


def test_email_destination_with_an_ec_certificate_is_refused(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525, cipher="aes-256-gcm", ap=ap_certificate(inst, "ec"))
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "'ap-mailbox'" in err and "recipient_certificate" in err, err


def test_smarthost_username_needs_a_password_file(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525, auth=False, extra=lambda c: c["smarthost"].update(username=RELAY_USER))
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "configuration error: smarthost.password_file:" in err, err


def test_smarthost_password_file_readable_by_others_is_refused(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525)
    os.chmod(inst.root / "keys" / "smarthost.password", 0o644)
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "configuration error: smarthost.password_file:" in err and "chmod 600" in err, err


def _dest(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        [d] = [d for d in c["destinations"] if d["name"] == "ap-mailbox"]
        d.update(changes)
        for k in [k for k, v in d.items() if v is None]:
            del d[k]
    return change


BAD_MAIL_CONFIG: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("cipher not offered", _dest(cipher="des-ede3-cbc"), "destinations[1].cipher: 'des-ede3-cbc' is not one of"),
    ("to with a display name", _dest(to="AP <ap@erp.example>"), "destinations[1].to: "),
    ("no to", _dest(to=None), "destinations[1].to: missing (required)"),
    ("no recipient_certificate", _dest(recipient_certificate=None), "destinations[1].recipient_certificate: missing"),
    ("recipient_certificate not found", _dest(recipient_certificate="pki/nowhere.crt"),
     "destinations[1].recipient_certificate: file not found"),
    ("no [smtp] identity", lambda c: c.pop("smtp"), "smtp: destination 'ap-mailbox'"),
    ("[smtp] switched off", lambda c: c["smtp"].update(enabled=False), "smtp: destination 'ap-mailbox'"),
    ("smarthost without host", lambda c: c["smarthost"].pop("host"), "smarthost.host: missing (required)"),
    ("smarthost port out of range", lambda c: c["smarthost"].update(port=70000), "smarthost.port: 70000 is out of range"),
    ("smarthost unknown key", lambda c: c["smarthost"].update(starttls=False), "smarthost.starttls: unknown key"),
    ("smarthost ca not found", lambda c: c["smarthost"].update(ca="pki/relay-ca.crt"), "smarthost.ca: file not found"),
    ("password_file without username", lambda c: c["smarthost"].pop("username"), "smarthost.password_file: give username"),
]


@pytest.mark.parametrize("case,change,message", BAD_MAIL_CONFIG, ids=[b[0] for b in BAD_MAIL_CONFIG])
def test_mail_configuration_errors_name_the_key(inst: Instance, case: str, change: Callable[[dict[str, Any]], None],
                                                message: str) -> None:
    configure(inst, 2525, cipher="aes-256-gcm", extra=change)
    with pytest.raises(ConfigError) as exc:
        config_mod.load(inst.config)
    assert exc.value.message.startswith(message), exc.value.message


def test_smarthost_and_email_destination_pass_check_config(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525, cipher="aes-256-cbc")
    code = cli.main(["check-config", "-c", str(inst.config)])
    out, err = capsys.readouterr()
    assert code == 0 and "OK" in out, err


@pytest.mark.parametrize("key_kind", ["ec", None], ids=["EC S/MIME certificate", "no S/MIME certificate"])
def test_mailto_endpoint_needs_an_rsa_smime_certificate(inst: Instance, capsys: pytest.CaptureFixture[str],
                                                        key_kind: str | None) -> None:
    client = devpki.issue(inst.ca, inst.root / "pki" / "clients", "mailer", role="client")
    smime = [] if key_kind is None else [devpki.issue(inst.ca, inst.root / "pki" / "clients", "mailer-smime", role="smime",
                                                      emails=("ap@mailer.example",), key_kind=key_kind).cert]
    register_partner(inst.partners, "mailer", [client.cert], ["0088:4000005000008"], ["ap@mailer.example"], "pytest",
                     smime_certs=smime)
    before = inst.partners.read_bytes()
    code, err = cli_error(capsys, "partners", "edit", "mailer", "--endpoint", "mailto:ap@mailer.example",
                          "-c", str(inst.config))
    assert code == 2 and "endpoint" in err and "--smime-cert" in err, err
    assert inst.partners.read_bytes() == before


def test_a_mailto_partner_keeps_its_rsa_smime_certificate(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["partners", "edit", DEMO_PARTNER, "--endpoint", f"mailto:{DEMO_EMAIL}", "-c", str(inst.config)]) == 0
    capsys.readouterr()
    before = inst.partners.read_bytes()
    spki = inspect_certificate(inst.demo_smime.cert, "smime").spki_sha256
    code, err = cli_error(capsys, "partners", "edit", DEMO_PARTNER, "--remove-cert", spki[:16], "-c", str(inst.config))
    assert code == 2 and "--smime-cert" in err, err
    assert inst.partners.read_bytes() == before
