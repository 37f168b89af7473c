"""Sealed objects by master key, in SQLite: what each key protects, and moving objects to another key."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from ..records import Resealed, SealedObject
from .engine import Engine

SEALING_KEY = "sealing_key"  # meta: the master key the running gateway seals with


class SqliteKeys:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def usage(self) -> dict[str, int]:
        """Stored invoices and notices still to be sent (a sent one keeps no sealed content), by key."""
        return await self.engine.read(lambda conn: dict(conn.execute(
            "SELECT key_id, count(*) FROM (SELECT key_id FROM invoices UNION ALL SELECT key_id FROM notices "
            "WHERE state = 'pending') GROUP BY key_id").fetchall()))

    async def sealed_under(self, key_ids: Sequence[str], limit: int) -> list[SealedObject]:
        marks = ",".join("?" * len(key_ids))
        sql = (f"SELECT i.message_id, i.sha256, b.sealed FROM invoices i JOIN blobs b USING (message_id) "  # noqa: S608
               f"WHERE i.key_id IN ({marks}) LIMIT ?")
        return await self.engine.read(lambda conn: [SealedObject(r[0], r[1], bytes(r[2]))
                                                    for r in conn.execute(sql, (*key_ids, limit))])

    async def replace_sealed(self, rows: Sequence[Resealed]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            n = 0
            for r in rows:
                if conn.execute("UPDATE blobs SET sealed = ? WHERE message_id = ? AND sealed = ?",
                                (r.new, r.message_id, r.old)).rowcount:
                    conn.execute("UPDATE invoices SET key_id = ? WHERE message_id = ?", (r.key_id, r.message_id))
                    n += 1
            return n

        return await self.engine.write(op)

    async def sealing_key(self) -> str | None:
        row = await self.engine.read(lambda conn: conn.execute("SELECT value FROM meta WHERE key = ?",
                                                               (SEALING_KEY,)).fetchone())
        return None if row is None else str(row[0])

    async def set_sealing_key(self, key_id: str) -> None:
        await self.engine.write(lambda conn: conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (SEALING_KEY, key_id)))
