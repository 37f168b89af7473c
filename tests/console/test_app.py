"""The console application (``gateway/console/app.py``): the security headers on every answer, the guard
every request passes (the Host, the Origin, the CSRF token, the session's idle timeout), over the real
admin listener of the package's one gateway (``world`` in tests/console/conftest.py).

The page groups have their own files (test_login.py, test_messages.py, test_approvals.py, test_audit.py,
test_users.py, test_partners.py), as do the credentials, the permission matrix, the handlers' marks and
the message search (test_security.py, test_roles.py, test_guard.py, test_views.py).  Argon2 costs about
60 ms a hash: accounts are made with one precomputed hash.
"""

from __future__ import annotations

from yarl import URL

from gateway.console import security
from gateway.console.app import CSP
from gateway.console.guard import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from gateway.console.login import WRONG_LOGIN
from tests.helpers.console import PASSWORD, Page, audits, login, shared

SPEC_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Cache-Control": "no-store", "Referrer-Policy": "same-origin"}


# --- 1. the content security policy ------------------------------------------------------------------------


def test_csp_is_the_contract_s():
    assert CSP == SPEC_CSP


# --- 2. HTTP: headers, Host, Origin, CSRF ------------------------------------------------------------------


def assert_security_headers(page: Page) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert page.headers.get(name) == value, (page.url, page.status, name, page.headers.get(name))


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
        assert (seen[-1].status, seen[-1].error) == (401, WRONG_LOGIN)
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


# --- 3. HTTP: the session's idle timeout -------------------------------------------------------------------


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
