"""The console's state: users and their factors, sessions, and four-eyes approval requests.

Kept in the gateway's database (the tables are declared with the others in gateway/store.py), so a
backup holds them and every change is written in one transaction with its audit record.  Reads
return frozen values; writes return futures (the store's one writer thread runs them).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import GatewayError
from ..storage.sqlite import SqliteStore

ROLES = ("admin", "operator", "auditor")
USER_NAME = r"[a-z][a-z0-9._-]{1,39}"


class AccountError(GatewayError):
    """A console or CLI request about accounts that cannot be done as asked (the message says why)."""

    code = "ACCOUNT"


@dataclass(frozen=True, slots=True)
class User:
    name: str
    roles: tuple[str, ...]
    content: bool  # may view invoice content
    state: str
    must_change: bool
    totp_secret: str | None = field(repr=False)
    totp_last_step: int
    failures: int
    locked_until: float
    created_at: str
    created_by: str
    user_handle: str
    password_hash: str = field(repr=False)

    @property
    def enrolled(self) -> bool:
        return self.totp_secret is not None

    def locked(self, now: float | None = None) -> bool:
        return self.locked_until > (time.time() if now is None else now)


@dataclass(frozen=True, slots=True)
class Session:
    id_hash: str
    user: str
    stage: str  # mfa | enroll | full
    csrf: str = field(repr=False)
    created_at: float
    seen_at: float
    auth_at: float
    address: str
    agent: str
    pending: dict[str, Any] = field(repr=False)


_USER_COLUMNS = ("name, roles, content, state, must_change, totp_secret, totp_last_step, failures, locked_until, "
                 "created_at, created_by, user_handle, password_hash")
_SESSION_COLUMNS = "id_hash, user, stage, csrf, created_at, seen_at, auth_at, address, agent, pending"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _user(r: tuple[Any, ...]) -> User:
    return User(r[0], tuple(json.loads(r[1])), bool(r[2]), r[3], bool(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], r[11],
                r[12])


_APPROVAL_FIELDS = ("id", "kind", "target", "params", "reason", "requested_by", "requested_at", "state", "decided_by",
                    "decided_at", "outcome")


def _approval(r: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(_APPROVAL_FIELDS, r, strict=True)) | {"params": json.loads(r[3])}


def _session(r: tuple[Any, ...]) -> Session:
    return Session(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]))


class Accounts:
    def __init__(self, store: SqliteStore):
        self.store = store
        self.audit = store.audit_in

    # --- users -----------------------------------------------------------------------------------

    def user(self, name: str) -> User | None:
        r = self.store.read().execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()  # noqa: S608
        return None if r is None else _user(r)

    def users(self) -> list[User]:
        return [_user(r) for r in self.store.read().execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name")]  # noqa: S608

    def _existing(self, conn: sqlite3.Connection, name: str) -> tuple[str, str]:
        r = conn.execute("SELECT roles, state FROM users WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise AccountError(f"no user {name!r} (see: einvoice-gateway users list)")
        return r[0], r[1]

    def add_user(self, name: str, roles: tuple[str, ...], content: bool, password_hash: str, actor: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AccountError(f"a user named {name!r} exists already")
            conn.execute(f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?,?,?,'active',1,NULL,0,0,0,?,?,?,?)",  # noqa: S608
                         (name, json.dumps(sorted(roles)), int(content), _now(), actor, secrets.token_urlsafe(32),
                          password_hash))
            self.audit(conn, actor, "user.added", None, None, {"user": name, "roles": sorted(roles), "content": content})

        return self.store.write(op)

    def set_password(self, name: str, password_hash: str, actor: str, *, must_change: bool) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            self._existing(conn, name)
            conn.execute("UPDATE users SET password_hash = ?, must_change = ? WHERE name = ?",
                         (password_hash, int(must_change), name))
            self.audit(conn, actor, "user.password_changed" if actor == f"console:{name}" else "user.password_reset",
                       None, None, {"user": name})

        return self.store.write(op)

    def set_state(self, name: str, state: str, actor: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            self._existing(conn, name)
            conn.execute("UPDATE users SET state = ? WHERE name = ?", (state, name))
            if state == "disabled":
                conn.execute("DELETE FROM console_sessions WHERE user = ?", (name,))
            self.audit(conn, actor, "user.disabled" if state == "disabled" else "user.enabled", None, None, {"user": name})

        return self.store.write(op)

    def set_roles(self, name: str, roles: tuple[str, ...], content: bool, actor: str, detail: dict[str, Any]) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            before, _ = self._existing(conn, name)
            conn.execute("UPDATE users SET roles = ?, content = ? WHERE name = ?", (json.dumps(sorted(roles)), int(content), name))
            self.audit(conn, actor, "user.roles_changed", None, None,
                       {"user": name, "before": json.loads(before), "after": sorted(roles), "content": content} | detail)

        return self.store.write(op)

    def reset_mfa(self, name: str, actor: str) -> Future[None]:
        """Forget every second factor and end the user's sessions: the next login enrols anew."""
        def op(conn: sqlite3.Connection) -> None:
            self._existing(conn, name)
            conn.execute("UPDATE users SET totp_secret = NULL, totp_last_step = 0 WHERE name = ?", (name,))
            for table in ("recovery_codes", "passkeys", "console_sessions"):
                conn.execute(f"DELETE FROM {table} WHERE user = ?", (name,))  # noqa: S608 (our own names)
            self.audit(conn, actor, "user.mfa_reset", None, None, {"user": name})

        return self.store.write(op)

    def unlock(self, name: str, actor: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            self._existing(conn, name)
            conn.execute("UPDATE users SET failures = 0, locked_until = 0 WHERE name = ?", (name,))
            self.audit(conn, actor, "user.unlocked", None, None, {"user": name})

        return self.store.write(op)

    # --- factors ---------------------------------------------------------------------------------

    def failed(self, name: str, factor: str, address: str, threshold: int, lock_s: float) -> Future[bool]:
        """One failed factor; True when this failure locks the account."""
        def op(conn: sqlite3.Connection) -> bool:
            r = conn.execute("UPDATE users SET failures = failures + 1 WHERE name = ? RETURNING failures",
                             (name,)).fetchone()
            detail = {"user": name, "factor": factor, "address": address}
            self.audit(conn, f"console:{name}", "console.login_failed", None, None, detail | {"failures": r[0]})
            if r[0] < threshold:
                return False
            conn.execute("UPDATE users SET failures = 0, locked_until = ? WHERE name = ?", (time.time() + lock_s, name))
            self.audit(conn, "gateway", "console.user_locked", None, None, detail | {"minutes": round(lock_s / 60)})
            return True

        return self.store.write(op)

    def succeeded(self, name: str, address: str, method: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET failures = 0 WHERE name = ?", (name,))
            self.audit(conn, f"console:{name}", "console.login", None, None, {"address": address, "method": method})

        return self.store.write(op)

    def spend_totp_step(self, name: str, step: int) -> Future[bool]:
        """Mark ``step`` used; False when it (or a later one) was used already: a code works once."""
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("UPDATE users SET totp_last_step = ? WHERE name = ? AND totp_last_step < ?",
                                (step, name, step)).rowcount == 1

        return self.store.write(op)

    def enroll_totp(self, name: str, secret: str, step: int, recovery_hashes: list[str]) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET totp_secret = ?, totp_last_step = ? WHERE name = ? AND totp_secret IS NULL",
                         (secret, step, name))
            self._replace_recovery(conn, name, recovery_hashes)
            self.audit(conn, f"console:{name}", "console.mfa_enrolled", None, None, {"user": name, "factor": "totp"})

        return self.store.write(op)

    @staticmethod
    def _replace_recovery(conn: sqlite3.Connection, name: str, hashes: list[str]) -> None:
        conn.execute("DELETE FROM recovery_codes WHERE user = ?", (name,))
        conn.executemany("INSERT INTO recovery_codes (user, code_hash) VALUES (?, ?)", [(name, h) for h in hashes])

    def replace_recovery(self, name: str, hashes: list[str]) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            self._replace_recovery(conn, name, hashes)
            self.audit(conn, f"console:{name}", "console.recovery_codes_renewed", None, None, {"user": name})

        return self.store.write(op)

    def spend_recovery(self, name: str, code_hash: str) -> Future[bool]:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("UPDATE recovery_codes SET used_at = ? WHERE user = ? AND code_hash = ? AND used_at IS NULL",
                                (_now(), name, code_hash)).rowcount == 1

        return self.store.write(op)

    def recovery_left(self, name: str) -> int:
        return int(self.store.read().execute("SELECT count(*) FROM recovery_codes WHERE user = ? AND used_at IS NULL",
                                             (name,)).fetchone()[0])

    def passkeys(self, name: str) -> list[dict[str, Any]]:
        rows = self.store.read().execute(
            "SELECT credential_id, label, created_at, last_used_at FROM passkeys WHERE user = ? ORDER BY created_at", (name,))
        return [{"credential_id": r[0], "label": r[1], "created_at": r[2], "last_used_at": r[3]} for r in rows]

    def passkey(self, credential_id: str) -> tuple[str, bytes, int] | None:
        r = self.store.read().execute("SELECT user, public_key, sign_count FROM passkeys WHERE credential_id = ?",
                                      (credential_id,)).fetchone()
        return None if r is None else (r[0], bytes(r[1]), int(r[2]))

    def add_passkey(self, name: str, credential_id: str, public_key: bytes, sign_count: int, label: str,
                    aaguid: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO passkeys VALUES (?,?,?,?,?,?,NULL)",
                         (credential_id, name, public_key, sign_count, label, _now()))
            self.audit(conn, f"console:{name}", "console.passkey_added", None, None,
                       {"user": name, "label": label, "aaguid": aaguid, "credential": credential_id[:16]})

        return self.store.write(op)

    def used_passkey(self, credential_id: str, sign_count: int) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE passkeys SET sign_count = ?, last_used_at = ? WHERE credential_id = ?",
                         (sign_count, _now(), credential_id))

        return self.store.write(op)

    def remove_passkey(self, name: str, credential_id: str, actor: str) -> Future[bool]:
        def op(conn: sqlite3.Connection) -> bool:
            gone = conn.execute("DELETE FROM passkeys WHERE user = ? AND credential_id = ?", (name, credential_id)).rowcount
            if gone:
                self.audit(conn, actor, "console.passkey_removed", None, None, {"user": name, "credential": credential_id[:16]})
            return bool(gone)

        return self.store.write(op)

    # --- sessions --------------------------------------------------------------------------------

    def session(self, id_hash: str) -> Session | None:
        r = self.store.read().execute(f"SELECT {_SESSION_COLUMNS} FROM console_sessions WHERE id_hash = ?",  # noqa: S608
                                      (id_hash,)).fetchone()
        return None if r is None else _session(r)

    def sessions(self, user: str | None = None) -> list[Session]:
        rows = self.store.read().execute(f"SELECT {_SESSION_COLUMNS} FROM console_sessions WHERE stage = 'full' AND "  # noqa: S608
                                         "(? IS NULL OR user = ?) ORDER BY seen_at DESC", (user, user))
        return [_session(r) for r in rows]

    def open_session(self, id_hash: str, user: str, stage: str, csrf: str, address: str, agent: str, auth_at: float,
                     *, replaces: str | None = None) -> Future[None]:
        """A new session; ``replaces`` (the pre-login one) ends in the same transaction, so the
        identifier changes at every step of a login (no session fixation)."""
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            if replaces is not None:
                conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (replaces,))
            conn.execute(f"INSERT INTO console_sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,'{{}}')",  # noqa: S608
                         (id_hash, user, stage, csrf, now, now, auth_at, address, agent[:200]))

        return self.store.write(op)

    def touch(self, id_hash: str, now: float) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE console_sessions SET seen_at = ? WHERE id_hash = ?", (now, id_hash))

        return self.store.write(op)

    def update_session(self, id_hash: str, *, auth_at: float | None = None,
                       pending: dict[str, Any] | None = None) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            if auth_at is not None:
                conn.execute("UPDATE console_sessions SET auth_at = ? WHERE id_hash = ?", (auth_at, id_hash))
            if pending is not None:
                conn.execute("UPDATE console_sessions SET pending = ? WHERE id_hash = ?", (json.dumps(pending), id_hash))

        return self.store.write(op)

    def end_session(self, id_hash: str, actor: str | None = None, why: str = "logout") -> Future[bool]:
        def op(conn: sqlite3.Connection) -> bool:
            r = conn.execute("DELETE FROM console_sessions WHERE id_hash = ? RETURNING user, stage", (id_hash,)).fetchone()
            if r is not None and actor is not None and r[1] == "full":
                self.audit(conn, actor, f"console.session_{why}", None, None, {"user": r[0], "session": id_hash[:12]})
            return r is not None

        return self.store.write(op)

    def expire_sessions(self, idle_before: float, created_before: float, pre_login_before: float) -> Future[int]:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM console_sessions WHERE seen_at < ? OR created_at < ? OR "
                                "(stage != 'full' AND created_at < ?)",
                                (idle_before, created_before, pre_login_before)).rowcount

        return self.store.write(op)

    # --- four-eyes approvals ---------------------------------------------------------------------

    def request(self, kind: str, target: str, params: dict[str, Any], reason: str, actor: str,
                partner: str | None = None, message_id: str | None = None,
                shown: dict[str, Any] | None = None) -> Future[int]:
        """A four-eyes request; its audit record carries ``params``, or ``shown`` in their place."""
        def op(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM approvals WHERE kind = ? AND target = ? AND state = 'pending'",
                            (kind, target)).fetchone():
                raise AccountError(f"a request to {kind.replace('.', ' ').replace('_', ' ')} {target} is already waiting "
                                   "for approval")
            r = conn.execute("INSERT INTO approvals (kind, target, params, reason, requested_by, requested_at, state) "
                             "VALUES (?,?,?,?,?,?,'pending') RETURNING id",
                             (kind, target, json.dumps(params, sort_keys=True), reason, actor, _now())).fetchone()
            self.audit(conn, actor, "console.approval_requested", partner, message_id,
                       {"request": r[0], "kind": kind, "target": target, "reason": reason} | (params if shown is None else shown))
            return int(r[0])

        return self.store.write(op)

    def approvals(self, state: str | None = "pending", limit: int = 200) -> list[dict[str, Any]]:
        rows = self.store.read().execute(f"SELECT {', '.join(_APPROVAL_FIELDS)} FROM approvals "  # noqa: S608 (our names)
                                         "WHERE (? IS NULL OR state = ?) ORDER BY id DESC LIMIT ?", (state, state, limit))
        return [_approval(r) for r in rows]

    def approval(self, request_id: int) -> dict[str, Any] | None:
        return self.approval_in(self.store.read(), request_id)

    def decide(self, request_id: int, actor: str, approve: bool, check: Callable[[dict[str, Any]], None]) -> Future[dict[str, Any]]:
        """Approve or deny a pending request; the requester cannot decide their own (four eyes).
        ``check`` may refuse (AccountError) for reasons of role.  Approving only marks the request:
        the caller then carries the action out and records its ``finish``."""
        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            found = self.approval_in(conn, request_id)
            if found is None or found["state"] != "pending":
                raise AccountError(f"request {request_id} is not waiting for a decision"
                                   + (f" (it was {found['state']})" if found else ""))
            if found["requested_by"] == actor:
                raise AccountError("you asked for this yourself: a second person must approve or deny it")
            check(found)
            state = "approved" if approve else "denied"
            conn.execute("UPDATE approvals SET state = ?, decided_by = ?, decided_at = ? WHERE id = ? AND state = 'pending'",
                         (state, actor, _now(), request_id))
            partner = found["target"] if found["kind"].startswith("partner.") else found["params"].get("partner")
            self.audit(conn, actor, f"console.approval_{state}", partner,
                       found["params"].get("message_id"),
                       {"request": request_id, "kind": found["kind"], "target": found["target"],
                        "requested_by": found["requested_by"]})
            return found | {"state": state, "decided_by": actor}

        return self.store.write(op)

    @staticmethod
    def approval_in(conn: sqlite3.Connection, request_id: int) -> dict[str, Any] | None:
        r = conn.execute(f"SELECT {', '.join(_APPROVAL_FIELDS)} FROM approvals WHERE id = ?",  # noqa: S608 (our names)
                         (request_id,)).fetchone()
        return None if r is None else _approval(r)

    def finish(self, request_id: int, outcome: str, failed: bool = False) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE approvals SET outcome = ?, state = CASE WHEN ? THEN 'failed' ELSE state END WHERE id = ?",
                         (outcome, int(failed), request_id))

        return self.store.write(op)

    def withdraw(self, request_id: int, actor: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            found = self.approval_in(conn, request_id)
            if found is None or found["state"] != "pending" or found["requested_by"] != actor:
                raise AccountError(f"request {request_id} is not a pending request of yours")
            conn.execute("UPDATE approvals SET state = 'withdrawn', decided_by = ?, decided_at = ? WHERE id = ?",
                         (actor, _now(), request_id))
            self.audit(conn, actor, "console.approval_withdrawn", None, None, {"request": request_id})

        return self.store.write(op)
