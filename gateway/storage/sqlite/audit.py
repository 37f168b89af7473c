"""The audit log in SQLite: records appended in the transaction of what they record, chained by hash."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ...model import stamp
from ..chain import CHECKPOINT, GENESIS, record_hash
from ..records import AuditRecord
from .engine import Engine

PAGE_ROWS = 5000  # records read per round trip when the whole chain is walked (verify, export)
_SELECT = "SELECT seq, at, actor, action, partner, message_id, detail, prev, hash FROM audit"


def append(conn: sqlite3.Connection, actor: str, action: str, partner: str | None, message_id: str | None,
           detail: Mapping[str, Any]) -> int:
    """Append a record chained to the last one, in the caller's transaction (never invoice content).
    The caller's write lock orders the chain across processes.  Returns its seq."""
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq = (last[0] + 1) if last else 1
    record = {"seq": seq, "at": stamp(), "actor": actor, "action": action, "partner": partner,
              "message_id": message_id, "detail": json.dumps(detail, sort_keys=True), "prev": last[1] if last else GENESIS}
    conn.execute("INSERT INTO audit (seq, at, actor, action, partner, message_id, detail, prev, hash) "
                 "VALUES (?,?,?,?,?,?,?,?,?)", (*record.values(), record_hash(record)))
    return seq


def row(r: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(*r)


class SqliteAuditLog:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def append(self, actor: str, action: str, partner: str | None, message_id: str | None,
                     detail: Mapping[str, Any]) -> None:
        await self.engine.write(lambda conn: append(conn, actor, action, partner, message_id, detail))

    async def newest(self, limit: int = 1000) -> list[AuditRecord]:
        return await self.engine.read(lambda conn: [row(r) for r in conn.execute(
            f"{_SELECT} ORDER BY seq DESC LIMIT ?", (limit,))])  # noqa: S608 (our own text)

    async def records(self, first: int | None = None, last: int | None = None, since: str | None = None,
                      until: str | None = None) -> AsyncIterator[AuditRecord]:
        after = (first or 0) - 1
        upto = last if last is not None else 2**62
        while True:
            page = await self.engine.read(lambda conn, after=after: [row(r) for r in conn.execute(  # type: ignore[misc]
                f"{_SELECT} WHERE seq > ? AND seq <= ? AND (? IS NULL OR at >= ?) AND (? IS NULL OR at < ?) "  # noqa: S608
                "ORDER BY seq LIMIT ?", (after, upto, since, since, until, until, PAGE_ROWS))])
            for record in page:
                yield record
            if len(page) < PAGE_ROWS:
                return
            after = page[-1].seq

    async def page(self, *, actor: str = "", action: str = "", partner: str = "", before: int | None = None,
                   limit: int = 100) -> list[AuditRecord]:
        where: list[str] = ["seq < ?"]
        args: list[object] = [before if before is not None else 2**62]
        for column, value in (("actor", actor), ("partner", partner)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if action:  # a prefix, as a range the audit_action index serves
            where.append("action >= ? AND action < ?")
            args += [action, action + "\U0010ffff"]
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"  # noqa: S608 (our own fragments)
        return await self.engine.read(lambda conn: [row(r) for r in conn.execute(sql, (*args, limit))])

    async def checkpoint(self, sign: Callable[[int, str], dict[str, Any]]) -> int | None:
        def op(conn: sqlite3.Connection) -> int | None:
            head = conn.execute("SELECT seq, hash, action FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            if head is None or head[2] == CHECKPOINT:
                return None
            return append(conn, "gateway", CHECKPOINT, None, None, sign(head[0], head[1]))

        return await self.engine.write(op)
