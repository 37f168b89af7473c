"""E-mail in the tests: the smarthost stub the gateway sends through, instances configured to use it,
and S/MIME messages made and opened with ``openssl cms`` (the independent peer, never the gateway's own code).

``Relay`` is that stub: aiosmtpd on an ephemeral port, offering STARTTLS with a certificate from the
instance's development CA (and refusing MAIL before it), optionally SMTP AUTH, recording every
connection, login and message (envelope and bytes), and answering what a test tells it to (451 or
550 to RCPT or DATA); the ``relay`` fixture (tests/delivery/conftest.py) starts one per test.
``configure`` points an instance's [smarthost] at it, with short retry delays, and optionally adds a
``type = "email"`` destination.  What the relay received is opened with ``open_with_openssl``
(decrypt, then verify against the development CA); what a partner's mail program sends is made with
``sign`` and ``encrypt``.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import functools
import io
import os
import re
import ssl
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from gateway.operations.instance import DEMO_EMAIL, Instance
from gateway.smime.identity import Identity
from gateway.tls import load_private_key
from tests.helpers import Running, post, rewrite_config
from tests.helpers import eventually as shared_eventually

WAIT_S = 15.0  # longer than tests.helpers.WAIT_S: STARTTLS, S/MIME and retries, on a busy machine
GATEWAY_ADDRESS = f"invoices@{instance.MAIL_HOST}"
AP = "ap@erp.example"
RELAY_USER, RELAY_PASSWORD = "gw", "relay-secret-0123"


# --- the smarthost stub -------------------------------------------------------------------------------


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


# --- configuring an instance --------------------------------------------------------------------------


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


# --- waiting, submitting ------------------------------------------------------------------------------


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


def identity_of(issued: devpki.Issued, address: str) -> Identity:
    """An S/MIME identity (certificate, key, From address) as the gateway holds one, from devpki's files."""
    return Identity(x509.load_pem_x509_certificate(issued.cert.read_bytes()), load_private_key(issued.key.read_bytes()), address)


# --- what a partner's mail program sends: made with openssl cms ---------------------------------------


def crlf(data: bytes) -> bytes:
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def b64lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i:i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def part(content: bytes, ctype: str = "application/xml", filename: str | None = "invoice.xml") -> bytes:
    """One MIME entity (CRLF), base64 encoded."""
    head = f"Content-Type: {ctype}\r\n"
    if filename:
        head += f"Content-Disposition: attachment; filename={filename}\r\n"
    return (head + "Content-Transfer-Encoding: base64\r\n\r\n").encode() + b64lines(content)


def openssl_cms(*args: object, data: bytes) -> bytes:
    """``openssl cms ARGS`` with ``data`` on stdin; its output with CRLF line ends (``openssl`` works on files)."""
    done = subprocess.run(["openssl", "cms", *map(str, args)], input=data, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return crlf(done.stdout)


def envelope_args(sender: str | None, to: str) -> list[str]:
    return (["-from", sender] if sender else []) + ["-to", to, "-subject", "Invoice"]


def sign(content: bytes, *signers: devpki.Issued, md: str = "sha256", opaque: bool = False,
         sender: str | None = None, to: str = GATEWAY_ADDRESS, options: Sequence[str] = ()) -> bytes:
    """``openssl cms -sign``: multipart/signed (or signed-data with ``opaque``); with ``sender``, a whole
    mail (From/To/Subject), else the entity that goes inside the encryption.  ``options`` follow the
    signers (``-keyopt`` applies to the last one)."""
    keys = [a for s in signers for a in ("-signer", s.cert, "-inkey", s.key)]
    return openssl_cms("-sign", "-md", md, "-binary", "-crlfeol", *(["-nodetach"] if opaque else []), *keys, *options,
                       *(envelope_args(sender, to) if sender else []), data=content)


def encrypt(content: bytes, recipient: Path, *cipher: str, sender: str | None = DEMO_EMAIL, to: str = GATEWAY_ADDRESS) -> bytes:
    """``openssl cms -encrypt`` of ``content`` to ``recipient``: the mail as sent (From/To/Subject)."""
    cipher = cipher or ("-aes-256-gcm",)
    return openssl_cms("-encrypt", "-binary", "-crlfeol", cipher[0], "-recip", recipient, *cipher[1:],
                       *envelope_args(sender, to), data=content)


def tamper_der(message: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """The mail with the DER of its application/pkcs7-mime body changed by ``change``."""
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + b64lines(change(base64.b64decode(body)))
