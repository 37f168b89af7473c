"""Logging in (``gateway/console/login.py``): the password, then a second factor (a TOTP code or a
recovery code, each spent once), the session cookie and its rotation, logout, failed logins that all
look alike and make their source wait (never a lock), the bootstrap account of a new installation and
the per-address flood limit.

Over the real admin listener of the package's one gateway (``world`` in tests/console/conftest.py);
the bootstrap account needs a gateway without any account: that test starts its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import time
import warnings

import pyotp
import pytest
from yarl import URL

from gateway import logs
from gateway.cli.common import current_user
from gateway.console import security
from gateway.console.guard import SESSION_COOKIE
from gateway.console.login import BOOTSTRAP_FILE, BROWSER_COOKIE, WRONG_LOGIN
from gateway.storage.records import SHARED_SOURCE
from tests.helpers import free_port, run_cli, serving
from tests.helpers.console import PASSWORD, Browser, audits, login, password_step, set_options, shared
from tests.helpers.daemon import set_admin

# --- sessions ---------------------------------------------------------------------------------------------


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


# --- the bootstrap account, the flood limit ---------------------------------------------------------------


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
                assert (await running.gw.store.accounts.user("admin")).failed_logins == 2  # a refused attempt is not one
                # A browser that logged in has a bucket of its own: others at its address cannot use it up.
                await b.post("/console/logout")
                page = await b.post("/console/login", {"username": "admin", "password": "purple elephant dances"})
                assert page.path == "/console/mfa", (page.status, page.error)
    finally:
        logs.configure("warning")


# --- failed logins: all alike, and never a lock -----------------------------------------------------------


def counting_verifications(monkeypatch) -> list[str | None]:
    """Every password verification the console runs, by the stored hash it checks against (None: the dummy)."""
    seen: list[str | None] = []
    real = security.verify_password

    def verify(stored: str | None, password: str) -> bool:
        seen.append(stored)
        return real(stored, password)

    monkeypatch.setattr(security, "verify_password", verify)
    return seen


def answer(page) -> tuple[int, str, list[tuple[str, str]]]:
    """Everything a failed login shows its sender, but the Date header."""
    return page.status, page.text, sorted((k, v) for k, v in page.headers.items() if k.lower() != "date")


async def fail_passwords(world, who: str, times: int, *, address: str | None = None) -> list[int]:
    async with Browser(f"http://127.0.0.1:{world.running.gw.admin_port}", address=address) as b:
        return [(await password_step(b, who, f"guess number {i}")).status for i in range(times)]


@shared
async def test_every_failed_login_gets_the_same_answer_after_the_same_work(world, monkeypatch):
    """The enumeration attack: an unknown name, a wrong password, a disabled account, an account whose
    failures make it wait (with the right password and a wrong one) and a password too long to hash all
    get one status, one page and one set of headers and cookies, after one password verification each;
    only the audit log tells them apart, and it never holds a password."""
    real, off, slow = [await world.person(n, "operator") for n in ("enum-real", "enum-off", "enum-slow")]
    await world.accounts.set_state(off.name, "disabled", "pytest")
    assert await fail_passwords(world, slow.name, 5) == [401] * 5  # its free failures spent: it must wait now
    cases = {
        "unknown-user": ("enum-nobody", PASSWORD),
        "wrong-password": (real.name, "not the password at all"),
        "disabled": (off.name, PASSWORD),
        "throttled": (slow.name, PASSWORD),
        "throttled ": (slow.name, "not the password either"),
        "too long": (real.name, PASSWORD + "x" * 1100),
    }
    verified = counting_verifications(monkeypatch)
    answers = {}
    async with world.browser() as b:
        await b.get("/console/login")
        for case, (name, password) in cases.items():
            page = await b.post("/console/login", {"username": name, "password": password})
            answers[case] = answer(page)
            assert (page.status, page.error) == (401, WRONG_LOGIN), case
            assert b.cookie() is None and b.cookie(BROWSER_COOKIE) is None, case  # no session, nothing remembered
    first = answers["unknown-user"]
    assert [case for case, a in answers.items() if a != first] == []
    assert [h for h, _ in first[2] if h.lower() == "set-cookie"] == ["Set-Cookie"]  # the login form's CSRF cookie only
    # One verification per attempt: the account's hash, or the dummy of the same cost.
    hashes = {p.name: (await world.accounts.user(p.name)).password_hash for p in (real, off, slow)}
    assert verified == [None, hashes[real.name], hashes[off.name], None, None, hashes[real.name]]
    # The audit log knows which was which, and names no password.
    records = [r for r in await audits(world.store, "console.login_failed") if r["detail"]["user"].startswith("enum-")]
    assert sorted(r["detail"]["reason"] for r in records) == sorted(
        ["unknown-user", "wrong-password", "disabled", "throttled", "throttled", "wrong-password"] + ["wrong-password"] * 5)
    assert [r["actor"] for r in records if r["detail"]["reason"] == "unknown-user"] == ["console:anonymous@127.0.0.1"]
    everything = json.dumps([r.as_json() for r in await world.store.audit.newest(1_000_000)])
    assert not [pw for _, pw in cases.values() if pw in everything]


@pytest.mark.slow
@shared
async def test_the_attackers_address_waits_and_the_owner_elsewhere_logs_in(world):
    """Guessing from one address makes that address wait (counted failures stop at the free ones), and
    never keeps the account's owner out: from another address they log in at once."""
    p = await world.person("besieged", "admin")
    after = world.running.gw.config.console.backoff_after
    assert await fail_passwords(world, p.name, 30) == [401] * 30
    reasons = [r["detail"]["reason"] for r in await audits(world.store, "console.login_failed")
               if r["detail"]["user"] == p.name]
    assert sorted(reasons) == ["throttled"] * (30 - after) + ["wrong-password"] * after
    async with Browser(f"http://127.0.0.1:{world.running.gw.admin_port}") as attacker:
        page = await password_step(attacker, p)  # the attacker's address, even with the right password
        assert (page.status, page.error, attacker.cookie()) == (401, WRONG_LOGIN, None)
    u = await world.accounts.user(p.name)
    assert (u.state, u.failed_logins) == ("active", after)  # no lock, and waiting attempts are not counted
    async with Browser(f"http://127.0.0.1:{world.running.gw.admin_port}", address="127.0.0.2") as owner:
        await login(owner, p)
        [session] = await world.accounts.sessions(p.name)
        assert session.address == "127.0.0.2"
    async with Browser(f"http://127.0.0.1:{world.running.gw.admin_port}") as attacker:
        page = await password_step(attacker, p)
        assert (page.status, page.error) == (401, WRONG_LOGIN)  # the owner's login did not end the attacker's wait


@shared
async def test_failed_second_factors_count_and_end_the_half_done_login(world, capsys):
    p = await world.person("mistyper", "operator")
    async with world.browser() as b:
        for _ in range(3):
            page = await password_step(b, p, "not the password at all")
            assert (page.status, page.error) == (401, WRONG_LOGIN)
        page = await password_step(b, p)  # the right password: on to the second factor
        assert page.path == "/console/mfa"
        wrong = pyotp.TOTP(p.secret).at(time.time() + 3600)
        for _ in range(2):  # the fourth and fifth failure, counted with the passwords
            page = await b.post("/console/mfa/totp", {"code": wrong})
            assert page.status == 401 and "not valid" in page.error
        page = await b.post("/console/mfa/totp", {"code": await p.code()})  # even the right code must wait now
        assert page.status == 429 and "too many failed attempts; wait 1 minute, then log in again" in page.error
        assert await world.session_of(b) is None  # the half-done login ends
        page = await password_step(b, p)  # and the password step answers as to any failure
        assert (page.status, page.error, await world.session_of(b)) == (401, WRONG_LOGIN, None)
    u = await world.accounts.user(p.name)
    assert (u.state, u.failed_logins) == ("active", 5)
    reasons = [(r["detail"]["factor"], r["detail"]["reason"]) for r in await audits(world.store, "console.login_failed")
               if r["detail"]["user"] == p.name][::-1]
    assert reasons == [("password", "wrong-password")] * 3 + [("totp", "wrong-code")] * 2 + [
        ("totp", "throttled"), ("password", "throttled")]
    # The break-glass path on the host forgets the failures: no need to wait.
    capsys.readouterr()
    code = await run_cli("users", "unlock", p.name, "-c", str(world.inst.config))
    out = capsys.readouterr().out
    assert (code, out.strip()) == (0, f"{p.name}: unlock done")
    [unlocked] = [r for r in await audits(world.store, "user.unlocked") if r["detail"]["user"] == p.name]
    assert unlocked["actor"] == f"cli:{current_user()}"
    async with world.browser() as b:
        await login(b, p)


@pytest.mark.slow
@shared
async def test_many_addresses_slow_the_account_but_never_a_browser_that_logged_in(world):
    """A distributed guess: each address adds its free failures to the account's shared count until
    addresses the account has not logged in from must wait too; the owner's browser, known from an
    earlier login, is judged by its own count alone, even from the attackers' own address."""
    p = await world.person("popular", "admin")
    cfg = world.running.gw.config.console
    base = f"http://127.0.0.1:{world.running.gw.admin_port}"
    owner = Browser(base)
    try:
        await login(owner, p)
        known = owner.cookie(BROWSER_COOKIE)
        assert known and await world.accounts.browser(security.token_hash(known), 0.0) == p.name
        await owner.post("/console/logout")
        attackers = [f"127.0.0.{3 + i}" for i in range(-(-cfg.account_backoff_after // cfg.backoff_after))]
        for address in attackers:  # each address: its free failures, and a few more that only wait
            assert await fail_passwords(world, p.name, cfg.backoff_after + 2, address=address) == \
                [401] * (cfg.backoff_after + 2)
        shared = (await world.accounts.failures(p.name, [SHARED_SOURCE]))[SHARED_SOURCE]
        assert shared.count == len(attackers) * cfg.backoff_after >= cfg.account_backoff_after
        async with Browser(base, address="127.0.0.99") as fresh:  # a new address, with the right password
            page = await password_step(fresh, p)
            assert (page.status, page.error) == (401, WRONG_LOGIN)
        [last] = [r for r in await audits(world.store, "console.login_failed") if r["detail"]["user"] == p.name][:1]
        assert (last["detail"]["reason"], last["detail"]["address"]) == ("throttled", "127.0.0.99")
        assert await fail_passwords(world, p.name, cfg.backoff_after + 3) == [401] * (cfg.backoff_after + 3)  # at 127.0.0.1
        await login(owner, p)  # the owner's browser, from 127.0.0.1 too: in at once
        assert owner.cookie(BROWSER_COOKIE) not in (None, known)  # a new token at every login
        assert await world.accounts.browser(security.token_hash(known), 0.0) is None
    finally:
        await owner.__aexit__()


# --- second factors ---------------------------------------------------------------------------------------


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


@shared
async def test_non_ascii_totp_code_is_a_wrong_code_over_http(world):
    p = await world.person("wide-digits", "auditor")
    async with world.browser() as b:
        await password_step(b, p)
        page = await b.post("/console/mfa/totp", {"code": "１２３４５６"})
        assert (await world.accounts.user(p.name)).failed_logins == 1
        assert page.status == 401 and "not valid" in page.error


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
