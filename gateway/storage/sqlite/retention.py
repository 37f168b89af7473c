"""Retention in SQLite: invoices delivered long ago are deleted; a tombstone keeps refusing duplicates."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from ...model import stamp
from .audit import append
from .engine import Engine


class SqliteRetention:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def expire(self, delivered_before: str, limit: int, actor: str = "retention") -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in conn.execute(
                "SELECT message_id FROM deliveries GROUP BY message_id HAVING min(state = 'delivered') = 1 "
                "AND max(delivered_at) < ? LIMIT ?", (delivered_before, limit))]
            now = stamp()
            for message_id in ids:
                conn.execute(
                    "INSERT OR REPLACE INTO retired SELECT message_id, direction, partner, source_sha256, sha256, kind, "
                    "invoice_number, issue_date, received_at, ?, number_key, date_key FROM invoices WHERE message_id = ?",
                    (now, message_id))
                row = conn.execute("SELECT partner, sha256 FROM invoices WHERE message_id = ?", (message_id,)).fetchone()
                for table in ("blobs", "deliveries", "quarantine", "invoices"):
                    conn.execute(f"DELETE FROM {table} WHERE message_id = ?", (message_id,))  # noqa: S608
                append(conn, actor, "invoice.expired", row[0], message_id, {"sha256": row[1]})
            # Notices sent (or given up) as long ago: their sealed body went when they were; the rest goes now.
            conn.execute("DELETE FROM notices WHERE (state = 'delivered' AND delivered_at < ?) OR (state = 'dead' AND "
                         "updated_at < ?)", (delivered_before, _epoch(delivered_before)))
            return ids

        return await self.engine.write(op)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
