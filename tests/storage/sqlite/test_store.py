"""SqliteStore on its own: receipts, duplicates, conflicts, status, group commit, reopening."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import uuid
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import Conflict, StorageUnavailable
from gateway.model import AcceptedInvoice, DocumentType, Receipt
from gateway.storage.sqlite.engine import MAX_BATCH, Engine
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers.records import WAIT, accepted_invoice


async def put(store: SqliteStore, inv: AcceptedInvoice, *destinations: str) -> Receipt:
    """The durable put, routed to ``destinations``; returns once it is durable (or fails within WAIT)."""
    return await asyncio.wait_for(store.intake.put(replace(inv, destinations=destinations)), WAIT)


def committed(store: SqliteStore, message_id: str) -> int:
    """Read with a connection of our own: only what was committed is visible."""
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute("SELECT count(*) FROM invoices WHERE message_id = ?", (message_id,)).fetchone()[0])
    finally:
        conn.close()


async def test_put_then_find_status_and_load(store: SqliteStore) -> None:
    inv = accepted_invoice("1")
    receipt = await put(store, inv, "erp")
    assert committed(store, inv.message_id) == 1  # durable once the put returned
    assert (receipt.message_id, receipt.status, receipt.sha256, receipt.duplicate) == (inv.message_id, "accepted", inv.sha256, False)
    found = await store.intake.find_accepted("acme", inv.sha256)
    assert found is not None and (found.message_id, found.duplicate) == (inv.message_id, True)
    assert await store.intake.find_accepted("other", inv.sha256) is None
    assert await store.intake.find_accepted("acme", "0" * 64) is None
    status = await store.intake.status(inv.message_id, "acme")
    assert status is not None and status.status == "accepted" and status.invoice_number == "1"
    assert status.as_json()["deliveries"] == [{"destination": "erp", "status": "pending", "attempts": 0, "delivered_at": None}]
    assert await store.intake.status(inv.message_id, "other") is None  # another partner does not see it
    assert await store.intake.status(str(uuid.uuid4()), "acme") is None
    assert await store.outbox.load_sealed(inv.message_id) == inv.sealed
    assert await store.reports.counts() == {"invoices": 1, "deliveries_pending": 1}


async def test_same_content_again_returns_the_first_receipt(store: SqliteStore) -> None:
    first = accepted_invoice("1")
    await put(store, first, "erp")
    again = await put(store, accepted_invoice("1"), "erp")  # same bytes, new message id
    assert (again.message_id, again.duplicate) == (first.message_id, True)
    assert await store.reports.counts() == {"invoices": 1, "deliveries_pending": 1}


async def test_same_number_other_content_conflicts(store: SqliteStore) -> None:
    await put(store, accepted_invoice("1"), "erp")
    with pytest.raises(Conflict) as err:
        await put(store, accepted_invoice("1", content="changed"), "erp")
    assert err.value.code == "DUPLICATE_CONFLICT" and err.value.http_status == 409
    # The credit-note series, or another partner, may use the same number.
    await put(store, accepted_invoice("1", content="cn", kind=DocumentType.UBL_CREDIT_NOTE), "erp")
    await put(store, accepted_invoice("1", content="b", partner="beta"), "erp")
    assert (await store.reports.counts())["invoices"] == 3


def hold_writer(store: SqliteStore) -> tuple[threading.Event, Future[Any]]:
    """Keep the writer busy inside one transaction, so that what is submitted meanwhile queues up."""
    gate, inside = threading.Event(), threading.Event()

    def wait(_conn: sqlite3.Connection) -> None:
        inside.set()
        gate.wait(WAIT)

    fut = store.engine.submit(wait)
    assert inside.wait(WAIT)
    return gate, fut


async def queued(store: SqliteStore, *invoices: AcceptedInvoice) -> list[asyncio.Task[Receipt]]:
    """Puts (to "erp") submitted to the writer in this order; their tasks, not yet finished."""
    tasks = [asyncio.create_task(store.intake.put(replace(x, destinations=("erp",)))) for x in invoices]
    await asyncio.sleep(0)  # each task runs up to its submission to the writer's queue
    assert not any(t.done() for t in tasks)
    return tasks


async def test_a_conflict_in_a_batch_spares_the_others(store: SqliteStore) -> None:
    gate, held = hold_writer(store)
    a, b, c = accepted_invoice("1"), accepted_invoice("1", content="changed"), accepted_invoice("2")
    futures = await queued(store, a, b, c)
    gate.set()
    await asyncio.wait_for(asyncio.wrap_future(held), WAIT)
    assert (await asyncio.wait_for(futures[0], WAIT)).message_id == a.message_id
    with pytest.raises(Conflict):
        await asyncio.wait_for(futures[1], WAIT)
    assert (await asyncio.wait_for(futures[2], WAIT)).message_id == c.message_id
    assert [committed(store, x.message_id) for x in (a, b, c)] == [1, 0, 1]


async def test_group_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commits: list[str] = []
    real_connect = Engine.connect

    def connect(self: Engine) -> sqlite3.Connection:
        conn = real_connect(self)
        if threading.current_thread().name == "store-writer":
            conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
        return conn

    monkeypatch.setattr(Engine, "connect", connect)
    store = SqliteStore(tmp_path / "state")
    try:
        gate, held = hold_writer(store)
        tasks, per_task = 8, 25
        futures = await queued(store, *(accepted_invoice(f"{t}-{i}") for t in range(tasks) for i in range(per_task)))
        gate.set()
        await asyncio.wait_for(asyncio.wrap_future(held), WAIT)
        receipts = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        puts = tasks * per_task
        assert len({r.message_id for r in receipts}) == puts and not any(r.duplicate for r in receipts)
        assert (await store.reports.counts())["invoices"] == puts
        # The held transaction, then the queued puts in batches of at most MAX_BATCH.
        assert 1 <= len(commits) <= 1 + math.ceil(puts / MAX_BATCH) < puts
    finally:
        await store.close()


async def test_reopen_after_close_keeps_everything(tmp_path: Path) -> None:
    inv = accepted_invoice("1")
    store = SqliteStore(tmp_path / "state")
    await put(store, inv, "erp")
    await store.close()
    with pytest.raises(StorageUnavailable):
        await put(store, accepted_invoice("2"), "erp")  # closed: refused, not hung
    reopened = SqliteStore(tmp_path / "state")
    try:
        found = await reopened.intake.find_accepted("acme", inv.sha256)
        assert found is not None and found.message_id == inv.message_id
        assert await reopened.outbox.load_sealed(inv.message_id) == inv.sealed
        assert await reopened.reports.counts() == {"invoices": 1, "deliveries_pending": 1}
        again = await put(reopened, accepted_invoice("1"), "erp")
        assert (again.message_id, again.duplicate) == (inv.message_id, True)  # duplicates survive restarts
    finally:
        await reopened.close()


# --- the stored status summary (schema 7) --------------------------------------------------------------


async def stored_status(store: SqliteStore) -> dict[str, str]:
    return await store.engine.read(lambda conn: dict(conn.execute("SELECT message_id, status FROM invoices").fetchall()))


async def computed_status(store: SqliteStore) -> dict[str, str]:
    """What store.reports.message() derives from the quarantine and delivery rows, message by message."""
    out = {}
    for mid in await stored_status(store):
        detail = await store.reports.message(mid)
        assert detail is not None
        out[mid] = detail.status
    return out


async def test_the_status_column_follows_every_change(store: SqliteStore) -> None:
    plain, two, held, rejected, nowhere = (accepted_invoice(f"S-{n}") for n in range(5))
    await put(store, plain, "erp")
    await put(store, two, "erp", "archive")
    await put(store, replace(held, holds=("over the ceiling",)), "erp")
    await put(store, replace(rejected, holds=("over the ceiling",)), "erp")
    await put(store, nowhere)
    steps = [dict(await stored_status(store))]

    jobs = {(j.message_id, j.destination): j for j in await store.outbox.claim("w", 2e9, {"erp": 10, "archive": 10}, 60)}
    await store.outbox.record(jobs[plain.message_id, "erp"], delivered_at="2026-11-20T00:00:01Z", next_attempt_at=None,
                              error=None, owner="w")
    await store.outbox.record(jobs[two.message_id, "erp"], delivered_at="2026-11-20T00:00:01Z", next_attempt_at=None,
                              error=None, owner="w")
    await store.outbox.record(jobs[two.message_id, "archive"], delivered_at=None, next_attempt_at=None, error="refused",
                              dead=True, owner="w")
    await store.quarantine.decide(held.message_id, True, "op", "checked")
    await store.quarantine.decide(rejected.message_id, False, "op", "fraud")
    steps.append(dict(await stored_status(store)))
    await store.outbox.retry(two.message_id, "archive", "op", requeue=True, reason="fixed")
    steps.append(dict(await stored_status(store)))

    assert steps[0] == {plain.message_id: "accepted", two.message_id: "accepted", held.message_id: "held",
                        rejected.message_id: "held", nowhere.message_id: "accepted"}
    assert steps[1] == {plain.message_id: "delivered", two.message_id: "dead-letter", held.message_id: "accepted",
                        rejected.message_id: "rejected", nowhere.message_id: "accepted"}
    assert steps[2][two.message_id] == "accepted"
    assert await stored_status(store) == await computed_status(store)
    for status in ("accepted", "delivered", "rejected"):
        assert {m.message_id for m in await store.reports.messages(status=status)} == {
            mid for mid, s in (await stored_status(store)).items() if s == status}
    assert [m.message_id for m in await store.reports.messages(status="pending")] != []  # a delivery state still filters


async def test_a_schema_6_database_gets_its_status_column_filled(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state")
    try:
        done, held = accepted_invoice("M-1"), accepted_invoice("M-2")
        await put(store, done, "erp")
        await put(store, replace(held, holds=("over the ceiling",)), "erp")
        job = (await store.outbox.claim("w", 2e9, {"erp": 10}, 60))[0]
        await store.outbox.record(job, delivered_at="2026-11-20T00:00:01Z", next_attempt_at=None, error=None, owner="w")
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state" / "gateway.db") as conn:
        conn.execute("DROP INDEX invoices_status")
        conn.execute("ALTER TABLE invoices DROP COLUMN status")
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    conn.close()
    store = SqliteStore(tmp_path / "state")
    try:
        assert await stored_status(store) == {done.message_id: "delivered", held.message_id: "held"}
        assert await stored_status(store) == await computed_status(store)
    finally:
        await store.close()


async def test_a_schema_8_database_gets_its_business_keys_filled(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state")
    try:
        first = accepted_invoice("INV-42")
        await store.intake.put(first)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state" / "gateway.db") as conn:
        conn.execute("UPDATE invoices SET number_key = '', date_key = ''")
        conn.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")
    conn.close()
    store = SqliteStore(tmp_path / "state")
    try:
        with pytest.raises(Conflict):
            await store.intake.put(accepted_invoice("inv-042", content="again", issue_date="2026-11-02Z"))
    finally:
        await store.close()
