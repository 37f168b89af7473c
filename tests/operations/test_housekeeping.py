"""Retention and certificate expiry: what runs for years beside the traffic.

Store level: ``expire`` deletes only invoices whose every delivery succeeded before the cutoff
(content, index row and delivery rows), keeps a tombstone and the audit trail; held, dead-lettered,
pending and partly delivered invoices stay.  Gateway level: after expiry, the same bytes still get
the duplicate receipt and the same number with other content still gets 409.  ExpiryWarnings logs
each certificate once per threshold.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from cryptography import x509

from gateway import devpki, logs
from gateway.cli.demo import SAMPLE
from gateway.operations import audit, instance
from gateway.operations import housekeeping as lifecycle
from gateway.operations.housekeeping import CertEntry, ExpiryWarnings
from gateway.partners.edit import register_partner
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import FakeClock, Running, eventually, log_events, numbered, post, serving_logged

IBAN = b"DE89370400440532013000"
OTHER_IBAN = b"GB82WEST12345698765432"  # valid check digits, never used by this seller before
assert SAMPLE.count(IBAN) == 1


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ago(days: float) -> str:
    return iso(datetime.now(UTC) - timedelta(days=days))


def set_retention(inst: instance.Instance, days: float) -> None:
    text = inst.config.read_text()
    assert "delete_after_days = 0\n" in text
    inst.config.write_text(text.replace("delete_after_days = 0\n", f"delete_after_days = {days}\n", 1))


@contextlib.asynccontextmanager
async def running(inst: instance.Instance, clock: FakeClock | None = None
                  ) -> AsyncIterator[tuple[Running, io.StringIO, aiohttp.ClientSession]]:
    """The gateway (on ``clock``, when given: its housekeeping waits only for ``clock.advance``) and a partner session."""
    async with serving_logged(inst, clock) as (r, stream), r.session() as s:
        yield r, stream, s


async def delivery_states(store: SqliteStore, message_id: str) -> list[str]:
    m = await store.reports.message(message_id)
    return [] if m is None else [d.state for d in m.deliveries]


async def all_delivered(store: SqliteStore, *message_ids: str) -> bool:
    return all([await delivery_states(store, m) == ["delivered"] for m in message_ids])


def rows(db: sqlite3.Connection, table: str, message_id: str) -> int:
    return db.execute(f"SELECT count(*) FROM {table} WHERE message_id = ?", (message_id,)).fetchone()[0]  # noqa: S608


# --- store level ------------------------------------------------------------------------------------


async def accept_set(inst: instance.Instance) -> dict[str, str]:
    """Invoices in every state retention must tell apart; returns name → message id (the gateway stopped)."""
    ids: dict[str, str] = {}
    async with running(inst) as (r, _stream, s):
        for name in ("old", "recent", "dead", "pending", "partly", "mixed", "released"):
            status, reply = await post(s, numbered(f"RET-{name}"))
            assert status == 202 and reply["status"] == "accepted", reply
            ids[name] = reply["message_id"]
        # A payee account this seller never used: held for review (its delivery waits, state "held").
        status, reply = await post(s, numbered("RET-held").replace(IBAN, OTHER_IBAN))
        assert status == 202 and reply["status"] == "held", reply
        ids["held"] = reply["message_id"]
        status, reply = await post(s, numbered("RET-held-2").replace(IBAN, OTHER_IBAN))
        assert status == 202 and reply["status"] == "held", reply
        ids["released"] = reply["message_id"]  # released below, then delivered
        await r.gw.store.quarantine.decide(ids["released"], True, "test", "checked by phone")
        r.gw.outbox.wake.set()
        delivered = [v for k, v in ids.items() if k != "held"]
        await eventually(lambda: all_delivered(r.gw.store, *delivered), "deliveries")
    return ids


def age(db: sqlite3.Connection, ids: dict[str, str]) -> None:
    """Move the delivery history back in time, as if the gateway had run for months."""
    def delivered(name: str, days: float, destination: str = "erp-inbox") -> None:
        db.execute("UPDATE deliveries SET delivered_at = ? WHERE message_id = ? AND destination = ?",
                   (ago(days), ids[name], destination))

    for name in ("old", "dead", "pending", "partly", "mixed", "released"):
        delivered(name, 100)
    delivered("recent", 1)
    db.execute("UPDATE deliveries SET state = 'dead', delivered_at = NULL WHERE message_id = ?", (ids["dead"],))
    db.execute("UPDATE deliveries SET state = 'pending', delivered_at = NULL WHERE message_id = ?", (ids["pending"],))
    # A second destination: still pending for one, delivered recently for the other.
    for name, state, at in (("partly", "pending", None), ("mixed", "delivered", ago(1))):
        db.execute("INSERT INTO deliveries (message_id, destination, state, created_at, next_attempt_at, delivered_at) "
                   "VALUES (?, 'erp-two', ?, 0, 0, ?)", (ids[name], state, at))
    db.execute("UPDATE quarantine SET held_at = ? WHERE message_id = ?", (ago(100), ids["held"]))
    db.commit()


@pytest.mark.slow
async def test_store_expire_deletes_only_invoices_delivered_before_the_cutoff(inst):
    ids = await accept_set(inst)
    db_path = inst.state_dir / "gateway.db"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        age(db, ids)
    store = SqliteStore(inst.state_dir)
    try:
        expired = await store.retention.expire(ago(30), 500)
        assert sorted(expired) == sorted([ids["old"], ids["released"]])
        assert await store.retention.expire(ago(30), 500) == []  # nothing twice

        with contextlib.closing(sqlite3.connect(db_path)) as db:
            for name in ("old", "released"):
                m = ids[name]
                for table in ("invoices", "blobs", "deliveries", "quarantine"):
                    assert rows(db, table, m) == 0, (name, table)
                assert rows(db, "retired", m) == 1
                actions = [a for (a,) in db.execute("SELECT action FROM audit WHERE message_id = ? ORDER BY seq", (m,))]
                assert "invoice.accepted" in actions and "delivery.delivered" in actions
                assert actions[-1] == "invoice.expired"
            for name in ("recent", "dead", "pending", "partly", "mixed", "held"):
                m = ids[name]
                assert rows(db, "invoices", m) == 1 and rows(db, "blobs", m) == 1, name
                assert rows(db, "retired", m) == 0, name
                assert rows(db, "audit", m) > 0
            assert rows(db, "quarantine", ids["held"]) == 1
            [(detail,)] = db.execute("SELECT detail FROM audit WHERE action = 'invoice.expired' AND message_id = ?",
                                     (ids["old"],))
        assert json.loads(detail)["sha256"]
        assert await store.reports.message(ids["old"]) is None
        assert await store.outbox.load_sealed(ids["old"]) is None  # no sealed content left (was: KeyError)
        status = await store.intake.status(ids["recent"], instance.DEMO_PARTNER)
        assert status is not None and status.status == "delivered"

        # The hash chain of the audit log is intact: expiry only appends.
        signing = x509.load_pem_x509_certificate(inst.signing.cert.read_bytes())
        report = audit.verify(await audit.read_chain(store.audit), [signing])
        assert report.ok, report.as_dict()
    finally:
        await store.close()


async def test_store_expire_works_in_batches(inst):
    async with running(inst) as (r, _stream, s):
        ids = []
        for i in range(5):
            status, reply = await post(s, numbered(f"BATCH-{i}"))
            assert status == 202
            ids.append(reply["message_id"])
        await eventually(lambda: all_delivered(r.gw.store, *ids), "deliveries")
        with contextlib.closing(sqlite3.connect(inst.state_dir / "gateway.db")) as db:
            db.execute("UPDATE deliveries SET delivered_at = ?", (ago(10),))
            db.commit()
        first = await r.gw.store.retention.expire(ago(5), 2)
        second = await r.gw.store.retention.expire(ago(5), 2)
        third = await r.gw.store.retention.expire(ago(5), 2)
        assert (len(first), len(second), len(third)) == (2, 2, 1)
        assert sorted(first + second + third) == sorted(ids)
        assert (await r.gw.store.reports.counts())["invoices"] == 0


# --- gateway level --------------------------------------------------------------------------------------


async def test_expired_invoice_still_counts_as_a_duplicate(inst):
    set_retention(inst, 0.00001)  # 0.864 s
    clock = FakeClock()
    async with running(inst, clock) as (r, stream, s):
        status, first = await post(s, SAMPLE)
        assert status == 202 and not first["duplicate"], first
        status, held = await post(s, numbered("RET-HELD").replace(IBAN, OTHER_IBAN))
        assert status == 202 and held["status"] == "held", held
        await eventually(lambda: all_delivered(r.gw.store, first["message_id"]), "delivery")
        await clock.advance(60.0)  # past the retention period (not yet time for a retention pass of its own)

        assert await r.gw.housekeeping.expire() == 1
        [deleted] = log_events(stream, "retention.deleted")
        assert deleted["invoices"] == 1
        assert await r.gw.store.reports.message(first["message_id"]) is None
        assert await r.gw.store.reports.message(held["message_id"]) is not None  # held for review: kept
        async with s.get(f"/v1/invoices/{first['message_id']}") as resp:
            assert resp.status == 404

        # The same bytes again: the same receipt, as a duplicate.
        status, again = await post(s, SAMPLE)
        assert status == 202, again
        assert again["message_id"] == first["message_id"] and again["duplicate"] is True
        assert again["sha256"] == first["sha256"]
        # Other content under the same invoice number and issue date: still a conflict.
        changed = SAMPLE.replace(b"<cbc:Note>Sample invoice", b"<cbc:Note>Corrected sample invoice", 1)
        assert changed != SAMPLE
        status, conflict = await post(s, changed)
        assert status == 409, conflict
        assert conflict["error"] == "DUPLICATE_CONFLICT"
        assert first["message_id"] in json.dumps(conflict)
        # A new number is a new invoice.
        status, fresh = await post(s, numbered("RET-NEW"))
        assert status == 202 and not fresh["duplicate"]
        assert (await r.gw.store.reports.counts())["invoices"] == 2  # the held one and the new one


async def test_disabling_retention_by_reload_keeps_invoices(inst):
    set_retention(inst, 30)
    clock = FakeClock()
    async with running(inst, clock) as (r, _stream, s):
        status, reply = await post(s, SAMPLE)
        assert status == 202
        await eventually(lambda: all_delivered(r.gw.store, reply["message_id"]), "delivery")
        inst.config.write_text(inst.config.read_text().replace("delete_after_days = 30\n", "delete_after_days = 0\n"))
        assert await r.gw.reload() is True
        for _ in range(3):  # several retention passes, past the 30 days the invoice was to be kept
            await clock.advance(11 * 86400.0)
        assert await r.gw.store.reports.message(reply["message_id"]) is not None


async def test_enabling_retention_by_reload_takes_effect(inst):
    clock = FakeClock()
    async with running(inst, clock) as (r, stream, s):
        status, reply = await post(s, SAMPLE)
        assert status == 202
        await eventually(lambda: all_delivered(r.gw.store, reply["message_id"]), "delivery")
        set_retention(inst, 0.00001)
        assert await r.gw.reload() is True
        await clock.advance(lifecycle.RETENTION_CHECK_S)  # the next retention pass, past the retention period

        async def took_effect() -> bool:
            return await r.gw.store.reports.message(reply["message_id"]) is None or bool(log_events(stream, "config.restart_needed"))

        # Either retention now runs, or the reload says that it needs a restart.
        await eventually(took_effect, "retention to delete the invoice, or config.restart_needed")


# --- certificate expiry warnings ---------------------------------------------------------------------------


def entry(owner: str, days: float, now: datetime, purpose: str = "client") -> CertEntry:
    return CertEntry(owner, purpose, f"CN={owner}", f"{owner}-spki", now + timedelta(days=days))


def test_expiry_warnings_once_per_threshold():
    stream = io.StringIO()
    logs.configure("debug", stream)
    try:
        now = datetime.now(UTC)
        counted: list[str] = []
        warnings = ExpiryWarnings((30, 14, 7), counted.append)
        entries = [entry("in-20", 20, now), entry("in-10", 10, now), entry("in-3", 3, now), entry("gone", -1, now),
                   entry("in-100", 100, now, purpose="tls-server")]
        warnings.check(entries, now)
        expiring = {e["owner"]: e for e in log_events(stream, "certificate.expiring")}
        assert {o: e["threshold_days"] for o, e in expiring.items()} == {"in-20": 30, "in-10": 14, "in-3": 7}
        assert all(e["level"] == "warning" for e in expiring.values())
        assert expiring["in-10"]["days_left"] == 10.0 and expiring["in-10"]["spki_sha256"] == "in-10-spki"
        [expired] = log_events(stream, "certificate.expired")
        assert expired["owner"] == "gone" and expired["level"] == "error"
        assert counted == ["30", "14", "7", "0"]

        warnings.check(entries, now)  # the next hourly check: nothing new
        warnings.check(entries, now + timedelta(minutes=1))
        assert len(log_events(stream, "certificate.expiring")) == 3 and len(log_events(stream, "certificate.expired")) == 1
        assert counted == ["30", "14", "7", "0"]

        # Eleven days on: in-20 crosses 14, in-10 and in-3 have expired; gone was said already.
        later = now + timedelta(days=11)
        warnings.check(entries, later)
        warnings.check(entries, later)
        assert [(e["owner"], e["threshold_days"]) for e in log_events(stream, "certificate.expiring")][3:] == [("in-20", 14)]
        assert [e["owner"] for e in log_events(stream, "certificate.expired")][1:] == ["in-10", "in-3"]
        assert counted == ["30", "14", "7", "0", "14", "0", "0"]
    finally:
        logs.configure("debug")


async def test_housekeeping_warns_of_an_expiring_partner_certificate(inst, tmp_path):
    soon = devpki.issue(inst.ca, tmp_path / "soon", "soon", role="client",
                        not_after=datetime.now(UTC) + timedelta(days=5))
    register_partner(inst.partners, "soon-co", [soon.cert], ["0088:4000009000001"], [], verified_by="test")
    async with running(inst) as (r, stream, _s):
        await r.gw.housekeeping.check_expiry()
        await r.gw.housekeeping.check_expiry()
        found = [e for e in log_events(stream, "certificate.expiring") if e["owner"] == "soon-co"]
        assert len(found) == 1
        assert found[0]["threshold_days"] == 7 and found[0]["purpose"] == "client"
        assert 4 < found[0]["days_left"] <= 5
        assert not [e for e in log_events(stream, "certificate.expiring") if e["owner"] in ("gateway", instance.DEMO_PARTNER)]
        assert r.gw.metrics.expiry_warnings.labels("7")._value.get() == 1
