"""POST /v1/outbound end to end: two real gateways on 127.0.0.1, A (this business) sending to B (its partner).

``pair`` makes both instances with ``instance.init``: B trusts A's development CA for client
certificates and registers A as partner ``gateway-a`` (A's client certificate, the sample's supplier
identifiers, A's signing certificate, signature policy ``required``); A registers B as partner
``buyer-b`` (the sample's buyer identifier, B's ``/v1/invoices`` as endpoint, ``sign_outbound``),
carries outbound invoices on a ``type = "partner"`` destination and takes submissions on a Unix
socket.  Both run in-process with their delivery loops on (short retry delays), so a submission
travels ERP → A → B → B's ERP inbox folder for real.  ``sender`` is A alone (its partner's endpoint
a closed port), for what never leaves A: refusals, the TCP listener, the socket's mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import shutil
import ssl
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lxml import etree

from gateway import devpki, logs
from gateway.app.gateway import Gateway
from gateway.cli.demo import SAMPLE, samples
from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.model import PartnerStatus, SignaturePolicy
from gateway.operations import instance
from gateway.operations.instance import DEMO_PARTNER, DEMO_PARTY_IDS, Instance
from gateway.partners.book import editing
from gateway.partners.edit import register_partner
from gateway.storage.records import DeliveryRow, MessageSummary
from gateway.tls import client_context, inspect_certificate
from tests.helpers import FOREIGN, HANDSHAKE_FAILED, XML, Running, add_partner, eventually, post, rewrite_config
from tests.helpers.messages import SELLER
from tests.helpers.outbound import Tweak, a_client_cert, closed_port, make_sender, unix_session

# SELLER, the sample's supplier, is "this business" for A; BUYER, the sample's buyer, is partner buyer-b at A.
# FOREIGN is the sample with someone else as the seller.
UNKNOWN_BUYER = "0088:4000008000002"
INVALID = dict(samples())["schema-invalid invoice"]
assert SAMPLE.count(b">4000002000005<") == 1
OTHER_BUYER_DOC = SAMPLE.replace(b">4000002000005<", b">4000008000002<")
DS = "http://www.w3.org/2000/09/xmldsig#"
XSD_INVOICE_ID = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2:Invoice"
XSD_PROPS_ID = "http://uri.etsi.org/01903/v1.3.2#:SignedProperties"
WAIT_S = 15.0


def make_receiver(b: Instance, a: Instance, a_client: devpki.Issued) -> None:
    """Configure ``b`` to take A's invoices: A's CA trusted, A registered (instead of the demo partner,
    which owns the same supplier identifiers) with its signing certificate required."""
    def change(c: dict[str, Any]) -> None:
        c["https"]["client_ca"].append(str(a.ca.cert))
        c.setdefault("rules", {})["processes"] = 1

    rewrite_config(b.config, change)
    with editing(b.partners) as ps:
        ps[:] = [p for p in ps if p.name != DEMO_PARTNER]
    register_partner(b.partners, "gateway-a", [a_client.cert], list(DEMO_PARTY_IDS), [], "pytest", [a.signing.cert],
                     SignaturePolicy.REQUIRED)


def set_partner(book_file: Path, name: str, **changes: Any) -> None:
    with editing(book_file) as ps:
        ps[:] = [dataclasses.replace(p, **changes) if p.name == name else p for p in ps]


@dataclass
class Pair:
    a: Instance
    b: Instance
    ga: Gateway
    gb: Gateway | None  # None while B is down
    b_port: int
    session: aiohttp.ClientSession  # the ERP, on A's Unix socket

    @property
    def b_gw(self) -> Gateway:
        assert self.gb is not None
        return self.gb

    async def submit(self, body: bytes, headers: dict[str, str] = XML) -> tuple[int, dict[str, Any]]:
        status, reply = await post(self.session, body, headers, "http://a/v1/outbound")
        return status, reply

    async def status(self, message_id: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"http://a/v1/outbound/{message_id}") as r:
            return r.status, await r.json()

    async def delivered(self, message_id: str) -> dict[str, Any] | None:
        """A's status of the message, once delivered (for ``eventually``)."""
        _, st = await self.status(message_id)
        return st if st["status"] == "delivered" else None

    async def delivered_at_b(self, n: int = 1) -> list[MessageSummary]:
        """B's messages once n of them reached B's ERP inbox folder."""
        async def check() -> list[MessageSummary] | None:
            rows = await self.b_gw.store.reports.messages(status="delivered")
            return rows if len(rows) >= n else None

        rows: list[MessageSummary] = await eventually(check, f"{n} message(s) delivered at B", WAIT_S)
        return rows

    async def stop_b(self) -> None:
        await self.b_gw.stop()
        self.gb = None

    async def start_b(self) -> None:
        """B again, on the port A's partner entry names."""
        cfg = config_mod.load(self.b.config)
        self.gb = Gateway(dataclasses.replace(cfg, https=dataclasses.replace(cfg.https, port=self.b_port)))
        await self.gb.start()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    logs.configure("warning")
    a, b = instance.init(tmp_path / "a", port=0), instance.init(tmp_path / "b", port=0)
    a_client = a_client_cert(a)
    make_receiver(b, a, a_client)
    gb = Gateway(config_mod.load(b.config))
    await gb.start()
    running: Pair | None = None
    try:
        make_sender(a, a_client, endpoint=f"https://127.0.0.1:{gb.port}/v1/invoices", ca=b.ca.cert)
        ga = Gateway(config_mod.load(a.config))
        await ga.start()
        try:
            async with unix_session(a) as session:
                running = Pair(a, b, ga, gb, gb.port, session)
                yield running
        finally:
            await ga.stop()
    finally:
        b_now = gb if running is None else running.gb  # a test may have stopped (and restarted) B
        if b_now is not None:
            await b_now.stop()


def xmlsec1_verify(document: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(ca), "--id-attr:Id", XSD_INVOICE_ID,
                           "--id-attr:Id", XSD_PROPS_ID, str(document)], capture_output=True, text=True, timeout=30)


# --- delivered to the partner ---------------------------------------------------------------------


async def test_submitted_invoice_is_signed_and_delivered_to_the_partner(pair: Pair) -> None:
    status, body = await pair.submit(SAMPLE)
    assert status == 202, body
    assert body["status"] == "accepted" and body["partner"] == "buyer-b" and body["duplicate"] is False
    message_id = body["message_id"]

    st = await eventually(lambda: pair.delivered(message_id), "A's delivery", WAIT_S)
    assert st["partner"] == "buyer-b"
    assert [(d["destination"], d["status"], d["attempts"]) for d in st["deliveries"]] == [("partners", "delivered", 1)]

    [row] = await pair.delivered_at_b()
    assert row.partner == "gateway-a" and row.direction == "in"
    at_a, at_b = await pair.ga.store.reports.message(message_id), await pair.b_gw.store.reports.message(row.message_id)
    assert at_a is not None and at_b is not None
    assert at_a.direction == "out" and at_a.partner == "buyer-b"
    assert at_b.sha256 == at_a.sha256 != hashlib.sha256(SAMPLE).hexdigest()  # the signed document
    # B verified A's signature against A's registered signing certificate (policy required: unsigned is refused)
    assert at_b.signature is not None
    assert at_b.signature["signer_spki_sha256"] == inspect_certificate(pair.a.signing.cert, "signing").spki_sha256
    assert at_a.signature is not None and at_a.signature["signed_by_gateway"] is True

    received = pair.b.delivery_folder / f"{row.message_id}.xml"
    document = received.read_bytes()
    assert hashlib.sha256(document).hexdigest() == at_a.sha256
    [sig] = etree.fromstring(document).iterfind(f".//{{{DS}}}Signature")
    assert etree.QName(sig.getparent()).localname == "SignatureInformation"  # in the UBL extension slot
    if shutil.which("xmlsec1"):  # an independent verifier, trusting A's CA only
        done = xmlsec1_verify(received, pair.a.ca.cert)
        assert done.returncode == 0, done.stderr
        assert "OK" in done.stderr

    code, missing = await pair.status("00000000-0000-4000-8000-000000000000")
    assert (code, missing["error"]) == (404, "NOT_FOUND")


async def test_resubmission_is_the_same_message_and_reaches_the_partner_once(pair: Pair) -> None:
    replies = await asyncio.gather(*(pair.submit(SAMPLE) for _ in range(5)))  # an ERP retrying in a hurry
    assert [status for status, _ in replies] == [202] * 5, replies
    assert len({r["message_id"] for _, r in replies}) == 1
    assert sorted(r["duplicate"] for _, r in replies) == [False] + [True] * 4
    assert {r["partner"] for _, r in replies} == {"buyer-b"}
    await pair.delivered_at_b()
    status, again = await pair.submit(SAMPLE)
    assert status == 202, again
    assert again["message_id"] == replies[0][1]["message_id"]
    assert again["duplicate"] is True and again["partner"] == "buyer-b"
    await asyncio.sleep(0.6)  # more than two polls of A's delivery loop
    assert await pair.ga.store.reports.counts() == {"invoices": 1, "deliveries_delivered": 1}
    assert await pair.b_gw.store.reports.counts() == {"invoices": 1, "deliveries_delivered": 1}
    assert len(list(pair.b.delivery_folder.glob("*.xml"))) == 1


async def test_partner_without_signing_gets_the_submitted_bytes(pair: Pair) -> None:
    set_partner(pair.a.partners, "buyer-b", sign_outbound=False)
    set_partner(pair.b.partners, "gateway-a", signature_policy=SignaturePolicy.IF_PRESENT)
    assert pair.ga.parts.partners.refresh() and pair.b_gw.parts.partners.refresh()
    status, body = await pair.submit(SAMPLE)
    assert status == 202 and body["partner"] == "buyer-b", body
    [row] = await pair.delivered_at_b()
    assert (pair.b.delivery_folder / f"{row.message_id}.xml").read_bytes() == SAMPLE
    at_a, at_b = await pair.ga.store.reports.message(body["message_id"]), await pair.b_gw.store.reports.message(row.message_id)
    assert at_a is not None and at_b is not None
    assert at_a.sha256 == at_b.sha256 == hashlib.sha256(SAMPLE).hexdigest()
    assert at_a.signature is None and at_b.signature is None


# --- the partner refuses, or is away --------------------------------------------------------------


async def test_unsigned_invoice_to_a_partner_requiring_signatures_is_dead_lettered(pair: Pair) -> None:
    """The other half of the proof that B checked A's signature above: without one, B refuses."""
    set_partner(pair.a.partners, "buyer-b", sign_outbound=False)
    assert pair.ga.parts.partners.refresh()
    _, body = await pair.submit(SAMPLE)
    [dead] = await eventually(lambda: pair.ga.store.reports.dead_letters(), "the dead letter", WAIT_S)
    assert dead.message_id == body["message_id"]
    assert dead.error is not None and dead.error.startswith("HTTP 422: SIGNATURE_REQUIRED: "), dead.error
    assert await pair.b_gw.store.reports.counts() == {"invoices": 0}


async def test_partner_refusal_is_dead_lettered_with_its_code(pair: Pair) -> None:
    set_partner(pair.b.partners, "gateway-a", status=PartnerStatus.SUSPENDED)
    assert pair.b_gw.parts.partners.refresh()
    _, body = await pair.submit(SAMPLE)
    message_id = body["message_id"]
    [dead] = await eventually(lambda: pair.ga.store.reports.dead_letters(), "the dead letter", WAIT_S)
    assert dead.message_id == message_id
    assert (dead.destination, dead.partner, dead.direction, dead.attempts) == ("partners", "buyer-b", "out", 1)
    assert dead.error is not None and "HTTP 403" in dead.error and "PARTNER_SUSPENDED" in dead.error, dead.error
    _, st = await pair.status(message_id)
    assert st["status"] == "dead-letter"
    assert await pair.b_gw.store.reports.counts() == {"invoices": 0}

    # B takes A back; the operator requeues: the same signed document goes out and is taken
    set_partner(pair.b.partners, "gateway-a", status=PartnerStatus.ACTIVE)
    assert pair.b_gw.parts.partners.refresh()
    assert await pair.ga.store.outbox.retry(message_id, None, "pytest", requeue=True,
                                            reason="partner resumed us") == ["partners"]
    pair.ga.outbox.wake.set()
    [row] = await pair.delivered_at_b()
    at_a, at_b = await pair.ga.store.reports.message(message_id), await pair.b_gw.store.reports.message(row.message_id)
    assert at_a is not None and at_b is not None and at_b.sha256 == at_a.sha256
    await eventually(lambda: pair.delivered(message_id), "A's delivery after the requeue", WAIT_S)
    assert await pair.ga.store.reports.dead_letters() == []


async def test_partner_down_is_retried_until_it_is_back(pair: Pair) -> None:
    await pair.stop_b()
    _, body = await pair.submit(SAMPLE)
    message_id = body["message_id"]

    async def retried() -> DeliveryRow | None:
        m = await pair.ga.store.reports.message(message_id)
        assert m is not None
        [d] = m.deliveries
        assert d.state == "pending", d
        return d if d.attempts >= 3 else None

    waiting = await eventually(retried, "three failed attempts", WAIT_S)
    assert waiting.last_error and waiting.next_attempt_at
    _, st = await pair.status(message_id)
    assert st["status"] == "accepted" and st["deliveries"][0]["status"] == "pending"

    await pair.start_b()
    await pair.delivered_at_b()
    st = await eventually(lambda: pair.delivered(message_id), "A's delivery after B is back", WAIT_S)
    assert st["deliveries"][0]["attempts"] > waiting.attempts
    assert await pair.ga.store.reports.dead_letters() == []


# --- refusals at the ERP listener (A alone) ---------------------------------------------------------


@dataclass
class Sender:
    inst: Instance
    gw: Gateway

    async def submit(self, body: bytes, headers: dict[str, str] = XML) -> tuple[int, dict[str, Any]]:
        async with unix_session(self.inst) as s:
            answer = await post(s, body, headers, "http://a/v1/outbound")
        assert answer.json is not None, answer.text  # None: not application/json
        return answer.status, answer.json

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with unix_session(self.inst) as s, s.get(f"http://a{path}") as r:
            return r.status, await r.json()


@pytest.fixture
def tweak() -> Tweak | None:
    return None


@pytest.fixture
async def sender(tmp_path: Path, tweak: Tweak | None) -> AsyncIterator[Sender]:
    logs.configure("warning")
    a = instance.init(tmp_path / "a", port=0)
    make_sender(a, a_client_cert(a), endpoint=f"https://127.0.0.1:{closed_port()}/v1/invoices", ca=a.ca.cert,
                tweak=tweak)
    gw = Gateway(config_mod.load(a.config))
    await gw.start()
    try:
        yield Sender(a, gw)
    finally:
        await gw.stop()


def suspend_buyer(s: Sender) -> bytes:
    set_partner(s.inst.partners, "buyer-b", status=PartnerStatus.SUSPENDED)
    return SAMPLE


def buyer_without_endpoint(s: Sender) -> bytes:
    add_partner(s.inst, "buyer-c", [UNKNOWN_BUYER])
    return OTHER_BUYER_DOC


def buyer_of_two_partners(s: Sender) -> bytes:
    """The sample's buyer VAT number (its second buyer identifier) registered for another partner."""
    add_partner(s.inst, "buyer-c", ["NL123456789B01"], endpoint="https://c.example/v1/invoices")
    return SAMPLE


REFUSALS: list[tuple[str, Callable[[Sender], bytes], dict[str, str], int, str]] = [
    ("seller is someone else", lambda s: FOREIGN, XML, 403, "SELLER_NOT_THIS_BUSINESS"),
    ("buyer not registered", lambda s: OTHER_BUYER_DOC, XML, 403, "RECIPIENT_UNKNOWN"),
    ("buyer ids of two partners", buyer_of_two_partners, XML, 403, "RECIPIENT_UNKNOWN"),
    ("recipient suspended", suspend_buyer, XML, 403, "RECIPIENT_SUSPENDED"),
    ("recipient without endpoint", buyer_without_endpoint, XML, 403, "RECIPIENT_NO_ENDPOINT"),
    ("schema-invalid", lambda s: INVALID, XML, 422, "SCHEMA_INVALID"),
    ("not XML", lambda s: b"%PDF-1.7 or so", XML, 400, "MALFORMED_XML"),
    ("wrong content type", lambda s: SAMPLE, {"Content-Type": "application/json"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("no content type", lambda s: SAMPLE, {}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("compressed", lambda s: gzip.compress(SAMPLE), {**XML, "Content-Encoding": "gzip"}, 415, "UNSUPPORTED_ENCODING"),
]


@pytest.mark.parametrize("case,make,headers,status,code", REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refusal_stores_nothing(sender: Sender, case: str, make: Callable[[Sender], bytes], headers: dict[str, str],
                                      status: int, code: str) -> None:
    body = make(sender)
    sender.gw.parts.partners.refresh()
    got, reply = await sender.submit(body, headers)
    assert (got, reply["error"]) == (status, code), reply
    assert reply["message"] and isinstance(reply["details"], list)
    assert await sender.gw.store.reports.messages() == []
    assert await sender.gw.store.reports.counts() == {"invoices": 0}


async def test_seller_refusal_names_what_was_found(sender: Sender) -> None:
    _, reply = await sender.submit(FOREIGN)
    details = " ".join(d["message"] for d in reply["details"])
    assert "0088:4000009000001" in details and SELLER in details, reply


async def test_same_number_with_other_content_is_409(sender: Sender) -> None:
    status, first = await sender.submit(SAMPLE)
    assert status == 202, first
    changed = SAMPLE.replace(b"Sample invoice shipped", b"Corrected invoice shipped")
    assert changed != SAMPLE
    status, reply = await sender.submit(changed)
    assert (status, reply["error"]) == (409, "DUPLICATE_CONFLICT"), reply
    assert [m.message_id for m in await sender.gw.store.reports.messages()] == [first["message_id"]]


@pytest.mark.parametrize("change", [{"status": PartnerStatus.SUSPENDED}, {"endpoint": ""}], ids=["suspended", "no endpoint"])
async def test_resubmission_after_the_recipient_changed_is_still_the_duplicate(sender: Sender, change: dict[str, Any]) -> None:
    """An ERP that lost the 202 and sends again must learn that the invoice was accepted (and perhaps delivered)."""
    status, first = await sender.submit(SAMPLE)
    assert status == 202, first
    set_partner(sender.inst.partners, "buyer-b", **change)
    assert sender.gw.parts.partners.refresh()
    status, again = await sender.submit(SAMPLE)
    assert (status, again.get("message_id"), again.get("duplicate")) == (202, first["message_id"], True), again


@pytest.mark.parametrize("tweak", [lambda c: c.pop("signing")], ids=["no [signing] key"])
async def test_signing_partner_without_a_signing_key_is_503(sender: Sender) -> None:
    status, reply = await sender.submit(SAMPLE)
    assert (status, reply["error"]) == (503, "SIGNING_UNAVAILABLE"), reply
    assert await sender.gw.store.reports.counts() == {"invoices": 0}


async def test_outbound_status_shows_outbound_messages_only(sender: Sender) -> None:
    """A message received from a partner is not visible on the ERP's sending listener."""
    async with Running(sender.inst, sender.gw).session() as s:  # the demo partner, on the partner API
        answer = await post(s, SAMPLE)
    assert answer.status == 202, answer.text
    inbound = answer.json["message_id"]
    _, outbound = await sender.submit(SAMPLE)
    status, st = await sender.get(f"/v1/outbound/{outbound['message_id']}")
    assert status == 200 and st["partner"] == "buyer-b" and st["status"] == "accepted", st
    for message_id in (inbound, "x" * 65):
        status, reply = await sender.get(f"/v1/outbound/{message_id}")
        assert (status, reply["error"]) == (404, "NOT_FOUND"), reply
    status, reply = await sender.get("/v1/invoices")
    assert (status, reply["error"]) == (404, "NOT_FOUND")  # the partner API is not served here


# --- the listener itself ----------------------------------------------------------------------------


async def test_unix_socket_has_the_default_mode(sender: Sender) -> None:
    st = (sender.inst.root / "outbound.sock").stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


@pytest.mark.parametrize("tweak", [lambda c: c["outbound"].update(socket_mode="0600")], ids=["0600"])
async def test_unix_socket_has_the_configured_mode(sender: Sender) -> None:
    assert stat.S_IMODE((sender.inst.root / "outbound.sock").stat().st_mode) == 0o600


def _drop_partner_destination(c: dict[str, Any]) -> None:
    c["destinations"] = [d for d in c["destinations"] if d["type"] != "partner"]


BAD_OUTBOUND: list[tuple[str, str, Tweak, str]] = [
    ("world-writable socket", "unix", lambda c: c["outbound"].update(socket_mode="0666"), "outbound.socket_mode: 0666"),
    ("socket mode not octal", "unix", lambda c: c["outbound"].update(socket_mode="rw-rw----"), "outbound.socket_mode"),
    ("no identities", "unix", lambda c: c["outbound"].update(identities=[]), "outbound.identities"),
    ("no partner destination", "unix", _drop_partner_destination, "outbound.destination"),
    ("TCP without client_spki", "tcp", lambda c: None, "outbound.client_spki"),
    ("TCP without client_ca", "tcp", lambda c: c["outbound"].update(client_spki=["ab" * 32], client_ca=[]),
     "outbound.client_ca"),
]


@pytest.mark.parametrize("case,transport,tweak,key", BAD_OUTBOUND, ids=[b[0] for b in BAD_OUTBOUND])
def test_outbound_configuration_errors_name_the_key(tmp_path: Path, case: str, transport: str, tweak: Tweak,
                                                     key: str) -> None:
    a = instance.init(tmp_path / "a", port=0)
    make_sender(a, a_client_cert(a), endpoint="https://b.example/v1/invoices", ca=a.ca.cert, transport=transport,
                tweak=tweak)
    with pytest.raises(ConfigError) as exc:
        config_mod.load(a.config)
    assert exc.value.message.startswith(key), exc.value.message


async def test_tcp_listener_takes_allowlisted_erp_certificates_only(tmp_path: Path) -> None:
    logs.configure("warning")
    a = instance.init(tmp_path / "a", port=0)
    erp = devpki.issue(a.ca, a.root / "pki", "erp", role="client", cn="ERP")
    other = devpki.issue(a.ca, a.root / "pki", "other", role="client", cn="another client of the same CA")
    spki = inspect_certificate(erp.cert, "erp").spki_sha256
    make_sender(a, a_client_cert(a), endpoint=f"https://127.0.0.1:{closed_port()}/v1/invoices", ca=a.ca.cert,
                transport="tcp", tweak=lambda c: c["outbound"].update(client_spki=[spki]))
    gw = Gateway(config_mod.load(a.config))
    await gw.start()
    try:
        assert gw.submit_port and gw.submit_port != gw.port  # port 0: an ephemeral port of its own
        assert not (a.root / "outbound.sock").exists()
        url = f"https://127.0.0.1:{gw.submit_port}"

        async def submit(ctx: ssl.SSLContext) -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                status, reply = await post(s, SAMPLE, path="/v1/outbound")
            return status, reply

        status, body = await submit(client_context(a.ca.cert, erp.cert, erp.key))
        assert status == 202 and body["partner"] == "buyer-b", body
        status, refused = await submit(client_context(a.ca.cert, other.cert, other.key))
        assert (status, refused["error"]) == (403, "SUBMITTER_UNKNOWN"), refused
        assert spki not in refused["message"]  # it names the refused key, not the allowed one
        with pytest.raises(HANDSHAKE_FAILED):
            await submit(client_context(a.ca.cert))
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(
                ssl=client_context(a.ca.cert, other.cert, other.key))) as s, s.get(f"/v1/outbound/{body['message_id']}") as r:
            assert (r.status, (await r.json())["error"]) == (403, "SUBMITTER_UNKNOWN")
        assert [m.message_id for m in await gw.store.reports.messages()] == [body["message_id"]]
    finally:
        await gw.stop()
