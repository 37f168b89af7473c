"""``type = "partner"`` destinations (gateway/delivery/partner.py): invoices this business submitted, to the
trading partner they are addressed to, over mutual TLS to its endpoint (another einvoice-gateway) or
by S/MIME e-mail when the endpoint is ``mailto:``.

Over HTTPS, a ``PartnerSender`` over a partners file of the test POSTs to fake partner endpoints
(``start_erp``, tests/helpers/erp.py: real TLS on 127.0.0.1, client certificates required); what an
attempt's outcome does to the delivery is the outbox's (tests/delivery/test_outbox.py), and the whole
way from one gateway to another is tests/inbound/test_submit.py.  By e-mail, a gateway runs in-process
with its smarthost pointing at a real stub (``Relay``, tests/helpers/mail.py), and what arrives is
opened with ``openssl cms``, not with the gateway's own code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.config.model import Destination
from gateway.delivery.partner import PartnerSender
from gateway.delivery.sender import DeliveryFailed
from gateway.model import CertWindow, PartnerStatus
from gateway.operations import instance
from gateway.operations.instance import DEMO_EMAIL, DEMO_PARTNER, Instance
from gateway.partners.book import PartnerBook, editing
from gateway.partners.edit import register_partner
from gateway.storage.records import DeliveryJob, DocumentFacts
from tests.helpers import numbered, post, run_cli, serving
from tests.helpers.mail import (
    GATEWAY_ADDRESS,
    RELAY_USER,
    Relay,
    attachments,
    configure,
    delivery_when,
    eventually,
    open_with_openssl,
    pem_of,
    quiet,
)
from tests.helpers.outbox import Pki, StartErp

SELLER = "0088:4000001000006"  # the sample's supplier, and the demo partner's first identifier
# The sample with the demo partner as the buyer as well: an invoice this business sends to it.
assert SAMPLE.count(b">4000002000005<") == 1
TO_DEMO_PARTNER = SAMPLE.replace(b">4000002000005<", b">4000001000006<")
# The partner of the HTTPS tests, and the invoice sent to it.
BUYER, BUYER_ID, BUYER_EMAIL = "buyer-b", "0088:4000002000005", "ap@buyer-b.example"
DOCUMENT = numbered("PARTNER-0001")


# --- over HTTPS, to another gateway ---------------------------------------------------------------------


@dataclass
class Outbound:
    """A partners file (partner ``buyer-b`` once registered) and the ``type = "partner"`` senders over it,
    presenting the client certificate of ``pki`` to the fake partner endpoints (``start_erp``)."""

    pki: Pki
    file: Path
    book: PartnerBook
    senders: list[PartnerSender] = field(default_factory=list)

    def register(self, endpoint: str = "", **options: Any) -> None:
        client = devpki.issue(self.pki.ca, self.file.parent, f"{BUYER}-client", role="client")
        register_partner(self.file, BUYER, [client.cert], [BUYER_ID], [BUYER_EMAIL], "pytest", endpoint=endpoint, **options)
        assert self.book.refresh()

    def change(self, **changes: Any) -> None:
        """``partners edit``: the partner's record changed in the file, and the book re-read."""
        with editing(self.file) as partners:
            partners[:] = [dataclasses.replace(p, **changes) if p.name == BUYER else p for p in partners]
        assert self.book.refresh()

    def sender(self, mailer: Callable[[], Any] = lambda: None, **fields: Any) -> PartnerSender:
        tls = {"ca": self.pki.ca.cert, "client_certificate": self.pki.client.cert, "client_key": self.pki.client.key}
        dest = Destination("partners", "partner", timeout_s=5.0, **{**tls, **fields})
        sender = PartnerSender(dest, self.book, mailer)
        self.senders.append(sender)
        return sender


@pytest.fixture
async def outbound(tmp_path: Path, pki: Pki) -> AsyncIterator[Outbound]:
    file = tmp_path / "partners.toml"
    file.write_text("# the partners of the test\n")
    o = Outbound(pki, file, PartnerBook(file))
    yield o
    for sender in o.senders:
        await sender.close()


def job(partner: str = BUYER, media_type: str = "application/xml") -> DeliveryJob:
    """A claimed delivery of DOCUMENT, an outbound invoice for ``partner``."""
    message_id, sha = str(uuid.uuid4()), hashlib.sha256(DOCUMENT).hexdigest()
    facts = DocumentFacts(message_id=message_id, partner=partner, sha256=sha, received_at="2026-11-03T10:00:00.000000Z",
                          document_type="ubl:Invoice", invoice_number="PARTNER-0001", supplier_ids=(SELLER,),
                          customer_ids=(BUYER_ID,), customization_id="", profile_id="", issue_date="2026-11-02",
                          size=len(DOCUMENT), signature=None, media_type=media_type, rules=None, direction="out")
    return DeliveryJob(message_id, "partners", 0, 0.0, partner, sha, facts)


def receipt(message_id: str, status: int = 202) -> tuple[int, str, dict[str, str]]:
    """What another einvoice-gateway answers to an invoice it took (its own message id)."""
    return status, json.dumps({"message_id": message_id, "status": "accepted", "duplicate": False}), {}


async def test_the_invoice_is_posted_to_the_partners_endpoint_over_mutual_tls(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True, path="/v1/invoices")
    partner.script = [receipt("theirs-1")]
    outbound.register(partner.url)
    sent = job()
    assert await outbound.sender().send(sent, DOCUMENT) == "HTTP 202 accepted message_id=theirs-1"
    [seen] = partner.seen
    assert (seen.path, seen.body, seen.peer_cn) == ("/v1/invoices", DOCUMENT, "gateway-client")
    assert seen.headers["Content-Type"] == "application/xml"
    assert seen.headers["Idempotency-Key"] == sent.message_id  # a resend is recognised there: booked once
    # Not the ERP webhook's request: no HMAC signature, no bearer token, no X-Einvoice facts.
    assert not [h for h in seen.headers if h.lower().startswith("x-einvoice") or h.lower() == "authorization"]


async def test_a_factur_x_pdf_goes_with_its_media_type(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)
    outbound.register(partner.url)
    await outbound.sender().send(job(media_type="application/pdf"), DOCUMENT)
    assert [s.headers["Content-Type"] for s in partner.seen] == ["application/pdf"]


async def test_a_success_without_a_receipt_is_still_delivered(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)  # answers 200 "booked": not another gateway's JSON
    outbound.register(partner.url)
    assert await outbound.sender().send(job(), DOCUMENT) == "HTTP 200"


async def test_without_the_client_certificate_the_partner_is_not_reached(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)
    outbound.register(partner.url)
    sender = outbound.sender(client_certificate=None, client_key=None)
    with pytest.raises(DeliveryFailed) as failed:
        await sender.send(job(), DOCUMENT)
    assert not failed.value.permanent and failed.value.error  # a TLS failure: retried
    assert partner.seen == []


async def test_a_destination_for_one_partner_sends_there_whatever_the_invoice_names(outbound: Outbound,
                                                                                   start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)
    outbound.register(partner.url)
    sender = outbound.sender(partner=BUYER)
    assert await sender.send(job(partner="someone-else"), DOCUMENT) == "HTTP 200"
    assert len(partner.seen) == 1


async def test_a_changed_endpoint_takes_effect_at_the_next_send(outbound: Outbound, start_erp: StartErp) -> None:
    old, new = await start_erp(mtls=True, path="/old"), await start_erp(mtls=True, path="/new")
    outbound.register(old.url)
    sender = outbound.sender()
    await sender.send(job(), DOCUMENT)
    outbound.change(endpoint=new.url)  # partners edit buyer-b --endpoint URL, while the sender lives on
    await sender.send(job(), DOCUMENT)
    assert ([s.path for s in old.seen], [s.path for s in new.seen]) == (["/old"], ["/new"])


async def test_another_gateways_refusal_is_condensed_and_permanent(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)
    refusal = {"error": "SCHEMA_INVALID", "message": "the invoice does not conform to the UBL 2.1 schema",
               "details": [{"message": f"line {n}: unexpected element"} for n in (1, 2, 3, 4)]}
    partner.default = (422, json.dumps(refusal, indent=2), {})
    outbound.register(partner.url)
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender().send(job(), DOCUMENT)
    assert failed.value.permanent
    assert failed.value.error == ("HTTP 422: SCHEMA_INVALID: the invoice does not conform to the UBL 2.1 schema "
                                  "(line 1: unexpected element; line 2: unexpected element; line 3: unexpected element)")


async def test_a_refusal_that_is_not_another_gateways_is_kept_as_text(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)
    partner.default = (403, "forbidden\nby the proxy", {})
    outbound.register(partner.url)
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender().send(job(), DOCUMENT)
    assert (failed.value.permanent, failed.value.error) == (True, "HTTP 403: forbidden by the proxy")


async def test_a_busy_partner_is_retried_when_it_asks(outbound: Outbound, start_erp: StartErp) -> None:
    partner = await start_erp(mtls=True)
    partner.default = (503, json.dumps({"error": "UNAVAILABLE", "message": "shedding load"}), {"Retry-After": "30"})
    outbound.register(partner.url)
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender().send(job(), DOCUMENT)
    assert (failed.value.permanent, failed.value.retry_after) == (False, 30.0)
    assert failed.value.error == "HTTP 503: UNAVAILABLE: shedding load"


async def test_a_partner_without_an_endpoint_waits_for_one(outbound: Outbound) -> None:
    outbound.register()
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender().send(job(), DOCUMENT)
    assert not failed.value.permanent  # retried until the horizon: the operator may register the endpoint meanwhile
    assert failed.value.error == "partner 'buyer-b' has no endpoint registered (partners edit buyer-b --endpoint URL)"


@pytest.mark.parametrize("status,command", [(PartnerStatus.SUSPENDED, "partners resume"),
                                            (PartnerStatus.PENDING, "partners activate")])
async def test_a_partner_that_is_not_active_gets_nothing_yet(outbound: Outbound, start_erp: StartErp, status: PartnerStatus,
                                                              command: str) -> None:
    partner = await start_erp(mtls=True)
    outbound.register(partner.url)
    outbound.change(status=status)
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender().send(job(), DOCUMENT)
    assert not failed.value.permanent
    assert failed.value.error == f"partner 'buyer-b' is {status.value}; retried until the horizon ({command} buyer-b)"
    assert partner.seen == []


# --- partners whose endpoint is mailto: --------------------------------------------------------------------


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


class NoMail:
    """The mailer, for partners that are refused before a message is made: reaching it fails the test."""

    async def send_invoice(self, *args: object) -> str:
        pytest.fail("no message may be sent to this partner")


def smime_certificate(o: Outbound, name: str, **kw: Any) -> devpki.Issued:
    """An S/MIME certificate of the partner, with an RSA key (mail can be encrypted to it)."""
    return devpki.issue(o.pki.ca, o.file.parent, name, role="smime", key_kind="rsa2048", emails=(BUYER_EMAIL,), **kw)


async def test_a_mailto_partner_waits_for_a_smarthost(outbound: Outbound) -> None:
    outbound.register(f"mailto:{BUYER_EMAIL}", smime_certs=[smime_certificate(outbound, "buyer-smime").cert])
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender(mailer=lambda: None).send(job(), DOCUMENT)
    assert not failed.value.permanent  # a reload may configure [smarthost] before the horizon
    assert failed.value.error.startswith("partner 'buyer-b' receives invoices by e-mail and there is no [smarthost]")


async def test_a_mailto_partner_whose_certificate_expired_waits_for_its_new_one(outbound: Outbound) -> None:
    now = datetime.now(UTC)
    expired = smime_certificate(outbound, "buyer-smime-old", not_before=now - timedelta(days=400),
                                not_after=now - timedelta(days=1))
    outbound.register(f"mailto:{BUYER_EMAIL}", smime_certs=[expired.cert])
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender(mailer=NoMail).send(job(), DOCUMENT)
    assert not failed.value.permanent
    until = x509.load_pem_x509_certificate(expired.cert.read_bytes()).not_valid_after_utc.date()
    assert failed.value.error == (f"partner 'buyer-b': its S/MIME certificate expired on {until}; register its new one "
                                  "(partners edit buyer-b --smime-cert PEM)")


async def test_a_mailto_partner_whose_certificate_is_not_accepted_yet_waits(outbound: Outbound) -> None:
    """Its only S/MIME certificate is registered for a rollover that has not begun: nothing to encrypt to yet."""
    outbound.register(f"mailto:{BUYER_EMAIL}", smime_certs=[smime_certificate(outbound, "buyer-smime-next").cert])
    [registered] = outbound.book.current.partners
    [spki] = registered.smime_spki
    outbound.change(windows=(CertWindow("smime", registered.smime_certs[0], spki, start=datetime.now(UTC) + timedelta(days=30)),))
    with pytest.raises(DeliveryFailed) as failed:
        await outbound.sender(mailer=NoMail).send(job(), DOCUMENT)
    assert not failed.value.permanent
    assert failed.value.error == ("partner 'buyer-b' has no S/MIME certificate with an RSA key to encrypt to "
                                  "(partners edit buyer-b --smime-cert PEM)")
