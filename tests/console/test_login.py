"""Logging in (``gateway/console/login.py``): the password, then a second factor (a TOTP code or a
recovery code, each spent once), the session cookie and its rotation, logout, lockout after failed
factors, the bootstrap account of a new installation and the per-address login throttle.

Over the real admin listener of the package's one gateway (``world`` in tests/console/conftest.py);
the bootstrap account needs a gateway without any account: that test starts its own.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import time
import warnings

import pyotp
from yarl import URL

from gateway import logs
from gateway.cli.common import current_user
from gateway.console import security
from gateway.console.guard import SESSION_COOKIE
from gateway.console.login import BOOTSTRAP_FILE
from tests.helpers import free_port, run_cli, serving
from tests.helpers.console import Browser, audits, login, password_step, set_options, shared
from tests.helpers.daemon import set_admin

# --- sessions ----------------------------------------------------------------------------------------------


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


# --- the bootstrap account, the throttle, lockout ----------------------------------------------------------


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


# --- second factors ----------------------------------------------------------------------------------------


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
        assert (await world.accounts.user(p.name)).failures == 1
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
