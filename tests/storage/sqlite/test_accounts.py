"""The SQLite console accounts (gateway/storage/sqlite/accounts.py): users, factors spent once, failed logins
counted (never a lock) and their rows dropped once forgotten, sessions replaced, expired and ended.  The
backend-neutral side of the same protocol is in tests/storage/test_base_contract.py; these also reach under
it (backdating sessions, reading rows in SQL)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from gateway.console import security
from gateway.storage.base import AccountError
from gateway.storage.sqlite.schema import SCHEMA_VERSION
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers.console import audits, password_hash


async def add(store: SqliteStore, name: str, roles: tuple[str, ...] = ("operator",)) -> None:
    await store.accounts.add_user(name, roles, False, password_hash(), "pytest")


async def test_add_user_and_a_duplicate_is_refused(store):
    accounts = store.accounts
    await add(store, "alice")
    u = await accounts.user("alice")
    assert u is not None
    assert (u.roles, u.content, u.state, u.must_change, u.enrolled, u.created_by) == (("operator",), False, "active", True,
                                                                                      False, "pytest")
    with pytest.raises(AccountError, match="exists already"):
        await accounts.add_user("alice", ("admin",), True, password_hash(), "pytest")
    assert (await accounts.user("alice")).roles == ("operator",)  # unchanged
    assert [r["detail"]["user"] for r in await audits(store, "user.added")] == ["alice"]


async def test_totp_step_is_spent_once(store):
    accounts = store.accounts
    await add(store, "alice")
    await accounts.enroll_totp("alice", security.new_totp_secret(), 100, [])
    assert await accounts.spend_totp_step("alice", 100) is False  # the enrolment's own step
    assert await accounts.spend_totp_step("alice", 101) is True
    assert await accounts.spend_totp_step("alice", 101) is False  # the same step again
    assert await accounts.spend_totp_step("alice", 99) is False  # an earlier step
    assert await accounts.spend_totp_step("alice", 103) is True
    assert await accounts.spend_totp_step("alice", 102) is False
    assert (await accounts.user("alice")).totp_last_step == 103


async def test_recovery_code_is_spent_once(store):
    accounts = store.accounts
    await add(store, "alice")
    codes = security.new_recovery_codes()
    await accounts.enroll_totp("alice", security.new_totp_secret(), 1, [security.recovery_hash(c) for c in codes])
    assert await accounts.recovery_left("alice") == 10
    assert await accounts.spend_recovery("alice", security.recovery_hash(codes[3].upper()))
    assert not await accounts.spend_recovery("alice", security.recovery_hash(codes[3]))
    assert not await accounts.spend_recovery("alice", security.recovery_hash("aaaaa-bbbbb"))
    await add(store, "bob")  # one user's code is not another's
    assert not await accounts.spend_recovery("bob", security.recovery_hash(codes[4]))
    assert await accounts.recovery_left("alice") == 9
    # new codes replace the old ones
    fresh = security.new_recovery_codes()
    await accounts.replace_recovery("alice", [security.recovery_hash(c) for c in fresh])
    assert await accounts.recovery_left("alice") == 10
    assert not await accounts.spend_recovery("alice", security.recovery_hash(codes[0]))
    assert await accounts.spend_recovery("alice", security.recovery_hash(fresh[0]))


async def test_failed_logins_never_lock_and_stale_counts_are_dropped(store):
    accounts = store.accounts
    await add(store, "alice")
    for i in range(50):  # however many failures: counted, never a lock
        await accounts.failed("alice", "password", "192.0.2.7", "wrong-password", ("192.0.2.7",), 1000.0 + i, 0.0)
    u = await accounts.user("alice")
    assert (u.state, u.failed_logins) == ("active", 50)
    await accounts.failed("alice", "password", "192.0.2.8", "wrong-password", ("192.0.2.8", "*"), 5000.0, 0.0)
    assert (await accounts.user("alice")).failed_logins == 51  # the shared count is not a second failure
    # Rows with no failure since forget_before are deleted, for every account (the table stays small).
    await add(store, "bob")
    await accounts.failed("bob", "totp", "192.0.2.9", "wrong-code", ("192.0.2.9",), 6000.0, 2000.0)
    rows = await store.engine.read(lambda c: c.execute("SELECT user, source FROM login_failures ORDER BY 1, 2").fetchall())
    assert rows == [("alice", "*"), ("alice", "192.0.2.8"), ("bob", "192.0.2.9")]
    # An unknown name adds no row.
    await accounts.failed("nobody", "password", "192.0.2.9", "unknown-user", ("192.0.2.9", "*"), 6001.0, 0.0)
    assert await store.engine.read(lambda c: c.execute(
        "SELECT count(*) FROM login_failures WHERE user = 'nobody'").fetchone()[0]) == 0


async def test_sessions_are_replaced_and_expire(store):
    accounts = store.accounts
    await add(store, "alice")
    await accounts.open_session("pre", "alice", "mfa", "csrf1", "127.0.0.1", "agent", 0.0)
    assert (await accounts.session("pre")).stage == "mfa"
    await accounts.open_session("full", "alice", "full", "csrf2", "127.0.0.1", "x" * 500, time.time(), replaces="pre")
    assert await accounts.session("pre") is None  # rotation: the pre-login identifier is gone
    s = await accounts.session("full")
    assert (s.user, s.stage, s.csrf, len(s.agent)) == ("alice", "full", "csrf2", 200)
    assert [x.id_hash for x in await accounts.sessions("alice")] == ["full"]
    for id_hash, stage in (("idle", "full"), ("old-pre", "mfa"), ("new-pre", "enroll"), ("ancient", "full")):
        await accounts.open_session(id_hash, "alice", stage, "c", "127.0.0.1", "agent", 0.0)
    now = time.time()
    await store.engine.write(lambda c: c.executemany(
        "UPDATE console_sessions SET seen_at = ?, created_at = ? WHERE id_hash = ?", [
            (now - 1000, now - 1000, "idle"), (now - 10, now - 400, "old-pre"), (now - 10, now - 10, "new-pre"),
            (now - 10, now - 40000, "ancient")]))
    assert await accounts.expire_sessions(now - 900, now - 28800, now - 300) == 3
    assert {h for h in ("full", "idle", "old-pre", "new-pre", "ancient") if await accounts.session(h)} == {"full", "new-pre"}
    assert await accounts.end_session("full", "console:alice", "logout") is True
    assert await accounts.end_session("full", "console:alice", "logout") is False
    [ended] = await audits(store, "console.session_logout")
    assert ended["detail"] == {"user": "alice", "session": "full"}
    # disabling a user ends their sessions
    await accounts.set_state("alice", "disabled", "cli:root")
    assert await accounts.session("new-pre") is None


async def test_reset_mfa_forgets_every_factor(store):
    accounts = store.accounts
    await add(store, "alice")
    await accounts.enroll_totp("alice", security.new_totp_secret(), 5, [security.recovery_hash("aaaaa-bbbbb")])
    await accounts.open_session("s", "alice", "full", "c", "127.0.0.1", "a", time.time())
    await accounts.reset_mfa("alice", "console:boss")
    u = await accounts.user("alice")
    assert (u.enrolled, u.totp_last_step, await accounts.recovery_left("alice"), await accounts.session("s")) == \
        (False, 0, 0, None)
    [r] = await audits(store, "user.mfa_reset")
    assert (r["actor"], r["detail"]) == ("console:boss", {"user": "alice"})


async def test_a_schema_9_database_loses_its_lock_columns_and_keeps_its_accounts(tmp_path):
    store = SqliteStore(tmp_path / "state")
    try:
        await add(store, "alice")
        await store.accounts.open_session("s", "alice", "full", "c", "127.0.0.1", "a", time.time())
        await store.accounts.add_passkey("alice", "cred", b"key", 1, "laptop", "aaguid")
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state" / "gateway.db") as conn:  # as schema 9 left it: alice locked
        conn.execute("DROP TABLE login_failures")
        conn.execute("DROP TABLE login_browsers")
        conn.execute("ALTER TABLE users ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")
        conn.execute("ALTER TABLE users ADD COLUMN locked_until REAL NOT NULL DEFAULT 0")
        conn.execute("UPDATE users SET failures = 3, locked_until = ?", (time.time() + 900,))
        conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    conn.close()
    store = SqliteStore(tmp_path / "state")
    try:
        u = await store.accounts.user("alice")
        assert (u.state, u.failed_logins, u.roles) == ("active", 0, ("operator",))  # the lock is gone with its columns
        assert (await store.accounts.session("s")).user == "alice"
        assert [p.label for p in await store.accounts.passkeys("alice")] == ["laptop"]
        await store.accounts.failed("alice", "password", "192.0.2.7", "wrong-password", ("192.0.2.7",), 1.0, 0.0)
        assert (await store.accounts.user("alice")).failed_logins == 1
        columns, version, problems = await store.engine.read(lambda c: (
            {r[1] for r in c.execute("PRAGMA table_info(users)")},
            c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0],
            c.execute("PRAGMA foreign_key_check").fetchall()))
        assert not {"failures", "locked_until"} & columns and version == str(SCHEMA_VERSION) == "10" and problems == []
    finally:
        await store.close()
