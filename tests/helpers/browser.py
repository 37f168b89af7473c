"""The admin console in a real browser: Debian's chromium driven by Playwright (async API).

* ``Console``: a gateway served in-process, in the test's own event loop, with the admin listener on a
  free loopback port; pages open ``http://localhost:<admin_port>/console/`` (WebAuthn refuses IP
  addresses as relying-party ids).  ``Console.add_user`` makes users with the break-glass CLI
  (``users add NAME --role R --json``).
* ``login`` and its steps go through the real pages: password, first-login TOTP enrolment (the
  secret read from ``#totp-secret``, codes computed with pyotp), the forced password change, TOTP or
  passkey as the second factor.  A TOTP code is never used twice: ``User.fresh_code`` waits (at most
  one 30 s step) for a step after the last one used.
* ``VirtualAuthenticator``: a CDP virtual authenticator (ctap2, internal, resident keys, user
  verification) on one page.

Every wait is bounded (``WAIT_MS`` for the browser, ``WAIT_S`` for the gateway's background work).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import aiohttp

from gateway import logs
from gateway.cli import main as cli
from gateway.operations import instance
from gateway.storage.base import Store
from tests.helpers import Running, free_port
from tests.helpers.daemon import set_admin
from tests.helpers.erp import Erp

try:  # not in the project's test extras everywhere; required under CI=true
    import pyotp
    from playwright.async_api import async_playwright, expect
except ImportError as exc:
    if os.environ.get("CI") == "true":
        raise
    MISSING: str | None = f"{exc.name} is not installed (pip install playwright pyotp): the browser tests cannot run"
    pyotp = async_playwright = expect = None  # type: ignore[assignment]
else:
    MISSING = None
    expect.set_options(timeout=10_000)

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, CDPSession, Page, Response

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
WAIT_MS = 15_000  # any one browser wait
WAIT_S = 15.0  # any one wait for the gateway's background work (delivery, dead-lettering)
TOTP_STEP_S = 30
MARGIN_S = 2.0  # a code is not used in the last seconds of its step (the request could land in the next one)


@dataclass
class User:
    name: str
    role: str
    password: str  # the current one
    initial_password: str
    secret: str | None = None  # the TOTP secret, once enrolled
    last_step: int = -1  # the last 30 s step whose code was used
    recovery_codes: list[str] = field(default_factory=list)

    def code_at(self, step: int) -> str:
        assert self.secret, f"{self.name} has not enrolled TOTP"
        return pyotp.TOTP(self.secret).at(step * TOTP_STEP_S)

    async def fresh_code(self) -> str:
        """A code of a step after the last one used: the current step's with MARGIN_S left in it, or the next
        step's, which the gateway accepts too (one step of drift either side); waits at most one step."""
        deadline = time.time() + TOTP_STEP_S + MARGIN_S + 1
        while True:
            now = time.time()
            step = int(now // TOTP_STEP_S)
            left = (step + 1) * TOTP_STEP_S - now
            if step > self.last_step and left >= MARGIN_S:
                self.last_step = step
                return self.code_at(step)
            if step + 1 > self.last_step:
                self.last_step = step + 1
                return self.code_at(step + 1)
            assert now < deadline, "no fresh TOTP step within one step (clock jump?)"
            await asyncio.sleep(min(left + 0.05, 1.0) if step > self.last_step else left + 0.05)


def new_password(user: str) -> str:
    return f"Harbour-{secrets.token_urlsafe(12)}".replace(user, "x")


async def submit(page: Page, form: str, *, button: str | None = None) -> Response:
    """Submit ``form`` (its first submit button, or ``button`` inside it) and wait for the page that
    results; returns that page's response (after any redirect: see ``first_status``)."""
    target = page.locator(form).locator(button or "button:not([type=button]):not([type=reset]), input[type=submit]").first
    async with page.expect_navigation(timeout=WAIT_MS) as nav:
        await target.click()
    resp = await nav.value
    assert resp is not None, f"{form}: no response"
    return resp


async def first_status(resp: Response) -> int:
    """The status of the request that started a redirect chain (the POST of a form, say)."""
    req = resp.request
    while req.redirected_from is not None:
        req = req.redirected_from
    first = await req.response()
    assert first is not None
    return first.status


async def click_nav(page: Page, selector: str) -> Response | None:
    async with page.expect_navigation(timeout=WAIT_MS) as nav:
        await page.locator(selector).first.click()
    return await nav.value


async def open_page(page: Page, path: str) -> Response:
    resp = await page.goto(path, timeout=WAIT_MS)
    assert resp is not None, path
    return resp


def path_of(page: Page) -> str:
    return re.sub(r"^https?://[^/]+", "", page.url).split("?")[0]


async def error_text(page: Page) -> str:
    await expect(page.locator(".error").first).to_be_visible()
    return " ".join(await page.locator(".error").all_inner_texts())


async def sign_in(page: Page, name: str, password: str) -> Response:
    """The password step only: the final response (the login page again on failure)."""
    await open_page(page, "/console/login")
    await page.locator("form#login input[name=username]").fill(name)
    await page.locator("form#login input[name=password]").fill(password)
    return await submit(page, "form#login")


async def enrol(page: Page, user: User) -> None:
    """First-login TOTP enrolment: read the secret, confirm with a code, keep the recovery codes, continue."""
    assert path_of(page) == "/console/enroll", page.url
    shown = page.locator("#totp-secret")
    tag = await shown.evaluate("e => e.tagName")
    text = await shown.input_value() if tag in ("INPUT", "TEXTAREA") else await shown.inner_text()
    user.secret = re.sub(r"[\s-]", "", text).upper()
    assert re.fullmatch(r"[A-Z2-7]{16,}=*", user.secret), f"not a base32 secret: {text!r}"
    await page.locator("form#enroll input[name=code]").fill(await user.fresh_code())
    resp = await submit(page, "form#enroll")
    assert resp.status == 200, f"enrolment refused ({resp.status}): {await page.content()}"
    codes = [c.strip() for c in await page.locator("#recovery-codes li").all_inner_texts()]
    assert len(codes) == 10 and len(set(codes)) == 10 and all(codes), codes
    user.recovery_codes = codes
    await click_nav(page, "a#continue")


def on_mfa(page: Page) -> bool:
    """The second-factor page (also as the answer to a refused code, at the form's own address)."""
    return path_of(page).startswith("/console/mfa")


async def enter_totp(page: Page, user: User, code: str | None = None) -> Response:
    assert on_mfa(page), page.url
    await page.locator("form#totp input[name=code]").fill(code if code is not None else await user.fresh_code())
    return await submit(page, "form#totp")


async def enter_recovery(page: Page, code: str) -> Response:
    assert on_mfa(page), page.url
    await page.locator("form#recovery input[name=recovery_code]").fill(code)
    return await submit(page, "form#recovery")


async def change_password(page: Page, user: User) -> Response:
    assert path_of(page) == "/console/password", page.url
    password = new_password(user.name)
    form = page.locator("form#password")
    await form.locator("input[name=current]").fill(user.password)
    await form.locator("input[name=new]").fill(password)
    await form.locator("input[name=confirm]").fill(password)
    resp = await submit(page, "form#password")
    assert resp.ok, f"password change refused ({resp.status}): {await page.content()}"
    user.password = password
    return resp


async def passkey_login(page: Page) -> None:
    assert on_mfa(page), page.url
    await page.locator("button#passkey-login").click()
    await page.wait_for_url(lambda url: "/console/mfa" not in url and "/console/login" not in url, timeout=WAIT_MS)


async def login(page: Page, user: User, *, factor: str = "totp") -> None:
    """The whole login through the pages (enrolment and password change when due); ends on the dashboard."""
    resp = await sign_in(page, user.name, user.password)
    assert resp.ok and path_of(page) in ("/console/mfa", "/console/enroll"), \
        f"login of {user.name} refused ({resp.status} at {page.url}): {await page.content()}"
    if path_of(page) == "/console/enroll":
        await enrol(page, user)
    elif factor == "totp":
        resp = await enter_totp(page, user)
        assert resp.ok, f"TOTP refused ({resp.status}): {await page.content()}"
    elif factor == "passkey":
        await passkey_login(page)
    else:
        raise AssertionError(f"unknown factor {factor}")
    if path_of(page) == "/console/password":
        await change_password(page, user)
    if path_of(page) != "/console/":
        await open_page(page, "/console/")
    await expect(page.locator("h1")).to_have_text("Dashboard")


async def logout(page: Page) -> Response:
    return await submit(page, "form#logout")


async def reauth_if_asked(page: Page, user: User) -> None:
    """Fresh authentication, when the console asks for it (``form#reauth``: password and TOTP code)."""
    if path_of(page) != "/console/reauth":
        return
    await page.locator("form#reauth input[name=password]").fill(user.password)
    await page.locator("form#reauth input[name=code]").fill(await user.fresh_code())
    resp = await submit(page, "form#reauth")
    assert resp.ok, f"re-authentication refused ({resp.status}): {await page.content()}"


async def csrf_token(page: Page) -> str:
    token = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert token, "no csrf field on the page"
    return token


async def session_cookie(page: Page) -> dict[str, Any]:
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert "egw_console" in cookies, sorted(cookies)
    return dict(cookies["egw_console"])


async def form_of(page: Page, selector: str) -> tuple[str, dict[str, str]]:
    """A form's absolute action URL and its hidden fields (to replay it outside the browser)."""
    form = page.locator(selector).first
    action = await form.get_attribute("action")
    fields: dict[str, str] = await form.evaluate(
        "f => Object.fromEntries([...f.querySelectorAll('input[type=hidden]')].map(i => [i.name, i.value]))")
    return urljoin(page.url, action or page.url), fields


async def browser_post(page: Page, action: str, fields: dict[str, str]) -> Response:
    """A form POST made by the browser itself (its cookies, its Origin), for actions the page shows no
    form for: a form is built in the page and submitted.  Returns the resulting page's response."""
    async with page.expect_navigation(timeout=WAIT_MS) as nav:
        await page.evaluate("""([action, fields]) => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = action;
            for (const [name, value] of Object.entries(fields)) {
                const input = document.createElement("input");
                input.type = "hidden";
                input.name = name;
                input.value = value;
                form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
        }""", [action, fields])
    resp = await nav.value
    assert resp is not None, action
    return resp


@dataclass
class VirtualAuthenticator:
    cdp: CDPSession
    id: str

    async def credentials(self) -> list[dict[str, Any]]:
        reply = await self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.id})
        creds: list[dict[str, Any]] = reply["credentials"]
        return creds


async def add_authenticator(page: Page) -> VirtualAuthenticator:
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    reply = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
        "isUserVerified": True, "automaticPresenceSimulation": True}})
    return VirtualAuthenticator(cdp, reply["authenticatorId"])


@dataclass
class Console:
    running: Running
    browser: Browser
    log: io.StringIO
    contexts: list[BrowserContext] = field(default_factory=list)

    @property
    def inst(self) -> instance.Instance:
        return self.running.inst

    @property
    def base(self) -> str:
        return f"http://localhost:{self.running.gw.admin_port}"

    @property
    def store(self) -> Store:
        return self.running.gw.store

    async def audit(self, action: str | None = None, *, actor: str | None = None,
                    message_id: str | None = None) -> list[dict[str, Any]]:
        """Audit records, newest first, filtered (``actor``: a substring of the actor); ``detail`` parsed."""
        return [r.as_json() | {"detail": json.loads(r.detail)} for r in await self.store.audit.newest(10_000)
                if (action is None or r.action == action) and (actor is None or actor in (r.actor or ""))
                and (message_id is None or r.message_id == message_id)]

    async def cli(self, *argv: str) -> tuple[int, str]:
        """``gateway.cli.main`` with ``-c CONFIG``, in a thread (the gateway keeps serving); its stdout."""
        out = io.StringIO()

        def run() -> int:
            with contextlib.redirect_stdout(out):
                try:
                    return cli.main([*argv, "-c", str(self.inst.config)])
                except SystemExit as exc:  # argparse refusing the arguments
                    return exc.code if isinstance(exc.code, int) else 2

        try:
            code = await asyncio.to_thread(run)
        finally:
            logs.configure("info", self.log)  # the CLI may have pointed the log lines at its stdout
        return code, out.getvalue()

    async def add_user(self, name: str, role: str, *extra: str) -> User:
        code, out = await self.cli("users", "add", name, "--role", role, *extra, "--json")
        assert code == 0, out
        reply, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
        assert reply["name"] == name and role in reply["roles"], reply
        return User(name, role, reply["password"], reply["password"])

    async def page(self) -> Page:
        """A page in a fresh browser context (its own cookies), 1280x800, relative URLs on the console."""
        context = await self.browser.new_context(base_url=self.base, viewport=VIEWPORT)  # type: ignore[arg-type]
        context.set_default_timeout(WAIT_MS)
        context.set_default_navigation_timeout(WAIT_MS)
        self.contexts.append(context)
        return await context.new_page()

    async def logged_in(self, role: str, name: str | None = None) -> tuple[Page, User]:
        page = await self.page()
        user = await self.add_user(name or f"{role}{len(self.contexts)}", role)
        await login(page, user)
        return page, user

    async def replay(self, page: Page, url: str, fields: dict[str, str], *, origin: str | None = "same",
                     cookie: bool = True) -> tuple[int, str]:
        """POST a form outside the browser with the page's session cookie; ``origin``: "same", None
        (no Origin header) or another origin.  Redirects are not followed."""
        headers = {}
        if cookie:
            c = await session_cookie(page)
            headers["Cookie"] = f"{c['name']}={c['value']}"
        if origin is not None:
            headers["Origin"] = self.base if origin == "same" else origin
        async with aiohttp.ClientSession() as s, s.post(url, data=fields, headers=headers, allow_redirects=False) as r:
            return r.status, await r.text()


StartConsole = Callable[..., Awaitable[Console]]


def prepare_instance(inst: instance.Instance) -> None:
    """The admin listener (which serves the console) on a free loopback port; one rules process."""
    set_admin(inst, free_port())
    text = inst.config.read_text()
    assert text.count("[rules]\n") == 1
    inst.config.write_text(text.replace("[rules]\n", "[rules]\nprocesses = 1\n", 1))


StartErp = Callable[[instance.Instance], Awaitable[Erp]]


def https_destination(inst: instance.Instance, url: str, name: str = "erp-api") -> dict[str, str]:
    """An ``https`` destination to ``url`` (its HMAC key written, mode 0600), for ``merge_config``."""
    key = inst.root / "keys" / f"{name}.hmac"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    return {"name": name, "type": "https", "url": url, "hmac_key_file": f"keys/{name}.hmac", "ca": "pki/ca.crt"}
