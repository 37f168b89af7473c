"""The message pages (``gateway/console/messages.py``): dead letters (requeue at once, discard as a
four-eyes request), the quarantine, and viewing an invoice's content (its own permission, audited),
each refused to a role that does not allow it.  Over the package's one gateway (tests/console/conftest.py).
"""

from __future__ import annotations

import sqlite3

import pytest

from tests.helpers.console import audits, login, shared
from tests.helpers.invoices import accepted, invoice


@shared
async def test_roles_over_http(world):
    auditor = await world.person("auditor1", "auditor")
    operator = await world.person("ops-dead", "operator")
    dead, held = world.ids["dead"], world.ids["held"]
    held_state = (await world.store.quarantine.entry(held)).state
    async with world.browser() as b:
        await login(b, auditor)
        page = await b.get("/console/dead-letters")
        assert page.xpath("//table[@id='dead-letters']//tbody/tr/@data-message-id") == [dead]
        assert not page.has("//input[@name='item']") and not page.has("//button[@name='action']")
        page = await b.post("/console/dead-letters", {"item": f"{dead} erp-api", "reason": "try again", "action": "requeue"})
        assert page.status == 403 and "does not allow" in page.error
        page = await b.get("/console/users")
        assert page.status == 200 and page.has("//table[@id='users']") and not page.has("//form[@id='add-user']")
        assert not page.has("//form[contains(@action, '/disable')]")
        page = await b.post("/console/users", {"name": "sneaky", "role_admin": "on"})
        assert page.status == 403 and "does not allow" in page.error
        page = await b.get(f"/console/quarantine/{world.ids['held']}")
        assert page.has("//table[@id='accounts']") and not page.has("//form[@id='release']")
        page = await b.post(f"/console/quarantine/{world.ids['held']}/reject", {"note": "no"})
        assert page.status == 403
    assert await world.accounts.user("sneaky") is None
    assert (await world.store.reports.message(dead)).deliveries[0].state == "dead"
    assert (await world.store.quarantine.entry(held)).state == held_state
    denied = [r["detail"]["path"] for r in await audits(world.store, "console.denied") if r["actor"] == "console:auditor1"]
    assert sorted(denied) == sorted(["/console/dead-letters", "/console/users", f"/console/quarantine/{world.ids['held']}/reject"])

    async with world.browser() as b:
        await login(b, operator)
        page = await b.get("/console/dead-letters")
        assert page.xpath("//input[@name='item']/@value") == [f"{dead} erp-api"]
        assert page.has("//button[@name='action'][@value='requeue']") and page.has("//button[@name='action'][@value='discard']")
        assert (await b.get("/console/users")).status == 403  # an operator does not see the accounts
        # discard is four-eyes: a request, nothing done yet
        page = await b.post("/console/dead-letters", {"item": f"{dead} erp-api", "reason": "sent by post", "action": "discard"})
        assert page.path == "/console/dead-letters" and "discard requested" in page.text
        [req] = [a for a in await world.approvals.requests("pending") if a.kind == "deadletter.discard"]
        assert (req.target, req.requested_by, req.reason) == (f"{dead} erp-api", "console:ops-dead", "sent by post")
        assert (await world.store.reports.message(dead)).deliveries[0].state == "dead"
        page = await b.get("/console/approvals")
        assert page.has(f"//table[@id='approvals']//tr[@data-approval-id='{req.id}']//form[@class='withdraw']")
        page = await b.post(f"/console/approvals/{req.id}/withdraw")
        assert page.status == 200 and (await world.approvals.get(req.id)).state == "withdrawn"
        # requeue is done at once
        page = await b.post("/console/dead-letters", {"item": f"{dead} erp-api", "reason": "ERP fixed", "action": "requeue"})
        assert page.path == "/console/dead-letters" and "1 requeued" in page.text
    assert (await world.store.reports.message(dead)).deliveries[0].state != "dead"
    [requeued] = [r for r in await audits(world.store, "delivery.requeued") if r["message_id"] == dead]
    assert (requeued["actor"], requeued["detail"]["reason"]) == ("console:ops-dead", "ERP fixed")


@shared
async def test_content_view_needs_its_permission_and_is_audited(world):
    plain = await world.person("no-content", "operator")
    reader = await world.person("reader", "operator", content=True)
    mid = world.ids["delivered"]
    async with world.browser() as b:
        await login(b, plain)
        page = await b.get(f"/console/messages/{mid}")
        assert len(page.xpath("//ol[@id='timeline']/li")) >= 3 and not page.has("//form[@id='view-content']")
        page = await b.post(f"/console/messages/{mid}/content")
        assert page.status == 403 and not page.has("//pre[@id='content']") and "DEMO-2026-0001</" not in page.text
    assert await audits(world.store, "console.content_viewed") == []
    assert [r["actor"] for r in await audits(world.store, "console.denied") if r["detail"]["path"].endswith("/content")] == \
        ["console:no-content"]
    async with world.browser() as b:
        await login(b, reader)
        page = await b.get(f"/console/messages/{mid}")
        assert page.has("//form[@id='view-content']")
        page = await b.post(f"/console/messages/{mid}/content")
        assert page.status == 200, page.error
        [content] = page.xpath("//pre[@id='content']/text()")
        assert content.lstrip().startswith("<?xml") and "<cbc:ID>DEMO-2026-0001</cbc:ID>" in content
    [viewed] = await audits(world.store, "console.content_viewed")
    assert (viewed["actor"], viewed["message_id"], viewed["partner"]) == ("console:reader", mid, "demo-supplier")
    assert viewed["detail"]["sha256"] == (await world.store.reports.message(mid)).sha256


def damage(world, message_id: str, how: str) -> None:
    """Alter a stored object at rest, as a disk fault or an intruder with file access would."""
    with sqlite3.connect(world.store.path) as db:
        if how == "missing":
            db.execute("DELETE FROM blobs WHERE message_id = ?", (message_id,))
        else:
            [sealed] = db.execute("SELECT sealed FROM blobs WHERE message_id = ?", (message_id,)).fetchone()
            flipped = bytes(sealed[:-20]) + bytes([sealed[-20] ^ 1]) + bytes(sealed[-19:])
            db.execute("UPDATE blobs SET sealed = ? WHERE message_id = ?", (flipped, message_id))


@shared
@pytest.mark.parametrize("how", ["flipped", "missing"])
async def test_a_damaged_stored_object_is_a_typed_error_page_and_an_audit_record(world, how: str):
    """Issue 20, item 13: not a plain-text 500, and the operator's log and audit trail say which message."""
    async with world.running.session() as s:
        mid = await accepted(s, invoice(f"CONSOLE-DAMAGED-{how}"))
    damage(world, mid, how)
    reader = await world.person(f"reader-{how}", "operator", content=True)
    async with world.browser() as b:
        await login(b, reader)
        page = await b.post(f"/console/messages/{mid}/content")
        assert page.status == 500 and not page.has("//pre[@id='content']")
        assert page.has("//main") and "cannot be opened" in page.text, page.text  # the console's own error page
        reason = "missing" if how == "missing" else "failed authentication"
        assert f"it is {reason}" in page.text and "restore it from a backup" in page.text
    [record] = [r for r in await audits(world.store, "console.content_unreadable") if r["message_id"] == mid]
    assert (record["actor"], record["detail"]["reason"]) == (f"console:reader-{how}", reason)
    assert [r for r in await audits(world.store, "console.content_viewed") if r["message_id"] == mid] == []

