"""The admin console (issue 8): credentials, roles, accounts, and the pages over the real admin listener.

* ``security``: the password policy, argon2id hashing, TOTP checked against pyotp (an independent
  RFC 6238 implementation), recovery codes, the per-address rate limiter.
* ``roles``: the permission matrix.
* ``store.accounts`` and ``store.approvals``: users, factors spent once, lockout, sessions, four-eyes approvals, on a
  real SqliteStore.
* HTTP: one gateway per module (``world``) with an admin listener on 127.0.0.1, a delivered, a
  dead-lettered and a held invoice (``populate`` from tests/helpers/messages.py, ``invoice`` from tests/helpers/invoices.py),
  driven by an aiohttp client exactly as a browser would (cookies, ``Origin``, the form's ``csrf``).
  Each test logs in its own accounts, so tests do not depend on each other's order.  The bootstrap
  account needs a gateway without any account: it gets its own.

Argon2 costs about 60 ms a hash: accounts are made with one precomputed hash, and logins are few.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
import pytest_asyncio
from aiohttp.web_exceptions import NotAppKeyWarning
from aiohttp.web_request import BaseRequest
from yarl import URL

from gateway import logs
from gateway.cli.common import current_user
from gateway.console import security
from gateway.console.app import CSP
from gateway.console.guard import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from gateway.console.login import BOOTSTRAP_FILE
from gateway.console.roles import APPROVAL_NEEDS, PERMISSIONS, allowed
from gateway.operations import instance
from gateway.storage.base import AccountError
from gateway.storage.records import Approval
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import free_port, run_cli, serving
from tests.helpers.console import PASSWORD, Browser, Page, World, audits, login, password_hash, password_step, set_options
from tests.helpers.daemon import set_admin
from tests.helpers.invoices import DEMO, IBAN_B, IBAN_C, accepted, invoice
from tests.helpers.messages import populate

shared = pytest.mark.asyncio(loop_scope="module")  # runs against the module's one gateway
SPEC_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Cache-Control": "no-store", "Referrer-Policy": "same-origin"}


async def audit_records(store: SqliteStore, limit: int = 1_000_000) -> list[dict[str, Any]]:
    """The newest audit records as dicts, ``detail`` parsed from its JSON text."""
    return [r.as_json() | {"detail": json.loads(r.detail)} for r in await store.audit.newest(limit)]


# --- 1. security.py ------------------------------------------------------------------------------------


def test_csp_is_the_contract_s():
    assert CSP == SPEC_CSP


@pytest.mark.parametrize("password, user, rule", [
    ("short pass", "alice", "at least 12 characters"),
    ("qazwsxedcrfv", "alice", "commonly used"),  # on the list as it is
    ("QAZWSXEDCRFV", "alice", "commonly used"),  # case does not matter
    ("iloveyou2024!!", "alice", "commonly used"),  # a common one with digits and "!" appended
    ("Password123456", "alice", "commonly used"),
    ("ｑａｚｗｓｘｅｄｃｒｆｖ", "alice", "commonly used"),  # full-width: the same after NFKC
    ("alice's own passphrase", "alice", "user name"),
    ("my ALICE passphrase", "alice", "user name"),
    ("my favourite einvoice words", "alice", "product's name"),
    ("that gateway is grand", "alice", "product's name"),
    ("abababababababab", "alice", "too few different characters"),
    ("x" * 100 + "y" * 100 + "z" * 56 + "w", "alice", "at most 256"),
])
def test_password_policy_refuses(password, user, rule):
    with pytest.raises(security.PolicyError, match=rule):
        security.check_policy(password, user)


@pytest.mark.parametrize("password", ["purple elephant dances", "Tr0ub4dor & three more words", "abcd" * 64])
def test_password_policy_accepts_a_good_passphrase(password):
    security.check_policy(password, "alice")  # no exception


def test_policy_counts_characters_after_nfkc():
    # "ﬁ" (one ligature) is "fi" (two letters) after NFKC: 11 typed characters, 12 after normalising.
    typed = "ﬁne  oranges"[:11]
    assert len(typed) == 11 and len(security.normalise(typed)) == 12
    security.check_policy(typed, "alice")
    with pytest.raises(security.PolicyError, match="at least 12"):
        security.check_policy("fine orange", "alice")


def test_hash_and_verify_roundtrip():
    digest = security.hash_password("purple elephant dances")
    assert digest.startswith("$argon2id$")
    assert "purple" not in digest
    assert security.verify_password(digest, "purple elephant dances")
    assert not security.verify_password(digest, "purple elephant dance")
    assert not security.verify_password(digest, "Purple elephant dances")
    assert not security.verify_password("not a hash", "purple elephant dances")
    assert not security.needs_rehash(digest)
    # NFKC: the same passphrase typed on another keyboard (full-width letters) is the same password.
    assert security.verify_password(digest, "ｐｕｒｐｌｅ elephant dances")


def test_missing_user_costs_a_hash_too():
    real = password_hash()
    t0 = time.perf_counter()
    assert not security.verify_password(real, "wrong horse battery staple")
    t_real = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert security.verify_password(None, "wrong horse battery staple") is False
    t_none = time.perf_counter() - t0
    assert t_none > t_real / 10, (t_none, t_real)
    # and no password "matches" the missing user, whatever it is
    assert security.verify_password(None, "") is False


def test_only_max_password_chars_are_hashed():
    long = ("abcdefgh" * 40)[:security.MAX_PASSWORD_CHARS] + "tail beyond the bound"
    digest = security.hash_password(long)
    assert security.verify_password(digest, long)
    assert security.verify_password(digest, long[:security.MAX_PASSWORD_CHARS])  # what is hashed is bounded
    assert not security.verify_password(digest, long[:security.MAX_PASSWORD_CHARS - 1])
    with pytest.raises(security.PolicyError, match=f"at most {security.MAX_PASSWORD_CHARS}"):
        security.check_policy(long, "alice")


RFC6238_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # ASCII "12345678901234567890", the RFC's SHA-1 key


@pytest.mark.parametrize("t, expected", [(59, "287082"), (1111111109, "081804"), (1111111111, "050471"),
                                         (1234567890, "005924"), (2000000000, "279037"), (20000000000, "353130")])
def test_totp_matches_rfc6238_vectors_and_pyotp(t, expected):
    # RFC 6238 appendix B lists 8-digit values; authenticator apps show their last six digits.
    assert security.totp_code(RFC6238_SECRET, t // 30) == expected == pyotp.TOTP(RFC6238_SECRET).at(t)


def test_totp_against_pyotp_at_many_times():
    secret = security.new_totp_secret()
    assert len(secret) == 32 and len(pyotp.TOTP(secret).byte_secret()) == 20
    otp = pyotp.TOTP(secret)
    for t in (0, 29, 30, 1_700_000_000, 1_700_000_029.9, time.time(), 4_102_444_800):
        code = otp.at(t)
        assert security.totp_code(secret, int(t // 30)) == code
        if t >= 30:  # (the window of step 0 would reach before 1970)
            assert security.totp_step(secret, code, now=t) == int(t // 30)


def test_totp_window_is_one_step_either_side():
    secret = security.new_totp_secret()
    otp = pyotp.TOTP(secret)
    now = 1_800_000_015.0
    step = int(now // 30)
    assert security.totp_step(secret, otp.at(now - 30), now=now) == step - 1
    assert security.totp_step(secret, otp.at(now + 30), now=now) == step + 1
    assert security.totp_step(secret, otp.at(now - 60), now=now) is None
    assert security.totp_step(secret, otp.at(now + 60), now=now) is None
    # typed with a space in the middle, or around: the same code
    code = otp.at(now)
    assert security.totp_step(secret, f" {code[:3]} {code[3:]} ", now=now) == step


def test_totp_refuses_wrong_and_malformed_codes():
    secret = security.new_totp_secret()
    now = 1_800_000_015.0
    good = pyotp.TOTP(secret).at(now)
    valid = {pyotp.TOTP(secret).at(now + d) for d in (-30, 0, 30)}
    wrong = next(c for c in (f"{(int(good) + k) % 10**6:06d}" for k in range(1, 10)) if c not in valid)
    assert security.totp_step(secret, wrong, now=now) is None
    for bad in ("", "12345", "1234567", good + "0", "12a456", "-12345", "+12345", "12.456", "1e5000"):
        assert security.totp_step(secret, bad, now=now) is None, bad


@pytest.mark.parametrize("code", ["１２３４５６", "١٢٣٤٥٦"])
def test_totp_refuses_non_ascii_digits(code):
    assert security.totp_step(security.new_totp_secret(), code) is None


def test_otpauth_uri_is_what_apps_read():
    secret = security.new_totp_secret()
    parsed = pyotp.parse_uri(security.otpauth_uri(secret, "alice", "einvoice-gateway"))
    assert (parsed.secret, parsed.name, parsed.issuer, parsed.digits, parsed.interval) == \
        (secret, "alice", "einvoice-gateway", 6, 30)


def test_recovery_codes_and_their_hashes():
    codes = security.new_recovery_codes()
    assert len(codes) == security.RECOVERY_CODES == len(set(codes))
    for c in codes:
        assert len(c) == 11 and c[5] == "-" and c.replace("-", "").isalnum() and c == c.lower()
    code = codes[0]
    h = security.recovery_hash(code)
    assert h != code and len(h) == 64
    for typed in (code.upper(), code.replace("-", ""), f"  {code.upper().replace('-', ' ')} ", code[:5] + "-" + code[5:]):
        assert security.recovery_hash(typed) == h, typed
    assert security.recovery_hash(codes[1]) != h


def test_tokens_are_random_and_stored_hashed():
    a, b = security.new_token(), security.new_token()
    assert a != b and len(a) >= 43
    assert security.token_hash(a) != a and len(security.token_hash(a)) == 64
    assert security.same(a, a) and not security.same(a, b)


def test_rate_limiter_burst_then_refusal_then_refill():
    rl = security.RateLimiter(burst=3, every_s=10.0)
    assert [rl.allow("10.0.0.1", now=100.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("10.0.0.2", now=100.0)  # another address has its own bucket
    assert not rl.allow("10.0.0.1", now=105.0)  # half a token is not an attempt
    assert rl.allow("10.0.0.1", now=110.0)  # one refilled
    assert not rl.allow("10.0.0.1", now=110.0)
    # a long pause refills up to the burst, not beyond
    assert [rl.allow("10.0.0.1", now=10_000.0) for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_forgets_idle_addresses():
    rl = security.RateLimiter(burst=2, every_s=1.0)
    rl.MAX_KEYS = 100  # type: ignore[misc]
    for i in range(100):
        assert rl.allow(f"a{i}", now=0.0)
    for i in range(50):  # much later: the idle buckets (full again) are dropped, not kept forever
        assert rl.allow(f"b{i}", now=1000.0)
    assert len(rl._buckets) <= rl.MAX_KEYS


def test_rate_limiter_stays_bounded_under_a_flood_of_addresses():
    rl = security.RateLimiter(burst=10, every_s=6.0)
    rl.MAX_KEYS = 100  # type: ignore[misc]
    for i in range(1000):
        rl.allow(f"2001:db8::{i:x}", now=float(i) / 1000)
    assert len(rl._buckets) <= rl.MAX_KEYS


# --- 2. roles.py ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Who:
    roles: tuple[str, ...]
    content: bool = False


ALL_PERMISSIONS = sorted(set().union(*PERMISSIONS.values()))


def test_auditor_reads_only():
    auditor = Who(("auditor",))
    assert [p for p in ALL_PERMISSIONS if allowed(auditor, p) and p.endswith((".act", ".manage"))] == []
    assert allowed(auditor, "audit.export") and allowed(auditor, "audit.read") and allowed(auditor, "messages.read")


def test_operator_works_messages_but_not_users():
    op = Who(("operator",))
    assert allowed(op, "messages.act")
    assert not allowed(op, "users.manage") and not allowed(op, "partners.manage") and not allowed(op, "audit.export")


def test_admin_does_not_act_on_messages():
    admin = Who(("admin",))
    assert allowed(admin, "users.manage") and allowed(admin, "partners.manage")
    assert not allowed(admin, "messages.act")
    assert not allowed(admin, "audit.export")


def test_content_only_with_the_flag():
    for roles in (("admin",), ("operator",), ("auditor",), ("admin", "operator", "auditor")):
        assert not allowed(Who(roles), "content"), roles
        assert allowed(Who(roles, content=True), "content"), roles
    assert all(not allowed(Who(()), p) for p in ALL_PERMISSIONS)
    assert all(not allowed(Who(("root",)), p) for p in ALL_PERMISSIONS)  # an unknown role grants nothing


def test_every_four_eyes_kind_has_a_second_person_role():
    for kind, need in APPROVAL_NEEDS.items():
        assert any(need in perms for perms in PERMISSIONS.values()), kind


# --- 3. accounts and approvals on a real store ---------------------------------------------------------


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state")
    try:
        yield s
    finally:
        await s.close()


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


async def test_failures_lock_at_the_threshold_and_are_audited(store):
    accounts = store.accounts
    await add(store, "alice")
    assert [await accounts.failed("alice", f, "192.0.2.7", 3, 600.0) for f in ("password", "totp")] == [False, False]
    assert not (await accounts.user("alice")).locked()
    assert await accounts.failed("alice", "recovery-code", "192.0.2.7", 3, 600.0) is True
    u = await accounts.user("alice")
    assert u.locked() and u.failures == 0 and 590 < u.locked_until - time.time() <= 600
    assert not u.locked(now=time.time() + 601)
    failed = sorted(await audits(store, "console.login_failed"), key=lambda r: r["seq"])
    assert [(r["actor"], r["detail"]["factor"], r["detail"]["failures"]) for r in failed] == [
        ("console:alice", "password", 1), ("console:alice", "totp", 2), ("console:alice", "recovery-code", 3)]
    [locked] = await audits(store, "console.user_locked")
    assert (locked["actor"], locked["detail"]["user"], locked["detail"]["minutes"], locked["detail"]["address"]) == \
        ("gateway", "alice", 10, "192.0.2.7")
    await accounts.unlock("alice", "cli:root")
    assert not (await accounts.user("alice")).locked()
    # a success resets the count of consecutive failures
    await accounts.failed("alice", "password", "192.0.2.7", 3, 600.0)
    await accounts.succeeded("alice", "192.0.2.7", "totp")
    assert (await accounts.user("alice")).failures == 0


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


async def test_approvals_need_a_second_person(store):
    approvals = store.approvals
    params = {"message_id": "m1", "partner": "acme"}
    rid = await approvals.request("quarantine.release", "m1", params, "confirmed by phone", "console:alice", "acme", "m1")
    with pytest.raises(AccountError, match="already waiting"):
        await approvals.request("quarantine.release", "m1", params, "again", "console:carol")
    assert [a.id for a in await approvals.requests("pending")] == [rid]

    def anyone(found: Approval) -> None:
        return None

    with pytest.raises(AccountError, match="second person"):
        await approvals.decide(rid, "console:alice", True, anyone)

    def refuse(found: Approval) -> None:
        raise AccountError("deciding needs messages.act")

    with pytest.raises(AccountError, match="messages.act"):
        await approvals.decide(rid, "console:auditor", True, refuse)
    assert (await approvals.get(rid)).state == "pending"
    with pytest.raises(AccountError, match="not a pending request of yours"):
        await approvals.withdraw(rid, "console:bob")
    decided = await approvals.decide(rid, "console:bob", True, anyone)
    assert (decided.state, decided.decided_by, decided.requested_by) == ("approved", "console:bob", "console:alice")
    await approvals.finish(rid, "released")
    a = await approvals.get(rid)
    assert (a.state, a.decided_by, a.outcome) == ("approved", "console:bob", "released")
    with pytest.raises(AccountError, match="not waiting for a decision"):
        await approvals.decide(rid, "console:carol", False, anyone)
    [rec] = await audits(store, "console.approval_approved")
    assert (rec["actor"], rec["message_id"], rec["detail"]["requested_by"]) == ("console:bob", "m1", "console:alice")
    # a new request for the same target once the first is decided; withdrawn by its requester
    rid2 = await approvals.request("quarantine.release", "m1", params, "once more", "console:alice")
    await approvals.withdraw(rid2, "console:alice")
    assert (await approvals.get(rid2)).state == "withdrawn"
    with pytest.raises(AccountError, match="it was withdrawn"):
        await approvals.decide(rid2, "console:bob", True, anyone)


# --- 4. the users CLI (no gateway running) ---------------------------------------------------------------


async def users_cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await run_cli("users", *argv, "-c", str(config))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_users_cli(inst, capsys):
    cfg = inst.config
    code, out, err = await users_cli(capsys, cfg, "add", "carol", "--role", "operator", "--content", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert (made["name"], made["roles"]) == ("carol", ["operator"]) and len(made["password"]) >= 16
    code, out, err = await users_cli(capsys, cfg, "add", "dave", "--role", "auditor")
    assert code == 0, err
    assert out.startswith("dave: initial password ")
    dave_password = out.split()[3]

    code, out, err = await users_cli(capsys, cfg, "add", "carol", "--role", "admin")
    assert code == 2 and "exists already" in err
    code, out, err = await users_cli(capsys, cfg, "add", "Carol!", "--role", "admin")
    assert code == 2 and "is not a user name" in err
    code, out, err = await users_cli(capsys, cfg, "disable", "nobody")
    assert code == 2 and "no user 'nobody'" in err

    code, out, err = await users_cli(capsys, cfg, "list", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"carol", "dave"}
    assert {k: rows["carol"][k] for k in ("roles", "content", "state", "locked", "second_factor", "must_change_password")} == \
        {"roles": ["operator"], "content": True, "state": "active", "locked": False, "second_factor": False,
         "must_change_password": True}
    assert rows["dave"]["roles"] == ["auditor"] and rows["dave"]["content"] is False

    store = SqliteStore(inst.state_dir)
    try:
        acc = store.accounts
        assert security.verify_password((await acc.user("carol")).password_hash, made["password"])
        assert security.verify_password((await acc.user("dave")).password_hash, dave_password)
        await acc.enroll_totp("carol", security.new_totp_secret(), 1, [security.recovery_hash("aaaaa-bbbbb")])
        for _ in range(5):
            await acc.failed("carol", "password", "127.0.0.1", 5, 900.0)
        assert (await acc.user("carol")).locked()
    finally:
        await store.close()

    for action in ("disable", "enable", "reset-mfa", "unlock"):
        code, out, err = await users_cli(capsys, cfg, action, "carol")
        assert (code, out.strip()) == (0, f"carol: {action} done"), err
    code, out, err = await users_cli(capsys, cfg, "reset-password", "carol", "--json")
    assert code == 0, err
    reset = json.loads(out)
    assert reset["name"] == "carol" and reset["password"] != made["password"]
    code, out, err = await users_cli(capsys, cfg, "disable", "dave")
    assert code == 0, err

    code, out, err = await users_cli(capsys, cfg, "list")
    assert code == 0, err
    lines = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert lines["carol"][1:3] == ["operator +content", "active"]
    assert "no second factor yet" in lines["carol"][3] and "must change password" in lines["carol"][3]
    assert "locked" not in lines["carol"][3]
    assert lines["dave"][2] == "disabled"

    store = SqliteStore(inst.state_dir)
    try:
        carol = await store.accounts.user("carol")
        assert (carol.enrolled, carol.locked(), carol.must_change, carol.state) == (False, False, True, "active")
        assert security.verify_password(carol.password_hash, reset["password"])
        assert not security.verify_password(carol.password_hash, made["password"])
        actor = f"cli:{current_user()}"
        records = [r for r in await audit_records(store, 1000) if r["action"].startswith("user.")]
        got = sorted((r["seq"], r["action"], r["detail"].get("user")) for r in records if r["actor"] == actor)
        assert [(a, u) for _, a, u in got] == [
            ("user.added", "carol"), ("user.added", "dave"), ("user.disabled", "carol"), ("user.enabled", "carol"),
            ("user.mfa_reset", "carol"), ("user.unlocked", "carol"), ("user.password_reset", "carol"),
            ("user.disabled", "dave")]
        assert all(r["actor"] == actor for r in records)
    finally:
        await store.close()
    capsys.readouterr()
    code = await run_cli("audit", "verify", "-c", str(cfg))
    out, err = capsys.readouterr()
    assert code == 0 and "audit log OK" in out, out + err  # every CLI change sealed into the chain


async def test_cli_password_reset_is_audited_as_a_reset_whoever_runs_it(inst, capsys, monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", "erin")
    code, _, err = await users_cli(capsys, inst.config, "add", "erin", "--role", "operator")
    assert code == 0, err
    code, _, err = await users_cli(capsys, inst.config, "reset-password", "erin")
    assert code == 0, err
    store = SqliteStore(inst.state_dir)
    try:
        assert [r["actor"] for r in await audits(store, "user.password_reset")] == ["cli:erin"]
    finally:
        await store.close()


# --- 5. HTTP: the client -----------------------------------------------------------------------------------


def assert_security_headers(page: Page) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert page.headers.get(name) == value, (page.url, page.status, name, page.headers.get(name))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    inst = instance.init(tmp_path_factory.mktemp("console") / "gw", port=0)
    ids = await populate(inst)  # delivered, dead (an https ERP refused it), pending, foreign
    # Sessions idle for a minute end (the shortest allowed); every test logs in from 127.0.0.1.
    set_options(inst.config, console={"idle_timeout_s": 60.0, "login_burst": 1000})
    set_admin(inst, free_port())
    try:
        async with serving(inst, "warning", io.StringIO()) as running:
            async with running.session() as s:
                ids["held"] = await accepted(s, invoice("CONSOLE-0001", iban=IBAN_B), status="held")  # a new payee account
            w = World(inst, running, ids)
            await w.person("boss", "admin")  # an account exists: no bootstrap account in this gateway
            yield w
    finally:
        logs.configure("warning")


# --- 6. HTTP: headers, Host, Origin, CSRF --------------------------------------------------------------------


@shared
async def test_security_headers_on_every_console_response(world):
    boss = world.people["boss"]
    async with world.browser() as b:
        seen = [await b.get("/console/login"), await b.get("/console/", follow=False), await b.get("/console/nowhere"),
                await b.get("/console/static/console.css")]
        assert [p.status for p in seen] == [200, 303, 404, 200]
        assert seen[0].has("//form[@id='login']//input[@name='username']")
        assert seen[0].has("//form[@id='login']//input[@name='password'][@type='password']")
        assert seen[0].has("//form[@id='login']//button[@type='submit']")
        assert seen[2].has("//p[@class='error']")
        seen.append(await b.post("/console/login", {"username": "boss"}, csrf=False))  # CSRF refusal page
        assert seen[-1].status == 403
        seen.append(await b.post("/console/login", {"username": "nobody", "password": "wrong password!"}))
        assert (seen[-1].status, seen[-1].error) == (401, "wrong user name or password")
        await login(b, boss)
        for path in ("/console/", "/console/messages", f"/console/messages/{world.ids['delivered']}", "/console/dead-letters",
                     "/console/quarantine", f"/console/quarantine/{world.ids['held']}", "/console/approvals",
                     "/console/partners", "/console/partners/demo-supplier", "/console/audit", "/console/users",
                     "/console/account", "/console/password", "/console/reauth?next=/console/users"):
            page = await b.get(path)
            assert page.status == 200, (path, page.status, page.error)
            seen.append(page)
        seen.append(await b.post("/console/dead-letters", {"item": f"{world.ids['dead']} erp-api", "reason": "x",
                                                           "action": "requeue"}))
        assert seen[-1].status == 403  # an administrator does not act on messages
        seen.append(await b.get(f"/console/messages/{'0' * 32}"))
        assert seen[-1].status == 404
    async with world.browser(host="evil.example") as b:
        seen.append(await b.get("/console/login"))
        assert seen[-1].status == 421
    for page in seen:
        assert_security_headers(page)
        for r in page.history:  # the redirects on the way too
            assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, r.url


@shared
async def test_host_not_allowed_is_421(world):
    for host in ("evil.example", f"evil.example:{world.running.gw.admin_port}", "localhost.evil.example",
                 "127.0.0.2", "[::2]"):
        async with world.browser(host=host) as b:
            page = await b.get("/console/login")
            assert page.status == 421, host
            assert "answers only to" in page.error
            assert b.cookie(LOGIN_CSRF_COOKIE) is None  # nothing was set up for that name
    for host in (f"localhost:{world.running.gw.admin_port}", f"127.0.0.1:{world.running.gw.admin_port}"):
        async with world.browser(host=host) as b:
            assert (await b.get("/console/login")).status == 200, host


@shared
async def test_post_without_csrf_is_refused_and_audited(world):
    p = await world.person("csrf-victim", "operator")
    async with world.browser() as b:
        await b.get("/console/login")
        page = await b.post("/console/login", {"username": p.name, "password": PASSWORD}, csrf=False)
        assert page.status == 403 and "CSRF" in page.error
        assert b.cookie() is None  # no session was opened
        denied = [r for r in await audits(world.store, "console.denied") if r["detail"]["path"] == "/console/login"]
        assert denied and denied[0]["actor"] == "console:anonymous@127.0.0.1" and "CSRF" in denied[0]["detail"]["reason"]
        # a wrong token is no better than none
        page = await b.post("/console/login", {"username": p.name, "password": PASSWORD, "csrf": "forged"}, csrf=False)
        assert page.status == 403 and b.cookie() is None

        await login(b, p)
        page = await b.post("/console/logout", csrf=False)
        assert page.status == 403
        page = await b.post("/console/logout", {"csrf": security.new_token()}, csrf=False)
        assert page.status == 403
        assert await world.session_of(b) is not None  # nothing changed: still logged in
        assert (await b.get("/console/")).path == "/console/"
        mine = [r for r in await audits(world.store, "console.denied") if r["actor"] == f"console:{p.name}"]
        assert len(mine) == 2 and all(r["detail"]["path"] == "/console/logout" for r in mine)


@shared
async def test_foreign_or_missing_origin_is_refused(world):
    p = await world.person("origin-victim", "operator")
    async with world.browser() as b:
        await login(b, p)
        token = b.cookie()
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": f"http://127.0.0.1:{world.running.gw.admin_port}"},  # another origin than the Host's
                        {"Origin": f"https://localhost:{world.running.gw.admin_port}"}):
            page = await b.post("/console/logout", headers=headers)
            assert page.status == 403 and "Origin" in page.error, headers
        assert await world.session_of(b) is not None
        # the same request without Origin or Referer: refused too
        async with world.browser(origin=None) as bare:
            bare.jar.update_cookies({SESSION_COOKIE: token}, URL(world.base + "/console/"))
            bare.csrf = b.csrf
            page = await bare.post("/console/logout")
            assert page.status == 403 and "Origin" in page.error
        assert await world.session_of(b) is not None
        denied = [r for r in await audits(world.store, "console.denied") if r["actor"] == f"console:{p.name}"]
        assert len(denied) == 5
        # a same-origin Referer (no Origin) is accepted: the check is not a blanket refusal
        async with world.browser(origin=None) as bare:
            bare.jar.update_cookies({SESSION_COOKIE: token}, URL(world.base + "/console/"))
            bare.csrf = b.csrf
            page = await bare.post("/console/logout", headers={"Referer": world.base + "/console/"})
            assert page.path == "/console/login"
        assert await world.session_of(b) is None


# --- 7. HTTP: sessions ---------------------------------------------------------------------------------------


@shared
async def test_session_cookie_flags_rotation_and_logout(world):
    p = await world.person("rotor", "operator")
    async with world.browser() as b:
        page = await password_step(b, p, follow=False)
        assert (page.status, page.location) == (303, "/console/mfa")
        [cookie] = [c for c in page.headers.getall("Set-Cookie") if c.startswith(f"{SESSION_COOKIE}=")]
        attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")[1:]}
        assert "httponly" in attrs and attrs["samesite"].lower() == "samesite=strict" and attrs["path"] == "Path=/console/"
        assert "secure" not in attrs  # plain HTTP on loopback; Secure on HTTPS
        pre = b.cookie()
        assert pre and (await world.session_of(b)).stage == "mfa"

        # the pre-login session reaches the second-factor pages only
        for path in ("/console/messages", "/console/", "/console/dead-letters", "/console/account"):
            page = await b.get(path, follow=False)
            assert (page.status, page.location) == (303, "/console/mfa"), path
        page = await b.get("/console/messages")
        assert page.path == "/console/mfa" and not page.has("//table[@id='messages']")
        assert page.has("//form[@id='totp']//input[@name='code']") and page.has("//form[@id='recovery']//input[@name='recovery_code']")
        assert not page.has("//button[@id='passkey-login']")  # no passkey registered
        before = (await world.store.reports.message(world.ids["dead"])).deliveries
        page = await b.post("/console/dead-letters", {"item": f"{world.ids['dead']} erp-api", "reason": "x",
                                                      "action": "requeue"}, follow=False)
        assert (page.status, page.location) == (303, "/console/mfa")
        assert (await world.store.reports.message(world.ids["dead"])).deliveries == before  # nothing done

        page = await b.post("/console/mfa/totp", {"code": await p.code()}, follow=False)
        assert (page.status, page.location) == (303, "/console/")
        full = b.cookie()
        assert full and full != pre  # a new identifier after the second factor
        assert await world.accounts.session(security.token_hash(pre)) is None
        assert (await world.session_of(b)).stage == "full"
        page = await b.get("/console/messages")
        assert page.status == 200 and page.has("//table[@id='messages']//tbody/tr[@data-message-id]")
        shown = set(page.xpath("//table[@id='messages']//tbody/tr/@data-message-id"))
        assert {world.ids["delivered"], world.ids["dead"], world.ids["held"]} <= shown
        assert page.has("//nav//a[@href='/console/messages']") and page.has("//form[@id='logout']")

        page = await b.post("/console/logout", follow=False)
        assert (page.status, page.location) == (303, "/console/login")
        assert await world.accounts.session(security.token_hash(full)) is None
        [ended] = [r for r in await audits(world.store, "console.session_logout") if r["detail"]["user"] == p.name]
        assert ended["actor"] == f"console:{p.name}"
    # the old cookie, replayed, is a stranger
    async with world.browser() as b:
        b.jar.update_cookies({SESSION_COOKIE: full}, URL(world.base + "/console/"))
        page = await b.get("/console/messages", follow=False)
        assert (page.status, page.location) == (303, "/console/login?next=/console/messages")
        page = await b.get("/console/messages")
        assert page.path == "/console/login" and page.has("//form[@id='login']")


@shared
async def test_idle_session_ends(world):
    p = await world.person("idler", "auditor")
    async with world.browser() as b:
        await login(b, p)
        session = await world.session_of(b)
        assert (await b.get("/console/audit")).status == 200
        assert await world.sql("UPDATE console_sessions SET seen_at = seen_at - 61 WHERE id_hash = ?", session.id_hash) == 1
        page = await b.get("/console/audit", follow=False)
        assert (page.status, page.location) == (303, "/console/login?next=/console/audit")
        assert await world.accounts.session(session.id_hash) is None
        [expired] = [r for r in await audits(world.store, "console.session_expired") if r["detail"]["user"] == p.name]
        assert expired["detail"]["session"] == session.id_hash[:12]


# --- 8. HTTP: logging in -------------------------------------------------------------------------------------


async def test_bootstrap_account_and_login_throttle(inst):
    # three login attempts per address, then one a minute (checked at the end)
    set_options(inst.config, rules={"processes": 1}, console={"login_burst": 3, "login_every_s": 60.0})
    set_admin(inst, free_port())
    secret_file = inst.state_dir / BOOTSTRAP_FILE
    try:
        async with serving(inst, "warning", io.StringIO()) as running:
            base = f"http://localhost:{running.gw.admin_port}"
            assert not secret_file.exists()
            async with Browser(base) as b:
                page = await b.get("/console/")
                assert page.path == "/console/login" and page.status == 200
                assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
                assert str(secret_file) in page.text  # the login page says where to look
                bootstrap = secret_file.read_text().strip()
                assert len(bootstrap) >= 16
                page = await b.post("/console/login", {"username": "admin", "password": bootstrap})
                assert page.path == "/console/enroll", page.error  # no second factor yet
                totp_secret = page.xpath("//code[@id='totp-secret']/text()")[0]
                assert page.has("//form[@id='enroll']//input[@name='code']")
                page = await b.post("/console/enroll", {"code": pyotp.TOTP(totp_secret).now()})
                assert page.status == 200
                assert len(page.xpath("//*[@id='recovery-codes']/li")) == 10
                assert page.xpath("//a[@id='continue']/@href") == ["/console/password"]
                # the password must change before any page
                for path in ("/console/", "/console/messages", "/console/users"):
                    page = await b.get(path, follow=False)
                    assert (page.status, page.location) == (303, "/console/password"), path
                page = await b.get("/console/password")
                assert page.has("//form[@id='password']//input[@name='current']")
                page = await b.post("/console/password", {"current": bootstrap, "new": "the admin passphrase",
                                                          "confirm": "the admin passphrase"})
                assert page.status == 400 and "user name" in page.error
                page = await b.post("/console/password", {"current": bootstrap, "new": "qwerty123456789",
                                                          "confirm": "qwerty123456789"})
                assert page.status == 400 and "commonly used" in page.error
                assert secret_file.exists()
                page = await b.post("/console/password", {"current": bootstrap, "new": "purple elephant dances",
                                                          "confirm": "purple elephant dances"})
                assert (page.status, page.path) == (200, "/console/"), page.error
                assert not secret_file.exists()
                assert (await b.get("/console/users")).status == 200
                admin = await running.gw.store.accounts.user("admin")
                assert (admin.roles, admin.must_change, admin.enrolled, admin.created_by) == (("admin",), False, True, "gateway")
                assert security.verify_password(admin.password_hash, "purple elephant dances")
                [changed] = await audits(running.gw.store, "user.password_changed")
                assert changed["actor"] == "console:admin"
                # the next visit does not make another account
                async with Browser(base) as other:
                    await other.get("/console/login")
                    assert not secret_file.exists() and [u.name for u in await running.gw.store.accounts.users()] == ["admin"]
                    # the address has used one of its three attempts; two more, then it must wait
                    for _ in range(2):
                        page = await other.post("/console/login", {"username": "admin", "password": "guessing wrong"})
                        assert page.status == 401
                    page = await other.post("/console/login", {"username": "admin", "password": "purple elephant dances"})
                    assert page.status == 429 and "too many" in page.error and other.cookie() is None
                [throttled] = await audits(running.gw.store, "console.login_throttled")
                assert throttled["actor"] == "console:anonymous@127.0.0.1"
                assert (await running.gw.store.accounts.user("admin")).failures == 2  # a refused attempt is not a failure
    finally:
        logs.configure("warning")


@shared
async def test_lockout_after_five_failed_factors(world, capsys):
    p = await world.person("locky", "operator")
    async with world.browser() as b:
        for _ in range(3):
            page = await password_step(b, p, "not the password at all")
            assert (page.status, page.error) == (401, "wrong user name or password")
        page = await password_step(b, p)  # the right password: on to the second factor
        assert page.path == "/console/mfa"
        wrong = pyotp.TOTP(p.secret).at(time.time() + 3600)
        page = await b.post("/console/mfa/totp", {"code": wrong})
        assert page.status == 401 and "not valid" in page.error
        page = await b.post("/console/mfa/totp", {"code": wrong})  # the fifth failure, counted with the passwords
        assert page.status == 423 and "locked" in page.error
        assert await world.session_of(b) is None  # the half-done login ends
    assert (await world.accounts.user(p.name)).locked()
    [locked] = [r for r in await audits(world.store, "console.user_locked") if r["detail"]["user"] == p.name]
    assert (locked["actor"], locked["detail"]["factor"], locked["detail"]["minutes"]) == ("gateway", "totp", 15)
    async with world.browser() as b:
        page = await password_step(b, p)  # even the right password
        assert page.status == 423 and "locked" in page.error and b.cookie() is None
        capsys.readouterr()
        code = await run_cli("users", "unlock", p.name, "-c", str(world.inst.config))
        out = capsys.readouterr().out
        assert (code, out.strip()) == (0, f"{p.name}: unlock done")
        [unlocked] = [r for r in await audits(world.store, "user.unlocked") if r["detail"]["user"] == p.name]
        assert unlocked["actor"] == f"cli:{current_user()}"
        await login(b, p)


@shared
async def test_totp_code_works_once(world):
    p = await world.person("reuse", "auditor")
    while time.time() % 30 > 25:  # keep the whole test inside one 30 s step (the earlier step must stay in the window)
        await asyncio.sleep(0.5)
    async with world.browser() as b:
        await password_step(b, p)
        code = pyotp.TOTP(p.secret).now()
        step = int(time.time() // 30)
        p.last_step = step
        page = await b.post("/console/mfa/totp", {"code": code})
        assert page.path == "/console/", page.error
        await b.post("/console/logout")
        page = await password_step(b, p)
        assert page.path == "/console/mfa"
        for used in (code, pyotp.TOTP(p.secret).at((step - 1) * 30)):  # the same step, and an earlier one
            page = await b.post("/console/mfa/totp", {"code": used})
            assert page.status == 401 and "already used" in page.error
        page = await b.post("/console/mfa/totp", {"code": await p.code()})  # the next step's code is fine
        assert page.path == "/console/", page.error


@shared
async def test_recovery_code_works_once(world):
    p = await world.person("recov", "auditor")
    async with world.browser() as b:
        await password_step(b, p)
        typed = p.codes[0].upper().replace("-", " ")  # as read aloud: case and separator do not matter
        page = await b.post("/console/mfa/recovery", {"recovery_code": typed})
        assert page.path == "/console/", page.error
        page = await b.get("/console/account")
        assert "9 unused" in page.text
        await b.post("/console/logout")
        page = await password_step(b, p)
        page = await b.post("/console/mfa/recovery", {"recovery_code": p.codes[0]})
        assert page.status == 401 and "used already" in page.error
        page = await b.post("/console/mfa/recovery", {"recovery_code": p.codes[1]})
        assert page.path == "/console/", page.error
    methods = [r["detail"]["method"] for r in await audits(world.store, "console.login") if r["actor"] == f"console:{p.name}"]
    assert methods == ["recovery-code", "recovery-code"]
    assert await world.accounts.recovery_left(p.name) == 8


# --- 9. HTTP: roles, four eyes, fresh authentication, content -------------------------------------------------


@shared
async def test_roles_over_http(world):
    auditor = await world.person("auditor1", "auditor")
    operator = await world.person("ops-dead", "operator")
    dead, held = world.ids["dead"], world.ids["held"]
    held_state = (await world.store.quarantine.entry(held)).state
    async with world.browser() as b:
        await login(b, auditor)
        page = await b.get("/console/dead-letters")
        assert page.xpath("//table[@id='dead-letters']//tbody/tr/@data-message-id") == [dead]
        assert not page.has("//input[@name='item']") and not page.has("//button[@name='action']")
        page = await b.post("/console/dead-letters", {"item": f"{dead} erp-api", "reason": "try again", "action": "requeue"})
        assert page.status == 403 and "does not allow" in page.error
        page = await b.get("/console/users")
        assert page.status == 200 and page.has("//table[@id='users']") and not page.has("//form[@id='add-user']")
        assert not page.has("//form[contains(@action, '/disable')]")
        page = await b.post("/console/users", {"name": "sneaky", "role_admin": "on"})
        assert page.status == 403 and "does not allow" in page.error
        page = await b.get(f"/console/quarantine/{world.ids['held']}")
        assert page.has("//table[@id='accounts']") and not page.has("//form[@id='release']")
        page = await b.post(f"/console/quarantine/{world.ids['held']}/reject", {"note": "no"})
        assert page.status == 403
    assert await world.accounts.user("sneaky") is None
    assert (await world.store.reports.message(dead)).deliveries[0].state == "dead"
    assert (await world.store.quarantine.entry(held)).state == held_state
    denied = [r["detail"]["path"] for r in await audits(world.store, "console.denied") if r["actor"] == "console:auditor1"]
    assert sorted(denied) == sorted(["/console/dead-letters", "/console/users", f"/console/quarantine/{world.ids['held']}/reject"])

    async with world.browser() as b:
        await login(b, operator)
        page = await b.get("/console/dead-letters")
        assert page.xpath("//input[@name='item']/@value") == [f"{dead} erp-api"]
        assert page.has("//button[@name='action'][@value='requeue']") and page.has("//button[@name='action'][@value='discard']")
        assert (await b.get("/console/users")).status == 403  # an operator does not see the accounts
        # discard is four-eyes: a request, nothing done yet
        page = await b.post("/console/dead-letters", {"item": f"{dead} erp-api", "reason": "sent by post", "action": "discard"})
        assert page.path == "/console/dead-letters" and "discard requested" in page.text
        [req] = [a for a in await world.approvals.requests("pending") if a.kind == "deadletter.discard"]
        assert (req.target, req.requested_by, req.reason) == (f"{dead} erp-api", "console:ops-dead", "sent by post")
        assert (await world.store.reports.message(dead)).deliveries[0].state == "dead"
        page = await b.get("/console/approvals")
        assert page.has(f"//table[@id='approvals']//tr[@data-approval-id='{req.id}']//form[@class='withdraw']")
        page = await b.post(f"/console/approvals/{req.id}/withdraw")
        assert page.status == 200 and (await world.approvals.get(req.id)).state == "withdrawn"
        # requeue is done at once
        page = await b.post("/console/dead-letters", {"item": f"{dead} erp-api", "reason": "ERP fixed", "action": "requeue"})
        assert page.path == "/console/dead-letters" and "1 requeued" in page.text
    assert (await world.store.reports.message(dead)).deliveries[0].state != "dead"
    [requeued] = [r for r in await audits(world.store, "delivery.requeued") if r["message_id"] == dead]
    assert (requeued["actor"], requeued["detail"]["reason"]) == ("console:ops-dead", "ERP fixed")


@shared
async def test_four_eyes_release_with_fresh_authentication(world):
    first = await world.person("ops1", "operator")
    second = await world.person("ops2", "operator")
    held = world.ids["held"]
    async with world.browser() as b:
        await login(b, first)
        page = await b.get("/console/quarantine")
        assert held in page.xpath("//table[@id='quarantine']//tbody/tr/@data-message-id")
        page = await b.get(f"/console/quarantine/{held}")
        assert page.has("//form[@id='release']//*[@name='note']") and page.has("//form[@id='reject']")
        page = await b.post(f"/console/quarantine/{held}/release", {"note": "account confirmed by phone"})
        assert page.path == f"/console/quarantine/{held}" and "second person" in page.text
        [req] = [a for a in await world.approvals.requests("pending") if a.kind == "quarantine.release"]
        assert (req.target, req.requested_by) == (held, "console:ops1")
        assert (await world.store.quarantine.entry(held)).state == "held"
        page = await b.get("/console/approvals")
        row = f"//table[@id='approvals']//tr[@data-approval-id='{req.id}']"
        assert page.has(row) and not page.has(f"{row}//form[@class='approve']")  # not offered to the requester
        page = await b.post(f"/console/approvals/{req.id}/approve")
        assert page.status == 403 and "second person" in page.error
        assert (await world.approvals.get(req.id)).state == "pending"

    async with world.browser() as b:
        await login(b, second)
        page = await b.get("/console/approvals")
        assert page.has(f"//tr[@data-approval-id='{req.id}']//form[@class='approve']")
        # ten minutes after the login, approving needs the password and a code again
        session = await world.session_of(b)
        await world.sql("UPDATE console_sessions SET auth_at = auth_at - 600 WHERE id_hash = ?", session.id_hash)
        page = await b.post(f"/console/approvals/{req.id}/approve", follow=False,
                            headers={"Referer": world.base + "/console/approvals"})
        assert page.status == 303 and page.location.startswith("/console/reauth?")
        assert parse_qs(urlsplit(page.location).query)["next"] == ["/console/approvals"]
        assert (await world.approvals.get(req.id)).state == "pending"
        page = await b.get(page.location)
        assert page.has("//form[@id='reauth']//input[@name='password']") and page.has("//form[@id='reauth']//input[@name='code']")
        page = await b.post("/console/reauth", {"password": PASSWORD, "code": await second.code(), "next": "/console/approvals"})
        assert page.path == "/console/approvals", page.error
        assert (await world.session_of(b)).auth_at > time.time() - 60
        page = await b.post(f"/console/approvals/{req.id}/approve")
        assert page.path == "/console/approvals" and page.status == 200, page.error
    decided = await world.approvals.get(req.id)
    assert (decided.state, decided.decided_by, decided.outcome) == ("approved", "console:ops2", "released")
    entry = await world.store.quarantine.entry(held)
    assert (entry.state, entry.decided_by) == ("released", "console:ops2")
    [released] = [r for r in await audits(world.store, "quarantine.released") if r["message_id"] == held]
    assert released["actor"] == "console:ops2" and "requested by console:ops1" in released["detail"]["note"]
    assert [r["actor"] for r in await audits(world.store, "console.reauthenticated")] == ["console:ops2"]


@shared
async def test_content_view_needs_its_permission_and_is_audited(world):
    plain = await world.person("no-content", "operator")
    reader = await world.person("reader", "operator", content=True)
    mid = world.ids["delivered"]
    async with world.browser() as b:
        await login(b, plain)
        page = await b.get(f"/console/messages/{mid}")
        assert len(page.xpath("//ol[@id='timeline']/li")) >= 3 and not page.has("//form[@id='view-content']")
        page = await b.post(f"/console/messages/{mid}/content")
        assert page.status == 403 and not page.has("//pre[@id='content']") and "DEMO-2026-0001</" not in page.text
    assert await audits(world.store, "console.content_viewed") == []
    assert [r["actor"] for r in await audits(world.store, "console.denied") if r["detail"]["path"].endswith("/content")] == \
        ["console:no-content"]
    async with world.browser() as b:
        await login(b, reader)
        page = await b.get(f"/console/messages/{mid}")
        assert page.has("//form[@id='view-content']")
        page = await b.post(f"/console/messages/{mid}/content")
        assert page.status == 200, page.error
        [content] = page.xpath("//pre[@id='content']/text()")
        assert content.lstrip().startswith("<?xml") and "<cbc:ID>DEMO-2026-0001</cbc:ID>" in content
    [viewed] = await audits(world.store, "console.content_viewed")
    assert (viewed["actor"], viewed["message_id"], viewed["partner"]) == ("console:reader", mid, "demo-supplier")
    assert viewed["detail"]["sha256"] == (await world.store.reports.message(mid)).sha256


@shared
async def test_signed_audit_export_verifies_and_tampering_is_found(world, tmp_path, capsys):
    auditor = await world.person("auditor2", "auditor")
    async with world.browser() as b:
        await login(b, auditor)
        page = await b.get("/console/audit")
        assert page.has("//form[@id='export']") and page.has("//form[@id='verify']")
        page = await b.post("/console/audit/verify")
        assert "The chain is intact" in " ".join(page.xpath("//*[@id='verify-result']//text()"))
        async with b.s.get(world.base + "/console/audit/export") as r:
            assert r.status == 200 and r.content_type == "application/x-ndjson"
            assert r.headers["Content-Disposition"].startswith("attachment; ")
            assert r.headers["Content-Security-Policy"] == CSP
            body = await r.read()
    lines = body.decode().splitlines()
    assert json.loads(lines[0])["format"] and json.loads(lines[-1])["format"] == "einvoice-gateway-audit-seal/1"
    assert len(lines) > 10
    export = tmp_path / "export.jsonl"
    export.write_bytes(body)
    capsys.readouterr()
    code = await run_cli("audit", "verify", "--file", str(export), "-c", str(world.inst.config))
    out, err = capsys.readouterr()
    assert code == 0 and "audit log OK" in out, out + err
    [exported] = [r for r in await audits(world.store, "console.audit_exported") if r["actor"] == "console:auditor2"]
    assert exported["detail"]["records"] == len(lines) - 2

    i = body.index(b'"action": "') + len(b'"action": "')  # one character of the first record changed
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:])
    code = await run_cli("audit", "verify", "--file", str(tampered), "-c", str(world.inst.config))
    out, err = capsys.readouterr()
    assert code != 0 and "differs from what its seal signed" in out + err

    # an administrator may read the log but not export it
    async with world.browser() as b:
        await login(b, world.people["boss"])
        async with b.s.get(world.base + "/console/audit/export") as r:
            assert r.status == 403


@shared
async def test_non_ascii_totp_code_is_a_wrong_code_over_http(world):
    p = await world.person("wide-digits", "auditor")
    async with world.browser() as b:
        await password_step(b, p)
        page = await b.post("/console/mfa/totp", {"code": "１２３４５６"})
        assert (await world.accounts.user(p.name)).failures == 1
        assert page.status == 401 and "not valid" in page.error


@shared
async def test_approved_release_keeps_the_requesters_reason(world):
    async with world.running.session() as s:
        held = await accepted(s, invoice("CONSOLE-0002", iban=IBAN_C), status="held")
    rid = await world.approvals.request("quarantine.release", held, {"message_id": held, "partner": DEMO},
                                        "seller confirmed the new account by phone", "console:someone-else", DEMO, held)
    approver = await world.person("ops-note", "operator")
    async with world.browser() as b:
        await login(b, approver)
        page = await b.post(f"/console/approvals/{rid}/approve")
        assert page.path == "/console/approvals", page.error
    entry = await world.store.quarantine.entry(held)
    assert entry.state == "released"
    assert "seller confirmed the new account by phone" in entry.note


@shared
async def test_login_redirects_are_raised_not_returned(world):
    p = await world.person("warned", "auditor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with world.browser() as b:
            await login(b, p)
            await b.post("/console/logout")
            await password_step(b, p)
            page = await b.post("/console/mfa/recovery", {"recovery_code": p.codes[0]})
            assert page.path == "/console/"
    assert [str(w.message) for w in caught if "returning HTTPException object is deprecated" in str(w.message)] == []


@shared
async def test_request_storage_uses_request_keys(world, monkeypatch):
    monkeypatch.setattr(BaseRequest, "_seen_str_keys", set())  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with world.browser() as b:
            page = await b.get("/console/login")
            assert page.status == 200 and page.has("//form[@id='login']")
    assert [str(w.message) for w in caught if issubclass(w.category, NotAppKeyWarning)] == []
