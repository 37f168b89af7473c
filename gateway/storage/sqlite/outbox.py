"""The outbox in SQLite: delivery jobs written with their invoice, claimed with a lease, recorded once.

Notices (the SMTP listener's replies) wait in their own table and are claimed, leased and recorded
the same way, under the destination REPLIES."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from ..base import NotHeld
from ..records import REPLIES, DeliveryJob, DocumentFacts, Job, Notice, NoticeJob, OutboxDepth
from .audit import append
from .engine import Engine
from .schema import restatus

_JOB_SELECT = (
    "SELECT d.message_id, d.destination, d.attempts, d.created_at, i.partner, i.sha256, i.received_at, "
    "i.document_type, i.invoice_number, i.supplier_ids, i.customer_ids, i.customization_id, i.profile_id, "
    "i.issue_date, i.size, i.signature, i.media_type, i.rules, i.direction FROM deliveries d "
    "JOIN invoices i USING (message_id) ")


def _job(r: tuple[Any, ...]) -> DeliveryJob:
    facts = DocumentFacts(r[0], r[4], r[5], r[6], r[7], r[8], tuple(json.loads(r[9])), tuple(json.loads(r[10])), r[11],
                          r[12], r[13], r[14], json.loads(r[15]) if r[15] else None, r[16],
                          json.loads(r[17]) if r[17] else None, r[18])
    return DeliveryJob(r[0], r[1], r[2], r[3], r[4], r[5], facts)


_NOTICE_SELECT = ("SELECT id, attempts, created_at, partner, sha256, recipient, in_reply_to, outcome, certificate, cipher "
                  "FROM notices ")


def _notice(r: tuple[Any, ...]) -> NoticeJob:
    return NoticeJob(r[0], REPLIES, r[1], r[2], r[3], r[4], r[5], r[6], r[7], None if r[8] is None else bytes(r[8]), r[9])


def partner_of(conn: sqlite3.Connection, message_id: str) -> str:
    return str(conn.execute("SELECT partner FROM invoices WHERE message_id = ?", (message_id,)).fetchone()[0])


class SqliteOutbox:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def due(self, now: float, limit: int) -> list[Job]:
        def read(conn: sqlite3.Connection) -> list[Job]:
            jobs: list[Job] = [_job(r) for r in conn.execute(
                _JOB_SELECT + "WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND "
                "(d.lease_until IS NULL OR d.lease_until <= ?) ORDER BY d.next_attempt_at LIMIT ?", (now, now, limit))]
            if len(jobs) < limit:
                jobs += [_notice(r) for r in conn.execute(
                    _NOTICE_SELECT + "WHERE state = 'pending' AND next_attempt_at <= ? AND (lease_until IS NULL OR "
                    "lease_until <= ?) ORDER BY next_attempt_at LIMIT ?", (now, now, limit - len(jobs)))]
            return jobs

        return await self.engine.read(read)

    async def enqueue(self, notice: Notice) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute("INSERT INTO notices (id, partner, message_id, recipient, in_reply_to, outcome, certificate, cipher, "
                         "sealed, sha256, key_id, state, created_at, next_attempt_at, updated_at) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,'pending',?,?,?)",
                         (notice.id, notice.partner, notice.message_id, notice.to, notice.in_reply_to, notice.outcome,
                          notice.certificate, notice.cipher, notice.sealed, notice.sha256, notice.key_id, now, now, now))

        await self.engine.write(op)

    async def claim(self, owner: str, now: float, wanted: Mapping[str, int], lease_s: float) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            jobs: list[Job] = []
            for destination, n in wanted.items():
                if n <= 0:
                    continue
                if destination == REPLIES:
                    jobs += [_notice(r) for r in conn.execute(
                        "UPDATE notices SET lease_owner = ?, lease_until = ? WHERE id IN (SELECT id FROM notices WHERE "
                        "state = 'pending' AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?) "
                        "ORDER BY next_attempt_at LIMIT ?) RETURNING id, attempts, created_at, partner, sha256, recipient, "
                        "in_reply_to, outcome, certificate, cipher", (owner, now + lease_s, now, now, n)).fetchall()]
                    continue
                keys = conn.execute(
                    "UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE rowid IN ("
                    "SELECT rowid FROM deliveries WHERE state = 'pending' AND destination = ? AND next_attempt_at <= ? "
                    "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at LIMIT ?) "
                    "RETURNING message_id", (owner, now + lease_s, destination, now, now, n)).fetchall()
                for (message_id,) in keys:
                    jobs.append(_job(conn.execute(_JOB_SELECT + "WHERE d.message_id = ? AND d.destination = ?",
                                                  (message_id, destination)).fetchone()))
            return jobs

        return await self.engine.write(op)

    async def release(self, owner: str) -> int:
        # Only a pending job's lease means anything (claims take pending jobs): the state keeps this on the
        # "due" indexes instead of reading every delivery and notice ever kept.
        return await self.engine.write(lambda conn: sum(conn.execute(
            f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL "  # noqa: S608
            "WHERE state = 'pending' AND lease_owner = ?", (owner,)).rowcount
            for table in ("deliveries", "notices")))

    async def load_sealed(self, message_id: str) -> bytes | None:
        row = await self.engine.read(lambda conn: conn.execute(
            "SELECT sealed FROM blobs WHERE message_id = ? UNION ALL SELECT sealed FROM notices WHERE id = ? AND "
            "state = 'pending' LIMIT 1", (message_id, message_id)).fetchone())
        return None if row is None else bytes(row[0])

    async def record(self, job: Job, *, delivered_at: str | None, next_attempt_at: float | None,
                     error: str | None, dead: bool = False, owner: str | None = None) -> None:
        state = "delivered" if delivered_at else "dead" if dead else "pending"
        if isinstance(job, NoticeJob):
            await self.engine.write(lambda conn: _record_notice(conn, job, state, delivered_at, next_attempt_at, error, owner))
            return

        def op(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, delivered_at = ?, last_error = ?, "
                "next_attempt_at = COALESCE(?, next_attempt_at), lease_owner = NULL, lease_until = NULL, updated_at = ? "
                "WHERE message_id = ? AND destination = ? AND state = 'pending' "
                "AND (? OR ? IS NULL OR lease_owner IS NULL OR lease_owner = ?)",
                (state, delivered_at, error, next_attempt_at, time.time(), job.message_id, job.destination,
                 state == "delivered", owner, owner),
            ).rowcount
            if not updated:
                return
            restatus(conn, job.message_id)
            if dead:
                append(conn, "gateway", "delivery.dead_letter", job.partner, job.message_id,
                       {"destination": job.destination, "attempts": job.attempts + 1, "error": error})
            elif delivered_at:
                append(conn, "gateway", "delivery.delivered", job.partner, job.message_id,
                       {"destination": job.destination, "attempts": job.attempts + 1})

        await self.engine.write(op)

    async def pending_by_destination(self) -> dict[str, int]:
        return await self.engine.read(lambda conn: dict(conn.execute(
            "SELECT destination, count(*) FROM deliveries WHERE state = 'pending' GROUP BY destination UNION ALL "
            "SELECT ?, count(*) FROM notices WHERE state = 'pending' HAVING count(*) > 0", (REPLIES,)).fetchall()))

    async def depth(self) -> OutboxDepth:
        n, oldest = await self.engine.read(lambda conn: conn.execute(
            "SELECT count(*), min(created_at) FROM (SELECT created_at FROM deliveries WHERE state = 'pending' "
            "UNION ALL SELECT created_at FROM notices WHERE state = 'pending')").fetchone())
        return OutboxDepth(int(n), oldest)

    async def retry(self, message_id: str, destination: str | None, actor: str, *, requeue: bool = False,
                    reason: str = "") -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            if requeue:
                sql = ("UPDATE deliveries SET state = 'pending', attempts = 0, created_at = ?, next_attempt_at = ?, "
                       "updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE message_id = ? AND state = 'dead' "
                       "AND (? IS NULL OR destination = ?) RETURNING destination")
                args: tuple[Any, ...] = (now, now, now, message_id, destination, destination)
            else:
                sql = ("UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE message_id = ? AND state = 'pending' "
                       "AND (? IS NULL OR destination = ?) RETURNING destination")
                args = (now, now, message_id, destination, destination)
            affected = sorted(r[0] for r in conn.execute(sql, args).fetchall())
            if not affected:
                known = conn.execute("SELECT group_concat(destination || ': ' || state, ', ') FROM deliveries "
                                     "WHERE message_id = ?", (message_id,)).fetchone()[0]
                want = "dead-lettered" if requeue else "waiting (pending)"
                raise NotHeld(f"message {message_id} has no {want} delivery"
                              + (f" to {destination!r}" if destination else "") + (f" ({known})" if known else
                              " (no such message, or it has no deliveries)"), code="NOTHING_TO_RETRY")
            restatus(conn, message_id)
            append(conn, actor, "delivery.requeued" if requeue else "delivery.retried", partner_of(conn, message_id),
                   message_id, {"destinations": affected, "reason": reason})
            return affected

        return await self.engine.write(op)

    async def discard(self, message_id: str, destination: str, actor: str, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute("UPDATE deliveries SET state = 'rejected', updated_at = ? WHERE message_id = ? AND "
                               "destination = ? AND state = 'dead' RETURNING message_id",
                               (time.time(), message_id, destination)).fetchone()
            if row is None:
                raise NotHeld(f"message {message_id} has no dead-lettered delivery to {destination!r}",
                              code="NOTHING_TO_DISCARD")
            restatus(conn, message_id)
            append(conn, actor, "delivery.discarded", partner_of(conn, message_id), message_id,
                   {"destination": destination, "reason": reason})

        await self.engine.write(op)


def _record_notice(conn: sqlite3.Connection, job: NoticeJob, state: str, delivered_at: str | None,
                   next_attempt_at: float | None, error: str | None, owner: str | None) -> None:
    """A notice's attempt, by the same rule as a delivery's; once it is sent or given up, its sealed body goes."""
    conn.execute(
        "UPDATE notices SET state = ?, attempts = attempts + 1, delivered_at = ?, last_error = ?, "
        "next_attempt_at = COALESCE(?, next_attempt_at), lease_owner = NULL, lease_until = NULL, updated_at = ?, "
        "sealed = CASE WHEN ? = 'pending' THEN sealed ELSE X'' END "
        "WHERE id = ? AND state = 'pending' AND (? OR ? IS NULL OR lease_owner IS NULL OR lease_owner = ?)",
        (state, delivered_at, error, next_attempt_at, time.time(), state, job.message_id, state == "delivered", owner, owner))
