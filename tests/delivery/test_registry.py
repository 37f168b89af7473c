"""The sender registry (gateway/delivery/registry.py): one sender per configured destination, by its kind.

It promises, for each destination kind the configuration knows (DESTINATION_TYPES): the sender of
that kind, named after the destination with its concurrency, wired to what it was given (the
destination's folder, URL and key files, the partner book, the mailer of the moment); a
configuration it cannot send with is refused when the sender is built, naming the destination; and
every sender it builds has the Sender shape (gateway/delivery/sender.py), ``close`` releasing its connections.

What each kind does in depth (atomic files, HMAC headers, S/MIME, retries) is tested in the kind's
own module tests; here each sender is driven once, far enough to show what it was built from.
Nothing leaves 127.0.0.1, and e-mail goes to a recording mailer instead of a relay.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509

from gateway import devpki
from gateway.config.model import DESTINATION_TYPES, Destination
from gateway.delivery.email import EmailSender
from gateway.delivery.folder import DirectorySender
from gateway.delivery.partner import PartnerSender
from gateway.delivery.registry import make_sender
from gateway.delivery.sender import DeliveryFailed, Sender
from gateway.delivery.webhook import HttpsSender
from gateway.errors import ConfigError
from gateway.partners.book import PartnerBook
from gateway.partners.edit import register_partner
from gateway.storage.records import DeliveryJob, DocumentFacts

DOCUMENT = b"<Invoice>...</Invoice>"
FACTS = DocumentFacts(
    message_id="m-1", partner="buyer-b", sha256=hashlib.sha256(DOCUMENT).hexdigest(), received_at="2026-11-03T10:00:00.000000Z",
    document_type="ubl:Invoice", invoice_number="INV-1", supplier_ids=("0088:4000001000006",), customer_ids=("0088:1",),
    customization_id="", profile_id="", issue_date="2026-11-02", size=len(DOCUMENT), signature=None,
    media_type="application/xml", rules=None, direction="out")
JOB = DeliveryJob("m-1", "dest", 0, 0.0, "buyer-b", FACTS.sha256, FACTS)


class RecordingMailer:
    """Stands in for gateway.delivery.smarthost.Mailer: what would have been sent, and to whom."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str, x509.Certificate, str]] = []

    async def send_invoice(self, job: DeliveryJob, document: bytes, to: str, recipient: x509.Certificate, cipher: str) -> str:
        self.sent.append((job.message_id, document.decode(), to, recipient, cipher))
        return "250 queued"


@dataclasses.dataclass
class Env:
    tmp: Path
    book: PartnerBook
    executor: concurrent.futures.Executor
    mail_cert: Path  # an S/MIME certificate with an RSA key (mail can be encrypted to it)
    ec_cert: Path  # one with an EC key (it cannot)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, devpki.Issued]:
    folder = tmp_path_factory.mktemp("pki")
    ca = devpki.make_ca(folder)
    return {"client": devpki.issue(ca, folder, "buyer-client", role="client"),
            "smime": devpki.issue(ca, folder, "buyer-smime", role="smime", key_kind="rsa2048", emails=("ap@buyer.example",)),
            "ec-smime": devpki.issue(ca, folder, "ec-smime", role="smime", emails=("ec@buyer.example",))}


@pytest.fixture
def env(tmp_path: Path, pki: dict[str, devpki.Issued]) -> Iterator[Env]:
    partners = tmp_path / "partners.toml"
    partners.write_text("# partners of the test\n")
    register_partner(partners, "buyer-b", [pki["client"].cert], ["0088:1"], ["ap@buyer.example"], "pytest",
                     endpoint="mailto:ap@buyer.example", smime_certs=[pki["smime"].cert])
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield Env(tmp_path, PartnerBook(partners), executor, pki["smime"].cert, pki["ec-smime"].cert)


def destination(env: Env, kind: str, **fields: Any) -> Destination:
    key = env.tmp / "hmac.key"
    key.write_bytes(b"k" * 32)
    defaults: dict[str, dict[str, Any]] = {
        "directory": {"path": env.tmp / "inbox"},
        "https": {"url": "http://127.0.0.1:9/never", "hmac_key_file": key},
        "email": {"to": "erp@us.example", "recipient_certificate": env.mail_cert},
        "partner": {},
    }
    return Destination(name=f"{kind}-dest", type=kind, concurrency=3, **{**defaults.get(kind, {}), **fields})


@contextlib.asynccontextmanager
async def erp() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """An ERP endpoint on 127.0.0.1 that records what it is sent and answers 201."""
    received: list[tuple[dict[str, str], bytes]] = []

    async def invoices(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    app.router.add_post("/invoices", invoices)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/invoices", received
    finally:
        await runner.cleanup()


def test_every_configurable_kind_has_a_sender(env: Env):
    built = {kind: make_sender(destination(env, kind), env.book, env.executor) for kind in DESTINATION_TYPES}
    assert {k: type(s) for k, s in built.items()} == {
        "directory": DirectorySender, "https": HttpsSender, "email": EmailSender, "partner": PartnerSender}
    for kind, sender in built.items():
        assert (sender.name, sender.concurrency) == (f"{kind}-dest", 3)
        assert asyncio.iscoroutinefunction(sender.send) and asyncio.iscoroutinefunction(sender.close)


async def test_a_folder_destination_writes_into_its_folder(env: Env):
    sender = make_sender(destination(env, "directory"), env.book, env.executor)
    (env.tmp / "inbox").mkdir()
    assert await sender.send(JOB, DOCUMENT) == "written"
    assert (env.tmp / "inbox" / "m-1.xml").read_bytes() == DOCUMENT
    assert (env.tmp / "inbox" / "m-1.json").is_file()
    await sender.close()


async def test_an_https_destination_posts_to_its_url_signed_with_its_key(env: Env):
    token = env.tmp / "token"
    token.write_text("s3cret-token\n")
    async with erp() as (url, received):
        sender = make_sender(destination(env, "https", url=url, bearer_token_file=token), env.book, env.executor)
        try:
            assert await sender.send(JOB, DOCUMENT) == "HTTP 201"
        finally:
            await sender.close()
    ((headers, body),) = received
    assert body == DOCUMENT and headers["Authorization"] == "Bearer s3cret-token"
    mac = hmac.new(b"k" * 32, f"{headers['X-Einvoice-Timestamp']}.m-1.".encode() + DOCUMENT, hashlib.sha256).hexdigest()
    assert headers["X-Einvoice-Signature"] == f"v1={mac}"


async def test_an_email_destination_sends_through_the_mailer_of_the_moment(env: Env):
    mailers: list[RecordingMailer | None] = [None]
    sender = make_sender(destination(env, "email", cipher="aes-256-cbc"), env.book, env.executor, lambda: mailers[-1])
    with pytest.raises(DeliveryFailed, match=r"^there is no \[smarthost\] to send e-mail through$"):
        await sender.send(JOB, DOCUMENT)
    mailers.append(RecordingMailer())  # a reload configured one: the same sender uses it
    assert await sender.send(JOB, DOCUMENT) == "250 queued"
    ((message_id, document, to, recipient, cipher),) = mailers[-1].sent  # type: ignore[union-attr]
    assert (message_id, document, to, cipher) == ("m-1", DOCUMENT.decode(), "erp@us.example", "aes-256-cbc")
    assert recipient == x509.load_pem_x509_certificate(env.mail_cert.read_bytes())


def test_an_email_destination_that_cannot_be_encrypted_to_is_refused_when_built(env: Env):
    with pytest.raises(ConfigError) as caught:
        make_sender(destination(env, "email", recipient_certificate=env.ec_cert), env.book, env.executor)
    assert caught.value.message == ("destinations: 'email-dest': recipient_certificate has no RSA key of 2048 bits or more; "
                                    "mail cannot be encrypted to it")


async def test_a_partner_destination_reads_the_partner_book_it_was_given(env: Env):
    mailer = RecordingMailer()
    sender = make_sender(destination(env, "partner"), env.book, env.executor, lambda: mailer)
    try:
        assert await sender.send(JOB, DOCUMENT) == "250 queued"  # buyer-b's endpoint is mailto:
        assert [(to, cipher) for _, _, to, _, cipher in mailer.sent] == [("ap@buyer.example", "aes-256-gcm")]
        stranger = dataclasses.replace(JOB, partner="buyer-z")
        with pytest.raises(DeliveryFailed, match=r"^partner 'buyer-z' has no endpoint registered \(partners edit buyer-z "):
            await sender.send(stranger, DOCUMENT)
    finally:
        await sender.close()


def test_an_unknown_kind_is_refused(env: Env):
    with pytest.raises(ConfigError, match="'ftp'"):
        make_sender(destination(env, "ftp"), env.book, env.executor)


@pytest.mark.parametrize("kind", ["https", "partner"])
async def test_close_releases_the_connections_of_the_http_senders(env: Env, kind: str):
    # The gateway closes a sender at stop, and when a reload replaces it: its pooled TLS connections go with it.
    sender: Sender = make_sender(destination(env, kind), env.book, env.executor)
    assert isinstance(sender, HttpsSender | PartnerSender)
    session = sender.session()  # what a delivery opens
    try:
        await sender.close()
        assert session.closed
    finally:
        await session.close()
