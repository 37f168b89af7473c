"""Four-eyes requests in SQLite: asked by one person, decided by another, each step audited."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from ...model import stamp
from ..base import AccountError
from ..records import Approval
from .audit import append
from .engine import Engine

_FIELDS = "id, kind, target, params, reason, requested_by, requested_at, state, decided_by, decided_at, outcome"


def _approval(r: tuple[Any, ...]) -> Approval:
    return Approval(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10])


def _get(conn: sqlite3.Connection, request_id: int) -> Approval | None:
    r = conn.execute(f"SELECT {_FIELDS} FROM approvals WHERE id = ?", (request_id,)).fetchone()  # noqa: S608 (our names)
    return None if r is None else _approval(r)


class SqliteApprovals:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def request(self, kind: str, target: str, params: Mapping[str, Any], reason: str, actor: str,
                      partner: str | None = None, message_id: str | None = None,
                      shown: Mapping[str, Any] | None = None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM approvals WHERE kind = ? AND target = ? AND state = 'pending'",
                            (kind, target)).fetchone():
                raise AccountError(f"a request to {kind.replace('.', ' ').replace('_', ' ')} {target} is already waiting "
                                   "for approval")
            r = conn.execute("INSERT INTO approvals (kind, target, params, reason, requested_by, requested_at, state) "
                             "VALUES (?,?,?,?,?,?,'pending') RETURNING id",
                             (kind, target, json.dumps(params, sort_keys=True), reason, actor, stamp())).fetchone()
            append(conn, actor, "console.approval_requested", partner, message_id,
                   {"request": r[0], "kind": kind, "target": target, "reason": reason} | dict(params if shown is None else shown))
            return int(r[0])

        return await self.engine.write(op)

    async def requests(self, state: str | None = "pending", limit: int = 200) -> list[Approval]:
        return await self.engine.read(lambda conn: [_approval(r) for r in conn.execute(
            f"SELECT {_FIELDS} FROM approvals WHERE (? IS NULL OR state = ?) ORDER BY id DESC LIMIT ?",  # noqa: S608
            (state, state, limit))])

    async def get(self, request_id: int) -> Approval | None:
        return await self.engine.read(lambda conn: _get(conn, request_id))

    async def decide(self, request_id: int, actor: str, approve: bool, check: Callable[[Approval], None]) -> Approval:
        def op(conn: sqlite3.Connection) -> Approval:
            found = _get(conn, request_id)
            if found is None or found.state != "pending":
                raise AccountError(f"request {request_id} is not waiting for a decision"
                                   + (f" (it was {found.state})" if found else ""))
            if found.requested_by == actor:
                raise AccountError("you asked for this yourself: a second person must approve or deny it")
            check(found)
            state, now = ("approved" if approve else "denied"), stamp()
            conn.execute("UPDATE approvals SET state = ?, decided_by = ?, decided_at = ? WHERE id = ? AND state = 'pending'",
                         (state, actor, now, request_id))
            partner = found.target if found.kind.startswith("partner.") else found.params.get("partner")
            append(conn, actor, f"console.approval_{state}", partner, found.params.get("message_id"),
                   {"request": request_id, "kind": found.kind, "target": found.target, "requested_by": found.requested_by})
            decided = _get(conn, request_id)
            assert decided is not None
            return decided

        return await self.engine.write(op)

    async def finish(self, request_id: int, outcome: str, failed: bool = False) -> None:
        await self.engine.write(lambda conn: conn.execute(
            "UPDATE approvals SET outcome = ?, state = CASE WHEN ? THEN 'failed' ELSE state END WHERE id = ?",
            (outcome, int(failed), request_id)))

    async def withdraw(self, request_id: int, actor: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            found = _get(conn, request_id)
            if found is None or found.state != "pending" or found.requested_by != actor:
                raise AccountError(f"request {request_id} is not a pending request of yours")
            conn.execute("UPDATE approvals SET state = 'withdrawn', decided_by = ?, decided_at = ? WHERE id = ?",
                         (actor, stamp(), request_id))
            append(conn, actor, "console.approval_withdrawn", None, None, {"request": request_id})

        await self.engine.write(op)
