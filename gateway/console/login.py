"""Logging in: the password, then a second factor (an authenticator app's code, a recovery code or a
passkey), or the first enrolment of one; the password change, the fresh authentication sensitive
actions ask for, logout, and the bootstrap account of a new installation.

Failed attempts never lock an account: they make further attempts from the same source wait
(``throttle.py``).  Every failed password step gets the same answer (status, page, cookies) after the
same work, one password verification and one audit record: an unknown name, a wrong password, a
disabled account and an attempt that must wait cannot be told apart, so names cannot be enumerated
and nobody learns that a wait is on.  The audit record says which it was.  Only the flood limits
answer otherwise (429), as they are decided before any name is read: the address's token bucket
(``_flood_limit``) and the bound on password checks waiting for the hashing thread (``app.py``).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from aiohttp import web

from .. import logs
from ..ratelimit import RateLimiter
from ..storage.base import AccountError
from ..storage.records import SHARED_SOURCE, Session, User
from . import passkeys, security
from .context import ConsoleContext
from .guard import CTX, LOGIN_CSRF_COOKIE, SESSION_COOKIE, Refused, json_body, page, relying_party, session_of, user_of
from .throttle import BROWSER, FORGET_S, KNOWN_BROWSER_S, Attempt, Throttle, sources

log = logs.get("console")

BOOTSTRAP_USER = "admin"
BOOTSTRAP_FILE = "console-bootstrap-password"  # in state_dir; removed once the password is changed
BROWSER_COOKIE = "egw_browser"  # a browser that completed a login: its own back-off (the store keeps its SHA-256)
# The one answer to every failed password step, whatever the reason (the audit record has the reason).
WRONG_LOGIN = "wrong user name or password; after repeated failures, wait a few minutes before trying again"


class LoginPages:
    """Handlers for ``/console/login``, ``/mfa``, ``/passkey/login/…``, ``/enroll``, ``/password``, ``/reauth``
    and ``/logout``."""

    def __init__(self, console: ConsoleContext):
        self.c = console
        self.cfg = console.config.console
        self.accounts = console.store.accounts
        self.limiter = RateLimiter(self.cfg.login_burst, self.cfg.login_every_s)
        self.throttle = Throttle.of(self.cfg)

    def routes(self, r: web.UrlDispatcher) -> None:
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

    @property
    def bootstrap_file(self) -> Path:
        return self.c.config.state_dir / BOOTSTRAP_FILE

    # --- password, then a second factor ----------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        await self._bootstrap()
        return self._login_form(request, "", 200)

    async def _bootstrap(self) -> None:
        """With no account at all, the first visit creates ``admin`` with a random password in a file
        only the service user can read; the password must be changed at the first login."""
        if await self.accounts.users():
            return
        password = security.new_password()
        digest = await self.c.hash_password(password)
        try:
            await self.accounts.add_user(BOOTSTRAP_USER, ("admin",), False, digest, "gateway")
        except AccountError:
            return  # another request made it a moment ago
        await self.c.run(self._write_bootstrap, password)
        log.warning("console.bootstrap_account", user=BOOTSTRAP_USER, password_file=str(self.bootstrap_file),
                    hint="log in with it, then choose your own password and set up a second factor")

    def _write_bootstrap(self, password: str) -> None:
        fd = os.open(self.bootstrap_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")

    def _login_form(self, request: web.Request, error: str, status: int) -> web.Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or security.new_token()
        request[CTX].login_csrf = token
        response = self.c.render(request, "login.html", {
            "error": error, "bootstrap": str(self.bootstrap_file) if self.bootstrap_file.exists() else ""}, status)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, path="/console/", httponly=True, samesite="Strict",
                            secure=_secure(request))
        return response

    async def _flood_limit(self, request: web.Request, browser: tuple[str, str] | None) -> None:
        """A token bucket per address (per browser, for a known one, so that others at its address cannot
        use it up), before any name is read or password hashed: what a flood may cost.  The one refusal
        that differs from a wrong password, as it says nothing about any account."""
        address = request.remote or ""
        if self.limiter.allow(BROWSER + browser[0] if browser is not None else address):
            return
        if self.c.first_this_minute(f"throttled:{address}"):  # one record a minute per address, not one per attempt
            await self.c.store.audit.append(f"console:anonymous@{address}", "console.login_throttled", None, None,
                                            {"address": address})
            log.warning("console.login_throttled", address=address)
        raise Refused(429, "too many login attempts from your address; wait a minute and try again", audit=False)

    async def _browser(self, request: web.Request) -> tuple[str, str] | None:
        """(its token's SHA-256, the account) when the browser completed a login lately."""
        token = request.cookies.get(BROWSER_COOKIE)
        if not token or len(token) > 100:
            return None
        digest = security.token_hash(token)
        name = await self.accounts.browser(digest, time.time() - KNOWN_BROWSER_S)
        return None if name is None else (digest, name)

    async def _attempt(self, request: web.Request, name: str, browser: tuple[str, str] | None) -> Attempt:
        known = browser[0] if browser is not None and browser[1] == name else None
        keys = sources(request.remote or "", known)
        return Attempt(keys, await self.accounts.failures(name, keys), time.time())

    async def _failed(self, request: web.Request, name: str, factor: str, reason: str, attempt: Attempt) -> None:
        """Audit a failed attempt with its reason, and count it (unless it was refused for waiting)."""
        counted = () if reason == "throttled" else self.throttle.counted(attempt)
        counts = await self.accounts.failed(name, factor, request.remote or "", reason, counted, attempt.now,
                                            attempt.now - FORGET_S)
        for source in self.throttle.started(counts):
            log.warning("console.login_backoff", user=name, factor=factor, address=request.remote,
                        scope="every address it has not logged in from" if source == SHARED_SOURCE else "this source",
                        hint="failed logins: further attempts wait, doubling; `einvoice-gateway users unlock` ends it")

    async def login(self, request: web.Request) -> web.StreamResponse:
        browser = await self._browser(request)
        await self._flood_limit(request, browser)
        form = await request.post()
        name, password = str(form.get("username", "")).strip().lower(), str(form.get("password", ""))
        too_long = len(password) > security.MAX_PASSWORD_CHARS * 4 or len(name) > 64
        user = await self.accounts.user(name)
        attempt = await self._attempt(request, name, browser)
        waiting = self.throttle.wait(attempt) > 0
        # Every failure costs one verification: of a dummy hash with the same parameters when there is
        # no such account or the attempt must wait, so the time taken does not tell which it was.
        stored = user.password_hash if user is not None and not waiting else None
        ok = await self.c.check_password(stored, password[:security.MAX_PASSWORD_CHARS * 4]) and not too_long
        reason = ("unknown-user" if user is None else "throttled" if waiting else "wrong-password" if not ok
                  else "disabled" if user.state != "active" else None)
        if reason is not None:
            await self._failed(request, name, "password", reason, attempt)
            return self._login_form(request, WRONG_LOGIN, 401)
        assert user is not None
        earlier = request[CTX].session
        return await self._new_session(request, user, "mfa" if user.enrolled else "enroll", 0.0,
                                       earlier.id_hash if earlier is not None else None)

    def _set_session(self, response: web.StreamResponse, request: web.Request, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, path="/console/", httponly=True, samesite="Strict",
                            secure=_secure(request), max_age=int(self.cfg.absolute_timeout_s))

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

    async def _factor_attempt(self, request: web.Request, factor: str) -> Attempt:
        """The counts a second factor or re-authentication is judged by.  When its source must wait,
        the attempt is refused (429) before anything is checked, and a half-done login ends."""
        user: User = user_of(request)
        attempt = await self._attempt(request, user.name, await self._browser(request))
        wait = self.throttle.wait(attempt)
        if wait <= 0:
            return attempt
        await self._failed(request, user.name, factor, "throttled", attempt)
        session: Session = session_of(request)
        if session.stage != "full":
            await self.accounts.end_session(session.id_hash)
        then = "then try again" if session.stage == "full" else "then log in again"
        raise Refused(429, f"too many failed attempts; wait {_minutes(wait)}, {then}", audit=False)

    @page(stage="mfa")
    async def mfa_page(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        keys = await self.accounts.passkeys(user.name)
        return self.c.render(request, "mfa.html", {"error": request[CTX].error, "passkeys": bool(keys),
                                                   "recovery_left": await self.accounts.recovery_left(user.name)},
                             request[CTX].status)

    async def _second_factor_ok(self, request: web.Request, method: str, attempt: Attempt) -> web.StreamResponse:
        """The full session, and the browser remembered as this account's (a new token at every login)."""
        user: User = user_of(request)
        session: Session = session_of(request)
        await self.accounts.succeeded(user.name, request.remote or "", method, attempt.sources[:1])
        response = await self._new_session(request, user, "full", time.time(), session.id_hash)
        token, earlier = security.new_token(), request.cookies.get(BROWSER_COOKIE)
        await self.accounts.add_browser(user.name, security.token_hash(token),
                                        security.token_hash(earlier) if earlier and len(earlier) <= 100 else None)
        response.set_cookie(BROWSER_COOKIE, token, path="/console/", httponly=True, samesite="Strict",
                            secure=_secure(request), max_age=int(KNOWN_BROWSER_S))
        return response

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
        if session_of(request).stage != "mfa":
            raise Refused(403, "set up your second factor first (/console/enroll)")
        attempt = await self._factor_attempt(request, "totp")
        problem = await self._totp(user, str((await request.post()).get("code", "")))
        if problem is not None:
            await self._failed(request, user.name, "totp", "wrong-code", attempt)
            request[CTX].error, request[CTX].status = problem, 401
            return await self.mfa_page(request)
        return await self._second_factor_ok(request, "totp", attempt)

    @page(stage="mfa")
    async def mfa_recovery(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        if session_of(request).stage != "mfa":
            raise Refused(403, "set up your second factor first (/console/enroll)")
        attempt = await self._factor_attempt(request, "recovery-code")
        code = str((await request.post()).get("recovery_code", ""))
        if not await self.accounts.spend_recovery(user.name, security.recovery_hash(code)):
            await self._failed(request, user.name, "recovery-code", "wrong-code", attempt)
            request[CTX].error, request[CTX].status = "that recovery code is not valid or was used already", 401
            return await self.mfa_page(request)
        return await self._second_factor_ok(request, "recovery-code", attempt)

    @page(stage="mfa")
    async def passkey_login_options(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        rp_id, _ = relying_party(request)
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
        rp_id, origin = relying_party(request)
        body = json.dumps(await json_body(request))
        try:
            attempt = await self._factor_attempt(request, "passkey")
        except Refused as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
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
            await self._failed(request, user.name, "passkey", "wrong-passkey", attempt)
            return web.json_response({"error": str(exc)}, status=401)
        await self.accounts.used_passkey(cred, count)
        redirect = await self._second_factor_ok(request, "passkey", attempt)
        response = web.json_response({"next": redirect.headers["Location"]})
        response.cookies.update(redirect.cookies)
        return response

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
        return self.c.render(request, "enroll.html", {"secret": secret, "uri": uri, "qr": _qr(uri),
                                                      "error": request[CTX].error}, request[CTX].status)

    @page(stage="mfa")
    async def enroll(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        session: Session = session_of(request)
        secret = session.pending.get("totp_secret")
        if session.stage != "enroll" or not secret:
            raise web.HTTPSeeOther("/console/mfa")
        attempt = await self._factor_attempt(request, "totp-enrolment")
        step = security.totp_step(secret, str((await request.post()).get("code", "")))
        if step is None:
            await self._failed(request, user.name, "totp-enrolment", "wrong-code", attempt)
            request[CTX].error, request[CTX].status = "that code does not match; check the secret and your clock", 401
            return await self.enroll_page(request)
        codes = security.new_recovery_codes()
        await self.accounts.enroll_totp(user.name, secret, step, [security.recovery_hash(c) for c in codes])
        redirect = await self._second_factor_ok(request, "totp-enrolment", attempt)
        response = self.c.render(request, "recovery.html", {"codes": codes, "next": redirect.headers["Location"]})
        response.cookies.update(redirect.cookies)
        return response

    @page()
    async def password_page(self, request: web.Request) -> web.Response:
        return self.c.render(request, "password.html", {"error": request[CTX].error,
                                                        "forced": user_of(request).must_change}, request[CTX].status)

    @page()
    async def change_password(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        form = await request.post()
        current, new, confirm = (str(form.get(k, "")) for k in ("current", "new", "confirm"))
        attempt = await self._factor_attempt(request, "password")
        problem = None
        if not await self.c.check_password(user.password_hash, current):
            await self._failed(request, user.name, "password", "wrong-password", attempt)
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
        digest = await self.c.hash_password(new)
        await self.accounts.set_password(user.name, digest, self.c.actor(request), must_change=False)
        if user.name == BOOTSTRAP_USER:
            self.bootstrap_file.unlink(missing_ok=True)
        raise web.HTTPSeeOther("/console/?done=password+changed")

    @page()
    async def reauth_page(self, request: web.Request) -> web.Response:
        return self.c.render(request, "reauth.html", {"error": request[CTX].error, "next": _local(request.query.get("next"))},
                             request[CTX].status)

    @page()
    async def reauth(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        form = await request.post()
        attempt = await self._factor_attempt(request, "reauthentication")
        problem = None
        if not await self.c.check_password(user.password_hash, str(form.get("password", ""))):
            await self._failed(request, user.name, "password", "wrong-password", attempt)
            problem = "wrong password"
        else:
            problem = await self._totp(user, str(form.get("code", "")))
            if problem is not None:
                await self._failed(request, user.name, "totp", "wrong-code", attempt)
        if problem is not None:
            request[CTX].error, request[CTX].status = problem, 401
            return await self.reauth_page(request)
        await self.accounts.update_session(session_of(request).id_hash, auth_at=time.time())
        await self.c.store.audit.append(self.c.actor(request), "console.reauthenticated", None, None, {})
        raise web.HTTPSeeOther(_local(str(form.get("next", ""))))

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session: Session | None = request[CTX].session
        if session is not None:
            await self.accounts.end_session(session.id_hash, f"console:{session.user}", "logout")
        response = web.Response(status=303, headers={"Location": "/console/login"})
        response.del_cookie(SESSION_COOKIE, path="/console/")
        return response


def _secure(request: web.Request) -> bool:
    return request.scheme == "https"


def _minutes(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute{'s' if minutes > 1 else ''}"


def _local(target: str | None) -> str:
    """Only paths of the console itself are followed after a login (no open redirect)."""
    if not target or not target.startswith("/console/") or target.startswith("//") or "\\" in target:
        return "/console/"
    return target


def _qr(text: str) -> str:
    """The otpauth URI as an SVG data URI (CSP allows data: images, not inline SVG styles)."""
    import segno

    return str(segno.make(text, error="m").svg_data_uri(scale=4))
