"""Read-only views in SQLite for the CLI, the console and the metrics: indexed queries that stay fast
with many stored messages (benchmarks/console.py measures them at 100,000)."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timedelta
from typing import Any

from ...model import stamp
from ..records import (
    SUMMARIES,
    Dashboard,
    DeadLetter,
    DeadLetterCount,
    DeliveryRow,
    HistoryEntry,
    MessageDetail,
    MessageSummary,
    status_summary,
)
from .engine import Engine
from .quarantine import held_entries

_SUMMARY = ("SELECT i.message_id, i.direction, i.partner, i.received_at, i.document_type, i.invoice_number, "
            "i.payable_amount, i.currency, i.status FROM invoices i ")
_MESSAGES = (_SUMMARY + "WHERE (? IS NULL OR i.direction = ?) AND (? IS NULL OR i.partner = ?) AND "  # noqa: S608
             "(? IS NULL OR i.received_at >= ?) AND (? IS NULL OR i.received_at < ?) AND (? IS NULL OR i.status = ?) AND "
             "(? IS NULL OR EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = i.message_id AND d.state = ?)) "
             "ORDER BY i.received_at DESC LIMIT ?")
_DETAIL = ("SELECT message_id, direction, partner, sha256, received_at, document_type, invoice_number, issue_date, "
           "payable_amount, currency, supplier_ids, customer_ids, customization_id, profile_id, size, media_type, "
           "key_id, signature, rules, route FROM invoices WHERE message_id = ?")


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


def _ids(text: str | None) -> tuple[str, ...] | None:
    found = _json(text)
    return None if found is None else tuple(found)


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else stamp(epoch)


def _message(conn: sqlite3.Connection, message_id: str) -> MessageDetail | None:
    r = conn.execute(_DETAIL, (message_id,)).fetchone()
    if r is None:
        return None
    deliveries = tuple(
        DeliveryRow(d[0], d[1], d[2], _iso(d[3]) if d[1] == "pending" else None, d[4], d[5], d[6], _iso(d[7]))
        for d in conn.execute("SELECT destination, state, attempts, next_attempt_at, last_error, delivered_at, "
                              "lease_owner, updated_at FROM deliveries WHERE message_id = ? ORDER BY destination",
                              (message_id,)))
    held = held_entries(conn, None, message_id=message_id)
    quarantine = held[0] if held else None
    history = tuple(HistoryEntry(h[0], h[1], h[2], json.loads(h[3])) for h in conn.execute(
        "SELECT at, actor, action, detail FROM audit WHERE message_id = ? ORDER BY seq", (message_id,)))
    return MessageDetail(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], _ids(r[10]), _ids(r[11]), r[12], r[13],
                         r[14], r[15], r[16], _json(r[17]), _json(r[18]), r[19], deliveries,
                         quarantine, status_summary(quarantine.state if quarantine else None, {d.state for d in deliveries}),
                         history)


class SqliteReports:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def messages(self, *, direction: str | None = None, partner: str | None = None, status: str | None = None,
                       since: str | None = None, until: str | None = None, limit: int = 100) -> list[MessageSummary]:
        summary = status if status in SUMMARIES else None
        state = status if status is not None and summary is None else None
        return await self.engine.read(lambda conn: [MessageSummary(*r) for r in conn.execute(_MESSAGES, (
            direction, direction, partner, partner, since, since, until, until, summary, summary, state, state, limit))])

    async def search(self, *, partner: str = "", status: str = "", since: str | None = None, until: str | None = None,
                     number: str = "", amount: str = "", offset: int = 0, limit: int = 50) -> list[MessageSummary]:
        where, args = ["1 = 1"], []
        for condition, value in (("i.partner = ?", partner), ("i.invoice_number = ?", number),
                                 ("i.payable_amount = ?", amount), ("i.received_at >= ?", since),
                                 ("i.received_at < ?", until)):
            if value:
                where.append(condition)
                args.append(value)
        if status in SUMMARIES:  # kept in step with quarantine and deliveries (schema.restatus)
            where.append("i.status = ?")
            args.append(status)
        sql = f"{_SUMMARY}WHERE {' AND '.join(where)} ORDER BY i.received_at DESC LIMIT ? OFFSET ?"  # noqa: S608
        return await self.engine.read(lambda conn: [MessageSummary(*r) for r in conn.execute(sql, (*args, limit, offset))])

    async def message(self, message_id: str) -> MessageDetail | None:
        return await self.engine.read(lambda conn: _message(conn, message_id))

    async def dead_letters(self, *, partner: str | None = None, destination: str | None = None, since: float | None = None,
                           until: float | None = None, limit: int = 100) -> list[DeadLetter]:
        return await self.engine.read(lambda conn: [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6], _iso(r[7]), r[8])
                                                    for r in conn.execute(
            "SELECT d.message_id, d.destination, i.partner, i.direction, i.invoice_number, d.attempts, d.last_error, "
            "d.updated_at, i.received_at FROM deliveries d JOIN invoices i USING (message_id) WHERE d.state = 'dead' "
            "AND (? IS NULL OR i.partner = ?) AND (? IS NULL OR d.destination = ?) AND (? IS NULL OR d.updated_at >= ?) "
            "AND (? IS NULL OR d.updated_at < ?) ORDER BY d.updated_at DESC LIMIT ?",
            (partner, partner, destination, destination, since, since, until, until, limit))])

    async def dashboard(self, now: datetime) -> Dashboard:
        hour, day = stamp(now - timedelta(hours=1)), stamp(now - timedelta(days=1))

        def read(conn: sqlite3.Connection) -> Dashboard:
            def count(sql: str, *args: object) -> int:
                return int(conn.execute(sql, args).fetchone()[0])

            windows = (("hour", hour), ("day", day))
            received = {w: count("SELECT count(*) FROM invoices WHERE received_at >= ?", since) for w, since in windows}
            delivered = {w: count("SELECT count(*) FROM deliveries WHERE state = 'delivered' AND delivered_at >= ?", since)
                         for w, since in windows}
            depth, oldest = conn.execute("SELECT count(*), min(created_at) FROM deliveries WHERE state = 'pending'").fetchone()
            dead = conn.execute(
                "SELECT destination, coalesce(substr(last_error, 1, 120), ''), count(*) FROM deliveries WHERE state = 'dead' "
                "GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10").fetchall()
            return Dashboard(received, delivered, int(depth), None if oldest is None else max(0.0, time.time() - oldest),
                             tuple(DeadLetterCount(*d) for d in dead),
                             count("SELECT count(*) FROM deliveries WHERE state = 'dead'"),
                             count("SELECT count(*) FROM quarantine WHERE state = 'held'"))

        return await self.engine.read(read)

    async def counts(self) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            out = {"invoices": int(conn.execute("SELECT count(*) FROM invoices").fetchone()[0])}
            for state, n in conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state"):
                out[f"deliveries_{state}"] = n
            return out

        return await self.engine.read(read)
