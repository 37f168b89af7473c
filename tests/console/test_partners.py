"""The console's partner pages (``/console/partners…``) over the real admin listener on 127.0.0.1.

One gateway for the module (``world``), with the admin listener and the mutual-TLS listener; the demo
partner has sent two invoices (one payee account known, one new and held).  The daemon's periodic
re-read of the partners file is slowed to an hour here, and tests call ``reload()`` (what the watcher
calls) when they need the console to see a change, so that what the console shows before a reload is
deterministic.  Each test logs in its own accounts (``tests.helpers.console.World.person``); forms are posted
as a browser posts them: multipart where the page's form is, with the page's CSRF token and Origin.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway import devpki, logs
from gateway.model import PartnerStatus
from gateway.operations import instance
from gateway.partners.book import load_directory
from gateway.partners.edit import register_partner
from gateway.storage.records import Approval
from gateway.tls import cert_sha256, inspect_certificate
from tests.helpers import FOREIGN, FOREIGN_IDS, free_port, post, serving
from tests.helpers.console import Browser, Page, Person, World, audits, login, set_options
from tests.helpers.daemon import set_admin
from tests.helpers.invoices import DEMO, IBAN_A, IBAN_B, IBAN_C, accepted, invoice

shared = pytest.mark.asyncio(loop_scope="module")
NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)


# --- the world -------------------------------------------------------------------------------------


class PartnerWorld(World):
    @property
    def partners_file(self) -> Path:
        return self.inst.partners

    def reload(self) -> None:
        """What the daemon's watcher does every reload_interval_s."""
        self.running.gw.parts.partners.refresh(force=True)

    def partner(self, name: str) -> Any:
        return load_directory(self.partners_file).get(name)

    def issue(self, name: str, role: str = "client", **kw: Any) -> devpki.Issued:
        return devpki.issue(self.inst.ca, self.inst.root / "pki" / "clients", name, role=role, **kw)

    def register(self, name: str, cert: devpki.Issued, ids: list[str]) -> None:
        """An active partner, as `partners add` makes one."""
        register_partner(self.partners_file, name, [cert.cert], ids, [], "pytest")
        self.reload()

    async def staff(self, prefix: str, *roles: str) -> list[Person]:
        return [await self.person(f"{prefix}-{role}-{i}", role) for i, role in enumerate(roles)]

    def snapshot(self) -> tuple[bytes, list[str]]:
        """The partners file and the stored certificates: what a refused request must leave as it was."""
        return self.partners_file.read_bytes(), sorted(p.name for p in (self.inst.root / "partner-certs").iterdir())




def make_instance(folder: Path) -> instance.Instance:
    inst = instance.init(folder / "gw", port=0)
    set_options(inst.config, console={"login_burst": 1000}, partners={"reload_interval_s": 3600.0})
    set_admin(inst, free_port())
    return inst


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PartnerWorld]:
    inst = make_instance(tmp_path_factory.mktemp("partner-console"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            running = await stack.enter_async_context(serving(inst, "warning", io.StringIO()))
            async with running.session() as s:
                await accepted(s, invoice("PC-0001", iban=IBAN_A))  # the first account: recorded as the seller's own
                await accepted(s, invoice("PC-0002", iban=IBAN_B), status="held")  # a new one: held, under review
            w = PartnerWorld(inst, running, {})
            await w.person("boss", "admin")  # an account exists: no bootstrap account
            yield w
    finally:
        logs.configure("warning")


async def send(b: Browser, path: str, fields: list[tuple[str, str]] | dict[str, str] | None = None,
               files: dict[str, tuple[str, bytes]] | None = None, *, follow: bool = True, csrf: bool = True,
               **kw: Any) -> Page:
    """A multipart form, as the partner pages' forms are sent (enctype multipart/form-data)."""
    form = aiohttp.FormData(default_to_multipart=True)
    for k, v in (fields.items() if isinstance(fields, dict) else fields or []):
        form.add_field(k, v)
    for k, (filename, data) in (files or {}).items():
        form.add_field(k, data, filename=filename, content_type="application/x-x509-ca-cert")
    if csrf:
        form.add_field("csrf", b.csrf)
    async with b.s.post(b.base + path, data=form, allow_redirects=follow, **kw) as r:
        return await b._page(r)


def pem(cert: devpki.Issued) -> str:
    return cert.cert.read_text()


def spki(cert: devpki.Issued) -> str:
    return inspect_certificate(cert.cert, "test").spki_sha256


def sha256(cert: devpki.Issued) -> str:
    return cert_sha256(inspect_certificate(cert.cert, "test").cert)


def colon(cert: devpki.Issued) -> str:
    """The fingerprint as the partner reads it out from `openssl x509 -noout -fingerprint -sha256`."""
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert.cert)],
                         capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    return out.partition("=")[2]


def new_partner_form(name: str, **fields: str) -> dict[str, str]:
    return {"name": name, "party_ids": f"0088:{name}", "emails": "", "endpoint": "",
            "signature_policy": "if-present"} | fields


async def pending_requests(world: PartnerWorld, kind: str, target: str) -> list[Approval]:
    return [a for a in await world.approvals.requests("pending") if a.kind == kind and a.target == target]


async def denied(world: PartnerWorld, who: Person) -> list[dict[str, Any]]:
    return sorted((r for r in await audits(world.store, "console.denied") if r["actor"] == f"console:{who.name}"),
                  key=lambda r: r["seq"])


async def tls_post(world: PartnerWorld, cert: devpki.Issued, body: bytes) -> tuple[int, dict[str, Any]]:
    async with world.running.session(cert.cert, cert.key) as s:
        status, answer = await post(s, body)
    return status, answer


async def add_pending(world: PartnerWorld, b: Browser, name: str, cert: devpki.Issued, **fields: str) -> None:
    page = await send(b, "/console/partners/new", new_partner_form(name, client_pem=pem(cert), **fields), follow=False)
    assert page.status == 303, (page.status, page.error)
    world.reload()


# --- 1. adding a partner -----------------------------------------------------------------------------


@shared
async def test_add_by_upload_is_pending_shortened_and_refused_at_the_gate(world):
    [admin] = await world.staff("add", "admin")
    cert = world.issue("acme-upload")
    async with world.browser() as b:
        await login(b, admin)
        page = await b.get("/console/partners")
        assert page.has("//a[@id='add-partner'][@href='/console/partners/new']")
        page = await b.get("/console/partners/new")
        assert page.has("//form[@id='new-partner'][@enctype='multipart/form-data']//input[@name='client_file'][@type='file']")
        page = await send(b, "/console/partners/new",
                          new_partner_form("acme-upload", party_ids="0088:5790000435975\r\n\r\nDE111111111\r\n",
                                           emails="billing@acme.example"),
                          {"client_file": ("acme.crt", cert.cert.read_bytes())}, follow=False)
        assert page.status == 303, page.error
        assert page.location.startswith("/console/partners/acme-upload?done=added")

        p = world.partner("acme-upload")
        assert (p.status, p.verified_by, p.verified_at) == (PartnerStatus.PENDING, "", "")
        assert p.client_spki == {spki(cert)} and p.party_ids == {"0088:5790000435975", "DE111111111"}
        assert p.emails == ("billing@acme.example",) and p.smime_certs == () and p.signing_certs == ()
        assert Path(p.client_certs[0]).parent == world.inst.root / "partner-certs"
        [added] = [r for r in await audits(world.store, "partner.added") if r["partner"] == "acme-upload"]
        assert added["actor"] == f"console:{admin.name}"
        assert added["detail"] == {"party_ids": ["0088:5790000435975", "DE111111111"], "status": "pending",
                                   "certificates": ["client"]}

        world.reload()
        page = await b.get("/console/partners/acme-upload")
        assert page.status == 200, page.error
        assert "".join(page.xpath("//dd[@id='partner-state']//text()")).startswith("pending")
        [row] = page.xpath("//table[@id='certificates']/tbody/tr")
        shown = " ".join(row.itertext())
        assert f"{sha256(cert)[:8]}…" in shown and sha256(cert) not in shown and spki(cert) not in shown
        assert page.has("//form[@id='partner-activate']")
        page = await b.get("/console/partners")
        assert page.xpath("//table[@id='partners']//tr[@data-partner='acme-upload']/td[2]/text()") == ["pending"]

    status, body = await tls_post(world, cert, FOREIGN)
    assert (status, body["error"]) == (403, "PARTNER_PENDING"), body


@shared
async def test_add_by_pasting_three_certificates(world):
    [admin] = await world.staff("paste", "admin")
    client, signing = world.issue("acme-pasted"), world.issue("acme-pasted-signing", "signing")
    smime = world.issue("acme-pasted-smime", "smime", emails=("billing@pasted.example",), key_kind="rsa2048")
    async with world.browser() as b:
        await login(b, admin)
        page = await send(b, "/console/partners/new", new_partner_form(
            "acme-pasted", party_ids="0088:4000002000001", emails="billing@pasted.example",
            endpoint="mailto:invoices@pasted.example", signature_policy="required",
            client_pem=pem(client), signing_pem=pem(signing), smime_pem=pem(smime)), follow=False)
        assert page.status == 303, page.error
    p = world.partner("acme-pasted")
    assert p.status is PartnerStatus.PENDING
    assert (p.client_spki, p.signing_spki, p.smime_spki) == ({spki(client)}, {spki(signing)}, {spki(smime)})
    assert (p.endpoint, p.signature_policy.value) == ("mailto:invoices@pasted.example", "required")
    [added] = [r for r in await audits(world.store, "partner.added") if r["partner"] == "acme-pasted"]
    assert added["detail"]["certificates"] == ["client", "signing", "smime"]


async def test_a_certificate_fits_through_the_admin_listener(tmp_path):
    # As the gateway is built (no test patch): an administrator adds a partner with an RSA-2048 certificate,
    # as the browser sends the form (multipart/form-data).
    inst = make_instance(tmp_path)
    cert = devpki.issue(inst.ca, tmp_path / "pki", "acme-rsa", role="client", key_kind="rsa2048")
    try:
        async with serving(inst, "warning", io.StringIO()) as running:
            w = PartnerWorld(inst, running, {})
            admin = await w.person("solo", "admin")
            async with w.browser() as b:
                await login(b, admin)
                page = await send(b, "/console/partners/new", new_partner_form("acme-rsa"),
                                  {"client_file": ("acme.crt", cert.cert.read_bytes())}, follow=False)
                assert page.status == 303, (page.status, page.error)
    finally:
        logs.configure("warning")


@shared
async def test_partner_page_right_after_adding_shows_the_partner(world):
    [admin] = await world.staff("redirect", "admin")
    cert = world.issue("acme-redirect")
    async with world.browser() as b:
        await login(b, admin)
        page = await send(b, "/console/partners/new", new_partner_form("acme-redirect", party_ids="0088:4000003000001",
                                                                       client_pem=pem(cert)))
        assert page.path == "/console/partners/acme-redirect"
        assert page.status == 200, page.error


@shared
async def test_pending_partner_page_does_not_reveal_a_fingerprint_the_approver_could_copy(world):
    [admin] = await world.staff("leak", "admin")
    cert = world.issue("acme-leak")
    async with world.browser() as b:
        await login(b, admin)
        await add_pending(world, b, "acme-leak", cert, party_ids="0088:4000004000001")
        page = await b.get("/console/partners/acme-leak")
        assert page.status == 200, page.error
    html = page.text.lower()
    assert sha256(cert) not in html and colon(cert).lower() not in html
    assert spki(cert) not in html


# --- 2. validation -----------------------------------------------------------------------------------


@shared
async def test_add_validation_errors_name_the_field_and_write_nothing(world, tmp_path):
    [admin] = await world.staff("valid", "admin")
    now = datetime.now(UTC)
    good = pem(world.issue("acme-valid"))
    rsa1024 = pem(world.issue("acme-rsa1024", key_kind="rsa1024"))
    expired = pem(world.issue("acme-expired", not_before=now - 400 * DAY, not_after=now - DAY))
    sha1 = tmp_path / "sha1.crt"
    subprocess.run(["openssl", "req", "-x509", "-sha1", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "sha1.key"),
                    "-out", str(sha1), "-subj", "/CN=acme sha1", "-days", "30"], capture_output=True, check=True, timeout=60)
    smime = pem(world.issue("acme-valid-smime", "smime", emails=("billing@valid.example",)))
    cases: list[tuple[dict[str, str], str]] = [
        ({"name": "bad name!"}, "name:"),
        ({"name": "new"}, "name:"),
        ({"name": ""}, "name:"),
        ({"party_ids": ""}, "party_ids:"),
        ({"party_ids": " \n \n"}, "party_ids:"),
        ({"party_ids": "0088:12\x0134"}, "party_ids[0]:"),
        ({"party_ids": "DE123456789"}, "party_ids: 'DE123456789' is already registered for partner 'demo-supplier'"),
        ({"party_ids": "DE 123.456.789"},  # another form of the same identifier (issue 20, item 3)
         "party_ids: 'DE 123.456.789' is already registered for partner 'demo-supplier' (as 'DE123456789')"),
        ({"emails": "not an address"}, "emails[0]:"),
        ({"endpoint": "ftp://acme.example/"}, "endpoint:"),
        ({"endpoint": "mailto:in@acme.example"}, "endpoint:"),  # no S/MIME certificate to encrypt to
        ({"signature_policy": "sometimes"}, "signature_policy:"),
        ({"signature_policy": "required"}, "signature_policy:"),  # needs a signing certificate
        ({"client_pem": "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"},
         "client (TLS) certificate: the certificate is not a PEM certificate"),
        ({"client_pem": "hello"}, "client (TLS) certificate:"),
        ({"client_pem": rsa1024}, "client (TLS) certificate: the certificate has an RSA key of 1024 bits"),
        ({"client_pem": sha1.read_text()}, "client (TLS) certificate: the certificate is signed with sha1"),
        ({"client_pem": expired}, "client (TLS) certificate: CN=acme-expired,O=einvoice-gateway DEVELOPMENT ONLY expired on"),
        ({"client_pem": pem(world.inst.demo_client)}, "also registered for partner 'demo-supplier'"),
        ({"client_pem": "", "signing_pem": good}, "certificates: a partner needs a client certificate"),
        ({"client_pem": ""}, "certificates: a partner needs a client certificate"),
        ({"client_pem": "", "smime_pem": smime}, "emails: a partner sending by e-mail needs the address"),
        ({"smime_pem": good, "emails": "billing@valid.example"}, "S/MIME certificate: the certificate is not an S/MIME certificate"),
        ({"name": DEMO}, f"a partner named {DEMO!r} exists already"),
    ]
    async with world.browser() as b:
        await login(b, admin)
        before = world.snapshot()
        for change, says in cases:
            page = await send(b, "/console/partners/new", new_partner_form("acme-valid", client_pem=good) | change)
            assert page.status == 400 and says in page.error, (change, page.status, page.error)
            assert page.has("//form[@id='new-partner']"), change  # the form again, to correct
            assert world.snapshot() == before, change
    assert [r for r in await audits(world.store, "partner.added") if r["partner"] in ("acme-valid", DEMO, "new")] == []


# --- 3. activation: four eyes and the fingerprint -----------------------------------------------------------


@shared
async def test_activation_needs_a_second_admin_and_the_right_fingerprints(world):
    alice, bob, olga = await world.staff("act", "admin", "admin", "operator")
    client = world.issue("acme-act")
    smime = world.issue("acme-act-smime", "smime", emails=("billing@act.example",))
    async with world.browser() as a:
        await login(a, alice)
        page = await send(a, "/console/partners/new", new_partner_form(
            "acme-act", party_ids="\n".join(FOREIGN_IDS), emails="billing@act.example", client_pem=pem(client),
            smime_pem=pem(smime)), follow=False)
        assert page.status == 303, page.error
        world.reload()
        page = await a.post("/console/partners/acme-act/activate", {"reason": ""})
        assert page.status == 400 and "give a reason" in page.error
        assert await pending_requests(world, "partner.activate", "acme-act") == []
        page = await a.post("/console/partners/acme-act/activate", {"reason": "contract signed 2026-11-01"}, follow=False)
        assert page.status == 303 and "activation+requested" in page.location
        [req] = await pending_requests(world, "partner.activate", "acme-act")
        assert (req.requested_by, req.reason) == (f"console:{alice.name}", "contract signed 2026-11-01")
        page = await a.post("/console/partners/acme-act/activate", {"reason": "again"})
        assert page.status == 409 and "already waiting" in page.error
        page = await a.get("/console/partners/acme-act")
        assert page.has(f"//p[@data-request='{req.id}']")
        # the requester cannot approve their own request, whatever they type
        page = await a.get("/console/approvals")
        assert not page.has(f"//tr[@data-approval-id='{req.id}']//form[@class='approve']")
        page = await a.post(f"/console/approvals/{req.id}/approve", {"fingerprint1": colon(client),
                                                                         "fingerprint2": colon(smime), "confirmed_with": "me"})
        assert page.status == 403 and "yourself" in page.error
    assert (await world.approvals.get(req.id)).state == "pending"

    right = {"fingerprint1": colon(client), "fingerprint2": colon(smime), "confirmed_with": "phone, Jane Roe of acme"}
    async with world.browser() as o:
        await login(o, olga)
        page = await o.post(f"/console/approvals/{req.id}/approve", right)
        assert page.status == 403 and "partners.manage" in page.error
    assert (await world.approvals.get(req.id)).state == "pending"

    async with world.browser() as bb:
        await login(bb, bob)
        page = await bb.get("/console/approvals")
        form = f"//tr[@data-approval-id='{req.id}']//form[@class='approve']"
        assert page.has(f"{form}//input[@name='fingerprint1']") and page.has(f"{form}//input[@name='fingerprint2']")
        assert not page.has(f"{form}//input[@name='fingerprint3']") and page.has(f"{form}//input[@name='confirmed_with']")
        wrong = colon(client)[:-2] + ("00" if not colon(client).endswith("00") else "11")
        for fields, says in (
            ({}, "say how you confirmed"),
            ({"confirmed_with": "phone"}, "was not confirmed"),
            ({"fingerprint1": colon(client), "fingerprint2": colon(smime)}, "say how you confirmed"),
            ({"fingerprint1": colon(client), "confirmed_with": "phone"}, "was not confirmed"),
            ({"fingerprint1": wrong, "fingerprint2": colon(smime), "confirmed_with": "phone"},
             "is not the fingerprint of any of these certificates"),
            ({"fingerprint1": colon(client)[:47], "fingerprint2": colon(smime), "confirmed_with": "phone"}, "not approved"),
        ):
            page = await bb.post(f"/console/approvals/{req.id}/approve", fields)
            assert page.status == 422 and says in page.error, (fields, page.status, page.error)
            assert (await world.approvals.get(req.id)).state == "pending"
            assert world.partner("acme-act").status is PartnerStatus.PENDING
        # the right ones, in either order, one as the key's SHA-256 in lower case
        page = await bb.post(f"/console/approvals/{req.id}/approve",
                             right | {"fingerprint1": colon(smime), "fingerprint2": spki(client)}, follow=False)
        assert page.status == 303 and page.location.startswith("/console/approvals?done=approved"), page.error
    decided = await world.approvals.get(req.id)
    assert (decided.state, decided.decided_by, decided.outcome) == ("approved", f"console:{bob.name}", "activated")
    p = world.partner("acme-act")
    assert p.status is PartnerStatus.ACTIVE
    assert p.verified_by.startswith(f"console:{bob.name}") and "phone, Jane Roe of acme" in p.verified_by
    assert f"requested by console:{alice.name}" in p.verified_by
    assert abs(datetime.strptime(p.verified_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    [rec] = [r for r in await audits(world.store, "partner.activated") if r["partner"] == "acme-act"]
    assert rec["actor"] == f"console:{bob.name}"
    assert (rec["detail"]["confirmed"], rec["detail"]["request"]) == ("phone, Jane Roe of acme", req.id)
    # every refusal is on record, by whom and where
    assert [r["detail"]["path"] for r in await denied(world, alice)] == [f"/console/approvals/{req.id}/approve"]
    assert [r["detail"]["path"] for r in await denied(world, olga)] == [f"/console/approvals/{req.id}/approve"]
    assert len(await denied(world, bob)) == 6 and all("approve" in r["detail"]["path"] for r in await denied(world, bob))

    world.reload()
    status, body = await tls_post(world, client, FOREIGN)  # its own invoice, now accepted
    assert (status, body.get("status")) == (202, "accepted"), body


@shared
async def test_operator_is_refused_before_any_fingerprint_check(world):
    # Whatever the operator types: 403 for the role, never 422 with the certificate's subject and key prefix.
    alice, olga = await world.staff("act-op", "admin", "operator")
    client = world.issue("acme-act-op")
    async with world.browser() as a:
        await login(a, alice)
        await add_pending(world, a, "acme-act-op", client, party_ids="0088:4000005000001")
        page = await a.post("/console/partners/acme-act-op/activate", {"reason": "new supplier"}, follow=False)
        assert page.status == 303
    [req] = await pending_requests(world, "partner.activate", "acme-act-op")
    async with world.browser() as o:
        await login(o, olga)
        for fields in ({}, {"fingerprint1": "00" * 32, "confirmed_with": "phone"}):
            page = await o.post(f"/console/approvals/{req.id}/approve", fields)
            assert page.status == 403 and "partners.manage" in page.error, (page.status, page.error)
            assert "CN=" not in page.error and spki(client)[:16] not in page.error
    assert (await world.approvals.get(req.id)).state == "pending"
    assert [r["detail"]["path"] for r in await denied(world, olga)] == [f"/console/approvals/{req.id}/approve"] * 2


@shared
async def test_suspend_and_resume_do_not_activate_a_pending_partner(world):
    [alice] = await world.staff("bypass", "admin")
    cert = world.issue("acme-bypass")
    async with world.browser() as a:
        await login(a, alice)
        await add_pending(world, a, "acme-bypass", cert, party_ids="0088:4000006000001")
        await a.post("/console/partners/acme-bypass/suspend", {"reason": "pause"})
        world.reload()
        await a.post("/console/partners/acme-bypass/resume", {"reason": "go"})
    world.reload()
    assert world.partner("acme-bypass").status is not PartnerStatus.ACTIVE
    status, body = await tls_post(world, cert, FOREIGN)
    assert status == 403, body


@shared
async def test_audit_page_does_not_reveal_the_fingerprints_to_confirm(world):
    alice, bob = await world.staff("audit-leak", "admin", "admin")
    cert = world.issue("acme-audit-leak")
    async with world.browser() as a:
        await login(a, alice)
        await add_pending(world, a, "acme-audit-leak", cert, party_ids="0088:4000007000001")
        page = await a.post("/console/partners/acme-audit-leak/activate", {"reason": "new supplier"}, follow=False)
        assert page.status == 303
    async with world.browser() as bb:
        await login(bb, bob)
        page = await bb.get("/console/audit?partner=acme-audit-leak")
        assert page.status == 200 and page.has("//table")
    html = page.text.lower()
    assert spki(cert) not in html and sha256(cert) not in html


# --- 4. certificate changes ----------------------------------------------------------------------------------


@shared
async def test_certificate_rollover_and_removal_need_a_second_admin(world):
    alice, bob = await world.staff("roll", "admin", "admin")
    old, new = world.issue("roll-old"), world.issue("roll-new")
    world.register("roll", old, ["0088:4000008000001"])
    start, retire = (NOW + 10 * DAY).date().isoformat(), (NOW + 20 * DAY).date().isoformat()
    path = "/console/partners/roll/certificates"
    async with world.browser() as a:
        await login(a, alice)
        page = await a.get("/console/partners/roll")
        assert page.has(f"//form[@id='partner-certificates']//input[@name='retire_{spki(old)[:16]}']")
        before = world.snapshot()
        for fields, files, says in (
            ({"purpose": "client", "reason": "x"}, {}, "nothing to change"),
            ({"purpose": "tls", "new_pem": pem(new), "reason": "x"}, {}, "purpose:"),
            ({"purpose": "client", "new_pem": pem(old), "reason": "x"}, {}, "registered for 'roll' already"),
            ({"purpose": "client", "new_pem": "junk", "reason": "x"}, {}, "client (TLS) certificate:"),
            ({"purpose": "client", "start": "next week", "reason": "x"}, {"new_file": ("new.crt", new.cert.read_bytes())},
             "start:"),
            ({"purpose": "client", f"retire_{spki(old)[:16]}": "on", "reason": "x"}, {}, "retire_at: give the date"),
            ({"purpose": "client", f"retire_{spki(old)[:16]}": "on", "retire_at": "31.12.2027", "reason": "x"}, {}, "retire_at:"),
            ({"purpose": "client", "new_pem": pem(new), "start": retire, f"retire_{spki(old)[:16]}": "on", "retire_at": start,
              "reason": "x"}, {}, "retire_at: must be later than the new certificate's start"),
            ({"purpose": "client", f"retire_{spki(old)[:16]}": "on", f"remove_{spki(old)[:16]}": "on", "retire_at": retire,
              "reason": "x"}, {}, "either retired at a date or removed now"),
        ):
            page = await send(a, path, fields, files)
            assert page.status == 400 and says in page.error, (fields, page.status, page.error)
        page = await send(a, path, {"purpose": "client", "new_pem": pem(new)})
        assert page.status == 400 and "give a reason" in page.error
        assert world.snapshot() == before and await pending_requests(world, "partner.certificates", "roll") == []

        page = await send(a, path, {"purpose": "client", "start": start, f"retire_{spki(old)[:16]}": "on", "retire_at": retire,
                                    "reason": "the partner's new certificate"},
                          {"new_file": ("roll-new.crt", new.cert.read_bytes())}, follow=False)
        assert page.status == 303 and "certificate+change+requested" in page.location, page.error
        [req] = await pending_requests(world, "partner.certificates", "roll")
        assert req.params["start"] == f"{start}T00:00:00Z"
        assert req.params["retire"] == {spki(old): f"{retire}T00:00:00Z"}
        assert world.snapshot() == before  # nothing changes before the approval
        page = await a.post(f"/console/approvals/{req.id}/approve", {"fingerprint1": colon(new), "confirmed_with": "me"})
        assert page.status == 403

    async with world.browser() as bb:
        await login(bb, bob)
        page = await bb.get("/console/approvals")
        form = f"//tr[@data-approval-id='{req.id}']//form[@class='approve']"
        assert page.has(f"{form}//input[@name='fingerprint1']") and not page.has(f"{form}//input[@name='fingerprint2']")
        page = await bb.post(f"/console/approvals/{req.id}/approve", {"fingerprint1": colon(old), "confirmed_with": "phone"})
        assert page.status == 422 and "not approved" in page.error  # the old certificate's is not the new one's
        page = await bb.post(f"/console/approvals/{req.id}/approve", {"fingerprint1": colon(new),
                                                                          "confirmed_with": "letter of 2026-11-02"},
                             follow=False)
        assert page.status == 303, page.error
    assert (await world.approvals.get(req.id)).outcome == "certificates changed"
    p = world.partner("roll")
    windows = {w.spki_sha256: (w.start, w.end) for w in p.windows}
    assert windows == {spki(new): (datetime.fromisoformat(start).replace(tzinfo=UTC), None),
                       spki(old): (None, datetime.fromisoformat(retire).replace(tzinfo=UTC))}
    assert p.client_spki == {spki(old), spki(new)}
    text = world.partners_file.read_text()
    assert f'from = "{start}T00:00:00Z"' in text and f'until = "{retire}T00:00:00Z"' in text
    [rec] = [r for r in await audits(world.store, "partner.certificates_changed") if r["partner"] == "roll"]
    assert (rec["actor"], rec["detail"]["added"], rec["detail"]["confirmed"]) == \
        (f"console:{bob.name}", spki(new), "letter of 2026-11-02")

    world.reload()
    async with world.browser() as a:
        await login(a, alice)
        page = await a.get("/console/partners/roll")
        states = {row.get("data-spki"): " ".join(row.xpath("td[6]//text()"))
                  for row in page.xpath("//table[@id='certificates']//tr[@data-spki]")}
        assert states == {spki(new)[:16]: f"not yet accepted; from {start}T00:00:00Z",
                          spki(old)[:16]: f"accepted; until {retire}T00:00:00Z"}
        assert sha256(old) in page.text  # an active partner's fingerprints are shown in full

        # removing needs no fingerprint, but still a second person
        page = await send(a, path, {f"remove_{spki(old)[:16]}": "on", "reason": "compromised key"}, follow=False)
        assert page.status == 303, page.error
        [removal] = await pending_requests(world, "partner.certificates", "roll")
        page = await a.post(f"/console/approvals/{removal.id}/approve")
        assert page.status == 403 and "yourself" in page.error
    assert world.partner("roll").client_spki == {spki(old), spki(new)}
    async with world.browser() as bb:
        await login(bb, bob)
        page = await bb.get("/console/approvals")
        form = f"//tr[@data-approval-id='{removal.id}']//form[@class='approve']"
        assert page.has(form) and not page.has(f"{form}//input[@name='fingerprint1']")
        page = await bb.post(f"/console/approvals/{removal.id}/approve", follow=False)
        assert page.status == 303, page.error
    p = world.partner("roll")
    assert p.client_spki == {spki(new)} and [w.spki_sha256 for w in p.windows] == [spki(new)]
    assert [r["actor"] for r in await audits(world.store, "partner.certificates_changed") if r["partner"] == "roll"] == \
        [f"console:{bob.name}"] * 2
    approve = "/console/approvals/{}/approve"
    assert [r["detail"]["path"] for r in await denied(world, alice)] == [approve.format(req.id), approve.format(removal.id)]
    assert [r["detail"]["path"] for r in await denied(world, bob)] == [approve.format(req.id)]  # the wrong fingerprint
    world.reload()
    status, body = await tls_post(world, old, FOREIGN)
    assert (status, body["error"]) == (403, "PARTNER_UNKNOWN")
    status, body = await tls_post(world, new, FOREIGN)
    assert (status, body["error"]) == (403, "CERTIFICATE_NOT_ACTIVE")


# --- 5. bank settings ----------------------------------------------------------------------------------------


@shared
async def test_bank_settings_need_a_second_admin(world):
    alice, bob = await world.staff("bank", "admin", "admin")
    seen = {a.account: a.state for a in await world.store.quarantine.seller_accounts(DEMO)}
    assert seen == {IBAN_A: "known", IBAN_B: "pending"}
    path = f"/console/partners/{DEMO}/bank"
    spaced = " ".join(IBAN_C[i:i + 4] for i in range(0, len(IBAN_C), 4)).lower()
    async with world.browser() as a:
        await login(a, alice)
        page = await a.get(f"/console/partners/{DEMO}")
        assert page.has(f"//form[@id='partner-bank']//input[@name='block_{IBAN_B}']")
        before = world.snapshot()
        for fields, says in (
            ({"known": "NL91ABNA0417164301", "reason": "x"}, "fails the IBAN check digits"),
            ({"known": "NL91 ABNA 0417 1643 01", "reason": "x"}, "fails the IBAN check digits"),
            ({"known": "12-34", "reason": "x"}, "is not an account number"),
            ({"ceilings": "EUR1000", "reason": "x"}, "ceilings[0]:"),
            ({"ceilings": "EUR:-5", "reason": "x"}, "ceilings[0]:"),
            ({"known": IBAN_B, f"block_{IBAN_B}": "on", "reason": "x"}, "either registered or blocked"),
            ({"reason": "x"}, "nothing to change"),
        ):
            page = await a.post(path, fields)
            assert page.status == 400 and says in page.error, (fields, page.status, page.error)
        page = await a.post(path, {"ceilings": "EUR:1000"})
        assert page.status == 400 and "give a reason" in page.error
        assert world.snapshot() == before and await pending_requests(world, "partner.bank", DEMO) == []

        page = await a.post(path, {"ceilings": "EUR:1000", "known": spaced, f"block_{IBAN_B}": "on",
                                   "reason": "bank letter of 2026-11-03"}, follow=False)
        assert page.status == 303 and "bank+settings+change+requested" in page.location, page.error
        [req] = await pending_requests(world, "partner.bank", DEMO)
        assert req.params == {"ceilings": ["EUR:1000"], "known": [IBAN_C], "blocked": [IBAN_B]}
        page = await a.post(f"/console/approvals/{req.id}/approve")
        assert page.status == 403
    assert world.partner(DEMO).amount_ceilings == ()
    async with world.browser() as bb:
        await login(bb, bob)
        page = await bb.get("/console/approvals")
        assert not page.has(f"//tr[@data-approval-id='{req.id}']//input[@name='fingerprint1']")
        page = await bb.post(f"/console/approvals/{req.id}/approve", follow=False)
        assert page.status == 303, page.error
    assert (await world.approvals.get(req.id)).outcome == "bank settings changed"
    assert world.partner(DEMO).amount_ceilings == (("EUR", Decimal("1000")),)
    assert {a.account: a.state for a in await world.store.quarantine.seller_accounts(DEMO)} == \
        {IBAN_A: "known", IBAN_B: "rejected", IBAN_C: "known"}
    [rec] = [r for r in await audits(world.store, "account.registered") if r["actor"] == f"console:{bob.name}"]
    assert rec["actor"] == f"console:{bob.name}" and rec["partner"] == DEMO
    assert len(rec["detail"]["known"]) == 1 and len(rec["detail"]["blocked"]) == 1
    assert f"requested by console:{alice.name}" in rec["detail"]["note"]
    world.reload()
    async with world.browser() as a:
        await login(a, alice)
        page = await a.get(f"/console/partners/{DEMO}")
        assert page.xpath(f"//table[@id='accounts']//tr[@data-account='{IBAN_B}']/td[2]/text()") == ["blocked"]
        assert page.xpath(f"//table[@id='accounts']//tr[@data-account='{IBAN_C}']/td[2]/text()") == ["the partner's own"]


# --- 6. direct edits ------------------------------------------------------------------------------------------


@shared
async def test_edit_is_direct_and_audited(world):
    [alice] = await world.staff("edit", "admin")
    world.register("editme", world.issue("editme"), ["0088:4000009900001"])
    path = "/console/partners/editme/edit"
    form = {"party_ids": "0088:4000009900001", "emails": "", "endpoint": "", "signature_policy": "if-present"}
    async with world.browser() as a:
        await login(a, alice)
        before = world.snapshot()
        for change, says in (
            ({"endpoint": "ftp://editme.example/in"}, "endpoint: 'ftp://editme.example/in' is neither"),
            ({"endpoint": "https://user@editme.example/"}, "endpoint:"),
            ({"endpoint": "mailto:in@editme.example"}, "endpoint:"),  # no S/MIME certificate to encrypt to
            ({"party_ids": ""}, "party_ids:"),
            ({"party_ids": "DE123456789"}, "already registered for partner 'demo-supplier'"),
            ({"party_ids": "9930:123456789"}, "already registered for partner 'demo-supplier' (as 'DE123456789')"),
            ({"emails": "nobody"}, "emails[0]:"),
            ({"signature_policy": "always"}, "signature_policy:"),
            ({"signature_policy": "required"}, "signature_policy:"),
        ):
            page = await a.post(path, form | change)
            assert page.status == 400 and says in page.error, (change, page.status, page.error)
            assert page.has("//form[@id='partner-edit']")
        assert world.snapshot() == before

        page = await a.post(path, {"party_ids": "0088:4000009900001\n0088:4000009900002", "emails": "a@editme.example\n"
                                   "B@editme.example\na@editme.example", "endpoint": "https://gw.editme.example/v1/invoices",
                                   "signature_policy": "ignore"}, follow=False)
        assert page.status == 303 and "saved" in page.location, page.error
    p = world.partner("editme")
    assert p.party_ids == {"0088:4000009900001", "0088:4000009900002"}
    assert p.emails == ("a@editme.example", "b@editme.example")
    assert (p.endpoint, p.signature_policy.value, p.status) == ("https://gw.editme.example/v1/invoices", "ignore",
                                                                PartnerStatus.ACTIVE)
    [rec] = [r for r in await audits(world.store, "partner.edited") if r["partner"] == "editme"]
    assert rec["actor"] == f"console:{alice.name}"
    assert sorted(rec["detail"]["changed"]) == ["emails", "endpoint", "party_ids", "signature_policy"]


# --- 7. permissions, fresh authentication, CSRF ---------------------------------------------------------------


PARTNER_POSTS = ["/console/partners/new", f"/console/partners/{DEMO}/edit", f"/console/partners/{DEMO}/certificates",
                 f"/console/partners/{DEMO}/bank", f"/console/partners/{DEMO}/activate", f"/console/partners/{DEMO}/suspend",
                 f"/console/partners/{DEMO}/resume"]


@shared
async def test_auditor_and_operator_are_refused_every_partner_post(world):
    people = await world.staff("noperm", "auditor", "operator")
    cert = world.issue("noperm")
    fields = {"name": "sneaky", "party_ids": "0088:4000009800001", "client_pem": pem(cert), "emails": "",
              "endpoint": "https://evil.example/", "signature_policy": "ignore", "purpose": "client", "new_pem": pem(cert),
              "ceilings": "EUR:1", "known": IBAN_C, "reason": "because"}
    before = world.snapshot()
    for who in people:
        async with world.browser() as b:
            await login(b, who)
            page = await b.get("/console/partners")
            assert page.status == 200 and not page.has("//a[@id='add-partner']")
            page = await b.get(f"/console/partners/{DEMO}")
            assert page.status == 200 and not page.has("//form[starts-with(@action, '/console/partners/')]")
            page = await b.get("/console/partners/new")
            assert page.status == 403
            for path in PARTNER_POSTS:
                page = await send(b, path, fields)
                assert page.status == 403 and "does not allow" in page.error, (who.name, path, page.status)
        assert [r["detail"]["path"] for r in await denied(world, who)] == ["/console/partners/new", *PARTNER_POSTS]
        assert all(r["detail"]["method"] == "POST" for r in (await denied(world, who))[1:])
    assert world.snapshot() == before
    assert [a for a in await world.approvals.requests("pending") if a.requested_by in {f"console:{p.name}" for p in people}] == []
    assert world.partner(DEMO).status is PartnerStatus.ACTIVE


@shared
async def test_partner_posts_need_fresh_authentication_and_csrf(world):
    [alice] = await world.staff("fresh", "admin")
    cert = world.issue("fresh")
    fields = new_partner_form("acme-fresh", client_pem=pem(cert)) | {"reason": "because", "ceilings": "EUR:5"}
    before = world.snapshot()
    async with world.browser() as b:
        await login(b, alice)
        # without the form's token: refused and audited
        for path in PARTNER_POSTS:
            page = await send(b, path, fields, csrf=False)
            assert page.status == 403 and "CSRF" in page.error, path
        page = await send(b, "/console/partners/new", fields | {"csrf": "forged"}, csrf=False)
        assert page.status == 403 and "CSRF" in page.error
        assert [r["detail"]["path"] for r in await denied(world, alice)] == [*PARTNER_POSTS, "/console/partners/new"]
        assert all("CSRF" in r["detail"]["reason"] for r in await denied(world, alice))

        # ten minutes after the login: back to the password and a code
        await world.sql("UPDATE console_sessions SET auth_at = auth_at - 600 WHERE id_hash = ?", (await world.session_of(b)).id_hash)
        for path in PARTNER_POSTS:
            page = await send(b, path, fields, follow=False, headers={"Referer": world.base + f"/console/partners/{DEMO}"})
            assert page.status == 303 and page.location == f"/console/reauth?next=/console/partners/{DEMO}", (path, page.location)
    assert world.snapshot() == before
    assert world.partner("acme-fresh") is None
    assert [a for a in await world.approvals.requests("pending") if a.requested_by == f"console:{alice.name}"] == []
