"""The storage contract: what every backend must do, method by method (gateway/storage/base.py).

Each test runs against every backend in ``BACKENDS``; a new backend adds itself there and must pass
the file unchanged.  Nothing here looks inside a backend: only the protocols' methods are called, and
concurrency is exercised the way the gateway causes it (many tasks, or two stores on one state, as
two worker processes or nodes would be).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import Conflict, StorageUnavailable
from gateway.model import DocumentType, stamp
from gateway.storage.base import BROWSERS_KEPT, AccountError, NotHeld, Store
from gateway.storage.chain import CHECKPOINT, GENESIS, record_hash
from gateway.storage.records import REPLIES, Notice, NoticeJob, Resealed
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import audit_of
from tests.helpers.records import accepted_invoice

Opener = Callable[[], Store]


def sqlite_backend(tmp_path: Path) -> Opener:
    return lambda: SqliteStore(tmp_path / "state")


BACKENDS: dict[str, Callable[[Path], Opener]] = {"sqlite": sqlite_backend}


@pytest.fixture(params=sorted(BACKENDS))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens a (new, or the same again) store on one state, for one backend."""
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
async def store(opener: Opener) -> AsyncIterator[Store]:
    s = opener()
    yield s
    await s.close()


async def audit_details(store: Store, action: str) -> list[dict[str, object]]:
    """``audit_of``, newest first, each record's detail with its partner, message_id and actor merged in."""
    return [r["detail"] | {"partner": r["partner"], "message_id": r["message_id"], "actor": r["actor"]}
            for r in reversed(await audit_of(store, action))]


# --- intake ----------------------------------------------------------------------------------------

async def test_put_then_find_and_status(store: Store) -> None:
    inv = accepted_invoice("1")
    receipt = await store.intake.put(inv)
    assert (receipt.message_id, receipt.status, receipt.sha256, receipt.duplicate) == (inv.message_id, "accepted",
                                                                                        inv.sha256, False)
    found = await store.intake.find_accepted("acme", inv.sha256)
    assert found is not None and (found.message_id, found.status, found.duplicate) == (inv.message_id, "accepted", True)
    assert await store.intake.find_accepted("other", inv.sha256) is None
    assert await store.intake.find_accepted("acme", "0" * 64) is None
    status = await store.intake.status(inv.message_id, "acme")
    assert status is not None and status.as_json() == {
        "message_id": inv.message_id, "status": "accepted", "sha256": inv.sha256, "received_at": inv.received_at,
        "document_type": "ubl:Invoice", "invoice_number": "1", "signature": None, "rules": None,
        "deliveries": [{"destination": "erp", "status": "pending", "attempts": 0, "delivered_at": None}]}
    assert await store.intake.status(inv.message_id, "other") is None  # another partner does not see it
    assert await store.intake.status(inv.message_id, None) is not None  # (the ERP's listener may)
    assert await store.intake.status(str(uuid.uuid4()), "acme") is None
    assert await store.outbox.load_sealed(inv.message_id) == inv.sealed
    assert await store.outbox.load_sealed(str(uuid.uuid4())) is None
    assert await store.reports.counts() == {"invoices": 1, "deliveries_pending": 1}
    [accepted] = await audit_details(store, "invoice.accepted")
    assert accepted["message_id"] == inv.message_id and accepted["destinations"] == ["erp"] and accepted["held"] is False


async def test_same_content_again_is_the_first_receipt(store: Store) -> None:
    first = accepted_invoice("1")
    await store.intake.put(first)
    again = await store.intake.put(accepted_invoice("1"))  # the same bytes under a new message id
    assert (again.message_id, again.duplicate) == (first.message_id, True)
    assert await store.reports.counts() == {"invoices": 1, "deliveries_pending": 1}


async def test_same_number_with_other_content_conflicts(store: Store) -> None:
    await store.intake.put(accepted_invoice("1"))
    with pytest.raises(Conflict) as refused:
        await store.intake.put(accepted_invoice("1", content="changed"))
    assert refused.value.code == "DUPLICATE_CONFLICT" and refused.value.http_status == 409
    # The credit-note series, another issue date, or another partner may use the same number.
    await store.intake.put(accepted_invoice("1", content="cn", kind=DocumentType.UBL_CREDIT_NOTE))
    await store.intake.put(accepted_invoice("1", content="d", issue_date="2026-11-03"))
    await store.intake.put(accepted_invoice("1", content="b", partner="beta"))
    assert (await store.reports.counts())["invoices"] == 4


@pytest.mark.parametrize(("number", "issue_date"), [
    ("inv-0042", "2026-11-02"), ("INV\u201142", "2026-11-02"), ("INV -\u200b42", "2026-11-02"),
    ("ＩＮＶ－４２", "2026-11-02"), ("INV-42", "2026-11-02Z"), ("INV-042", "2026-11-02+01:00"),
], ids=["case-and-zeros", "non-breaking-hyphen", "space-and-zero-width", "full-width", "utc-suffix", "offset"])
async def test_the_same_number_written_differently_conflicts(store: Store, number: str, issue_date: str) -> None:
    """Issue 20, item 4: a second payment of one invoice must not pass for another number."""
    first = accepted_invoice("INV-42")
    await store.intake.put(first)
    with pytest.raises(Conflict) as refused:
        await store.intake.put(accepted_invoice(number, content="again", issue_date=issue_date))
    assert first.message_id in refused.value.message
    assert repr(number) in refused.value.message  # the sender is shown its own spelling


async def test_numbers_that_only_look_alike_are_two_invoices(store: Store) -> None:
    for number in ("INV-1-23", "INV-12-3", "INV-123", "INV/123", "INV-124"):
        await store.intake.put(accepted_invoice(number, content=number))
    assert (await store.reports.counts())["invoices"] == 5


async def test_outbound_duplicates_match_whoever_they_were_for(store: Store) -> None:
    submitted = accepted_invoice("O-1", partner="beta", direction="out")
    signed = replace(submitted, sha256=hashlib.sha256(b"signed").hexdigest(), source_sha256=submitted.sha256)
    await store.intake.put(signed)
    again = await store.intake.find_accepted(None, submitted.sha256, "out")
    assert again is not None and again.message_id == submitted.message_id
    assert await store.intake.find_accepted(None, submitted.sha256, "in") is None
    status = await store.intake.status(submitted.message_id, None, "out")
    assert status is not None and status.partner == "beta" and "partner" in status.as_json()
    assert (await store.intake.put(replace(accepted_invoice("O-1", partner="gamma", direction="out"), sha256=signed.sha256,
                                           source_sha256=submitted.sha256))).duplicate


async def test_two_writers_racing_on_one_invoice_store_it_once(opener: Opener) -> None:
    """As two worker processes (or nodes) would: separate stores on one state, the same content at once."""
    a, b = opener(), opener()
    try:
        contenders = [accepted_invoice("R-1") for _ in range(6)]
        receipts = await asyncio.gather(*(s.intake.put(inv) for s, inv in zip([a, b] * 3, contenders, strict=True)))
        winners = {r.message_id for r in receipts}
        assert len(winners) == 1 and sum(not r.duplicate for r in receipts) == 1
        assert (await a.reports.counts())["invoices"] == 1
        numbered = [accepted_invoice("R-2", content=str(i)) for i in range(6)]  # one number, six contents
        outcomes = await asyncio.gather(*(s.intake.put(inv) for s, inv in zip([a, b] * 3, numbered, strict=True)),
                                        return_exceptions=True)
        assert sum(isinstance(o, Conflict) for o in outcomes) == 5
        assert (await b.reports.counts())["invoices"] == 2
    finally:
        await a.close()
        await b.close()


async def test_a_refused_put_spares_the_others_written_with_it(store: Store) -> None:
    batch = [accepted_invoice("B-1"), accepted_invoice("B-1", content="other"), accepted_invoice("B-2")]
    outcomes = await asyncio.gather(*(store.intake.put(x) for x in batch), return_exceptions=True)
    assert not isinstance(outcomes[0], BaseException) and isinstance(outcomes[1], Conflict)
    assert not isinstance(outcomes[2], BaseException)
    assert (await store.reports.counts())["invoices"] == 2


async def test_hold_reasons_hold_the_invoice(store: Store) -> None:
    inv = accepted_invoice("H-1", holds=("payable amount 100.00 EUR is over the ceiling 50",))
    receipt = await store.intake.put(inv)
    assert receipt.status == "held" and receipt.as_json()["message"] == "accepted and held for review before delivery"
    status = await store.intake.status(inv.message_id, "acme")
    assert status is not None and status.status == "held" and status.deliveries == ()  # held jobs are not shown
    assert await store.outbox.due(2e9, 10) == []
    assert await store.quarantine.held_count() == 1
    [held] = await audit_details(store, "quarantine.held")
    assert held["reasons"] == ["payable amount 100.00 EUR is over the ceiling 50"]


async def test_payee_accounts_are_learned_then_guarded(store: Store) -> None:
    first = await store.intake.put(accepted_invoice("P-1", accounts=("DE02120300000000202051",)))
    assert first.status == "accepted"  # a new seller's first accounts become its known ones
    assert [(a.account, a.state) for a in await store.quarantine.seller_accounts("acme")] == [
        ("DE02120300000000202051", "known")]
    same = await store.intake.put(accepted_invoice("P-2", accounts=("DE02120300000000202051",)))
    assert same.status == "accepted"
    changed = accepted_invoice("P-3", accounts=("DE89370400440532013000",))
    held = await store.intake.put(changed)
    assert held.status == "held"
    [entry] = await store.quarantine.held()
    assert entry.message_id == changed.message_id and entry.reasons == (
        "payee account DE89…3000 was never used by this seller before",)
    [changes] = await audit_details(store, "account.changed")
    assert changes["accounts"] == ["DE89…3000"]  # masked, never the whole number
    other = await store.intake.put(accepted_invoice("P-1", partner="beta", content="b", accounts=("DE89370400440532013000",)))
    assert other.status == "accepted"  # every seller has its own history


# --- quarantine ------------------------------------------------------------------------------------

async def test_release_and_reject(store: Store) -> None:
    released, rejected = accepted_invoice("Q-1", holds=("x",)), accepted_invoice("Q-2", holds=("x",))
    await store.intake.put(released)
    await store.intake.put(rejected)
    assert [e.message_id for e in await store.quarantine.held()] == [released.message_id, rejected.message_id]
    decision = await store.quarantine.decide(released.message_id, True, "op", "called the seller")
    assert (decision.state, decision.decided_by, decision.partner) == ("released", "op", "acme")
    assert [j.message_id for j in await store.outbox.due(2e9, 10)] == [released.message_id]
    await store.quarantine.decide(rejected.message_id, False, "op", "fraud")
    assert await store.quarantine.held() == []
    assert {e.state for e in await store.quarantine.held(None)} == {"released", "rejected"}
    rejected_status = await store.intake.status(rejected.message_id, "acme")
    assert rejected_status is not None and rejected_status.status == "rejected"
    with pytest.raises(NotHeld, match="already released"):
        await store.quarantine.decide(released.message_id, False, "op", "again")
    with pytest.raises(NotHeld):
        await store.quarantine.decide(str(uuid.uuid4()), True, "op", "none")
    assert [a["actor"] for a in await audit_details(store, "quarantine.released")] == ["op"]


async def test_an_unrouted_hold_is_released_only_to_a_named_destination(store: Store) -> None:
    nowhere = accepted_invoice("U-1", destinations=(), holds=("no routing rule matches this invoice",))
    await store.intake.put(nowhere)
    with pytest.raises(NotHeld) as refused:
        await store.quarantine.decide(nowhere.message_id, True, "op", "route it")
    assert refused.value.code == "UNROUTED"
    assert await store.quarantine.held_count() == 1  # the refused decision changed nothing
    await store.quarantine.decide(nowhere.message_id, True, "op", "route it", ("archive",))
    assert [j.destination for j in await store.outbox.due(2e9, 10)] == ["archive"]


async def test_a_release_makes_the_new_account_known_and_a_rejection_blocks_it(store: Store) -> None:
    await store.intake.put(accepted_invoice("A-1", accounts=("DE02120300000000202051",)))
    one, two = (accepted_invoice(n, accounts=(a,)) for n, a in (("A-2", "DE89370400440532013000"), ("A-3", "GB82WEST12345698765432")))
    await store.intake.put(one)
    await store.intake.put(two)
    await store.quarantine.decide(one.message_id, True, "op", "confirmed")
    await store.quarantine.decide(two.message_id, False, "op", "not theirs")
    states = {a.account: a.state for a in await store.quarantine.seller_accounts("acme")}
    assert states == {"DE02120300000000202051": "known", "DE89370400440532013000": "known",
                      "GB82WEST12345698765432": "rejected"}
    entry = await store.intake.put(accepted_invoice("A-4", accounts=("GB82WEST12345698765432",)))
    assert entry.status == "held"  # a rejected account holds every invoice naming it


async def test_entry_shows_the_seller_history(store: Store) -> None:
    await store.intake.put(accepted_invoice("E-1", accounts=("DE02120300000000202051",)))
    held = accepted_invoice("E-2", accounts=("DE89370400440532013000",))
    await store.intake.put(held)
    entry = await store.quarantine.entry(held.message_id)
    assert entry is not None and entry.accounts is not None
    assert [(a.account, a.state, a.this_invoice) for a in entry.accounts] == [
        ("DE02120300000000202051", "known", False), ("DE89370400440532013000", "pending", True)]
    assert "accounts" in entry.as_json()
    assert await store.quarantine.entry(str(uuid.uuid4())) is None


async def test_registered_and_blocked_accounts(store: Store) -> None:
    await store.quarantine.set_accounts("acme", ["DE02120300000000202051"], ["DE89370400440532013000"], "admin", "letter")
    assert {(a.account, a.state) for a in await store.quarantine.seller_accounts("acme")} == {
        ("DE02120300000000202051", "known"), ("DE89370400440532013000", "rejected")}
    [record] = await audit_details(store, "account.registered")
    assert record == {"known": ["DE02…2051"], "blocked": ["DE89…3000"], "note": "letter", "partner": "acme",
                      "message_id": None, "actor": "admin"}
    assert (await store.intake.put(accepted_invoice("K-1", accounts=("DE02120300000000202051",)))).status == "accepted"
    assert (await store.intake.put(accepted_invoice("K-2", accounts=("DE89370400440532013000",)))).status == "held"


# --- the outbox ------------------------------------------------------------------------------------

async def test_claims_lease_jobs_to_one_owner(store: Store) -> None:
    invs = [accepted_invoice(f"C-{i}", destinations=("erp", "archive")) for i in range(3)]
    for inv in invs:
        await store.intake.put(inv)
    now = 2e9
    assert len(await store.outbox.due(now, 10)) == 6
    mine = await store.outbox.claim("a", now, {"erp": 2, "archive": 0}, 60)
    assert [j.destination for j in mine] == ["erp", "erp"] and all(j.facts.invoice_number.startswith("C-") for j in mine)
    theirs = await store.outbox.claim("b", now, {"erp": 10, "archive": 10}, 120)
    assert sorted(j.destination for j in theirs) == ["archive"] * 3 + ["erp"]  # what "a" holds is not offered
    assert await store.outbox.claim("c", now, {"erp": 10, "archive": 10}, 60) == []
    assert await store.outbox.due(now, 10) == []
    later = await store.outbox.claim("c", now + 61, {"erp": 10}, 60)  # "a" died: its lease lapsed
    assert {j.message_id for j in later} == {j.message_id for j in mine}
    assert await store.outbox.release("c") == 2 and await store.outbox.release("c") == 0
    assert len(await store.outbox.due(now + 61, 10)) == 2  # given back: due again (b still holds its four)
    assert (await store.outbox.pending_by_destination()) == {"erp": 3, "archive": 3}


async def test_two_claimers_racing_take_each_job_once(opener: Opener) -> None:
    a, b = opener(), opener()
    try:
        for i in range(20):
            await a.intake.put(accepted_invoice(f"X-{i}"))
        rounds = await asyncio.gather(*(s.outbox.claim(f"node-{k}", 2e9, {"erp": 3}, 60)
                                        for k, s in enumerate([a, b] * 5)))
        taken = [j.message_id for jobs in rounds for j in jobs]
        assert len(taken) == len(set(taken)) == 20
    finally:
        await a.close()
        await b.close()


async def test_outcomes_are_recorded_once_and_only_by_the_holder(store: Store) -> None:
    ok, retry, dead = accepted_invoice("D-1"), accepted_invoice("D-2"), accepted_invoice("D-3")
    for inv in (ok, retry, dead):
        await store.intake.put(inv)
    jobs = {j.message_id: j for j in await store.outbox.claim("a", 2e9, {"erp": 10}, 60)}
    await store.outbox.record(jobs[ok.message_id], delivered_at="2026-11-20T00:00:01.000000Z", next_attempt_at=None,
                              error=None, owner="a")
    await store.outbox.record(jobs[retry.message_id], delivered_at=None, next_attempt_at=2e9 + 30, error="HTTP 503",
                              owner="b")  # not the holder: ignored
    await store.outbox.record(jobs[retry.message_id], delivered_at=None, next_attempt_at=2e9 + 30, error="HTTP 503",
                              owner="a")
    await store.outbox.record(jobs[dead.message_id], delivered_at=None, next_attempt_at=None, error="HTTP 400",
                              dead=True, owner="a")
    await store.outbox.record(jobs[ok.message_id], delivered_at="2026-11-20T00:00:02.000000Z", next_attempt_at=None,
                              error=None, owner="a")  # again: nothing changes
    detail = await store.reports.message(ok.message_id)
    assert detail is not None and detail.status == "delivered" and detail.deliveries[0].attempts == 1
    assert detail.deliveries[0].delivered_at == "2026-11-20T00:00:01.000000Z"
    waiting = await store.reports.message(retry.message_id)
    assert waiting is not None and waiting.deliveries[0].attempts == 1 and waiting.deliveries[0].last_error == "HTTP 503"
    assert await store.outbox.due(2e9 + 29, 10) == [] and len(await store.outbox.due(2e9 + 30, 10)) == 1
    [letter] = await store.reports.dead_letters()
    assert (letter.message_id, letter.error, letter.attempts) == (dead.message_id, "HTTP 400", 1)
    assert [a["destination"] for a in await audit_details(store, "delivery.delivered")] == ["erp"]
    assert [a["error"] for a in await audit_details(store, "delivery.dead_letter")] == ["HTTP 400"]
    depth = await store.outbox.depth()
    assert depth.jobs == 1 and depth.oldest is not None


async def test_retry_requeue_and_discard(store: Store) -> None:
    waiting, dead = accepted_invoice("R-1"), accepted_invoice("R-2")
    await store.intake.put(waiting)
    await store.intake.put(dead)
    jobs = {j.message_id: j for j in await store.outbox.claim("a", 2e9, {"erp": 10}, 60)}
    await store.outbox.record(jobs[waiting.message_id], delivered_at=None, next_attempt_at=4e9, error="down", owner="a")
    await store.outbox.record(jobs[dead.message_id], delivered_at=None, next_attempt_at=None, error="gone", dead=True,
                              owner="a")
    assert await store.outbox.retry(waiting.message_id, None, "op") == ["erp"]
    assert [j.message_id for j in await store.outbox.due(datetime.now(UTC).timestamp() + 1, 10)] == [waiting.message_id]
    with pytest.raises(NotHeld) as nothing:
        await store.outbox.retry(dead.message_id, None, "op")
    assert nothing.value.code == "NOTHING_TO_RETRY" and "erp: dead" in nothing.value.message
    assert await store.outbox.retry(dead.message_id, "erp", "op", requeue=True, reason="fixed") == ["erp"]
    requeued = await store.reports.message(dead.message_id)
    assert requeued is not None and requeued.status == "accepted" and requeued.deliveries[0].attempts == 0
    jobs = {j.message_id: j for j in await store.outbox.claim("a", 4e9, {"erp": 10}, 60)}
    await store.outbox.record(jobs[dead.message_id], delivered_at=None, next_attempt_at=None, error="gone", dead=True,
                              owner="a")
    await store.outbox.discard(dead.message_id, "erp", "op", "the ERP booked it by hand")
    assert await store.reports.dead_letters() == []
    gone = await store.reports.message(dead.message_id)
    assert gone is not None and gone.status == "accepted" and gone.deliveries[0].state == "rejected"
    with pytest.raises(NotHeld) as again:
        await store.outbox.discard(dead.message_id, "erp", "op", "twice")
    assert again.value.code == "NOTHING_TO_DISCARD"
    assert [a["actor"] for a in await audit_details(store, "delivery.requeued")] == ["op"]


# --- the audit log ---------------------------------------------------------------------------------

async def test_the_audit_log_is_one_chain(opener: Opener) -> None:
    a, b = opener(), opener()
    try:
        await asyncio.gather(*(s.audit.append("t", f"test.{i}", None, None, {"i": i}) for i, s in enumerate([a, b] * 20)))
        records = [r async for r in a.audit.records()]
        assert [r.seq for r in records] == list(range(1, 41))
        assert records[0].prev == GENESIS and all(r.prev == p.hash for p, r in zip(records, records[1:], strict=False))
        assert all(record_hash(r.as_chain()) == r.hash for r in records)
        assert [r.seq for r in await b.audit.newest(3)] == [40, 39, 38]
        assert [r.seq for r in [r async for r in a.audit.records(5, 7)]] == [5, 6, 7]
        assert await a.audit.checkpoint(lambda seq, head: {"through_seq": seq, "head": head}) == 41
        assert await b.audit.checkpoint(lambda seq, head: {"through_seq": seq, "head": head}) is None  # head is one
        [cp] = [r for r in await a.audit.newest(1)]
        assert cp.action == CHECKPOINT and json.loads(cp.detail) == {"through_seq": 40, "head": records[-1].hash}
    finally:
        await a.close()
        await b.close()


async def test_audit_pages_and_time_ranges(store: Store) -> None:
    for i in range(5):
        await store.audit.append("alice" if i % 2 else "bob", "partner.edited" if i < 3 else "quarantine.released",
                                 "acme" if i < 4 else "beta", None, {"i": i})
    assert [r.seq for r in await store.audit.page()] == [5, 4, 3, 2, 1]
    assert [r.seq for r in await store.audit.page(actor="alice")] == [4, 2]
    assert [r.seq for r in await store.audit.page(action="quarantine")] == [5, 4]  # a prefix
    assert [r.seq for r in await store.audit.page(partner="beta")] == [5]
    assert [r.seq for r in await store.audit.page(before=3, limit=1)] == [2]
    at = [r.at async for r in store.audit.records()]
    assert [r.seq async for r in store.audit.records(since=at[2])] == [3, 4, 5]
    assert [r.seq async for r in store.audit.records(until=at[2])] == [1, 2]


# --- sealed objects and keys -----------------------------------------------------------------------

async def test_objects_move_to_another_key(store: Store) -> None:
    old, other = accepted_invoice("K-1"), replace(accepted_invoice("K-2"), key_id="k0")
    await store.intake.put(old)
    await store.intake.put(other)
    assert await store.keys.usage() == {"k1": 1, "k0": 1}
    [obj] = await store.keys.sealed_under(["k1"], 10)
    assert (obj.message_id, obj.sealed) == (old.message_id, old.sealed)
    moved = await store.keys.replace_sealed([Resealed(old.message_id, old.sealed, b"resealed", "k2"),
                                             Resealed(other.message_id, b"not what is stored", b"x", "k2")])
    assert moved == 1  # the second one changed meanwhile: left alone
    assert await store.keys.usage() == {"k2": 1, "k0": 1}
    assert await store.outbox.load_sealed(old.message_id) == b"resealed"
    assert await store.keys.sealing_key() is None
    await store.keys.set_sealing_key("k2")
    await store.keys.set_sealing_key("k3")
    assert await store.keys.sealing_key() == "k3"


# --- reports ---------------------------------------------------------------------------------------

async def test_message_lists_and_detail(store: Store) -> None:
    inbound, held = accepted_invoice("M-1"), accepted_invoice("M-2", holds=("x",), partner="beta")
    out = accepted_invoice("M-3", direction="out")
    for inv in (inbound, held, out):
        await store.intake.put(inv)
    assert [m.message_id for m in await store.reports.messages()] == [out.message_id, held.message_id, inbound.message_id]
    assert [m.message_id for m in await store.reports.messages(direction="out")] == [out.message_id]
    assert [m.message_id for m in await store.reports.messages(partner="beta")] == [held.message_id]
    assert [m.message_id for m in await store.reports.messages(status="held")] == [held.message_id]
    assert {m.message_id for m in await store.reports.messages(status="pending")} == {inbound.message_id, out.message_id}
    assert [m.message_id for m in await store.reports.messages(limit=1)] == [out.message_id]
    later = stamp(datetime.now(UTC) + timedelta(seconds=1))
    assert await store.reports.messages(since=later) == [] and len(await store.reports.messages(until=later)) == 3
    assert [m.message_id for m in await store.reports.search(number="M-2")] == [held.message_id]
    assert [m.message_id for m in await store.reports.search(amount="100.00", offset=1, limit=1)] == [held.message_id]
    assert [m.message_id for m in await store.reports.search(status="held")] == [held.message_id]
    detail = await store.reports.message(held.message_id)
    assert detail is not None and detail.status == "held" and detail.quarantine is not None
    assert detail.supplier_ids == ("0088:1",) and detail.deliveries[0].state == "held"
    assert [h.action for h in detail.history] == ["invoice.accepted", "quarantine.held"]
    shown = detail.as_json()
    assert shown["deliveries"][0]["state"] == "held" and shown["quarantine"]["state"] == "held"
    assert await store.reports.message(str(uuid.uuid4())) is None


async def test_dashboard_counts(store: Store) -> None:
    for inv in (accepted_invoice("S-1"), accepted_invoice("S-2", holds=("x",))):
        await store.intake.put(inv)
    [job] = await store.outbox.claim("a", 2e9, {"erp": 10}, 60)
    await store.outbox.record(job, delivered_at=stamp(), next_attempt_at=None, error=None, owner="a")
    board = await store.reports.dashboard(datetime.now(UTC))
    assert board.received == {"hour": 2, "day": 2} and board.delivered == {"hour": 1, "day": 1}
    assert (board.outbox_depth, board.held, board.dead_total, board.dead_letters) == (0, 1, 0, ())


# --- retention -------------------------------------------------------------------------------------

async def test_retention_deletes_delivered_invoices_and_keeps_refusing_them(store: Store) -> None:
    done, waiting = accepted_invoice("T-1"), accepted_invoice("T-2")
    await store.intake.put(done)
    await store.intake.put(waiting)
    jobs = {j.message_id: j for j in await store.outbox.claim("a", 2e9, {"erp": 10}, 60)}
    await store.outbox.record(jobs[done.message_id], delivered_at="2026-01-01T00:00:00.000000Z", next_attempt_at=None,
                              error=None, owner="a")
    assert await store.retention.expire("2026-01-02T00:00:00.000000Z", 100) == [done.message_id]
    assert await store.retention.expire("2026-01-02T00:00:00.000000Z", 100) == []
    assert await store.reports.message(done.message_id) is None and await store.outbox.load_sealed(done.message_id) is None
    again = await store.intake.put(accepted_invoice("T-1"))
    assert (again.message_id, again.status, again.duplicate) == (done.message_id, "delivered", True)
    with pytest.raises(Conflict):
        await store.intake.put(accepted_invoice("T-1", content="new content, old number"))
    [expired] = await audit_details(store, "invoice.expired")
    assert expired["actor"] == "retention" and expired["sha256"] == done.sha256


# --- the console's accounts, sessions and approvals ------------------------------------------------

async def test_users_and_their_factors(store: Store) -> None:
    accounts = store.accounts
    await accounts.add_user("alice", ("admin",), False, "hash-1", "cli:root")
    with pytest.raises(AccountError):
        await accounts.add_user("alice", (), False, "hash-2", "cli:root")
    user = await accounts.user("alice")
    assert user is not None and (user.roles, user.must_change, user.enrolled, user.state) == (("admin",), True, False, "active")
    await accounts.set_password("alice", "hash-3", "console:alice", must_change=False)
    await accounts.set_roles("alice", ("auditor", "admin"), True, "console:bob", {"request": 1})
    user = await accounts.user("alice")
    assert user is not None and (user.password_hash, user.roles, user.content) == ("hash-3", ("admin", "auditor"), True)
    await accounts.enroll_totp("alice", "SECRET", 100, ["r1", "r2"])
    assert await accounts.spend_totp_step("alice", 101) and not await accounts.spend_totp_step("alice", 101)
    assert await accounts.spend_recovery("alice", "r1") and not await accounts.spend_recovery("alice", "r1")
    assert await accounts.recovery_left("alice") == 1
    await accounts.add_passkey("alice", "cred-1", b"key", 0, "laptop", "aaguid")
    await accounts.used_passkey("cred-1", 5)
    stored = await accounts.passkey("cred-1")
    assert stored is not None and (stored.user, stored.public_key, stored.sign_count) == ("alice", b"key", 5)
    assert [p.label for p in await accounts.passkeys("alice")] == ["laptop"]
    await accounts.reset_mfa("alice", "cli:root")
    reset = await accounts.user("alice")
    assert reset is not None and not reset.enrolled and await accounts.passkeys("alice") == []
    assert await accounts.recovery_left("alice") == 0
    assert not await accounts.remove_passkey("alice", "cred-1", "console:alice")
    with pytest.raises(AccountError, match="no user"):
        await accounts.unlock("nobody", "cli:root")
    actions = [r.action for r in await store.audit.newest(100)][::-1]
    assert actions[:3] == ["user.added", "user.password_changed", "user.roles_changed"] and actions[-1] == "user.mfa_reset"


async def test_failed_logins_are_counted_by_source_and_never_lock(store: Store) -> None:
    accounts = store.accounts
    await accounts.add_user("alice", ("admin",), False, "h", "cli:root")
    assert await accounts.failures("alice", ("10.0.0.1", "*")) == {}
    assert await accounts.failed("alice", "password", "10.0.0.1", "wrong-password", ("10.0.0.1", "*"), 100.0, 0.0) == \
        {"10.0.0.1": 1, "*": 1}
    assert await accounts.failed("alice", "totp", "10.0.0.1", "wrong-code", ("10.0.0.1",), 101.0, 0.0) == {"10.0.0.1": 2}
    assert await accounts.failed("alice", "password", "10.0.0.2", "throttled", (), 102.0, 0.0) == {}  # audited, not counted
    got = await accounts.failures("alice", ("10.0.0.1", "*", "10.0.0.2"))
    assert {k: (f.count, f.last_at) for k, f in got.items()} == {"10.0.0.1": (2, 101.0), "*": (1, 100.0)}
    user = await accounts.user("alice")
    assert user is not None and user.failed_logins == 2 and user.state == "active"  # counted, never locked
    # An unknown name is audited the same way and counts nothing.
    assert await accounts.failed("mallory", "password", "10.0.0.9", "unknown-user", ("10.0.0.9", "*"), 103.0, 0.0) == {}
    assert await accounts.failures("mallory", ("10.0.0.9", "*")) == {} and await accounts.user("mallory") is None
    failed = await audit_details(store, "console.login_failed")
    assert [(d["actor"], d["user"], d["factor"], d["reason"], d["address"], d.get("failures")) for d in failed][::-1] == [
        ("console:alice", "alice", "password", "wrong-password", "10.0.0.1", 1),
        ("console:alice", "alice", "totp", "wrong-code", "10.0.0.1", 2),
        ("console:alice", "alice", "password", "throttled", "10.0.0.2", None),
        ("console:anonymous@10.0.0.9", "mallory", "password", "unknown-user", "10.0.0.9", None)]
    # Counts with no failure since ``forget_before`` are forgotten first.
    assert await accounts.failed("alice", "password", "10.0.0.3", "wrong-password", ("10.0.0.3", "*"), 200.0, 100.5) == \
        {"10.0.0.3": 1, "*": 1}
    got = await accounts.failures("alice", ("10.0.0.1", "10.0.0.3", "*"))
    assert {k: f.count for k, f in got.items()} == {"10.0.0.1": 2, "10.0.0.3": 1, "*": 1}
    # A completed login clears the counts of the sources it names; unlock forgets them all.
    await accounts.succeeded("alice", "10.0.0.3", "totp", ("10.0.0.3",))
    assert set(await accounts.failures("alice", ("10.0.0.1", "10.0.0.3", "*"))) == {"10.0.0.1", "*"}
    [login] = await audit_details(store, "console.login")
    assert (login["actor"], login["address"], login["method"]) == ("console:alice", "10.0.0.3", "totp")
    await accounts.unlock("alice", "cli:root")
    assert await accounts.failures("alice", ("10.0.0.1", "10.0.0.3", "*")) == {}
    assert (await accounts.user("alice")).failed_logins == 0  # type: ignore[union-attr]
    [unlocked] = await audit_details(store, "user.unlocked")
    assert (unlocked["actor"], unlocked["user"]) == ("cli:root", "alice")


async def test_known_browsers(store: Store) -> None:
    accounts = store.accounts
    for name in ("alice", "bob"):
        await accounts.add_user(name, ("admin",), False, "h", "cli:root")
    await accounts.add_browser("alice", "t1")
    assert await accounts.browser("t1", 0.0) == "alice"
    assert await accounts.browser("t1", 4e9) is None  # known only since it was given
    assert await accounts.browser("nope", 0.0) is None
    await accounts.add_browser("bob", "t2", replaces="t1")  # the same browser, now bob's
    assert (await accounts.browser("t1", 0.0), await accounts.browser("t2", 0.0)) == (None, "bob")
    for i in range(BROWSERS_KEPT + 3):  # the oldest beyond the bound are forgotten
        await accounts.add_browser("alice", f"a{i}")
    assert [await accounts.browser(f"a{i}", 0.0) for i in range(3)] == [None] * 3
    assert await accounts.browser(f"a{BROWSERS_KEPT + 2}", 0.0) == await accounts.browser("a3", 0.0) == "alice"
    assert await accounts.browser("t2", 0.0) == "bob"  # another account's are its own
    await accounts.reset_mfa("alice", "cli:root")  # a reset second factor forgets the account's browsers
    assert await accounts.browser(f"a{BROWSERS_KEPT + 2}", 0.0) is None and await accounts.browser("t2", 0.0) == "bob"


async def test_sessions(store: Store) -> None:
    accounts = store.accounts
    await accounts.add_user("alice", ("admin",), False, "h", "cli:root")
    await accounts.open_session("pre", "alice", "mfa", "csrf-1", "10.0.0.1", "browser", 0.0)
    await accounts.open_session("full", "alice", "full", "csrf-2", "10.0.0.1", "browser", 1.0, replaces="pre")
    assert await accounts.session("pre") is None
    session = await accounts.session("full")
    assert session is not None and (session.stage, session.user, session.auth_at) == ("full", "alice", 1.0)
    await accounts.update_session("full", auth_at=5.0, pending={"challenge": "c"})
    await accounts.touch("full", session.seen_at + 10)
    changed = await accounts.session("full")
    assert changed is not None and changed.auth_at == 5.0 and changed.pending == {"challenge": "c"}
    assert [s.id_hash for s in await accounts.sessions("alice")] == ["full"]
    await accounts.set_state("alice", "disabled", "cli:root")  # ends the user's sessions
    assert await accounts.session("full") is None
    await accounts.set_state("alice", "active", "cli:root")
    await accounts.open_session("s2", "alice", "full", "csrf", "10.0.0.1", "browser", 1.0)
    assert await accounts.end_session("s2", "console:alice", "logout") and not await accounts.end_session("s2")
    await accounts.open_session("old", "alice", "full", "csrf", "10.0.0.1", "browser", 1.0)
    assert await accounts.expire_sessions(idle_before=4e9, created_before=0, pre_login_before=0) == 1
    assert [r.action for r in await store.audit.newest(1)] == ["console.session_logout"]


async def test_four_eyes_requests(store: Store) -> None:
    approvals = store.approvals
    first = await approvals.request("quarantine.release", "m-1", {"message_id": "m-1"}, "called", "console:alice",
                                    "acme", "m-1")
    with pytest.raises(AccountError, match="already waiting"):
        await approvals.request("quarantine.release", "m-1", {"message_id": "m-1"}, "again", "console:bob")
    with pytest.raises(AccountError, match="yourself"):
        await approvals.decide(first, "console:alice", True, lambda found: None)

    def refuse(_found: object) -> None:
        raise AccountError("not allowed")

    with pytest.raises(AccountError, match="not allowed"):
        await approvals.decide(first, "console:bob", True, refuse)
    decided = await approvals.decide(first, "console:bob", True, lambda found: None)
    assert (decided.state, decided.decided_by, decided.params) == ("approved", "console:bob", {"message_id": "m-1"})
    await approvals.finish(first, "released")
    done = await approvals.get(first)
    assert done is not None and (done.state, done.outcome) == ("approved", "released")
    with pytest.raises(AccountError, match="not waiting"):
        await approvals.decide(first, "console:carol", False, lambda found: None)
    second = await approvals.request("user.roles", "carol", {"roles": ["admin"]}, "new", "console:bob")
    with pytest.raises(AccountError):
        await approvals.withdraw(second, "console:alice")  # only the requester withdraws
    await approvals.withdraw(second, "console:bob")
    third = await approvals.request("user.roles", "dave", {"roles": []}, "x", "console:bob")
    await approvals.finish(third, "could not", failed=True)
    assert [a.state for a in await approvals.requests(None)] == ["failed", "withdrawn", "approved"]
    assert [a.id for a in await approvals.requests("failed")] == [third]
    assert await approvals.get(999) is None


# --- lifetime --------------------------------------------------------------------------------------

async def test_what_was_stored_survives_a_reopen_and_a_closed_store_refuses(opener: Opener) -> None:
    first = opener()
    inv = accepted_invoice("L-1")
    await first.intake.put(inv)
    await first.close()
    with pytest.raises(StorageUnavailable):
        await first.intake.put(accepted_invoice("L-2"))  # refused, not hung
    again = opener()
    try:
        found = await again.intake.find_accepted("acme", inv.sha256)
        assert found is not None and found.message_id == inv.message_id
        assert await again.outbox.load_sealed(inv.message_id) == inv.sealed
        assert (await again.intake.put(accepted_invoice("L-1"))).duplicate
    finally:
        await again.close()


@pytest.mark.parametrize("step", ["put", "record", "decide"])
async def test_the_stored_status_follows_every_change(store: Store, step: str) -> None:
    """Every change keeps the message's summary (what its sender is told) the same in lists and detail."""
    inv = accepted_invoice(f"F-{step}", holds=("x",) if step == "decide" else ())
    await store.intake.put(inv)
    changes: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: asyncio.sleep(0),
        "record": lambda: _deliver(store),
        "decide": lambda: store.quarantine.decide(inv.message_id, False, "op", "no"),
    }
    await changes[step]()
    detail = await store.reports.message(inv.message_id)
    [listed] = await store.reports.messages()
    assert detail is not None and listed.status == detail.status
    assert [m.message_id for m in await store.reports.messages(status=detail.status)] == [inv.message_id]


async def _deliver(store: Store) -> None:
    [job] = await store.outbox.claim("a", 2e9, {"erp": 1}, 60)
    await store.outbox.record(job, delivered_at=stamp(), next_attempt_at=None, error=None, owner="a")


# --- notices (the SMTP listener's replies) -----------------------------------------------------------

def notice(outcome: str = "accepted", message_id: str | None = None) -> Notice:
    body = json.dumps({"outcome": outcome}).encode()
    return Notice(str(uuid.uuid4()), "acme", message_id, "billing@acme.example", "<m-1@acme.example>", outcome,
                  b"DER", "aes-256-gcm", b"sealed:" + body, hashlib.sha256(body).hexdigest(), "k1")


async def test_notices_go_through_the_outbox(store: Store) -> None:
    sent, failing = notice(), notice("rejected")
    await store.outbox.enqueue(sent)
    await store.outbox.enqueue(failing)
    assert await store.outbox.pending_by_destination() == {REPLIES: 2}
    assert (await store.outbox.depth()).jobs == 2 and await store.keys.usage() == {"k1": 2}
    assert await store.outbox.load_sealed(sent.id) == sent.sealed
    jobs = await store.outbox.claim("a", 2e9, {REPLIES: 10, "erp": 10}, 60)
    assert {(j.message_id, j.destination) for j in jobs} == {(sent.id, REPLIES), (failing.id, REPLIES)}
    assert await store.outbox.claim("b", 2e9, {REPLIES: 10}, 60) == []  # leased to "a"
    by_id = {j.message_id: j for j in jobs}
    job = by_id[sent.id]
    assert isinstance(job, NoticeJob) and (job.to, job.in_reply_to, job.outcome, job.certificate, job.cipher) == (
        "billing@acme.example", "<m-1@acme.example>", "accepted", b"DER", "aes-256-gcm")
    await store.outbox.record(job, delivered_at="2026-01-01T00:00:00.000000Z", next_attempt_at=None, error=None, owner="a")
    await store.outbox.record(by_id[failing.id], delivered_at=None, next_attempt_at=2e9 + 30, error="relay down", owner="a")
    assert await store.outbox.load_sealed(sent.id) is None  # sent: its sealed body is gone
    assert await store.keys.usage() == {"k1": 1}
    assert [j.message_id for j in await store.outbox.due(2e9 + 30, 10)] == [failing.id]
    [again] = await store.outbox.claim("b", 2e9 + 30, {REPLIES: 10}, 60)
    await store.outbox.record(again, delivered_at=None, next_attempt_at=None, error="refused", dead=True, owner="b")
    assert await store.outbox.pending_by_destination() == {} and await store.keys.usage() == {}
    assert await store.reports.dead_letters() == []  # the operators' dead letters are invoices
    assert await store.retention.expire("2026-01-02T00:00:00.000000Z", 10) == []
    await store.outbox.enqueue(sent)  # (the same id again: only if the sent one was deleted by retention)


async def test_a_released_notice_lease_is_claimed_again(store: Store) -> None:
    waiting = notice()
    await store.outbox.enqueue(waiting)
    await store.outbox.claim("a", 2e9, {REPLIES: 1}, 60)
    assert await store.outbox.release("a") == 1
    assert [j.message_id for j in await store.outbox.claim("b", 2e9, {REPLIES: 1}, 60)] == [waiting.id]
