"""Intake in SQLite: the duplicate check, the durable put (decided by gateway/stages/admission.py), status."""

from __future__ import annotations

import json
import sqlite3
import time

from ...model import AcceptedInvoice, Receipt, stamp
from ...stages.admission import Admission, Earlier, admit, date_key, duplicate_receipt, needs_history, number_key
from ..records import SENDER_STATUS, DeliveryState, InvoiceStatus, status_summary
from .audit import append
from .engine import Engine


def earlier(conn: sqlite3.Connection, partner: str | None, source_sha256: str, direction: str) -> Earlier | None:
    """The first acceptance of this content (by this partner; None: by anyone), or its tombstone."""
    row = conn.execute(
        "SELECT i.message_id, i.received_at, i.rules, q.state, i.sha256 FROM invoices i "
        "LEFT JOIN quarantine q USING (message_id) WHERE i.direction = ? AND i.source_sha256 = ? "
        "AND (? IS NULL OR i.partner = ?) ORDER BY i.received_at LIMIT 1",
        (direction, source_sha256, partner, partner)).fetchone()
    if row is not None:
        return Earlier(row[0], row[1], row[4], SENDER_STATUS.get(row[3], "accepted"),
                       json.loads(row[2]) if row[2] else None)
    row = conn.execute(
        "SELECT message_id, received_at, sha256 FROM retired WHERE direction = ? AND source_sha256 = ? "
        "AND (? IS NULL OR partner = ?) ORDER BY received_at LIMIT 1", (direction, source_sha256, partner, partner)).fetchone()
    return None if row is None else Earlier(row[0], row[1], row[2], "delivered", retired=True)


def _same_number(conn: sqlite3.Connection, invoice: AcceptedInvoice) -> str | None:
    f = invoice.facts
    row = conn.execute(
        "SELECT message_id FROM invoices WHERE direction = ? AND partner = ? AND kind = ? AND number_key = ? "
        "AND date_key = ? UNION ALL SELECT message_id FROM retired WHERE direction = ? AND partner = ? "
        "AND kind = ? AND number_key = ? AND date_key = ? LIMIT 1",
        (invoice.direction, invoice.partner, f.kind, number_key(f.invoice_number), date_key(f.issue_date)) * 2).fetchone()
    return None if row is None else str(row[0])


def _history(conn: sqlite3.Connection, partner: str) -> dict[str, str]:
    return dict(conn.execute("SELECT account, state FROM seller_accounts WHERE partner = ?", (partner,)).fetchall())


def _store(conn: sqlite3.Connection, invoice: AcceptedInvoice, decided: Admission) -> None:
    f = invoice.facts
    status, now_text = ("held" if decided.held else "accepted"), stamp()
    conn.executemany("INSERT INTO seller_accounts VALUES (?,?,?,?,?)",
                     [(invoice.partner, a, state, now_text, invoice.message_id) for a, state in decided.new_accounts])
    conn.execute(
        "INSERT INTO invoices VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (invoice.message_id, invoice.partner, invoice.sha256, invoice.received_at, f.document_type.label,
         f.invoice_number, f.ubl_version, json.dumps(f.supplier_ids), json.dumps(f.customer_ids),
         f.customization_id, f.profile_id, f.issue_date, invoice.size, invoice.key_id,
         json.dumps(invoice.signature) if invoice.signature else None, invoice.media_type,
         json.dumps(invoice.rules) if invoice.rules is not None else None, f.payable_amount, f.currency, f.kind,
         invoice.direction, invoice.source_sha256 or invoice.sha256, invoice.route, status,
         number_key(f.invoice_number), date_key(f.issue_date)))
    conn.execute("INSERT INTO blobs VALUES (?, ?)", (invoice.message_id, invoice.sealed))
    now = time.time()
    conn.executemany(
        "INSERT INTO deliveries (message_id, destination, state, created_at, next_attempt_at, updated_at) VALUES (?,?,?,?,?,?)",
        [(invoice.message_id, d, "held" if decided.held else "pending", now, now, now) for d in invoice.destinations])
    if decided.held:
        conn.execute("INSERT INTO quarantine (message_id, partner, reasons, accounts, state, held_at) "
                     "VALUES (?,?,?,?,'held',?)",
                     (invoice.message_id, invoice.partner, json.dumps(list(decided.holds)), json.dumps(invoice.accounts),
                      now_text))
    for action, detail in decided.audit:
        append(conn, "gateway", action, invoice.partner, invoice.message_id, detail)


class SqliteIntake:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def find_accepted(self, partner: str | None, sha256: str, direction: str = "in") -> Receipt | None:
        found = await self.engine.read(lambda conn: earlier(conn, partner, sha256, direction))
        return None if found is None else duplicate_receipt(found)

    async def put(self, invoice: AcceptedInvoice) -> Receipt:
        def op(conn: sqlite3.Connection) -> Receipt:
            # Outbound, the same bytes are the same submission whoever they were addressed to.
            found = earlier(conn, invoice.partner if invoice.direction == "in" else None,
                            invoice.source_sha256 or invoice.sha256, invoice.direction)
            decided = admit(invoice, earlier=found, same_number=None if found else _same_number(conn, invoice),
                            history=_history(conn, invoice.partner) if not found and needs_history(invoice) else {})
            if isinstance(decided, Receipt):
                return decided
            _store(conn, invoice, decided)
            return decided.receipt

        return await self.engine.write(op)

    async def status(self, message_id: str, partner: str | None, direction: str = "in") -> InvoiceStatus | None:
        def read(conn: sqlite3.Connection) -> InvoiceStatus | None:
            row = conn.execute(
                "SELECT i.message_id, i.sha256, i.received_at, i.document_type, i.invoice_number, i.signature, i.rules, "
                "q.state, i.partner FROM invoices i LEFT JOIN quarantine q USING (message_id) "
                "WHERE i.message_id = ? AND i.direction = ? AND (? IS NULL OR i.partner = ?)",
                (message_id, direction, partner, partner)).fetchone()
            if row is None:
                return None
            deliveries = tuple(DeliveryState(*d) for d in conn.execute(
                "SELECT destination, state, attempts, delivered_at FROM deliveries WHERE message_id = ? AND "
                "state NOT IN ('held', 'rejected') ORDER BY destination", (message_id,)))
            return InvoiceStatus(row[0], status_summary(row[7], {d.status for d in deliveries}), row[1], row[2],
                                 row[8] if direction == "out" else None, row[3], row[4], deliveries,
                                 json.loads(row[5]) if row[5] else None, json.loads(row[6]) if row[6] else None)

        return await self.engine.read(read)

