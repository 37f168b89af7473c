"""SqliteStore on its own: receipts, duplicates, conflicts, status, group commit, reopening."""

from __future__ import annotations

import hashlib
import math
import sqlite3
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import Conflict, StorageUnavailable
from gateway.model import AcceptedInvoice, DocumentType, InvoiceFacts
from gateway.storage.sqlite import MAX_BATCH, SqliteStore

WAIT = 10  # seconds; a future that takes longer is a failure, not a hang


def invoice(number: str, *, partner: str = "acme", content: str = "",
            doc_type: DocumentType = DocumentType.UBL_INVOICE) -> AcceptedInvoice:
    body = f"<Invoice>{number}{content}</Invoice>".encode()
    facts = InvoiceFacts(doc_type, number, "2.1", ("0088:1",), ("0088:2",), "urn:c", "urn:p", "2026-11-02",
                         credit_note=doc_type is DocumentType.UBL_CREDIT_NOTE)
    return AcceptedInvoice(str(uuid.uuid4()), partner, hashlib.sha256(body).hexdigest(), "2026-11-20T00:00:00.000000Z",
                           len(body), facts, b"sealed:" + body, "k1")


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "state")
    yield s
    s.close()


def committed(store: SqliteStore, message_id: str) -> int:
    """Read with a connection of our own: only what was committed is visible."""
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute("SELECT count(*) FROM invoices WHERE message_id = ?", (message_id,)).fetchone()[0])
    finally:
        conn.close()


def test_put_then_find_status_and_load(store):
    inv = invoice("1")
    receipt = store.put(inv, ["erp"]).result(WAIT)
    assert committed(store, inv.message_id) == 1  # durable once the future resolved
    assert (receipt.message_id, receipt.status, receipt.sha256, receipt.duplicate) == (inv.message_id, "accepted", inv.sha256, False)
    found = store.find_accepted("acme", inv.sha256)
    assert found is not None and (found.message_id, found.duplicate) == (inv.message_id, True)
    assert store.find_accepted("other", inv.sha256) is None
    assert store.find_accepted("acme", "0" * 64) is None
    status = store.status(inv.message_id, "acme")
    assert status is not None and status["status"] == "accepted" and status["invoice_number"] == "1"
    assert status["deliveries"] == [{"destination": "erp", "status": "pending", "attempts": 0, "delivered_at": None}]
    assert store.status(inv.message_id, "other") is None  # another partner does not see it
    assert store.status(str(uuid.uuid4()), "acme") is None
    assert store.load_sealed(inv.message_id) == inv.sealed
    assert store.counts() == {"invoices": 1, "deliveries_pending": 1}


def test_same_content_again_returns_the_first_receipt(store):
    first = invoice("1")
    store.put(first, ["erp"]).result(WAIT)
    again = store.put(invoice("1"), ["erp"]).result(WAIT)  # same bytes, new message id
    assert (again.message_id, again.duplicate) == (first.message_id, True)
    assert store.counts() == {"invoices": 1, "deliveries_pending": 1}


def test_same_number_other_content_conflicts(store):
    store.put(invoice("1"), ["erp"]).result(WAIT)
    with pytest.raises(Conflict) as err:
        store.put(invoice("1", content="changed"), ["erp"]).result(WAIT)
    assert err.value.code == "DUPLICATE_CONFLICT" and err.value.http_status == 409
    # The credit-note series, or another partner, may use the same number.
    store.put(invoice("1", content="cn", doc_type=DocumentType.UBL_CREDIT_NOTE), ["erp"]).result(WAIT)
    store.put(invoice("1", content="b", partner="beta"), ["erp"]).result(WAIT)
    assert store.counts()["invoices"] == 3


def hold_writer(store: SqliteStore) -> tuple[threading.Event, Future[Any]]:
    """Keep the writer busy inside one transaction, so that what is submitted meanwhile queues up."""
    gate, inside = threading.Event(), threading.Event()

    def wait(_conn: sqlite3.Connection) -> None:
        inside.set()
        gate.wait(WAIT)

    fut = store._submit(wait)
    assert inside.wait(WAIT)
    return gate, fut


def test_a_conflict_in_a_batch_spares_the_others(store):
    gate, held = hold_writer(store)
    a, b, c = invoice("1"), invoice("1", content="changed"), invoice("2")
    futures = [store.put(x, ["erp"]) for x in (a, b, c)]
    gate.set()
    held.result(WAIT)
    assert futures[0].result(WAIT).message_id == a.message_id
    with pytest.raises(Conflict):
        futures[1].result(WAIT)
    assert futures[2].result(WAIT).message_id == c.message_id
    assert [committed(store, x.message_id) for x in (a, b, c)] == [1, 0, 1]


def test_group_commit(tmp_path, monkeypatch):
    commits: list[str] = []
    real_connect = SqliteStore._connect

    def connect(self: SqliteStore) -> sqlite3.Connection:
        conn = real_connect(self)
        if threading.current_thread().name == "store-writer":
            conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
        return conn

    monkeypatch.setattr(SqliteStore, "_connect", connect)
    store = SqliteStore(tmp_path / "state")
    try:
        gate, held = hold_writer(store)
        threads, per_thread = 8, 25
        barrier = threading.Barrier(threads)

        def submit(t: int) -> list[Future[Any]]:
            barrier.wait(WAIT)
            return [store.put(invoice(f"{t}-{i}"), ["erp"]) for i in range(per_thread)]

        with ThreadPoolExecutor(threads) as pool:
            futures = [f for fs in pool.map(submit, range(threads)) for f in fs]
        gate.set()
        held.result(WAIT)
        receipts = [f.result(WAIT) for f in futures]
        puts = threads * per_thread
        assert len({r.message_id for r in receipts}) == puts and not any(r.duplicate for r in receipts)
        assert store.counts()["invoices"] == puts
        # The held transaction, then the queued puts in batches of at most MAX_BATCH.
        assert 1 <= len(commits) <= 1 + math.ceil(puts / MAX_BATCH) < puts
    finally:
        store.close()


def test_reopen_after_close_keeps_everything(tmp_path):
    inv = invoice("1")
    store = SqliteStore(tmp_path / "state")
    store.put(inv, ["erp"]).result(WAIT)
    store.close()
    with pytest.raises(StorageUnavailable):
        store.put(invoice("2"), ["erp"]).result(WAIT)  # closed: refused, not hung
    reopened = SqliteStore(tmp_path / "state")
    try:
        found = reopened.find_accepted("acme", inv.sha256)
        assert found is not None and found.message_id == inv.message_id
        assert reopened.load_sealed(inv.message_id) == inv.sealed
        assert reopened.counts() == {"invoices": 1, "deliveries_pending": 1}
        again = reopened.put(invoice("1"), ["erp"]).result(WAIT)
        assert (again.message_id, again.duplicate) == (inv.message_id, True)  # duplicates survive restarts
    finally:
        reopened.close()


# --- the stored status summary (schema 7) --------------------------------------------------------------


def stored_status(store: SqliteStore) -> dict[str, str]:
    return dict(store.read().execute("SELECT message_id, status FROM invoices").fetchall())


def computed_status(store: SqliteStore) -> dict[str, str]:
    """What store.message() derives from the quarantine and delivery rows, message by message."""
    return {mid: store.message(mid)["status"] for mid in stored_status(store)}  # type: ignore[index]


def test_the_status_column_follows_every_change(store: SqliteStore) -> None:
    from dataclasses import replace

    plain, two, held, rejected, nowhere = (invoice(f"S-{n}") for n in range(5))
    store.put(plain, ["erp"]).result(WAIT)
    store.put(two, ["erp", "archive"]).result(WAIT)
    store.put(replace(held, holds=("over the ceiling",)), ["erp"]).result(WAIT)
    store.put(replace(rejected, holds=("over the ceiling",)), ["erp"]).result(WAIT)
    store.put(nowhere, []).result(WAIT)
    steps = [dict(stored_status(store))]

    jobs = {(j.message_id, j.destination): j for j in store.claim("w", 2e9, {"erp": 10, "archive": 10}, 60).result(WAIT)}
    store.record_delivery(jobs[plain.message_id, "erp"], delivered_at="2026-11-20T00:00:01Z", next_attempt_at=None,
                          error=None, owner="w").result(WAIT)
    store.record_delivery(jobs[two.message_id, "erp"], delivered_at="2026-11-20T00:00:01Z", next_attempt_at=None,
                          error=None, owner="w").result(WAIT)
    store.record_delivery(jobs[two.message_id, "archive"], delivered_at=None, next_attempt_at=None, error="refused",
                          dead=True, owner="w").result(WAIT)
    store.decide(held.message_id, True, "op", "checked").result(WAIT)
    store.decide(rejected.message_id, False, "op", "fraud").result(WAIT)
    steps.append(dict(stored_status(store)))
    store.retry(two.message_id, "archive", "op", requeue=True, reason="fixed").result(WAIT)
    steps.append(dict(stored_status(store)))

    assert steps[0] == {plain.message_id: "accepted", two.message_id: "accepted", held.message_id: "held",
                        rejected.message_id: "held", nowhere.message_id: "accepted"}
    assert steps[1] == {plain.message_id: "delivered", two.message_id: "dead-letter", held.message_id: "accepted",
                        rejected.message_id: "rejected", nowhere.message_id: "accepted"}
    assert steps[2][two.message_id] == "accepted"
    assert stored_status(store) == computed_status(store)
    for status in ("accepted", "delivered", "rejected"):
        assert {m["message_id"] for m in store.messages(status=status)} == {
            mid for mid, s in stored_status(store).items() if s == status}
    assert [m["message_id"] for m in store.messages(status="pending")] != []  # a delivery state still filters


def test_a_schema_6_database_gets_its_status_column_filled(tmp_path: Path) -> None:
    from dataclasses import replace

    store = SqliteStore(tmp_path / "state")
    try:
        done, held = invoice("M-1"), invoice("M-2")
        store.put(done, ["erp"]).result(WAIT)
        store.put(replace(held, holds=("over the ceiling",)), ["erp"]).result(WAIT)
        job = store.claim("w", 2e9, {"erp": 10}, 60).result(WAIT)[0]
        store.record_delivery(job, delivered_at="2026-11-20T00:00:01Z", next_attempt_at=None, error=None,
                              owner="w").result(WAIT)
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "state" / "gateway.db") as conn:
        conn.execute("DROP INDEX invoices_status")
        conn.execute("ALTER TABLE invoices DROP COLUMN status")
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    conn.close()
    store = SqliteStore(tmp_path / "state")
    try:
        assert stored_status(store) == {done.message_id: "delivered", held.message_id: "held"}
        assert stored_status(store) == computed_status(store)
    finally:
        store.close()
