"""What the console's pages read: indexed queries that stay fast with many stored messages.

Each function takes the store and returns plain values; the handlers run them in the I/O executor,
never on the event loop.  Nothing here returns invoice content (that is ``Console.content``).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ..storage.sqlite import SUMMARIES, SqliteStore

PAGE = 50
MAX_PAGES = 200
STATUSES = ("accepted", "held", "delivered", "dead-letter", "rejected")

_SEARCH = ("SELECT i.message_id, i.direction, i.partner, i.received_at, i.document_type, i.invoice_number, "
           "i.payable_amount, i.currency, i.status FROM invoices i")


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_day(text: str, where: str) -> str | None:
    """A date (YYYY-MM-DD) from a search form, as the RFC 3339 prefix the store compares with."""
    text = text.strip()
    if not text:
        return None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(f"{where}: give a date as YYYY-MM-DD")
    return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).strftime("%Y-%m-%dT00:00:00")


def search(store: SqliteStore, *, partner: str = "", status: str = "", since: str | None = None, until: str | None = None,
           number: str = "", amount: str = "", page: int = 0) -> tuple[list[dict[str, Any]], bool]:
    """One page of messages, newest first, and whether there are more."""
    where, args = ["1 = 1"], []
    for condition, value in (("i.partner = ?", partner), ("i.invoice_number = ?", number), ("i.payable_amount = ?", amount),
                             ("i.received_at >= ?", since), ("i.received_at < ?", until)):
        if value:
            where.append(condition)
            args.append(value)
    if status in SUMMARIES:  # kept by the store in step with quarantine and deliveries
        where.append("i.status = ?")
        args.append(status)
    page = max(0, min(page, MAX_PAGES))
    sql = f"{_SEARCH} WHERE {' AND '.join(where)} ORDER BY i.received_at DESC LIMIT ? OFFSET ?"  # noqa: S608 (our fragments)
    rows = store.read().execute(sql, (*args, PAGE + 1, page * PAGE)).fetchall()
    out = [{"message_id": r[0], "direction": r[1], "partner": r[2], "received_at": r[3],
            "document_type": r[4].split(":")[-1], "invoice_number": r[5], "payable_amount": r[6], "currency": r[7],
            "status": r[8]} for r in rows[:PAGE]]
    return out, len(rows) > PAGE


def dashboard(store: SqliteStore, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    conn = store.read()
    hour, day = _iso(now - timedelta(hours=1)), _iso(now - timedelta(days=1))
    received = {w: conn.execute("SELECT count(*) FROM invoices WHERE received_at >= ?", (since,)).fetchone()[0]
                for w, since in (("hour", hour), ("day", day))}
    delivered = {w: conn.execute("SELECT count(*) FROM deliveries WHERE state = 'delivered' AND delivered_at >= ?",
                                 (since,)).fetchone()[0] for w, since in (("hour", hour), ("day", day))}
    depth, oldest = store.outbox_depth()
    dead = conn.execute(
        "SELECT destination, coalesce(substr(last_error, 1, 120), ''), count(*) FROM deliveries WHERE state = 'dead' "
        "GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10").fetchall()
    held = conn.execute("SELECT count(*) FROM quarantine WHERE state = 'held'").fetchone()[0]
    return {"received": received, "delivered": delivered, "outbox_depth": depth,
            "oldest_age_s": None if oldest is None else max(0.0, time.time() - oldest),
            "dead_letters": [{"destination": d, "error": e, "count": n} for d, e, n in dead],
            "dead_total": conn.execute("SELECT count(*) FROM deliveries WHERE state = 'dead'").fetchone()[0],
            "held": held}


def audit_page(store: SqliteStore, *, actor: str = "", action: str = "", partner: str = "", before: int | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
    where: list[str] = ["seq < ?"]
    args: list[object] = [before if before is not None else 2**62]
    for column, value in (("actor", actor), ("partner", partner)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if action:  # a prefix, as a range the audit_action index serves
        where.append("action >= ? AND action < ?")
        args += [action, action + "\U0010ffff"]
    rows = store.read().execute(
        f"SELECT seq, at, actor, action, partner, message_id, detail FROM audit WHERE {' AND '.join(where)} "  # noqa: S608
        "ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
    keys = ("seq", "at", "actor", "action", "partner", "message_id", "detail")
    return [dict(zip(keys, r, strict=True)) for r in rows]
