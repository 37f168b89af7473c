"""The admin console in a real browser (Debian chromium through Playwright), against a real gateway.

Each test starts a fresh instance in-process (the admin listener serves /console/ on a free loopback
port), makes its users with the CLI (``users add``), and logs them in through the pages.  What the
pages show is checked together with what really happened: the store (quarantine, deliveries), the
ERP stub or the delivery folder, and the audit log.

Logins, second factors and the back-off after failed logins; passkeys through a CDP virtual authenticator; CSRF and Origin
checks; the auditor's read-only role; four-eyes quarantine release; dead-letter requeue; and the
screenshots of the main pages (docs/screenshots/ with EGW_SCREENSHOTS=1, else a temporary folder).
"""

from __future__ import annotations

import asyncio
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp.web_request import BaseRequest

from gateway.cli.demo import SAMPLE
from tests.helpers import ROOT, eventually, post
from tests.helpers.browser import (
    MISSING,
    WAIT_S,
    Console,
    StartConsole,
    StartErp,
    User,
    add_authenticator,
    browser_post,
    change_password,
    click_nav,
    csrf_token,
    enrol,
    enter_recovery,
    enter_totp,
    error_text,
    expect,
    first_status,
    form_of,
    https_destination,
    login,
    logout,
    on_mfa,
    open_page,
    passkey_login,
    path_of,
    reauth_if_asked,
    session_cookie,
    sign_in,
    submit,
)
from tests.helpers.invoices import IBAN_B, accepted, delivered, invoice
from tests.helpers.messages import REFUSED_BUYER, REFUSED_DOC, merge_config

if TYPE_CHECKING:
    from playwright.async_api import Page

if MISSING:
    pytest.skip(MISSING, allow_module_level=True)

pytestmark = pytest.mark.asyncio(loop_scope="module")

WRONG = "wrong user name or password"
EVIL = "http://evil.example"


async def held_invoice(console: Console, number: str = "HELD-0001") -> str:
    """An invoice held for review: the demo partner's usual account first, then a new one."""
    async with console.running.session() as s:
        await accepted(s, invoice(f"{number}-K"))
        return await accepted(s, invoice(number, iban=IBAN_B), status="held")


async def quarantine_state(console: Console, message_id: str) -> str:
    entry = await console.store.quarantine.entry(message_id)
    assert entry is not None, message_id
    return str(entry.state)


async def denied(console: Console, user: User) -> int:
    return len(await console.audit("console.denied", actor=user.name))


async def approval_ids(page: Page) -> list[str]:
    await open_page(page, "/console/approvals")
    rows = page.locator("table#approvals tbody tr[data-approval-id]")
    return [str(await rows.nth(i).get_attribute("data-approval-id")) for i in range(await rows.count())]


async def request_release(page: Page, message_id: str, note: str) -> None:
    """From the quarantine detail page: ask for a release (four-eyes: an approval request, nothing released)."""
    resp = await open_page(page, f"/console/quarantine/{message_id}")
    assert resp.status == 200
    await page.locator("form#release [name=note]").fill(note)
    resp = await submit(page, "form#release")
    assert resp.ok and await first_status(resp) in (200, 303), f"{resp.status}: {await page.content()}"


# --- logging in -------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_login_with_password_then_totp(console: Console) -> None:
    alice = await console.add_user("alice", "operator")
    page = await console.page()

    resp = await open_page(page, "/console/login")
    assert resp.status == 200
    headers = resp.headers
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "form-action 'self'"):
        assert directive in headers.get("content-security-policy", ""), headers
    assert (headers.get("x-frame-options"), headers.get("x-content-type-options"), headers.get("cache-control")) == \
        ("DENY", "nosniff", "no-store")
    assert any(c["name"] == "egw_login_csrf" for c in await page.context.cookies())

    # First login: password, TOTP enrolment, the forced password change, then the dashboard.
    resp = await sign_in(page, "alice", alice.initial_password)
    assert await first_status(resp) == 303 and path_of(page) == "/console/enroll"
    await enrol(page, alice)
    assert path_of(page) == "/console/password", "a CLI-made user must change the initial password first"
    await page.goto("/console/")  # nothing else before the password is changed
    assert path_of(page) == "/console/password"
    weak = "alice-harbour-lights"  # long enough, but it contains the user name
    for field in ("current", "new", "confirm"):
        await page.locator(f"form#password input[name={field}]").fill(alice.password if field == "current" else weak)
    resp = await submit(page, "form#password")
    assert resp.status >= 400 and await error_text(page), resp.status
    await page.goto("/console/")
    assert path_of(page) == "/console/password"
    await change_password(page, alice)
    if path_of(page) != "/console/":
        await open_page(page, "/console/")
    await expect(page.locator("h1")).to_have_text("Dashboard")
    hrefs = await page.locator("nav a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    for target in ("/console/messages", "/console/dead-letters", "/console/quarantine", "/console/approvals"):
        assert any(h and h.startswith(target) for h in hrefs), hrefs
    cookie = await session_cookie(page)
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Strict", False)

    # Logged out: the session is gone, on the server too (the old cookie opens nothing).
    await logout(page)
    assert path_of(page) == "/console/login"
    await page.goto("/console/")
    assert path_of(page) == "/console/login"
    async with aiohttp.ClientSession() as s, s.get(f"{console.base}/console/messages", allow_redirects=False,
                                                   headers={"Cookie": f"egw_console={cookie['value']}"}) as r:
        assert r.status == 303 and r.headers["Location"].startswith("/console/login"), r.status

    # The initial password is no longer accepted; the new one leads to the second factor (no enrolment again).
    resp = await sign_in(page, "alice", alice.initial_password)
    assert resp.status == 401 and WRONG in await error_text(page)
    resp = await sign_in(page, "alice", alice.password)
    assert path_of(page) == "/console/mfa"
    await expect(page.locator("form#totp input[name=code]")).to_be_visible()
    await expect(page.locator("form#recovery input[name=recovery_code]")).to_be_visible()
    await expect(page.locator("button#passkey-login")).to_have_count(0)  # no passkey yet
    await page.goto("/console/messages")  # the password alone opens nothing
    assert path_of(page) in ("/console/login", "/console/mfa")

    await open_page(page, "/console/mfa")
    resp = await enter_totp(page, alice)  # a code of a later step than the enrolment's
    assert await first_status(resp) == 303 and resp.status == 200
    if path_of(page) != "/console/":
        await open_page(page, "/console/")
    await expect(page.locator("h1")).to_have_text("Dashboard")
    resp = await open_page(page, "/console/messages")
    assert resp.status == 200
    await expect(page.locator("table#messages")).to_be_visible()
    logins = await console.audit("console.login", actor="alice")
    assert logins and logins[0]["detail"]["method"] == "totp", logins
    assert await console.audit("console.mfa_enrolled", actor="alice")


async def test_a_browser_login_raises_no_warnings(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warnings are errors under this project's filterwarnings: a request that raises one is a 500 or a dropped
    connection.  aiohttp warns about str request-storage keys once per key and process, hence the reset."""
    monkeypatch.setattr(BaseRequest, "_seen_str_keys", set())  # as in a fresh gateway process
    mia = await console.add_user("mia", "auditor")
    page = await console.page()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await login(page, mia)
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []


@pytest.mark.slow
async def test_reused_totp_code_is_refused(console: Console) -> None:
    bob = await console.add_user("bob", "operator")
    page = await console.page()
    await login(page, bob)  # enrolment used the code of step bob.last_step
    used = bob.code_at(bob.last_step)
    await logout(page)

    await sign_in(page, "bob", bob.password)
    assert path_of(page) == "/console/mfa"
    resp = await enter_totp(page, bob, used)
    assert resp.status == 401 and "already used" in await error_text(page)
    assert on_mfa(page)
    resp = await enter_totp(page, bob, bob.code_at(bob.last_step - 1))  # an earlier step: refused the same way
    assert resp.status == 401 and "already used" in await error_text(page)
    assert len(await console.audit("console.login_failed", actor="bob")) == 2
    await page.goto("/console/")
    assert path_of(page) in ("/console/login", "/console/mfa")

    # A recovery code still works (once).
    await open_page(page, "/console/mfa")
    resp = await enter_recovery(page, bob.recovery_codes[0])
    assert resp.ok, await page.content()
    await open_page(page, "/console/")
    await expect(page.locator("h1")).to_have_text("Dashboard")
    await logout(page)
    await sign_in(page, "bob", bob.password)
    resp = await enter_recovery(page, bob.recovery_codes[0])
    assert resp.status == 401 and await error_text(page)
    assert on_mfa(page)
    assert len(await console.audit("console.login", actor="bob")) == 2  # the enrolment's and the recovery code's


@pytest.mark.slow
async def test_failed_logins_make_the_browser_wait_and_never_lock(console: Console) -> None:
    carol = await console.add_user("carol", "operator")
    page = await console.page()
    for i in range(5):
        resp = await sign_in(page, "carol", f"not-the-password-{i}")
        text = await error_text(page)
        assert "too many" not in text, f"attempt {i + 1}: the address limit came before the account's back-off"
        assert resp.status == 401 and WRONG in text, (i, resp.status, text)
    wrong = await error_text(page)
    failed = await console.audit("console.login_failed", actor="carol")
    assert [r["detail"]["reason"] for r in failed] == ["wrong-password"] * 5

    # Now this address must wait: even the right password gets the answer of a wrong one, and no session.
    resp = await sign_in(page, "carol", carol.password)
    assert resp.status == 401 and await error_text(page) == wrong
    assert path_of(page) == "/console/login"
    assert "egw_console" not in {c["name"] for c in await page.context.cookies()}
    await page.goto("/console/enroll")
    assert path_of(page) == "/console/login"
    failed = await console.audit("console.login_failed", actor="carol")
    assert len(failed) == 6 and sum(r["detail"]["reason"] == "throttled" for r in failed) == 1  # audited, not counted
    assert await console.audit("console.user_locked") == []  # there is no lock

    # The break-glass path on the host forgets the failures (audited): the right password works again at once.
    code, out = await console.cli("users", "unlock", "carol")
    assert code == 0, out
    assert [r for r in await console.audit() if r["actor"].startswith("cli:") and "carol" in str(r)], "unlock not audited"
    resp = await sign_in(page, "carol", carol.password)
    assert resp.ok and path_of(page) == "/console/enroll"


# --- passkeys -----------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_passkey_registration_and_login(console: Console) -> None:
    dave = await console.add_user("dave", "operator")
    page = await console.page()
    authenticator = await add_authenticator(page)
    await login(page, dave)

    await open_page(page, "/console/account")
    await expect(page.locator("table#passkeys tbody tr form")).to_have_count(0)
    await page.locator("button#passkey-register").click()
    await reauth_if_asked(page, dave)
    creds: list[dict[str, Any]] = await eventually(authenticator.credentials, "a credential in the authenticator", 10.0)
    [cred] = creds
    assert cred["rpId"] == "localhost" and cred["isResidentCredential"] is True, cred
    # The gateway stored it too (not only the authenticator): audited, listed, and offered at the next login.
    async def passkey_audited() -> bool:
        return bool(await console.audit("console.passkey_added", actor="dave"))

    await eventually(passkey_audited, "passkey registration audited", 10.0)
    await expect(page.locator("#passkey-error")).to_be_hidden()
    await open_page(page, "/console/account")
    await expect(page.locator("table#passkeys tbody tr form")).to_have_count(1)
    await logout(page)

    await sign_in(page, "dave", dave.password)
    assert path_of(page) == "/console/mfa"
    await expect(page.locator("button#passkey-login")).to_be_visible()
    await passkey_login(page)
    if path_of(page) != "/console/":
        await open_page(page, "/console/")
    await expect(page.locator("h1")).to_have_text("Dashboard")
    [after] = await authenticator.credentials()
    assert after["signCount"] > cred["signCount"]  # the authenticator really signed the login challenge
    login_record = (await console.audit("console.login", actor="dave"))[0]
    assert "passkey" in login_record["detail"]["method"], login_record
    resp = await open_page(page, "/console/messages")
    assert resp.status == 200


# --- CSRF and Origin -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["no csrf field", "foreign origin", "no origin"])
async def test_forged_posts_are_refused_and_change_nothing(console: Console, attack: str) -> None:
    held = await held_invoice(console)
    page, erin = await console.logged_in("operator", "erin")
    await open_page(page, f"/console/quarantine/{held}")
    url, fields = await form_of(page, "form#reject")
    assert fields.get("csrf") == await csrf_token(page)
    fields["note"] = "looks like fraud"
    forged = dict(fields)
    origin: str | None = "same"
    if attack == "no csrf field":
        del forged["csrf"]
    elif attack == "foreign origin":
        origin = EVIL
    else:
        origin = None

    status, body = await console.replay(page, url, forged, origin=origin)
    assert status == 403, (status, body)
    assert await quarantine_state(console, held) == "held"
    assert await console.audit("quarantine.rejected") == []
    assert await denied(console, erin) == 1
    resp = await open_page(page, "/console/")  # the session itself is untouched
    assert resp.status == 200 and path_of(page) == "/console/"

    # The same request with the token and the console's own Origin goes through: only those were missing.
    status, body = await console.replay(page, url, fields)
    assert status in (200, 303), (status, body)
    assert await quarantine_state(console, held) == "rejected"
    [record] = await console.audit("quarantine.rejected")
    assert "erin" in record["actor"] and record["message_id"] == held


# --- roles --------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_auditor_cannot_change_anything(console: Console) -> None:
    held = await held_invoice(console)
    operator, _ = await console.logged_in("operator", "frank")
    await open_page(operator, f"/console/quarantine/{held}")
    reject_url, _ = await form_of(operator, "form#reject")
    release_url, _ = await form_of(operator, "form#release")
    await request_release(operator, held, "called the supplier")
    [approval] = await approval_ids(operator)

    page, grace = await console.logged_in("auditor", "grace")
    resp = await open_page(page, f"/console/quarantine/{held}")
    assert resp.status == 200  # read access
    await expect(page.locator("table#accounts")).to_contain_text("GB82")
    refusals = 0
    # Forms the auditor's pages show anyway are refused when submitted.
    for path, form in ((f"/console/quarantine/{held}", "form#release"), (f"/console/quarantine/{held}", "form#reject"),
                       ("/console/approvals", f"tr[data-approval-id='{approval}'] form.approve"),
                       ("/console/approvals", f"tr[data-approval-id='{approval}'] form.deny")):
        await open_page(page, path)
        if await page.locator(form).count():
            if await page.locator(f"{form} [name=note]").count():
                await page.locator(f"{form} [name=note]").fill("auditor")
            resp = await submit(page, form)
            assert resp.status == 403 and "role" in await error_text(page), (form, resp.status)
            refusals += 1
    await open_page(page, "/console/approvals")
    await expect(page.locator(f"tr[data-approval-id='{approval}']")).to_have_count(1)  # the auditor sees it
    resp = await open_page(page, "/console/users")  # auditors read the user list, admins manage it
    assert resp.status == 200
    await expect(page.locator("form[action^='/console/users']")).to_have_count(0)

    # The same POSTs the operator's pages make, from the auditor's browser with the auditor's valid token.
    token = await csrf_token(page)
    attempts = [(reject_url, {"note": "auditor"}), (release_url, {"note": "auditor"}),
                (f"/console/approvals/{approval}/approve", {}), (f"/console/approvals/{approval}/deny", {}),
                ("/console/dead-letters", {"action": "requeue", "item": f"{held} erp-inbox", "reason": "auditor"}),
                ("/console/users", {"name": "mallory", "role": "admin"})]
    for url, fields in attempts:
        resp = await browser_post(page, url, {"csrf": token, **fields})
        assert resp.status == 403, (url, resp.status, await page.content())
        assert "role" in await error_text(page), url
        refusals += 1

    assert await quarantine_state(console, held) == "held"
    assert not delivered(console.inst, held)
    assert await approval_ids(operator) == [approval]  # still waiting for a second person
    assert [r["action"] for r in await console.audit() if r["action"].startswith("quarantine.")] == ["quarantine.held"]
    code, out = await console.cli("users", "list", "--json")
    assert code == 0 and "mallory" not in out, out
    assert await denied(console, grace) == refusals


# --- four eyes --------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_quarantine_release_needs_a_second_person(console: Console) -> None:
    held = await held_invoice(console)
    page_a, heidi = await console.logged_in("operator", "heidi")
    await open_page(page_a, "/console/quarantine")
    await expect(page_a.locator(f"table#quarantine tbody tr[data-message-id='{held}']")).to_have_count(1)
    await open_page(page_a, f"/console/quarantine/{held}")
    await expect(page_a.locator("table#accounts")).to_contain_text("GB82")  # the new account, for the reviewer
    await request_release(page_a, held, "confirmed by phone with the supplier")
    assert await quarantine_state(console, held) == "held"  # only a request so far
    [approval] = await approval_ids(page_a)

    # The requester cannot approve their own request (the page offers no approve button; the POST is refused).
    own = page_a.locator(f"tr[data-approval-id='{approval}'] form.approve")
    if await own.count():
        resp = await submit(page_a, f"tr[data-approval-id='{approval}'] form.approve")
    else:
        resp = await browser_post(page_a, f"/console/approvals/{approval}/approve", {"csrf": await csrf_token(page_a)})
    assert resp.status == 403 and "second person" in await error_text(page_a)
    assert await quarantine_state(console, held) == "held"
    assert await denied(console, heidi) == 1
    await asyncio.sleep(0.6)  # more than two passes of the delivery loop
    assert not delivered(console.inst, held)

    # A second operator approves: released and delivered.
    page_b, ivan = await console.logged_in("operator", "ivan")
    assert await approval_ids(page_b) == [approval]
    resp = await submit(page_b, f"tr[data-approval-id='{approval}'] form.approve")
    assert resp.ok and await first_status(resp) == 303, f"{resp.status}: {await page_b.content()}"
    assert await approval_ids(page_b) == []
    async def released() -> bool:
        return await quarantine_state(console, held) == "released"

    async def status_delivered() -> bool:
        status = await console.store.intake.status(held, None)
        assert status is not None, held
        return status.status == "delivered"

    await eventually(released, "released")
    await eventually(lambda: delivered(console.inst, held), "delivered to the ERP inbox")
    await eventually(status_delivered, "status delivered")
    [record] = await console.audit("quarantine.released", message_id=held)
    assert "ivan" in record["actor"] and "heidi" not in record["actor"], record
    assert "heidi" in str(record["detail"]), record  # who asked is on record too


# --- dead letters ------------------------------------------------------------------------------------------------


async def test_dead_letter_requeue_reaches_the_erp(inst, start_console: StartConsole, start_erp: StartErp) -> None:
    erp = await start_erp(inst)
    erp.default = (422, "cost centre missing", {})  # a refusal: dead-lettered at once
    console = await start_console(lambda i: merge_config(i.config, {
        "destinations": [https_destination(i, erp.url)], "routing": {"default": ["erp-api"]}}))
    async with console.running.session() as s:
        mid = await accepted(s, SAMPLE)
    async def dead_lettered() -> bool:
        return [d.message_id for d in await console.store.reports.dead_letters()] == [mid]

    async def redelivered() -> bool:
        found = await console.store.reports.message(mid)
        assert found is not None, mid
        return found.deliveries[0].state == "delivered"

    await eventually(dead_lettered, "dead-lettered")
    assert len(erp.seen) == 1

    page, judy = await console.logged_in("operator", "judy")
    await open_page(page, "/console/dead-letters")
    row = page.locator(f"table#dead-letters tbody tr[data-message-id='{mid}']")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("erp-api")

    erp.default = (200, "booked", {})  # the ERP is fixed
    await page.locator(f"input[name=item][value='{mid} erp-api']").check()
    await page.locator("textarea[name=reason]").fill("cost centre mapping fixed in the ERP")
    resp = await click_nav(page, "button[name=action][value=requeue]")
    assert resp is not None and resp.ok and await first_status(resp) in (200, 303), await page.content()

    await erp.until(lambda: len(erp.seen) >= 2, WAIT_S)
    await eventually(redelivered, "delivered")
    last = erp.seen[-1]
    assert last.body == SAMPLE and last.headers["Idempotency-Key"] == mid
    [record] = await console.audit("delivery.requeued", message_id=mid)
    assert "judy" in record["actor"] and record["detail"]["reason"] == "cost centre mapping fixed in the ERP"
    await open_page(page, "/console/dead-letters")
    await expect(page.locator("table#dead-letters tbody tr[data-message-id]")).to_have_count(0)


# --- screenshots ------------------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
async def test_screenshots_of_the_main_pages(inst, start_console: StartConsole, start_erp: StartErp, tmp_path: Path) -> None:
    folder = ROOT / "docs" / "screenshots" if os.environ.get("EGW_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    erp = await start_erp(inst)
    erp.default = (422, "cost centre missing", {})
    console = await start_console(lambda i: merge_config(i.config, {
        "destinations": [https_destination(i, erp.url)], "routes": [{"receiver": REFUSED_BUYER, "destinations": ["erp-api"]}],
        "routing": {"default": ["erp-inbox"]}}))
    async with console.running.session() as s:
        ok = await accepted(s, SAMPLE)
        dead = await accepted(s, REFUSED_DOC)
        held = await accepted(s, invoice("DEMO-2026-0042", iban=IBAN_B), status="held")
    inbox = console.inst.delivery_folder  # the erp-inbox destination
    async def delivered_and_dead() -> bool:
        return (inbox / f"{ok}.xml").exists() and len(await console.store.reports.dead_letters()) == 1

    await eventually(delivered_and_dead, "delivered and dead")

    shots: list[Path] = []

    async def shot(page: Page, name: str, path: str | None, ready: str) -> None:
        if path is not None:
            resp = await open_page(page, path)
            assert resp.status == 200, (path, resp.status)
        await expect(page.locator(ready).first).to_be_visible()
        target = folder / f"{name}.png"
        await page.screenshot(path=str(target))
        shots.append(target)

    page = await console.page()
    await shot(page, "login", "/console/login", "form#login")
    kim = await console.add_user("kim", "operator")
    await login(page, kim)
    await shot(page, "dashboard", "/console/", "h1")
    await shot(page, "messages", "/console/messages", f"table#messages tbody tr[data-message-id='{dead}']")
    await expect(page.locator("table#messages tbody tr[data-message-id]")).to_have_count(3)
    await shot(page, "message-detail", f"/console/messages/{dead}", "ol#timeline li")
    assert await page.locator("ol#timeline li").count() >= 2  # accepted, then dead-lettered
    await shot(page, "dead-letters", "/console/dead-letters", f"table#dead-letters tbody tr[data-message-id='{dead}']")
    await shot(page, "quarantine-detail", f"/console/quarantine/{held}", "table#accounts")
    await request_release(page, held, "confirmed by phone with the supplier")
    await shot(page, "approvals", "/console/approvals", "table#approvals tbody tr[data-approval-id]")
    auditor, _ = await console.logged_in("auditor", "lee")
    await shot(auditor, "audit", "/console/audit", "form#verify")

    assert [p.name for p in shots] == [f"{n}.png" for n in ("login", "dashboard", "messages", "message-detail",
                                                            "dead-letters", "quarantine-detail", "approvals", "audit")]
    for p in shots:
        assert png_size(p) == (1280, 800), p
        assert p.stat().st_size > 5_000, f"{p} looks empty"


# --- partners: a certificate rollover under four eyes ---------------------------------------------------------------


@pytest.mark.slow
async def test_a_new_partner_certificate_needs_a_second_admin_and_its_fingerprint(console: Console, tmp_path: Path) -> None:
    from gateway.operations.instance import DEMO_PARTNER
    from gateway.tls import cert_sha256, inspect_certificate

    new = console.running.issue_client("demo-next")
    info = inspect_certificate(new.cert, "test")
    spoken = ":".join(cert_sha256(info.cert)[i:i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints it

    async with console.running.session(new.cert, new.key) as s:
        code, reply = await post(s, invoice("ROLL-0001"))
    assert (code, reply["error"]) == (403, "PARTNER_UNKNOWN"), reply

    page_a, _ann = await console.logged_in("admin", "ann")
    await open_page(page_a, f"/console/partners/{DEMO_PARTNER}")
    await page_a.fill("#new_pem", new.cert.read_text())
    await page_a.fill("#cert-reason", "the partner's yearly certificate renewal")
    resp = await submit(page_a, "form#partner-certificates")
    assert await first_status(resp) == 303, await page_a.content()
    await expect(page_a.locator("p.flash[data-request]")).to_contain_text("add a client (TLS) certificate")
    [approval] = await approval_ids(page_a)
    assert not await page_a.locator(f"tr[data-approval-id='{approval}'] form.approve").count()  # not for the requester

    page_b, _bob = await console.logged_in("admin", "bob")
    await open_page(page_b, "/console/approvals")
    row = f"tr[data-approval-id='{approval}']"
    await expect(page_b.locator(row)).to_contain_text("add a client (TLS) certificate")
    await expect(page_b.locator(row)).not_to_contain_text(cert_sha256(info.cert)[:20])  # typed, not copied
    await page_b.fill(f"#fp-{approval}-1", ("1" if spoken[0] != "1" else "2") + spoken[1:])  # one digit wrong
    await page_b.fill(f"#how-{approval}", "phoned the partner's IT contact")
    resp = await submit(page_b, f"{row} form.approve")
    assert resp.status == 422 and "not the fingerprint" in await error_text(page_b)
    assert await approval_ids(page_b) == [approval]  # still waiting

    await open_page(page_b, "/console/approvals")
    await page_b.fill(f"#fp-{approval}-1", spoken)
    await page_b.fill(f"#how-{approval}", "phoned the partner's IT contact, 2026-11-21")
    resp = await submit(page_b, f"{row} form.approve")
    assert await first_status(resp) == 303, await page_b.content()
    [record] = await console.audit("partner.certificates_changed")
    assert "bob" in record["actor"] and "ann" in str(record["detail"]) and record["detail"]["added"] == info.spki_sha256

    async def accepted_with_new() -> bool:
        async with console.running.session(new.cert, new.key) as s:
            code, reply = await post(s, invoice(f"ROLL-{len(await console.audit('invoice.accepted')):04d}"))
        return code == 202

    # the daemon re-reads the partners file within seconds
    await eventually(accepted_with_new, "the new certificate to be accepted", WAIT_S)
    await open_page(page_b, f"/console/partners/{DEMO_PARTNER}")
    await expect(page_b.locator(f"table#certificates tr[data-spki='{info.spki_sha256[:16]}']")).to_contain_text("accepted")
    if os.environ.get("EGW_SCREENSHOTS") == "1":
        await page_b.screenshot(path=str(ROOT / "docs" / "screenshots" / "partner.png"), full_page=False)
