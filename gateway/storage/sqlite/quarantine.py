"""Quarantine in SQLite: held invoices, the decisions on them, and the sellers' payee-account history."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ...model import stamp
from ...stages.fraud import masked
from ..base import NotHeld
from ..records import AccountSeen, Decision, QuarantineEntry, SellerAccount
from .audit import append
from .engine import Engine
from .schema import restatus

_SELECT = ("SELECT q.message_id, q.partner, q.state, q.reasons, q.held_at, q.decided_at, q.decided_by, q.note, "
           "i.invoice_number, i.issue_date, i.payable_amount, i.currency, i.document_type FROM quarantine q "
           "JOIN invoices i USING (message_id) ")


def _entry(r: tuple[Any, ...]) -> QuarantineEntry:
    return QuarantineEntry(r[0], r[1], r[2], tuple(json.loads(r[3])), *r[4:])


def held_entries(conn: sqlite3.Connection, state: str | None = "held", partner: str | None = None, limit: int = 1000,
                 message_id: str | None = None) -> list[QuarantineEntry]:
    rows = conn.execute(
        _SELECT + "WHERE (? IS NULL OR q.state = ?) AND (? IS NULL OR q.partner = ?) AND (? IS NULL OR q.message_id = ?) "
        "ORDER BY q.held_at LIMIT ?", (state, state, partner, partner, message_id, message_id, limit)).fetchall()
    return [_entry(r) for r in rows]


class SqliteQuarantine:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def held(self, state: str | None = "held", partner: str | None = None, limit: int = 1000) -> list[QuarantineEntry]:
        return await self.engine.read(lambda conn: held_entries(conn, state, partner, limit))

    async def held_count(self) -> int:
        return await self.engine.read(lambda conn: int(conn.execute(
            "SELECT count(*) FROM quarantine WHERE state = 'held'").fetchone()[0]))

    async def entry(self, message_id: str) -> QuarantineEntry | None:
        def read(conn: sqlite3.Connection) -> QuarantineEntry | None:
            row = conn.execute("SELECT partner, accounts FROM quarantine WHERE message_id = ?", (message_id,)).fetchone()
            if row is None:
                return None
            named = set(json.loads(row[1]))
            accounts = tuple(AccountSeen(a, st, fs, m, a in named) for a, st, fs, m in conn.execute(
                "SELECT account, state, first_seen, message_id FROM seller_accounts WHERE partner = ? ORDER BY first_seen",
                (row[0],)))
            return dataclasses.replace(held_entries(conn, None, message_id=message_id)[0], accounts=accounts)

        return await self.engine.read(read)

    async def decide(self, message_id: str, release: bool, actor: str, note: str,
                     destinations: tuple[str, ...] = ()) -> Decision:
        def op(conn: sqlite3.Connection) -> Decision:
            row = conn.execute("SELECT partner, state, accounts FROM quarantine WHERE message_id = ?",
                               (message_id,)).fetchone()
            if row is None:
                raise NotHeld(f"no quarantined message {message_id}", code="NOT_HELD")
            if row[1] != "held":
                raise NotHeld(f"message {message_id} was already {row[1]}", code="NOT_HELD")
            state, now = ("released" if release else "rejected"), stamp()
            conn.execute("UPDATE quarantine SET state = ?, decided_at = ?, decided_by = ?, note = ? WHERE message_id = ?",
                         (state, now, actor, note, message_id))
            held = conn.execute("SELECT count(*) FROM deliveries WHERE message_id = ?", (message_id,)).fetchone()[0]
            if release and not held and not destinations:
                raise NotHeld(f"message {message_id} matched no routing rule: add a [[routes]] entry for it, or "
                              "name where to deliver it (--to DESTINATION)", code="UNROUTED")
            if release and destinations:  # the operator's choice replaces the route taken at acceptance
                conn.execute("DELETE FROM deliveries WHERE message_id = ? AND state = 'held'", (message_id,))
                t = time.time()
                conn.executemany("INSERT INTO deliveries (message_id, destination, state, created_at, next_attempt_at, "
                                 "updated_at) VALUES (?,?,'pending',?,?,?)", [(message_id, d, t, t, t) for d in destinations])
            conn.execute("UPDATE deliveries SET state = ?, next_attempt_at = ?, updated_at = ? WHERE message_id = ? "
                         "AND state = 'held'", ("pending" if release else "rejected", time.time(), time.time(), message_id))
            # Its new accounts (first named by this invoice or by another one still held) become known
            # with a release; a rejection keeps them under suspicion for good.
            conn.executemany("UPDATE seller_accounts SET state = ? WHERE partner = ? AND account = ? AND state = 'pending'",
                             [("known" if release else "rejected", row[0], a) for a in json.loads(row[2])])
            restatus(conn, message_id)
            append(conn, actor, f"quarantine.{state}", row[0], message_id, {"note": note})
            return Decision(message_id, row[0], state, actor, now)

        return await self.engine.write(op)

    async def seller_accounts(self, partner: str) -> list[SellerAccount]:
        return await self.engine.read(lambda conn: [SellerAccount(*r) for r in conn.execute(
            "SELECT account, state, first_seen, message_id FROM seller_accounts WHERE partner = ? ORDER BY first_seen, account",
            (partner,))])

    async def set_accounts(self, partner: str, known: Sequence[str], blocked: Sequence[str], actor: str, note: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = stamp()
            for account, state in [(a, "known") for a in known] + [(a, "rejected") for a in blocked]:
                conn.execute("INSERT INTO seller_accounts VALUES (?,?,?,?,'') ON CONFLICT (partner, account) "
                             "DO UPDATE SET state = excluded.state", (partner, account, state, now))
            append(conn, actor, "account.registered", partner, None,
                   {"known": [masked(a) for a in known], "blocked": [masked(a) for a in blocked], "note": note})

        await self.engine.write(op)
