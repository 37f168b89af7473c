"""The SQLite four-eyes approvals (gateway/storage/sqlite/approvals.py): a request needs a second person,
one pending request per target, decided once, withdrawn only by its requester, each step audited."""

from __future__ import annotations

import pytest

from gateway.storage.base import AccountError
from gateway.storage.records import Approval
from tests.helpers.console import audits


async def test_approvals_need_a_second_person(store):
    approvals = store.approvals
    params = {"message_id": "m1", "partner": "acme"}
    rid = await approvals.request("quarantine.release", "m1", params, "confirmed by phone", "console:alice", "acme", "m1")
    with pytest.raises(AccountError, match="already waiting"):
        await approvals.request("quarantine.release", "m1", params, "again", "console:carol")
    assert [a.id for a in await approvals.requests("pending")] == [rid]

    def anyone(found: Approval) -> None:
        return None

    with pytest.raises(AccountError, match="second person"):
        await approvals.decide(rid, "console:alice", True, anyone)

    def refuse(found: Approval) -> None:
        raise AccountError("deciding needs messages.act")

    with pytest.raises(AccountError, match="messages.act"):
        await approvals.decide(rid, "console:auditor", True, refuse)
    assert (await approvals.get(rid)).state == "pending"
    with pytest.raises(AccountError, match="not a pending request of yours"):
        await approvals.withdraw(rid, "console:bob")
    decided = await approvals.decide(rid, "console:bob", True, anyone)
    assert (decided.state, decided.decided_by, decided.requested_by) == ("approved", "console:bob", "console:alice")
    await approvals.finish(rid, "released")
    a = await approvals.get(rid)
    assert (a.state, a.decided_by, a.outcome) == ("approved", "console:bob", "released")
    with pytest.raises(AccountError, match="not waiting for a decision"):
        await approvals.decide(rid, "console:carol", False, anyone)
    [rec] = await audits(store, "console.approval_approved")
    assert (rec["actor"], rec["message_id"], rec["detail"]["requested_by"]) == ("console:bob", "m1", "console:alice")
    # a new request for the same target once the first is decided; withdrawn by its requester
    rid2 = await approvals.request("quarantine.release", "m1", params, "once more", "console:alice")
    await approvals.withdraw(rid2, "console:alice")
    assert (await approvals.get(rid2)).state == "withdrawn"
    with pytest.raises(AccountError, match="it was withdrawn"):
        await approvals.decide(rid2, "console:bob", True, anyone)
