"""The four-eyes requests: the list, a second person's decision (or the requester's withdrawal), and
carrying out what was approved.  Partner requests are confirmed and carried out by the partner pages."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from ..errors import GatewayError
from ..storage.base import AccountError
from ..storage.records import Approval, User
from .context import ConsoleContext
from .guard import Refused, page, user_of
from .partners import KINDS as PARTNER_REQUESTS
from .partners import PartnerPages, describe
from .roles import APPROVAL_NEEDS, allowed


class ApprovalPages:
    """Handlers for ``/console/approvals…``."""

    def __init__(self, console: ConsoleContext, partners: PartnerPages):
        self.c = console
        self.accounts = console.store.accounts
        self.four_eyes = console.store.approvals
        self.partners = partners

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/approvals", self.approvals)
        r.add_post("/approvals/{id}/{decision}", self.decide)

    @page("view")
    async def approvals(self, request: web.Request) -> web.Response:
        pending = []
        for a in await self.four_eyes.requests("pending"):
            shown = dataclasses.asdict(a) | {"can_decide": allowed(user_of(request), APPROVAL_NEEDS.get(a.kind, "users.manage"))}
            if a.kind in PARTNER_REQUESTS:
                shown |= {"lines": describe(a.kind, a.params), "confirm": await self.c.run(self.partners.to_confirm, a)}
            pending.append(shown)
        recent = [a for a in await self.four_eyes.requests(None, 50) if a.state != "pending"]
        return self.c.render(request, "approvals.html", {"pending": pending, "recent": recent})

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
                await self.four_eyes.withdraw(request_id, self.c.actor(request))
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
                and pending.state == "pending" and pending.requested_by != self.c.actor(request) \
                and allowed(user, APPROVAL_NEEDS[pending.kind]):
            try:
                await self.c.run(self.partners.confirm, pending, fingerprints, how)
            except GatewayError as exc:
                raise Refused(422, str(exc)) from None

        def check(found: Approval) -> None:
            need = APPROVAL_NEEDS.get(found.kind, "users.manage")
            if not allowed(user, need):
                raise AccountError(f"deciding a {found.kind} request needs the permission {need}, which your role "
                                   "does not have")

        try:
            found = await self.four_eyes.decide(request_id, self.c.actor(request), decision == "approve", check)
        except AccountError as exc:
            raise Refused(403, str(exc)) from None
        if decision == "approve":
            outcome, failed = await self._carry_out(found, self.c.actor(request), fingerprints, how)
            await self.four_eyes.finish(request_id, outcome, failed)
            if failed:
                raise Refused(409, f"approved, but it could not be done: {outcome}", audit=False)
        raise web.HTTPSeeOther(f"/console/approvals?done={decision}d")

    async def _carry_out(self, found: Approval, actor: str, fingerprints: list[str], how: str) -> tuple[str, bool]:
        p, kind = found.params, found.kind
        note = f"{found.reason} (requested by {found.requested_by}, approved by {actor})".strip()
        try:
            if kind in PARTNER_REQUESTS:
                return await self.partners.carry_out(found, actor, fingerprints, how), False
            if kind == "quarantine.release":
                await self.c.store.quarantine.decide(p["message_id"], True, actor, note)
                self.c.wake_outbox()
                return "released", False
            if kind == "deadletter.discard":
                await self.c.store.outbox.discard(p["message_id"], p["destination"], actor, note)
                return "discarded", False
            if kind == "user.roles":
                await self.accounts.set_roles(found.target, tuple(p["roles"]), bool(p["content"]), actor,
                                              {"requested_by": found.requested_by, "request": found.id})
                return "roles changed", False
        except GatewayError as exc:
            return str(exc), True
        return f"unknown request kind {kind}", True
