"""The people pages: the accounts (an administrator adds, disables, unlocks, resets a second factor,
requests a role change), and one's own account (recovery codes, passkeys); ending a session."""

from __future__ import annotations

import base64
import json
import re

from aiohttp import web

from ..storage.base import AccountError
from ..storage.records import Session, User
from . import passkeys, security
from .context import ConsoleContext
from .guard import CTX, Refused, json_body, page, relying_party, session_of, user_of
from .roles import ROLES, USER_NAME, allowed


class UserPages:
    """Handlers for ``/console/users…``, ``/account…``, ``/passkey/register/…``, ``/passkeys/…`` and ``/sessions/…``."""

    def __init__(self, console: ConsoleContext):
        self.c = console
        self.accounts = console.store.accounts
        self.four_eyes = console.store.approvals

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/users", self.users)
        r.add_post("/users", self.user_add)
        r.add_post("/users/{name}/{action}", self.user_act)
        r.add_get("/account", self.account)
        r.add_post("/account/recovery", self.new_recovery_codes)
        r.add_post("/passkey/register/options", self.passkey_register_options)
        r.add_post("/passkey/register/verify", self.passkey_register_verify)
        r.add_post("/passkeys/{id}/remove", self.passkey_remove)
        r.add_post("/sessions/{id}/revoke", self.revoke)

    @page("users.read")
    async def users(self, request: web.Request) -> web.Response:
        people = await self.accounts.users()
        sessions = await self.accounts.sessions(None)
        return self.c.render(request, "users.html", {"people": people, "roles": ROLES, "sessions": sessions,
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
        digest = await self.c.hash_password(password)
        try:
            await self.accounts.add_user(name, (), False, digest, self.c.actor(request))
        except AccountError as exc:
            request[CTX].error, request[CTX].status = str(exc), 409
            return await self.users(request)
        roles = tuple(r for r in ROLES if form.get(f"role_{r}"))
        if roles or form.get("content"):
            await self.four_eyes.request("user.roles", name, {"roles": list(roles), "content": bool(form.get("content"))},
                                         "new account", self.c.actor(request))
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
                await self.accounts.set_state(name, "disabled", self.c.actor(request))
            elif action == "enable":
                await self.accounts.set_state(name, "active", self.c.actor(request))
            elif action == "unlock":
                await self.accounts.unlock(name, self.c.actor(request))
            elif action == "reset-mfa":
                await self.accounts.reset_mfa(name, self.c.actor(request))
            elif action == "roles":
                roles = [r for r in ROLES if form.get(f"role_{r}")]
                await self.four_eyes.request("user.roles", name, {"roles": roles, "content": bool(form.get("content"))},
                                             str(form.get("reason", "")).strip()[:500], self.c.actor(request))
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
        return self.c.render(request, "account.html", {"passkeys": keys, "sessions": sessions, "recovery_left": left,
                                                       "current": session_of(request).id_hash, "codes": request[CTX].codes})

    @page(fresh=True)
    async def new_recovery_codes(self, request: web.Request) -> web.Response:
        codes = security.new_recovery_codes()
        await self.accounts.replace_recovery(user_of(request).name, [security.recovery_hash(c) for c in codes])
        request[CTX].codes = codes
        return await self.account(request)

    @page(fresh=True)
    async def passkey_register_options(self, request: web.Request) -> web.Response:
        user: User = user_of(request)
        rp_id, _ = relying_party(request)
        body = await json_body(request)
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
        rp_id, origin = relying_party(request)
        body = json.dumps(await json_body(request))
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
        if not await self.accounts.remove_passkey(user.name, request.match_info["id"], self.c.actor(request)):
            raise Refused(404, "no such passkey of yours", audit=False)
        raise web.HTTPSeeOther("/console/account?done=passkey+removed")

    @page()
    async def revoke(self, request: web.Request) -> web.StreamResponse:
        user: User = user_of(request)
        target = await self.accounts.session(request.match_info["id"])
        if target is None:
            raise Refused(404, "no such session", audit=False)
        if target.user != user.name and not allowed(user, "users.manage"):
            raise Refused(403, "only administrators may end other people's sessions")
        await self.accounts.end_session(target.id_hash, self.c.actor(request), "revoked")
        back = "/console/users" if target.user != user.name else "/console/account"
        raise web.HTTPSeeOther(f"{back}?done=session+ended")
