"""The four-eyes pages (``gateway/console/approvals.py``): a second person decides, after a fresh
authentication, and what was approved is carried out with the requester's reason.  Over the package's
one gateway (tests/console/conftest.py)."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from tests.helpers.console import PASSWORD, audits, login, shared
from tests.helpers.invoices import DEMO, IBAN_C, accepted, invoice


@shared
async def test_four_eyes_release_with_fresh_authentication(world):
    first = await world.person("ops1", "operator")
    second = await world.person("ops2", "operator")
    held = world.ids["held"]
    async with world.browser() as b:
        await login(b, first)
        page = await b.get("/console/quarantine")
        assert held in page.xpath("//table[@id='quarantine']//tbody/tr/@data-message-id")
        page = await b.get(f"/console/quarantine/{held}")
        assert page.has("//form[@id='release']//*[@name='note']") and page.has("//form[@id='reject']")
        page = await b.post(f"/console/quarantine/{held}/release", {"note": "account confirmed by phone"})
        assert page.path == f"/console/quarantine/{held}" and "second person" in page.text
        [req] = [a for a in await world.approvals.requests("pending") if a.kind == "quarantine.release"]
        assert (req.target, req.requested_by) == (held, "console:ops1")
        assert (await world.store.quarantine.entry(held)).state == "held"
        page = await b.get("/console/approvals")
        row = f"//table[@id='approvals']//tr[@data-approval-id='{req.id}']"
        assert page.has(row) and not page.has(f"{row}//form[@class='approve']")  # not offered to the requester
        page = await b.post(f"/console/approvals/{req.id}/approve")
        assert page.status == 403 and "second person" in page.error
        assert (await world.approvals.get(req.id)).state == "pending"

    async with world.browser() as b:
        await login(b, second)
        page = await b.get("/console/approvals")
        assert page.has(f"//tr[@data-approval-id='{req.id}']//form[@class='approve']")
        # ten minutes after the login, approving needs the password and a code again
        session = await world.session_of(b)
        await world.sql("UPDATE console_sessions SET auth_at = auth_at - 600 WHERE id_hash = ?", session.id_hash)
        page = await b.post(f"/console/approvals/{req.id}/approve", follow=False,
                            headers={"Referer": world.base + "/console/approvals"})
        assert page.status == 303 and page.location.startswith("/console/reauth?")
        assert parse_qs(urlsplit(page.location).query)["next"] == ["/console/approvals"]
        assert (await world.approvals.get(req.id)).state == "pending"
        page = await b.get(page.location)
        assert page.has("//form[@id='reauth']//input[@name='password']") and page.has("//form[@id='reauth']//input[@name='code']")
        page = await b.post("/console/reauth", {"password": PASSWORD, "code": await second.code(), "next": "/console/approvals"})
        assert page.path == "/console/approvals", page.error
        assert (await world.session_of(b)).auth_at > time.time() - 60
        page = await b.post(f"/console/approvals/{req.id}/approve")
        assert page.path == "/console/approvals" and page.status == 200, page.error
    decided = await world.approvals.get(req.id)
    assert (decided.state, decided.decided_by, decided.outcome) == ("approved", "console:ops2", "released")
    entry = await world.store.quarantine.entry(held)
    assert (entry.state, entry.decided_by) == ("released", "console:ops2")
    [released] = [r for r in await audits(world.store, "quarantine.released") if r["message_id"] == held]
    assert released["actor"] == "console:ops2" and "requested by console:ops1" in released["detail"]["note"]
    assert [r["actor"] for r in await audits(world.store, "console.reauthenticated")] == ["console:ops2"]


@shared
async def test_approved_release_keeps_the_requesters_reason(world):
    async with world.running.session() as s:
        held = await accepted(s, invoice("CONSOLE-0002", iban=IBAN_C), status="held")
    rid = await world.approvals.request("quarantine.release", held, {"message_id": held, "partner": DEMO},
                                        "seller confirmed the new account by phone", "console:someone-else", DEMO, held)
    approver = await world.person("ops-note", "operator")
    async with world.browser() as b:
        await login(b, approver)
        page = await b.post(f"/console/approvals/{rid}/approve")
        assert page.path == "/console/approvals", page.error
    entry = await world.store.quarantine.entry(held)
    assert entry.state == "released"
    assert "seller confirmed the new account by phone" in entry.note
