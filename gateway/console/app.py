"""The admin console: server-rendered pages on the admin listener, under ``/console/``.

This module builds the application from the page groups (login, messages, approvals, partners,
audit, users: one module each, over ``context.ConsoleContext``) and guards every request.

Request path, in order (``Console._guard``):

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

Password hashing runs in a one-thread executor behind a token bucket per address (or known browser:
``login``) and a bound on waiting hashes, so a login flood costs at most one core and never the
invoice listeners' loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web

from .. import logs
from ..config.model import Config, ConsoleConfig
from ..partners.directory import PartnerDirectory
from ..ratelimit import RateLimiter
from ..stages.signature import SigningKey
from ..storage.base import Store
from ..storage.records import Session, User
from ..threads import named_pool
from ..vault import Vault
from . import security
from .approvals import ApprovalPages
from .audit import AuditPages
from .guard import CTX, LOGIN_CSRF_COOKIE, PUBLIC, SESSION_COOKIE, Context, Page, Refused, user_of
from .login import LoginPages
from .messages import MessagePages
from .partners import PartnerPages
from .roles import allowed
from .users import UserPages

log = logs.get("console")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

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
    """The console's application and guard; it is the ``ConsoleContext`` its page groups work with."""

    def __init__(self, config: Config, store: Store, io: Executor, vault: Callable[[], Vault],
                 directory: Callable[[], PartnerDirectory], signer: Callable[[], SigningKey | None],
                 wake_outbox: Callable[[], None], rejections: Callable[[], dict[str, float]],
                 partners_changed: Callable[[], Awaitable[None]] | None = None):
        self.config = config
        self.cfg: ConsoleConfig = config.console
        self.store = store
        self.accounts = store.accounts
        self.io = io
        self.vault = vault
        self.directory = directory
        self.signer = signer
        self.wake_outbox = wake_outbox
        self.rejections = rejections
        self.partners_changed = partners_changed  # re-read the partners file now (the console just wrote it)
        self.hashing = named_pool(1, "console-hash")
        self.waiting_hashes = 0
        self.throttled_audit: dict[str, float] = {}
        self.static = _static_files()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.console", "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["short"] = lambda s, n=12: (s or "")[:n]
        self.templates.filters["when"] = lambda t: (t or "")[:19].replace("T", " ")
        self.templates.filters["epoch"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""
        self.login_pages = LoginPages(self)
        self.message_pages = MessagePages(self)
        self.partner_pages = PartnerPages(self)
        self.approval_pages = ApprovalPages(self, self.partner_pages)
        self.audit_pages = AuditPages(self)
        self.user_pages = UserPages(self)

    def close(self) -> None:
        self.hashing.shutdown(wait=False, cancel_futures=True)

    @property
    def bootstrap_file(self) -> Path:
        """Where the first visit writes the bootstrap account's password (removed once it is changed)."""
        return self.login_pages.bootstrap_file

    # --- plumbing --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        r = app.router
        r.add_get("/static/{name}", self.static_file)
        self.login_pages.routes(r)
        self.message_pages.routes(r)
        self.approval_pages.routes(r)
        self.partner_pages.routes(r)
        self.audit_pages.routes(r)
        self.user_pages.routes(r)
        return app

    async def static_file(self, request: web.Request) -> web.Response:
        found = self.static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound(reason="no such file")
        response = web.Response(body=found[0], content_type=found[1])
        return response

    def _headers(self, response: web.StreamResponse) -> None:
        h = response.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "same-origin"
        h["Cache-Control"] = "no-store"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"

    # --- the guard -------------------------------------------------------------------------------

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
        if user.must_change and handler not in (self.login_pages.password_page, self.login_pages.change_password,
                                                self.login_pages.logout):
            raise web.HTTPSeeOther("/console/password")
        if spec.permission is not None and not allowed(user, spec.permission):
            raise Refused(403, f"your role ({', '.join(user.roles) or 'none'}) does not allow this "
                          f"({spec.permission.replace('.', ' ')})")
        if spec.fresh and time.time() - session.auth_at > self.cfg.fresh_auth_s:
            back = request.path_qs if request.method == "GET" else request.headers.get("Referer", "/console/")
            raise web.HTTPSeeOther(f"/console/reauth?next={quote(urlsplit(back).path or '/console/')}")
        return await handler(request)

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
        if user is None and not self.first_this_minute(f"denied:{request.remote}"):
            return  # anonymous refusals: one record a minute per address, so a flood cannot fill the log
        actor = f"console:{user.name}" if user is not None else f"console:anonymous@{request.remote}"
        await self.store.audit.append(actor, "console.denied", None, None,
                                         {"method": request.method, "path": request.path, "reason": why,
                                          "address": request.remote or ""})

    # --- what the page groups use (context.ConsoleContext) ---------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def render(self, request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
        session: Session | None = request[CTX].session
        user: User | None = request[CTX].user
        base = {"user": user if session is not None and session.stage == "full" else None,
                "csrf": session.csrf if session is not None else request[CTX].login_csrf,
                "allowed": (lambda p: user is not None and allowed(user, p)), "htmx": "htmx.min.js" in self.static,
                "path": request.path, "flash": request.query.get("done", "")}
        text = self.templates.get_template(template).render(base | context)
        return web.Response(text=text, content_type="text/html", charset="utf-8", status=status)

    def actor(self, request: web.Request) -> str:
        return f"console:{user_of(request).name}"

    async def hash_password(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.hashing, security.hash_password, password)

    async def check_password(self, stored: str | None, password: str) -> bool:
        if self.waiting_hashes >= MAX_WAITING_HASHES:
            raise Refused(429, "too many logins are being checked right now; wait a moment and try again", audit=False)
        self.waiting_hashes += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.hashing, security.verify_password, stored, password)
        finally:
            self.waiting_hashes -= 1

    def first_this_minute(self, key: str) -> bool:
        now = time.monotonic()
        if now - self.throttled_audit.get(key, -60.0) < 60:
            return False
        if len(self.throttled_audit) > RateLimiter.MAX_KEYS:
            self.throttled_audit = {k: t for k, t in self.throttled_audit.items() if now - t < 60}
        self.throttled_audit[key] = now
        return True
