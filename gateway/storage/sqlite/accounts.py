"""The console's users, second factors and sessions in SQLite; every change with its audit record."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ...model import stamp
from ..base import BROWSERS_KEPT, AccountError
from ..records import SHARED_SOURCE, Failures, Passkey, Session, StoredPasskey, User
from .audit import append
from .engine import Engine

_USER_COLUMNS = ("name, roles, content, state, must_change, totp_secret, totp_last_step, created_at, created_by, "
                 "user_handle, password_hash")
# The columns of a User, in its order: failed_logins sums the user's counts by source (not the shared one).
_USER_SELECT = ("SELECT name, roles, content, state, must_change, totp_secret, totp_last_step, "
                "(SELECT coalesce(sum(failures), 0) FROM login_failures f WHERE f.user = users.name AND f.source != ?), "
                "created_at, created_by, user_handle, password_hash FROM users")
_SESSION_COLUMNS = "id_hash, user, stage, csrf, created_at, seen_at, auth_at, address, agent, pending"


def _user(r: tuple[Any, ...]) -> User:
    return User(r[0], tuple(json.loads(r[1])), bool(r[2]), r[3], bool(r[4]), r[5], r[6], int(r[7]), r[8], r[9], r[10],
                r[11])


def _session(r: tuple[Any, ...]) -> Session:
    return Session(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]))


def _existing(conn: sqlite3.Connection, name: str) -> tuple[str, str]:
    r = conn.execute("SELECT roles, state FROM users WHERE name = ?", (name,)).fetchone()
    if r is None:
        raise AccountError(f"no user {name!r} (see: einvoice-gateway users list)")
    return r[0], r[1]


def _replace_recovery(conn: sqlite3.Connection, name: str, hashes: Sequence[str]) -> None:
    conn.execute("DELETE FROM recovery_codes WHERE user = ?", (name,))
    conn.executemany("INSERT INTO recovery_codes (user, code_hash) VALUES (?, ?)", [(name, h) for h in hashes])


class SqliteAccounts:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- users -----------------------------------------------------------------------------------

    async def user(self, name: str) -> User | None:
        r = await self.engine.read(lambda conn: conn.execute(
            f"{_USER_SELECT} WHERE name = ?", (SHARED_SOURCE, name)).fetchone())  # noqa: S608 (our own names)
        return None if r is None else _user(r)

    async def users(self) -> list[User]:
        return await self.engine.read(lambda conn: [_user(r) for r in conn.execute(
            f"{_USER_SELECT} ORDER BY name", (SHARED_SOURCE,))])  # noqa: S608 (our own names)

    async def add_user(self, name: str, roles: tuple[str, ...], content: bool, password_hash: str, actor: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AccountError(f"a user named {name!r} exists already")
            conn.execute(f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?,?,?,'active',1,NULL,0,?,?,?,?)",  # noqa: S608
                         (name, json.dumps(sorted(roles)), int(content), stamp(), actor, secrets.token_urlsafe(32),
                          password_hash))
            append(conn, actor, "user.added", None, None, {"user": name, "roles": sorted(roles), "content": content})

        await self.engine.write(op)

    async def set_password(self, name: str, password_hash: str, actor: str, *, must_change: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _existing(conn, name)
            conn.execute("UPDATE users SET password_hash = ?, must_change = ? WHERE name = ?",
                         (password_hash, int(must_change), name))
            append(conn, actor, "user.password_changed" if actor == f"console:{name}" else "user.password_reset",
                   None, None, {"user": name})

        await self.engine.write(op)

    async def set_state(self, name: str, state: str, actor: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _existing(conn, name)
            conn.execute("UPDATE users SET state = ? WHERE name = ?", (state, name))
            if state == "disabled":
                conn.execute("DELETE FROM console_sessions WHERE user = ?", (name,))
            append(conn, actor, "user.disabled" if state == "disabled" else "user.enabled", None, None, {"user": name})

        await self.engine.write(op)

    async def set_roles(self, name: str, roles: tuple[str, ...], content: bool, actor: str, detail: Mapping[str, Any]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            before, _ = _existing(conn, name)
            conn.execute("UPDATE users SET roles = ?, content = ? WHERE name = ?", (json.dumps(sorted(roles)), int(content), name))
            append(conn, actor, "user.roles_changed", None, None,
                   {"user": name, "before": json.loads(before), "after": sorted(roles), "content": content} | dict(detail))

        await self.engine.write(op)

    async def reset_mfa(self, name: str, actor: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _existing(conn, name)
            conn.execute("UPDATE users SET totp_secret = NULL, totp_last_step = 0 WHERE name = ?", (name,))
            for table in ("recovery_codes", "passkeys", "console_sessions", "login_browsers"):
                conn.execute(f"DELETE FROM {table} WHERE user = ?", (name,))  # noqa: S608 (our own names)
            append(conn, actor, "user.mfa_reset", None, None, {"user": name})

        await self.engine.write(op)

    async def unlock(self, name: str, actor: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _existing(conn, name)
            conn.execute("DELETE FROM login_failures WHERE user = ?", (name,))
            append(conn, actor, "user.unlocked", None, None, {"user": name})

        await self.engine.write(op)

    # --- failed logins and known browsers --------------------------------------------------------

    async def failures(self, name: str, sources: Sequence[str]) -> dict[str, Failures]:
        marks = ", ".join("?" * len(sources))
        return await self.engine.read(lambda conn: {r[0]: Failures(int(r[1]), float(r[2])) for r in conn.execute(
            f"SELECT source, failures, last_at FROM login_failures WHERE user = ? AND source IN ({marks})",  # noqa: S608
            (name, *sources))})

    async def failed(self, name: str, factor: str, address: str, reason: str, counted: Sequence[str], now: float,
                     forget_before: float) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            conn.execute("DELETE FROM login_failures WHERE last_at < ?", (forget_before,))
            # The same statements whether or not the user exists (an unknown name adds no row).
            known = conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None
            counts: dict[str, int] = {}
            for source in counted:
                for r in conn.execute(
                        "INSERT INTO login_failures (user, source, failures, last_at) SELECT name, ?, 1, ? FROM users "
                        "WHERE name = ? ON CONFLICT (user, source) DO UPDATE SET failures = failures + 1, "
                        "last_at = excluded.last_at RETURNING failures", (source, now, name)).fetchall():
                    counts[source] = int(r[0])
            detail: dict[str, Any] = {"user": name[:64], "factor": factor, "reason": reason, "address": address}
            if counted and counted[0] in counts:
                detail["failures"] = counts[counted[0]]
            actor = f"console:{name}" if known else f"console:anonymous@{address}"
            append(conn, actor, "console.login_failed", None, None, detail)
            return counts

        return await self.engine.write(op)

    async def succeeded(self, name: str, address: str, method: str, cleared: Sequence[str] = ()) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM login_failures WHERE user = ? AND source = ?", [(name, s) for s in cleared])
            append(conn, f"console:{name}", "console.login", None, None, {"address": address, "method": method})

        await self.engine.write(op)

    async def add_browser(self, name: str, token_hash: str, replaces: str | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if replaces is not None:
                conn.execute("DELETE FROM login_browsers WHERE token_hash = ?", (replaces,))
            conn.execute("INSERT OR REPLACE INTO login_browsers (token_hash, user, created_at) VALUES (?, ?, ?)",
                         (token_hash, name, time.time()))
            conn.execute("DELETE FROM login_browsers WHERE user = ? AND token_hash NOT IN (SELECT token_hash FROM "
                         "login_browsers WHERE user = ? ORDER BY created_at DESC, rowid DESC LIMIT ?)", (name, name, BROWSERS_KEPT))

        await self.engine.write(op)

    async def browser(self, token_hash: str, since: float) -> str | None:
        r = await self.engine.read(lambda conn: conn.execute(
            "SELECT user FROM login_browsers WHERE token_hash = ? AND created_at >= ?", (token_hash, since)).fetchone())
        return None if r is None else str(r[0])

    # --- factors ---------------------------------------------------------------------------------

    async def spend_totp_step(self, name: str, step: int) -> bool:
        return await self.engine.write(lambda conn: conn.execute(
            "UPDATE users SET totp_last_step = ? WHERE name = ? AND totp_last_step < ?", (step, name, step)).rowcount == 1)

    async def enroll_totp(self, name: str, secret: str, step: int, recovery_hashes: Sequence[str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET totp_secret = ?, totp_last_step = ? WHERE name = ? AND totp_secret IS NULL",
                         (secret, step, name))
            _replace_recovery(conn, name, recovery_hashes)
            append(conn, f"console:{name}", "console.mfa_enrolled", None, None, {"user": name, "factor": "totp"})

        await self.engine.write(op)

    async def replace_recovery(self, name: str, hashes: Sequence[str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _replace_recovery(conn, name, hashes)
            append(conn, f"console:{name}", "console.recovery_codes_renewed", None, None, {"user": name})

        await self.engine.write(op)

    async def spend_recovery(self, name: str, code_hash: str) -> bool:
        return await self.engine.write(lambda conn: conn.execute(
            "UPDATE recovery_codes SET used_at = ? WHERE user = ? AND code_hash = ? AND used_at IS NULL",
            (stamp(), name, code_hash)).rowcount == 1)

    async def recovery_left(self, name: str) -> int:
        return await self.engine.read(lambda conn: int(conn.execute(
            "SELECT count(*) FROM recovery_codes WHERE user = ? AND used_at IS NULL", (name,)).fetchone()[0]))

    async def passkeys(self, name: str) -> list[Passkey]:
        return await self.engine.read(lambda conn: [Passkey(*r) for r in conn.execute(
            "SELECT credential_id, label, created_at, last_used_at FROM passkeys WHERE user = ? ORDER BY created_at",
            (name,))])

    async def passkey(self, credential_id: str) -> StoredPasskey | None:
        r = await self.engine.read(lambda conn: conn.execute(
            "SELECT user, public_key, sign_count FROM passkeys WHERE credential_id = ?", (credential_id,)).fetchone())
        return None if r is None else StoredPasskey(r[0], bytes(r[1]), int(r[2]))

    async def add_passkey(self, name: str, credential_id: str, public_key: bytes, sign_count: int, label: str,
                          aaguid: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO passkeys VALUES (?,?,?,?,?,?,NULL)",
                         (credential_id, name, public_key, sign_count, label, stamp()))
            append(conn, f"console:{name}", "console.passkey_added", None, None,
                   {"user": name, "label": label, "aaguid": aaguid, "credential": credential_id[:16]})

        await self.engine.write(op)

    async def used_passkey(self, credential_id: str, sign_count: int) -> None:
        await self.engine.write(lambda conn: conn.execute(
            "UPDATE passkeys SET sign_count = ?, last_used_at = ? WHERE credential_id = ?", (sign_count, stamp(), credential_id)))

    async def remove_passkey(self, name: str, credential_id: str, actor: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            gone = conn.execute("DELETE FROM passkeys WHERE user = ? AND credential_id = ?", (name, credential_id)).rowcount
            if gone:
                append(conn, actor, "console.passkey_removed", None, None, {"user": name, "credential": credential_id[:16]})
            return bool(gone)

        return await self.engine.write(op)

    # --- sessions --------------------------------------------------------------------------------

    async def session(self, id_hash: str) -> Session | None:
        r = await self.engine.read(lambda conn: conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM console_sessions WHERE id_hash = ?", (id_hash,)).fetchone())  # noqa: S608
        return None if r is None else _session(r)

    async def sessions(self, user: str | None = None) -> list[Session]:
        return await self.engine.read(lambda conn: [_session(r) for r in conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM console_sessions WHERE stage = 'full' AND "  # noqa: S608 (our own names)
            "(? IS NULL OR user = ?) ORDER BY seen_at DESC", (user, user))])

    async def open_session(self, id_hash: str, user: str, stage: str, csrf: str, address: str, agent: str, auth_at: float,
                           *, replaces: str | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            if replaces is not None:
                conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (replaces,))
            conn.execute(f"INSERT INTO console_sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,'{{}}')",  # noqa: S608
                         (id_hash, user, stage, csrf, now, now, auth_at, address, agent[:200]))

        await self.engine.write(op)

    async def touch(self, id_hash: str, now: float) -> None:
        await self.engine.write(lambda conn: conn.execute(
            "UPDATE console_sessions SET seen_at = ? WHERE id_hash = ?", (now, id_hash)))

    async def update_session(self, id_hash: str, *, auth_at: float | None = None,
                             pending: Mapping[str, Any] | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if auth_at is not None:
                conn.execute("UPDATE console_sessions SET auth_at = ? WHERE id_hash = ?", (auth_at, id_hash))
            if pending is not None:
                conn.execute("UPDATE console_sessions SET pending = ? WHERE id_hash = ?", (json.dumps(pending), id_hash))

        await self.engine.write(op)

    async def end_session(self, id_hash: str, actor: str | None = None, why: str = "logout") -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            r = conn.execute("DELETE FROM console_sessions WHERE id_hash = ? RETURNING user, stage", (id_hash,)).fetchone()
            if r is not None and actor is not None and r[1] == "full":
                append(conn, actor, f"console.session_{why}", None, None, {"user": r[0], "session": id_hash[:12]})
            return r is not None

        return await self.engine.write(op)

    async def expire_sessions(self, idle_before: float, created_before: float, pre_login_before: float) -> int:
        return await self.engine.write(lambda conn: conn.execute(
            "DELETE FROM console_sessions WHERE seen_at < ? OR created_at < ? OR (stage != 'full' AND created_at < ?)",
            (idle_before, created_before, pre_login_before)).rowcount)
