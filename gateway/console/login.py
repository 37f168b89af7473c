"""Logging in: the password (throttled per address), then a second factor (an authenticator app's
code, a recovery code or a passkey), or the first enrolment of one; the password change, the fresh
authentication sensitive actions ask for, logout, and the bootstrap account of a new installation.
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
from ..storage.records import Session, User
from . import passkeys, security
from .context import ConsoleContext
from .guard import CTX, LOGIN_CSRF_COOKIE, SESSION_COOKIE, Refused, json_body, page, relying_party, session_of, user_of

log = logs.get("console")

BOOTSTRAP_USER = "admin"
BOOTSTRAP_FILE = "console-bootstrap-password"  # in state_dir; removed once the password is changed


class LoginPages:
    """Handlers for ``/console/login``, ``/mfa``, ``/passkey/login/…``, ``/enroll``, ``/password``, ``/reauth``
    and ``/logout``."""

    def __init__(self, console: ConsoleContext):
        self.c = console
        self.cfg = console.config.console
        self.accounts = console.store.accounts
        self.limiter = RateLimiter(self.cfg.login_burst, self.cfg.login_every_s)

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

    async def _throttle(self, request: web.Request) -> None:
        address = request.remote or ""
        if self.limiter.allow(address):
            return
        if self.c.first_this_minute(f"throttled:{address}"):  # one record a minute per address, not one per attempt
            await self.c.store.audit.append(f"console:anonymous@{address}", "console.login_throttled", None, None,
                                            {"address": address})
            log.warning("console.login_throttled", address=address)
        raise Refused(429, "too many login attempts from your address; wait a minute and try again", audit=False)

    async def login(self, request: web.Request) -> web.StreamResponse:
        await self._throttle(request)
        form = await request.post()
        name, password = str(form.get("username", "")).strip().lower(), str(form.get("password", ""))
        if len(password) > security.MAX_PASSWORD_CHARS * 4 or len(name) > 64:
            return self._login_form(request, "wrong user name or password", 401)
        user = await self.accounts.user(name)
        if user is not None and user.locked():
            await self.c.store.audit.append(f"console:{name}", "console.login_refused", None, None,
                                            {"reason": "locked", "address": request.remote or ""})
            return self._login_form(request, "this account is locked after repeated failed logins; try again later "
                                    "or ask an administrator to unlock it", 423)
        ok = await self.c.check_password(user.password_hash if user else None, password)
        if user is None or not ok or user.state != "active":
            if user is not None:
                await self._failed(request, user, "password")
            else:
                await self.c.store.audit.append(f"console:anonymous@{request.remote}", "console.login_failed", None, None,
                                                {"user": name[:64], "factor": "password", "address": request.remote or ""})
            return self._login_form(request, "wrong user name or password", 401)
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
        return self.c.render(request, "mfa.html", {"error": request[CTX].error, "passkeys": bool(keys),
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
        step = security.totp_step(secret, str((await request.post()).get("code", "")))
        if step is None:
            await self._failed(request, user, "totp-enrolment")
            request[CTX].error, request[CTX].status = "that code does not match; check the secret and your clock", 401
            return await self.enroll_page(request)
        codes = security.new_recovery_codes()
        await self.accounts.enroll_totp(user.name, secret, step, [security.recovery_hash(c) for c in codes])
        redirect = await self._second_factor_ok(request, "totp-enrolment")
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
        problem = None
        if not await self.c.check_password(user.password_hash, current):
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
        problem = None
        if not await self.c.check_password(user.password_hash, str(form.get("password", ""))):
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


def _local(target: str | None) -> str:
    """Only paths of the console itself are followed after a login (no open redirect)."""
    if not target or not target.startswith("/console/") or target.startswith("//") or "\\" in target:
        return "/console/"
    return target


def _qr(text: str) -> str:
    """The otpauth URI as an SVG data URI (CSP allows data: images, not inline SVG styles)."""
    import segno

    return str(segno.make(text, error="m").svg_data_uri(scale=4))
