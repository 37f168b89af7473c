"""The admin console: server-rendered pages on the admin listener, under ``/console/``.

Request path, in order (``_guard``):

1. The Host must be one the console answers to (no DNS rebinding), and every answer carries the
   security headers (a CSP without inline script or style, frame-ancestors 'none', nosniff,
   no-store, Referrer-Policy same-origin).
2. Every POST must come from this origin (``Origin``, else ``Referer``) and carry the CSRF token:
   the session's token, or before login the double-submit cookie.  Refusals are audited.
3. The session cookie names a server-side session (only its SHA-256 is stored); it has idle and
   absolute timeouts, and a stage: ``mfa``/``enroll`` sessions reach the second-factor pages only.
   A password set by someone else must be changed before any other page.
4. The handler's permission (``roles.PERMISSIONS``) is checked; sensitive actions also need an
   authentication at most ``fresh_auth_s`` old.  Refusals are audited.

Password hashing runs in a one-thread executor behind a per-address token bucket and a bound on
waiting hashes, so a login flood costs at most one core and never the invoice listeners' loop.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web

from .. import logs
from ..config.model import Config, ConsoleConfig
from ..errors import GatewayError
from ..operations import audit as audit_mod
from ..operations.audit import trusted_certificates, unsealed_limit
from ..operations.housekeeping import expiring, inventory
from ..partners.directory import PartnerDirectory
from ..stages.signature import SigningKey
from ..storage.base import AccountError, Store
from ..storage.records import Approval, MessageDetail, Session, User
from ..vault import Vault
from . import passkeys, security, views
from .guard import CTX, PUBLIC, Context, Page, Refused, page, session_of, user_of
from .partnerpages import KINDS as PARTNER_REQUESTS
from .partnerpages import PartnerPages, describe
from .roles import APPROVAL_NEEDS, ROLES, USER_NAME, allowed

log = logs.get("console")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BOOTSTRAP_USER = "admin"
BOOTSTRAP_FILE = "console-bootstrap-password"  # in state_dir; removed once the password is changed
SESSION_COOKIE = "egw_console"
LOGIN_CSRF_COOKIE = "egw_login_csrf"
PRE_LOGIN_S = 300.0  # a password-only session must finish its second factor within this time
MAX_WAITING_HASHES = 4  # more concurrent password checks than this are refused (429), not queued
MAX_BODY = 256 * 1024  # a form with a certificate or two; the admin listener's limit when the console is on
TOUCH_EVERY_S = 30.0  # a session's last-seen time is written at most this often
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# htmx comes from the npm registry (package.json pins it; `npm ci` puts it in node_modules/ beside the
# project); the gateway serves that copy itself and checks its hash.  Without it the pages still work.
HTMX_PATH = Path("node_modules") / "htmx.org" / "dist" / "htmx.min.js"
HTMX_PLACES = (Path(__file__).resolve().parents[2], Path.cwd())
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"  # htmx.org 2.0.11 dist/htmx.min.js (package.json)


def _static_files() -> dict[str, tuple[bytes, str]]:
    out = {}
    for name, ctype in (("console.css", "text/css"), ("passkey.js", "text/javascript")):
        out[name] = (files("gateway.console").joinpath("static", name).read_bytes(), ctype)
    for place in HTMX_PLACES:
        path = place / HTMX_PATH
        if not path.is_file():
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == HTMX_SHA256:
            out["htmx.min.js"] = (data, "text/javascript")
            return out
        log.warning("console.htmx_mismatch", path=str(path), expected_sha256=HTMX_SHA256,
                    hint="run `npm ci` in the project folder")
    log.info("console.htmx_missing", hint="run `npm ci` in the project folder for live search; the pages work without it")
    return out


class Console:
    def __init__(self, config: Config, store: Store, io: Executor, vault: Callable[[], Vault],
                 directory: Callable[[], PartnerDirectory], signer: Callable[[], SigningKey | None],
                 wake_outbox: Callable[[], None], rejections: Callable[[], dict[str, float]],
                 partners_changed: Callable[[], Awaitable[None]] | None = None):
        self.config = config
        self.cfg: ConsoleConfig = config.console
        self.store = store
        self.accounts = store.accounts
        self.four_eyes = store.approvals
        self.io = io
        self.vault = vault
        self.directory = directory
        self.partner_pages = PartnerPages(self)
        self.signer = signer
        self.wake_outbox = wake_outbox
        self.rejections = rejections
        self.partners_changed = partners_changed  # re-read the partners file now (the console just wrote it)
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-hash")
        self.waiting_hashes = 0
        self.limiter = security.RateLimiter(self.cfg.login_burst, self.cfg.login_every_s)
        self.throttled_audit: dict[str, float] = {}
        self.static = _static_files()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.console", "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["short"] = lambda s, n=12: (s or "")[:n]
        self.templates.filters["when"] = lambda t: (t or "")[:19].replace("T", " ")
        self.templates.filters["epoch"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""

    def close(self) -> None:
        self.hashing.shutdown(wait=False, cancel_futures=True)

    # --- plumbing --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        r = app.router
        r.add_get("/static/{name}", self.static_file)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_get("/mfa", self.mfa_page)
        r.add_post("/mfa/totp", self.mfa_totp)
        r.add_post("/mfa/recovery", self.mfa_recovery)
        r.add_post("/passkey/login/options", self.passkey_login_options)
        r.add_post("/passkey/login/verify", self.passkey_login_verify)
        r.add_get("/enroll", self.enroll_page)
        r.add_post("/enroll", self.enroll)
        r.add_get("/password", self.password_page)
        r.add_post("/password", self.change_password)
        r.add_get("/reauth", self.reauth_page)
        r.add_post("/reauth", self.reauth)
        r.add_post("/logout", self.logout)
        r.add_get("/", self.dashboard)
        r.add_get("/messages", self.messages)
        r.add_get("/messages/{id}", self.message)
        r.add_post("/messages/{id}/content", self.content)
        r.add_get("/dead-letters", self.dead_letters)
        r.add_post("/dead-letters", self.dead_letters_act)
        r.add_get("/quarantine", self.quarantine)
        r.add_get("/quarantine/{id}", self.quarantine_entry)
        r.add_post("/quarantine/{id}/release", self.quarantine_release)
        r.add_post("/quarantine/{id}/reject", self.quarantine_reject)
        r.add_get("/approvals", self.approvals)
        r.add_post("/approvals/{id}/{decision}", self.decide)
        self.partner_pages.routes(r)
        r.add_get("/audit", self.audit)
        r.add_post("/audit/verify", self.audit_verify)
        r.add_get("/audit/export", self.audit_export)
        r.add_get("/users", self.users)
        r.add_post("/users", self.user_add)
        r.add_post("/users/{name}/{action}", self.user_act)
        r.add_get("/account", self.account)
        r.add_post("/account/recovery", self.new_recovery_codes)
        r.add_post("/passkey/register/options", self.passkey_register_options)
        r.add_post("/passkey/register/verify", self.passkey_register_verify)
        r.add_post("/passkeys/{id}/remove", self.passkey_remove)
        r.add_post("/sessions/{id}/revoke", self.revoke)
        return app

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def _headers(self, response: web.StreamResponse) -> None:
        h = response.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "same-origin"
        h["Cache-Control"] = "no-store"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"

    def _secure(self, request: web.Request) -> bool:
        return request.scheme == "https"

    def _host_allowed(self, request: web.Request) -> bool:
        host = (request.host or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]") in self.cfg.allowed_hosts

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin") or request.headers.get("Referer")
        if not origin or origin == "null":
            return False
        u = urlsplit(origin)
        return f"{u.scheme}://{u.netloc}".lower() == f"{request.scheme}://{request.host}".lower()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[CTX] = Context()
        try:
            response = await self._checked(request, handler)
        except Refused as exc:
            if exc.audit:
                await self._denied(request, exc.message)
            response = self.render(request, "error.html", {"message": exc.message}, status=exc.status)
        except web.HTTPException as exc:
            if exc.status >= 400:
                response = self.render(request, "error.html", {"message": exc.reason}, status=exc.status)
            else:
                self._headers(exc)
                raise
        self._headers(response)
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._host_allowed(request):
            raise Refused(421, f"this console answers only to {', '.join(self.cfg.allowed_hosts)}; open it by one of "
                          "those names (or add the name to console.allowed_hosts)", audit=False)
        spec: Page = getattr(handler, "console_page", PUBLIC)
        session = await self._session(request)
        ctx = request[CTX]
        ctx.session = session
        ctx.user = None if session is None else await self.accounts.user(session.user)
        if request.method == "POST":
            if not self._same_origin(request):
                raise Refused(403, "this request did not come from the console's own pages (Origin check); "
                              "reload the page and try again")
            token = request.headers.get("X-CSRF-Token") or (await request.post()).get("csrf", "")
            expected = session.csrf if session is not None else request.cookies.get(LOGIN_CSRF_COOKIE, "")
            if not isinstance(token, str) or not expected or not security.same(token, expected):
                raise Refused(403, "the form's security token is missing or stale (CSRF check); reload the page and "
                              "try again")
        if spec.stage == "none":
            return await handler(request)
        user = ctx.user
        if session is None or user is None or user.state != "active":
            if request.method == "GET":
                raise web.HTTPSeeOther(f"/console/login?next={quote(request.path_qs)}")
            raise Refused(401, "your session has ended; log in again", audit=False)
        if spec.stage == "mfa":
            if session.stage not in ("mfa", "enroll"):
                raise web.HTTPSeeOther("/console/")
            return await handler(request)
        if session.stage != "full":
            raise web.HTTPSeeOther("/console/enroll" if session.stage == "enroll" else "/console/mfa")
        if user.must_change and handler not in (self.password_page, self.change_password, self.logout):
            raise web.HTTPSeeOther("/console/password")
        if spec.permission is not None and not allowed(user, spec.permission):
            raise Refused(403, f"your role ({', '.join(user.roles) or 'none'}) does not allow this "
                          f"({spec.permission.replace('.', ' ')})")
        if spec.fresh and time.time() - session.auth_at > self.cfg.fresh_auth_s:
            back = request.path_qs if request.method == "GET" else request.headers.get("Referer", "/console/")
            raise web.HTTPSeeOther(f"/console/reauth?next={quote(urlsplit(back).path or '/console/')}")
        return await handler(request)

    async def _session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token or len(token) > 100:
            return None
        key = security.token_hash(token)
        session = await self.accounts.session(key)
        if session is None:
            return None
        now = time.time()
        limit = PRE_LOGIN_S if session.stage != "full" else self.cfg.idle_timeout_s
        if now - session.seen_at > limit or now - session.created_at > self.cfg.absolute_timeout_s:
            await self.accounts.end_session(key, f"console:{session.user}", "expired")
            return None
        if now - session.seen_at > TOUCH_EVERY_S:
            await self.accounts.touch(key, now)
        return session

    async def _denied(self, request: web.Request, why: str) -> None:
        user = request[CTX].user
        if user is None and not self._first_this_minute(f"denied:{request.remote}"):
            return  # anonymous refusals: one record a minute per address, so a flood cannot fill the log
        actor = f"console:{user.name}" if user is not None else f"console:anonymous@{request.remote}"
        await self.store.audit.append(actor, "console.denied", None, None,
                                         {"method": request.method, "path": request.path, "reason": why,
                                          "address": request.remote or ""})

    def actor(self, request: web.Request) -> str:
        return f"console:{user_of(request).name}"

    def render(self, request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
        session: Session | None = request[CTX].session
        user: User | None = request[CTX].user
        base = {"user": user if session is not None and session.stage == "full" else None,
                "csrf": session.csrf if session is not None else request[CTX].login_csrf,
                "allowed": (lambda p: user is not None and allowed(user, p)), "htmx": "htmx.min.js" in self.static,
                "path": request.path, "flash": request.query.get("done", "")}
        text = self.templates.get_template(template).render(base | context)
        return web.Response(text=text, content_type="text/html", charset="utf-8", status=status)

    def _set_session(self, response: web.StreamResponse, request: web.Request, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, path="/console/", httponly=True, samesite="Strict",
                            secure=self._secure(request), max_age=int(self.cfg.absolute_timeout_s))

    async def _new_session(self, request: web.Request, user: User, stage: str, auth_at: float,
                           replaces: str | None) -> web.Response:
        token = security.new_token()
        await self.accounts.open_session(security.token_hash(token), user.name, stage, security.new_token(),
                                                   request.remote or "", request.headers.get("User-Agent", ""),
                                                   auth_at, replaces=replaces)
        target = {"mfa": "/console/mfa", "enroll": "/console/enroll"}.get(stage, "/console/")
        if stage == "full" and user.must_change:
            target = "/console/password"
        response = web.Response(status=303, headers={"Location": target})
        self._set_session(response, request, token)
        return response

    async def static_file(self, request: web.Request) -> web.Response:
        found = self.static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound(reason="no such file")
        response = web.Response(body=found[0], content_type=found[1])
        return response

    # --- login: password, then a second factor ---------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        await self._bootstrap()
        return self._login_form(request, "", 200)

    @property
    def bootstrap_file(self) -> Path:
        return self.config.state_dir / BOOTSTRAP_FILE

    async def _bootstrap(self) -> None:
        """With no account at all, the first visit creates ``admin`` with a random password in a file
        only the service user can read; the password must be changed at the first login."""
        if await self.accounts.users():
            return
        password = security.new_password()
        digest = await asyncio.get_running_loop().run_in_executor(self.hashing, security.hash_password, password)
        try:
            await self.accounts.add_user(BOOTSTRAP_USER, ("admin",), False, digest, "gateway")
        except AccountError:
            return  # another request made it a moment ago
        await self.run(self._write_bootstrap, password)
        log.warning("console.bootstrap_account", user=BOOTSTRAP_USER, password_file=str(self.bootstrap_file),
                    hint="log in with it, then choose your own password and set up a second factor")

    def _write_bootstrap(self, password: str) -> None:
        fd = os.open(self.bootstrap_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")

    def _login_form(self, request: web.Request, error: str, status: int) -> web.Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or security.new_token()
        request[CTX].login_csrf = token
        response = self.render(request, "login.html", {
            "error": error, "bootstrap": str(self.bootstrap_file) if self.bootstrap_file.exists() else ""}, status)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, path="/console/", httponly=True, samesite="Strict",
                            secure=self._secure(request))
        return response

    async def _check_password(self, stored: str | None, password: str) -> bool:
        if self.waiting_hashes >= MAX_WAITING_HASHES:
            raise Refused(429, "too many logins are being checked right now; wait a moment and try again", audit=False)
        self.waiting_hashes += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.hashing, security.verify_password, stored, password)
        finally:
            self.waiting_hashes -= 1

    async def _throttle(self, request: web.Request) -> None:
        address = request.remote or ""
        if self.limiter.allow(address):
            return
        if self._first_this_minute(f"throttled:{address}"):  # one record a minute per address, not one per attempt
            await self.store.audit.append(f"console:anonymous@{address}", "console.login_throttled", None, None,
                                             {"address": address})
            log.warning("console.login_throttled", address=address)
        raise Refused(429, "too many login attempts from your address; wait a minute and try again", audit=False)

    def _first_this_minute(self, key: str) -> bool:
        now = time.monotonic()
        if now - self.throttled_audit.get(key, -60.0) < 60:
            return False
        if len(self.throttled_audit) > security.RateLimiter.MAX_KEYS:
            self.throttled_audit = {k: t for k, t in self.throttled_audit.items() if now - t < 60}
        self.throttled_audit[key] = now
        return True

    async def login(self, request: web.Request) -> web.StreamResponse:
        await self._throttle(request)
        form = await request.post()
        name, password = str(form.get("username", "")).strip().lower(), str(form.get("password", ""))
        if len(password) > security.MAX_PASSWORD_CHARS * 4 or len(name) > 64:
            return self._login_form(request, "wrong user name or password", 401)
        user = await self.accounts.user(name)
        if user is not None and user.locked():
            await self.store.audit.append(f"console:{name}", "console.login_refused", None, None,
                                             {"reason": "locked", "address": request.remote or ""})
            return self._login_form(request, "this account is locked after repeated failed logins; try again later "
                                    "or ask an administrator to unlock it", 423)
        ok = await self._check_password(user.password_hash if user else None, password)
        if user is None or not ok or user.state != "active":
            if user is not None:
                await self._failed(request, user, "password")
            else:
                await self.store.audit.append(f"console:anonymous@{request.remote}", "console.login_failed", None, None,
                                                 {"user": name[:64], "factor": "password", "address": request.remote or ""})
            return self._login_form(request, "wrong user name or password", 401)
        earlier = request[CTX].session
        return await self._new_session(request, user, "mfa" if user.enrolled else "enroll", 0.0,
                                       earlier.id_hash if earlier is not None else None)

    async def _failed(self, request: web.Request, user: User, factor: str) -> None:
        locked = await self.accounts.failed(user.name, factor, request.remote or "", self.cfg.lockout_after,
                                                      self.cfg.lockout_s)
        if locked:
            log.warning("console.user_locked", user=user.name, factor=factor, address=request.remote,
                        minutes=round(self.cfg.lockout_s / 60))
            session: Session | None = request[CTX].session
            if session is not None and session.stage != "full":
                await self.accounts.end_session(session.id_hash)
            raise Refused(423, "this account is locked after repeated failed attempts; try again later or ask an "
                          "administrator to unlock it", audit=False)

    @page(stage="mfa")
    async def mfa_page(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        keys = await self.accounts.passkeys(user.name)
        return self.render(request, "mfa.html", {"error": request[CTX].error, "passkeys": bool(keys),
                                                 "recovery_left": await self.accounts.recovery_left(user.name)},
                           request[CTX].status)

    async def _second_factor_ok(self, request: web.Request, method: str) -> web.StreamResponse:
        user: User = user_of(request)
        session: Session = session_of(request)
        await self.accounts.succeeded(user.name, request.remote or "", method)
        return await self._new_session(request, user, "full", time.time(), session.id_hash)

    async def _totp(self, user: User, code: str) -> str | None:
        """None when ``code`` is valid and unused (and spends it), else why not."""
        assert user.totp_secret is not None
        step = security.totp_step(user.totp_secret, code)
        if step is None:
            return "that code is not valid; check your authenticator app's clock"
        if step <= user.totp_last_step or not await self.accounts.spend_totp_step(user.name, step):
            return "that code was already used; wait for the next one"
        return None

    @page(stage="mfa")
    async def mfa_totp(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        if session_of(request).stage != "mfa" or user.locked():
            raise Refused(403, "this account is locked; try again later")
        problem = await self._totp(user, str((await request.post()).get("code", "")))
        if problem is not None:
            await self._failed(request, user, "totp")
            request[CTX].error, request[CTX].status = problem, 401
            return await self.mfa_page(request)
        return await self._second_factor_ok(request, "totp")

    @page(stage="mfa")
    async def mfa_recovery(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        if session_of(request).stage != "mfa" or user.locked():
            raise Refused(403, "this account is locked; try again later")
        code = str((await request.post()).get("recovery_code", ""))
        if not await self.accounts.spend_recovery(user.name, security.recovery_hash(code)):
            await self._failed(request, user, "recovery-code")
            request[CTX].error, request[CTX].status = "that recovery code is not valid or was used already", 401
            return await self.mfa_page(request)
        return await self._second_factor_ok(request, "recovery-code")

    # --- passkeys --------------------------------------------------------------------------------

    def _rp(self, request: web.Request) -> tuple[str, str]:
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        if not host or host.replace(".", "").isdigit() or ":" in host:
            raise Refused(400, f"passkeys need the console opened by a name, not an address: use "
                          f"{request.scheme}://localhost:{request.url.port}/console/ (or the host's name)", audit=False)
        return host, f"{request.scheme}://{request.host}"

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "the request body is not JSON", audit=False) from None
        return body if isinstance(body, dict) else {}

    @page(stage="mfa")
    async def passkey_login_options(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        rp_id, _ = self._rp(request)
        ids = [base64.urlsafe_b64decode(k.credential_id + "==") for k in await self.accounts.passkeys(user.name)]
        if not ids:
            return web.json_response({"error": "you have no passkey yet; use your authenticator app's code"}, status=400)
        options, challenge = passkeys.authentication_options(rp_id, ids)
        await self.accounts.update_session(session_of(request).id_hash, pending={
            "challenge": base64.b64encode(challenge).decode(), "purpose": "login"})
        return web.Response(text=options, content_type="application/json")

    @page(stage="mfa")
    async def passkey_login_verify(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        session: Session = session_of(request)
        rp_id, origin = self._rp(request)
        body = json.dumps(await self._json(request))
        try:
            if session.pending.get("purpose") != "login":
                raise passkeys.PasskeyError("no passkey login was started; reload the page")
            cred = base64.urlsafe_b64encode(passkeys.credential_id_of(body)).decode().rstrip("=")
            stored = await self.accounts.passkey(cred)
            if stored is None or stored.user != user.name:
                raise passkeys.PasskeyError("this passkey is not registered for your account")
            count = passkeys.verify_authentication(body, base64.b64decode(session.pending["challenge"]), rp_id, origin,
                                                   stored.public_key, stored.sign_count)
        except passkeys.PasskeyError as exc:
            await self.accounts.update_session(session.id_hash, pending={})
            await self._failed_json(request, user, "passkey")
            return web.json_response({"error": str(exc)}, status=401)
        await self.accounts.used_passkey(cred, count)
        redirect = await self._second_factor_ok(request, "passkey")
        response = web.json_response({"next": redirect.headers["Location"]})
        response.cookies.update(redirect.cookies)
        return response

    async def _failed_json(self, request: web.Request, user: User, factor: str) -> None:
        try:
            await self._failed(request, user, factor)
        except Refused:
            pass  # locked: the next attempt says so

    @page(fresh=True)
    async def passkey_register_options(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        rp_id, _ = self._rp(request)
        body = await self._json(request)
        existing = [base64.urlsafe_b64decode(k.credential_id + "==") for k in await self.accounts.passkeys(user.name)]
        options, challenge = passkeys.registration_options(rp_id, "einvoice-gateway", user.name,
                                                           user.user_handle.encode(), existing)
        label = str(body.get("label") or "passkey")[:60]
        await self.accounts.update_session(session_of(request).id_hash, pending={
            "challenge": base64.b64encode(challenge).decode(), "purpose": "register", "label": label})
        return web.Response(text=options, content_type="application/json")

    @page(fresh=True)
    async def passkey_register_verify(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        session: Session = session_of(request)
        rp_id, origin = self._rp(request)
        body = json.dumps(await self._json(request))
        try:
            if session.pending.get("purpose") != "register":
                raise passkeys.PasskeyError("no passkey registration was started; reload the page")
            new = passkeys.verify_registration(body, base64.b64decode(session.pending["challenge"]), rp_id, origin)
        except passkeys.PasskeyError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        finally:
            await self.accounts.update_session(session.id_hash, pending={})
        cred = base64.urlsafe_b64encode(new.credential_id).decode().rstrip("=")
        await self.accounts.add_passkey(user.name, cred, new.public_key, new.sign_count,
                                                  session.pending.get("label", "passkey"), new.aaguid)
        return web.json_response({"next": "/console/account?done=passkey+added"})

    @page()
    async def passkey_remove(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        if not await self.accounts.remove_passkey(user.name, request.match_info["id"], self.actor(request)):
            raise Refused(404, "no such passkey of yours", audit=False)
        raise web.HTTPSeeOther("/console/account?done=passkey+removed")

    # --- enrolment, password change, fresh authentication ----------------------------------------

    @page(stage="mfa")
    async def enroll_page(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        session: Session = session_of(request)
        if session.stage != "enroll":
            raise web.HTTPSeeOther("/console/mfa")
        secret = session.pending.get("totp_secret")
        if not secret:
            secret = security.new_totp_secret()
            await self.accounts.update_session(session.id_hash, pending={"totp_secret": secret})
        uri = security.otpauth_uri(secret, user.name, "einvoice-gateway")
        return self.render(request, "enroll.html", {"secret": secret, "uri": uri, "qr": _qr(uri),
                                                    "error": request[CTX].error}, request[CTX].status)

    @page(stage="mfa")
    async def enroll(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        session: Session = session_of(request)
        secret = session.pending.get("totp_secret")
        if session.stage != "enroll" or not secret:
            raise web.HTTPSeeOther("/console/mfa")
        step = security.totp_step(secret, str((await request.post()).get("code", "")))
        if step is None:
            await self._failed(request, user, "totp-enrolment")
            request[CTX].error, request[CTX].status = "that code does not match; check the secret and your clock", 401
            return await self.enroll_page(request)
        codes = security.new_recovery_codes()
        await self.accounts.enroll_totp(user.name, secret, step, [security.recovery_hash(c) for c in codes])
        redirect = await self._second_factor_ok(request, "totp-enrolment")
        response = self.render(request, "recovery.html", {"codes": codes, "next": redirect.headers["Location"]})
        response.cookies.update(redirect.cookies)
        return response

    @page()
    async def password_page(self, request: web.Request) -> web.Response:
        return self.render(request, "password.html", {"error": request[CTX].error,
                                                      "forced": user_of(request).must_change}, request[CTX].status)

    @page()
    async def change_password(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        form = await request.post()
        current, new, confirm = (str(form.get(k, "")) for k in ("current", "new", "confirm"))
        problem = None
        if not await self._check_password(user.password_hash, current):
            await self._failed(request, user, "password")
            problem = "the current password is wrong"
        elif new != confirm:
            problem = "the new password and its confirmation differ"
        elif new == current:
            problem = "the new password must differ from the current one"
        else:
            try:
                security.check_policy(new, user.name)
            except security.PolicyError as exc:
                problem = str(exc)
        if problem is not None:
            request[CTX].error, request[CTX].status = problem, 400
            return await self.password_page(request)
        digest = await asyncio.get_running_loop().run_in_executor(self.hashing, security.hash_password, new)
        await self.accounts.set_password(user.name, digest, self.actor(request), must_change=False)
        if user.name == BOOTSTRAP_USER:
            self.bootstrap_file.unlink(missing_ok=True)
        raise web.HTTPSeeOther("/console/?done=password+changed")

    @page()
    async def reauth_page(self, request: web.Request) -> web.Response:
        return self.render(request, "reauth.html", {"error": request[CTX].error, "next": _local(request.query.get("next"))},
                           request[CTX].status)

    @page()
    async def reauth(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        form = await request.post()
        problem = None
        if not await self._check_password(user.password_hash, str(form.get("password", ""))):
            await self._failed(request, user, "password")
            problem = "wrong password"
        else:
            problem = await self._totp(user, str(form.get("code", "")))
            if problem is not None:
                await self._failed(request, user, "totp")
        if problem is not None:
            request[CTX].error, request[CTX].status = problem, 401
            return await self.reauth_page(request)
        await self.accounts.update_session(session_of(request).id_hash, auth_at=time.time())
        await self.store.audit.append(self.actor(request), "console.reauthenticated", None, None, {})
        raise web.HTTPSeeOther(_local(str(form.get("next", ""))))

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session: Session | None = request[CTX].session
        if session is not None:
            await self.accounts.end_session(session.id_hash, f"console:{session.user}", "logout")
        response = web.Response(status=303, headers={"Location": "/console/login"})
        response.del_cookie(SESSION_COOKIE, path="/console/")
        return response

    # --- pages -----------------------------------------------------------------------------------

    @page("view")
    async def dashboard(self, request: web.Request) -> web.Response:
        data = await self.store.reports.dashboard(datetime.now(UTC))
        certs = await self.run(inventory, self.config, self.directory())
        soon = expiring(certs, 90)
        buckets = {d: sum(1 for _, left in soon if left < d) for d in (90, 30, 7)}
        return self.render(request, "dashboard.html", {"d": data, "expiring": soon[:20], "buckets": buckets,
                                                       "rejections": sorted(self.rejections().items(), key=lambda x: -x[1])})

    @page("messages.read")
    async def messages(self, request: web.Request) -> web.Response:
        q = request.query
        error = ""
        rows: list[dict[str, Any]] = []
        more = False
        try:
            page_no = int(q.get("page", "0") or 0)
            since, until = views.parse_day(q.get("since", ""), "from"), views.parse_day(q.get("until", ""), "until")
            if q.get("status") and q["status"] not in views.STATUSES:
                raise ValueError(f"status: one of {', '.join(views.STATUSES)}")
            rows, more = await views.search(
                self.store.reports, partner=q.get("partner", "").strip(), status=q.get("status", ""), since=since,
                until=until, number=q.get("number", "").strip(), amount=q.get("amount", "").strip(), page=page_no)
        except ValueError as exc:
            error, page_no = str(exc), 0
        context = {"rows": rows, "more": more, "q": q, "page_no": page_no, "statuses": views.STATUSES, "error": error,
                   "partners": sorted(p.name for p in self.directory().partners)}
        if request.headers.get("HX-Request") and request.headers.get("HX-Target") == "results":
            return self.render(request, "messages_table.html", context)
        return self.render(request, "messages.html", context)

    @page("messages.read")
    async def message(self, request: web.Request) -> web.Response:
        found = await self.store.reports.message(request.match_info["id"])
        if found is None:
            raise Refused(404, "no such message (it may have been deleted by retention)", audit=False)
        return self.render(request, "message.html", {"m": found, "timeline": _timeline(found)})

    @page("content", fresh=True)
    async def content(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        found = await self.store.reports.message(message_id)
        if found is None:
            raise Refused(404, "no such message", audit=False)
        sealed = await self.store.outbox.load_sealed(message_id)
        if sealed is None:
            raise Refused(404, "the stored content of this message is missing", audit=False)
        body = await self.run(self.vault().open, sealed, message_id, found.sha256)
        await self.store.audit.append(self.actor(request), "console.content_viewed", found.partner, message_id,
                                      {"sha256": found.sha256})
        text = body.decode("utf-8", "replace") if found.media_type.endswith("xml") else \
            f"({found.media_type}, {len(body)} bytes; not shown as text)"
        return self.render(request, "content.html", {"m": found, "text": text})

    @page("messages.read")
    async def dead_letters(self, request: web.Request) -> web.Response:
        rows = await self.store.reports.dead_letters(partner=request.query.get("partner") or None, limit=200)
        return self.render(request, "dead_letters.html", {"rows": rows})

    @page("messages.act")
    async def dead_letters_act(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        items = [str(v).split(" ", 1) for v in form.getall("item", []) if " " in str(v)]
        reason = str(form.get("reason", "")).strip()[:500]
        action = form.get("action")
        if not items:
            raise Refused(400, "choose at least one dead letter", audit=False)
        if not reason:
            raise Refused(400, "give a reason (it goes into the audit log)", audit=False)
        if len(items) > 200:
            raise Refused(400, "at most 200 at a time", audit=False)
        done, problems = 0, []
        for message_id, destination in items:
            try:
                if action == "requeue":
                    await self.store.outbox.retry(message_id, destination, self.actor(request), requeue=True, reason=reason)
                elif action == "discard":
                    await self.four_eyes.request("deadletter.discard", f"{message_id} {destination}",
                                                          {"message_id": message_id, "destination": destination},
                                                          reason, self.actor(request))
                else:
                    raise Refused(400, "unknown action", audit=False)
                done += 1
            except GatewayError as exc:
                problems.append(f"{message_id} → {destination}: {exc}")
        if action == "requeue" and done:
            self.wake_outbox()
        if problems:
            raise Refused(409, f"{done} done; not done: " + "; ".join(problems), audit=False)
        what = "requeued" if action == "requeue" else "discard+requested+(waiting+for+a+second+person)"
        raise web.HTTPSeeOther(f"/console/dead-letters?done={done}+{what}")

    @page("messages.read")
    async def quarantine(self, request: web.Request) -> web.Response:
        rows = await self.store.quarantine.held("held", limit=500)
        return self.render(request, "quarantine.html", {"rows": rows})

    @page("messages.read")
    async def quarantine_entry(self, request: web.Request) -> web.Response:
        entry = await self.store.quarantine.entry(request.match_info["id"])
        if entry is None:
            raise Refused(404, "no such quarantined message", audit=False)
        waiting = [a for a in await self.four_eyes.requests("pending")
                   if a.kind == "quarantine.release" and a.target == entry.message_id]
        return self.render(request, "quarantine_entry.html", {"e": entry, "waiting": waiting})

    @page("messages.act")
    async def quarantine_release(self, request: web.Request) -> web.StreamResponse:
        message_id = request.match_info["id"]
        note = str((await request.post()).get("note", "")).strip()[:500]
        if not note:
            raise Refused(400, "say why the invoice may be released (for example: account confirmed by phone with ...)",
                          audit=False)
        entry = await self.store.quarantine.entry(message_id)
        if entry is None or entry.state != "held":
            raise Refused(409, "this invoice is not held (any more)", audit=False)
        try:
            await self.four_eyes.request("quarantine.release", message_id, {"message_id": message_id,
                                                  "partner": entry.partner}, note, self.actor(request),
                                                  entry.partner, message_id)
        except AccountError as exc:
            raise Refused(409, str(exc), audit=False) from None
        raise web.HTTPSeeOther(f"/console/quarantine/{message_id}?done=release+requested:+a+second+person+must+approve+it")

    @page("messages.act")
    async def quarantine_reject(self, request: web.Request) -> web.StreamResponse:
        message_id = request.match_info["id"]
        note = str((await request.post()).get("note", "")).strip()[:500]
        if not note:
            raise Refused(400, "say why the invoice is rejected", audit=False)
        try:
            await self.store.quarantine.decide(message_id, False, self.actor(request), note)
        except GatewayError as exc:
            raise Refused(409, str(exc), audit=False) from None
        raise web.HTTPSeeOther("/console/quarantine?done=rejected")

    @page("view")
    async def approvals(self, request: web.Request) -> web.Response:
        pending = []
        for a in await self.four_eyes.requests("pending"):
            shown = dataclasses.asdict(a) | {"can_decide": allowed(user_of(request), APPROVAL_NEEDS.get(a.kind, "users.manage"))}
            if a.kind in PARTNER_REQUESTS:
                shown |= {"lines": describe(a.kind, a.params), "confirm": await self.run(self.partner_pages.to_confirm, a)}
            pending.append(shown)
        recent = [a for a in await self.four_eyes.requests(None, 50) if a.state != "pending"]
        return self.render(request, "approvals.html", {"pending": pending, "recent": recent})

    @page("view", fresh=True)
    async def decide(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        decision = request.match_info["decision"]
        try:
            request_id = int(request.match_info["id"])
        except ValueError:
            raise Refused(404, "no such request", audit=False) from None
        if decision == "withdraw":
            try:
                await self.four_eyes.withdraw(request_id, self.actor(request))
            except AccountError as exc:
                raise Refused(409, str(exc), audit=False) from None
            raise web.HTTPSeeOther("/console/approvals?done=withdrawn")
        if decision not in ("approve", "deny"):
            raise Refused(404, "no such decision", audit=False)
        form = await request.post()
        fingerprints = [str(v) for k, v in form.items() if k.startswith("fingerprint")]
        how = str(form.get("confirmed_with", "")).strip()[:300]
        pending = await self.four_eyes.get(request_id)
        if decision == "approve" and pending is not None and pending.kind in PARTNER_REQUESTS \
                and pending.state == "pending" and pending.requested_by != self.actor(request) \
                and allowed(user, APPROVAL_NEEDS[pending.kind]):
            try:
                await self.run(self.partner_pages.confirm, pending, fingerprints, how)
            except GatewayError as exc:
                raise Refused(422, str(exc)) from None

        def check(found: Approval) -> None:
            need = APPROVAL_NEEDS.get(found.kind, "users.manage")
            if not allowed(user, need):
                raise AccountError(f"deciding a {found.kind} request needs the permission {need}, which your role "
                                   "does not have")

        try:
            found = await self.four_eyes.decide(request_id, self.actor(request), decision == "approve", check)
        except AccountError as exc:
            raise Refused(403, str(exc)) from None
        if decision == "approve":
            outcome, failed = await self._carry_out(found, self.actor(request), fingerprints, how)
            await self.four_eyes.finish(request_id, outcome, failed)
            if failed:
                raise Refused(409, f"approved, but it could not be done: {outcome}", audit=False)
        raise web.HTTPSeeOther(f"/console/approvals?done={decision}d")

    async def _carry_out(self, found: Approval, actor: str, fingerprints: list[str], how: str) -> tuple[str, bool]:
        p, kind = found.params, found.kind
        note = f"{found.reason} (requested by {found.requested_by}, approved by {actor})".strip()
        try:
            if kind in PARTNER_REQUESTS:
                return await self.partner_pages.carry_out(found, actor, fingerprints, how), False
            if kind == "quarantine.release":
                await self.store.quarantine.decide(p["message_id"], True, actor, note)
                self.wake_outbox()
                return "released", False
            if kind == "deadletter.discard":
                await self.store.outbox.discard(p["message_id"], p["destination"], actor, note)
                return "discarded", False
            if kind == "user.roles":
                await self.accounts.set_roles(found.target, tuple(p["roles"]), bool(p["content"]), actor,
                                              {"requested_by": found.requested_by, "request": found.id})
                return "roles changed", False
        except GatewayError as exc:
            return str(exc), True
        return f"unknown request kind {kind}", True

    @page("audit.read")
    async def audit(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            before = int(q["before"]) if q.get("before") else None
        except ValueError:
            before = None
        rows = await self.store.audit.page(actor=q.get("actor", "").strip(), action=q.get("action", "").strip(),
                                           partner=q.get("partner", "").strip(), before=before)
        return self.render(request, "audit.html", {"rows": rows, "q": q, "report": None})

    @page("audit.read")
    async def audit_verify(self, request: web.Request) -> web.Response:
        records = await audit_mod.read_chain(self.store.audit)
        report = await self.run(lambda: audit_mod.verify(records, trusted_certificates(self.config),
                                                         max_unsealed_s=unsealed_limit(self.config)))
        await self.store.audit.append(self.actor(request), "console.audit_verified", None, None,
                                         {"ok": report.ok, "records": report.records})
        return self.render(request, "audit.html", {"rows": [], "q": {}, "report": report})

    @page("audit.export")
    async def audit_export(self, request: web.Request) -> web.StreamResponse:
        """Records ``from``..``to`` as the CLI's export format, closed by a line signed with the gateway's
        signing key over the SHA-256 of everything before it."""
        try:
            first = int(request.query.get("from") or 0) or None
            last = int(request.query.get("to") or 0) or None
        except ValueError:
            raise Refused(400, "from and to are record numbers", audit=False) from None
        signer = self.signer()
        if signer is None:
            raise Refused(409, "a signed export needs the [signing] key, which is not configured", audit=False)

        records = await audit_mod.read_chain(self.store.audit, first, last)

        def build() -> bytes:
            body = audit_mod.export_text(records, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")).encode()
            return body + (json.dumps(audit_mod.export_seal(signer, body)) + "\n").encode()

        body, n = await self.run(build), len(records)
        await self.store.audit.append(self.actor(request), "console.audit_exported", None, None,
                                         {"from": first, "to": last, "records": n})
        return web.Response(body=body, content_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="audit-{first or 1}-{last or "head"}.jsonl"'})

    @page("users.read")
    async def users(self, request: web.Request) -> web.Response:
        people = await self.accounts.users()
        sessions = await self.accounts.sessions(None)
        return self.render(request, "users.html", {"people": people, "roles": ROLES, "sessions": sessions,
                                                   "error": request[CTX].error, "created": request[CTX].created},
                           request[CTX].status)

    @page("users.manage", fresh=True)
    async def user_add(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name = str(form.get("name", "")).strip().lower()
        if not re.fullmatch(USER_NAME, name):
            request[CTX].error, request[CTX].status = "a user name is 2 to 40 lower-case letters, digits, '.', '_' or '-'", 400
            return await self.users(request)
        # A new account starts without roles: granting one is a four-eyes request.
        password = security.new_password()
        digest = await asyncio.get_running_loop().run_in_executor(self.hashing, security.hash_password, password)
        try:
            await self.accounts.add_user(name, (), False, digest, self.actor(request))
        except AccountError as exc:
            request[CTX].error, request[CTX].status = str(exc), 409
            return await self.users(request)
        roles = tuple(r for r in ROLES if form.get(f"role_{r}"))
        if roles or form.get("content"):
            await self.four_eyes.request("user.roles", name, {"roles": list(roles), "content": bool(form.get("content"))},
                                                  "new account", self.actor(request))
        request[CTX].created = {"name": name, "password": password, "requested": roles}
        return await self.users(request)

    @page("users.manage", fresh=True)
    async def user_act(self, request: web.Request) -> web.StreamResponse:
        name, action = request.match_info["name"], request.match_info["action"]
        form = await request.post()
        if name == user_of(request).name and action in ("disable", "roles", "reset-mfa"):
            raise Refused(403, "you cannot do this to your own account; ask another administrator")
        try:
            if action == "disable":
                await self.accounts.set_state(name, "disabled", self.actor(request))
            elif action == "enable":
                await self.accounts.set_state(name, "active", self.actor(request))
            elif action == "unlock":
                await self.accounts.unlock(name, self.actor(request))
            elif action == "reset-mfa":
                await self.accounts.reset_mfa(name, self.actor(request))
            elif action == "roles":
                roles = [r for r in ROLES if form.get(f"role_{r}")]
                await self.four_eyes.request("user.roles", name, {"roles": roles, "content": bool(form.get("content"))},
                                                      str(form.get("reason", "")).strip()[:500], self.actor(request))
            else:
                raise Refused(404, "no such action", audit=False)
        except AccountError as exc:
            raise Refused(409, str(exc), audit=False) from None
        done = "role+change+requested:+a+second+administrator+must+approve+it" if action == "roles" else f"{action}+done"
        raise web.HTTPSeeOther(f"/console/users?done={done}")

    @page()
    async def account(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        keys = await self.accounts.passkeys(user.name)
        sessions = await self.accounts.sessions(user.name)
        left = await self.accounts.recovery_left(user.name)
        return self.render(request, "account.html", {"passkeys": keys, "sessions": sessions, "recovery_left": left,
                                                     "current": session_of(request).id_hash, "codes": request[CTX].codes})

    @page(fresh=True)
    async def new_recovery_codes(self, request: web.Request) -> web.Response:
        codes = security.new_recovery_codes()
        await self.accounts.replace_recovery(user_of(request).name, [security.recovery_hash(c) for c in codes])
        request[CTX].codes = codes
        return await self.account(request)

    @page()
    async def revoke(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        target = await self.accounts.session(request.match_info["id"])
        if target is None:
            raise Refused(404, "no such session", audit=False)
        if target.user != user.name and not allowed(user, "users.manage"):
            raise Refused(403, "only administrators may end other people's sessions")
        await self.accounts.end_session(target.id_hash, self.actor(request), "revoked")
        back = "/console/users" if target.user != user.name else "/console/account"
        raise web.HTTPSeeOther(f"{back}?done=session+ended")


def _local(target: str | None) -> str:
    """Only paths of the console itself are followed after a login (no open redirect)."""
    if not target or not target.startswith("/console/") or target.startswith("//") or "\\" in target:
        return "/console/"
    return target


def _timeline(m: MessageDetail) -> list[dict[str, Any]]:
    """The message's history as steps a person reads: received, validated, stored, routed, delivered."""
    steps = [{"at": m.received_at, "what": "received", "detail": f"from {m.partner} ({m.size} bytes, {m.media_type})"}]
    rules = m.rules
    steps.append({"at": m.received_at, "what": "validated",
                  "detail": "schema" + (f" and rules {', '.join(rules.get('packs', []))}" if isinstance(rules, dict)
                                        and rules.get("packs") else "") + (", signature verified" if m.signature else "")})
    steps.append({"at": m.received_at, "what": "stored", "detail": f"encrypted under key {m.key_id}"})
    if m.route:
        steps.append({"at": m.received_at, "what": "routed", "detail": f"route {m.route}"})
    for h in m.history:
        if h.action in ("invoice.accepted", "invoice.submitted"):
            continue
        detail = ", ".join(f"{k}: {v}" for k, v in h.detail.items() if v not in (None, "", [])) if isinstance(h.detail, dict) else ""
        steps.append({"at": h.at, "what": h.action, "detail": f"{h.actor}; {detail}".strip("; ")})
    for d in m.deliveries:
        if d.delivered_at:
            steps.append({"at": d.delivered_at, "what": "delivered", "detail": f"to {d.destination} after "
                          f"{d.attempts} attempt(s)"})
        elif d.last_error:
            steps.append({"at": d.updated_at or "", "what": f"delivery {d.state}",
                          "detail": f"to {d.destination}: {d.last_error} ({d.attempts} attempt(s))"})
    return sorted(steps, key=lambda s: s["at"] or "")


def _qr(text: str) -> str:
    """The otpauth URI as an SVG data URI (CSP allows data: images, not inline SVG styles)."""
    import segno

    return str(segno.make(text, error="m").svg_data_uri(scale=4))
