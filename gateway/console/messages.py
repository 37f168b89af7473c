"""The message pages: the dashboard, the message list and search, one message with its timeline and
(audited) content, dead letters and what an operator does with them, and the quarantine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .. import logs
from ..errors import GatewayError, VaultError
from ..operations.housekeeping import expiring, inventory
from ..storage.base import AccountError
from ..storage.records import MessageDetail
from . import views
from .context import ConsoleContext
from .guard import Refused, page

log = logs.get("console")


class MessagePages:
    """Handlers for ``/console/``, ``/messages…``, ``/dead-letters`` and ``/quarantine…``."""

    def __init__(self, console: ConsoleContext):
        self.c = console
        self.four_eyes = console.store.approvals

    def routes(self, r: web.UrlDispatcher) -> None:
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

    @page("view")
    async def dashboard(self, request: web.Request) -> web.Response:
        data = await self.c.store.reports.dashboard(datetime.now(UTC))
        certs = await self.c.run(inventory, self.c.config, self.c.directory())
        soon = expiring(certs, 90)
        buckets = {d: sum(1 for _, left in soon if left < d) for d in (90, 30, 7)}
        return self.c.render(request, "dashboard.html", {"d": data, "expiring": soon[:20], "buckets": buckets,
                                                         "rejections": sorted(self.c.rejections().items(), key=lambda x: -x[1])})

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
                self.c.store.reports, partner=q.get("partner", "").strip(), status=q.get("status", ""), since=since,
                until=until, number=q.get("number", "").strip(), amount=q.get("amount", "").strip(), page=page_no)
        except ValueError as exc:
            error, page_no = str(exc), 0
        context = {"rows": rows, "more": more, "q": q, "page_no": page_no, "statuses": views.STATUSES, "error": error,
                   "partners": sorted(p.name for p in self.c.directory().partners)}
        if request.headers.get("HX-Request") and request.headers.get("HX-Target") == "results":
            return self.c.render(request, "messages_table.html", context)
        return self.c.render(request, "messages.html", context)

    @page("messages.read")
    async def message(self, request: web.Request) -> web.Response:
        found = await self.c.store.reports.message(request.match_info["id"])
        if found is None:
            raise Refused(404, "no such message (it may have been deleted by retention)", audit=False)
        return self.c.render(request, "message.html", {"m": found, "timeline": _timeline(found)})

    @page("content", fresh=True)
    async def content(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        found = await self.c.store.reports.message(message_id)
        if found is None:
            raise Refused(404, "no such message", audit=False)
        sealed = await self.c.store.outbox.load_sealed(message_id)
        try:
            if sealed is None:
                raise VaultError("the stored object is missing")
            body = await self.c.run(self.c.vault().open, sealed, message_id, found.sha256)
        except VaultError as exc:
            reason = "missing" if sealed is None else "failed authentication"
            log.error("console.content_unreadable", message_id=message_id, reason=reason)
            await self.c.store.audit.append(self.c.actor(request), "console.content_unreadable", found.partner,
                                            message_id, {"sha256": found.sha256, "reason": reason})
            raise Refused(500, f"the stored content of this message cannot be opened: it is {reason} (damaged or "
                          "altered at rest, or sealed under a master key this gateway no longer has); restore it from "
                          "a backup, or check vault.keys", audit=False) from exc
        await self.c.store.audit.append(self.c.actor(request), "console.content_viewed", found.partner, message_id,
                                        {"sha256": found.sha256})
        text = body.decode("utf-8", "replace") if found.media_type.endswith("xml") else \
            f"({found.media_type}, {len(body)} bytes; not shown as text)"
        return self.c.render(request, "content.html", {"m": found, "text": text})

    @page("messages.read")
    async def dead_letters(self, request: web.Request) -> web.Response:
        rows = await self.c.store.reports.dead_letters(partner=request.query.get("partner") or None, limit=200)
        return self.c.render(request, "dead_letters.html", {"rows": rows})

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
                    await self.c.store.outbox.retry(message_id, destination, self.c.actor(request), requeue=True, reason=reason)
                elif action == "discard":
                    await self.four_eyes.request("deadletter.discard", f"{message_id} {destination}",
                                                 {"message_id": message_id, "destination": destination},
                                                 reason, self.c.actor(request))
                else:
                    raise Refused(400, "unknown action", audit=False)
                done += 1
            except GatewayError as exc:
                problems.append(f"{message_id} → {destination}: {exc}")
        if action == "requeue" and done:
            self.c.wake_outbox()
        if problems:
            raise Refused(409, f"{done} done; not done: " + "; ".join(problems), audit=False)
        what = "requeued" if action == "requeue" else "discard+requested+(waiting+for+a+second+person)"
        raise web.HTTPSeeOther(f"/console/dead-letters?done={done}+{what}")

    @page("messages.read")
    async def quarantine(self, request: web.Request) -> web.Response:
        rows = await self.c.store.quarantine.held("held", limit=500)
        return self.c.render(request, "quarantine.html", {"rows": rows})

    @page("messages.read")
    async def quarantine_entry(self, request: web.Request) -> web.Response:
        entry = await self.c.store.quarantine.entry(request.match_info["id"])
        if entry is None:
            raise Refused(404, "no such quarantined message", audit=False)
        waiting = [a for a in await self.four_eyes.requests("pending")
                   if a.kind == "quarantine.release" and a.target == entry.message_id]
        return self.c.render(request, "quarantine_entry.html", {"e": entry, "waiting": waiting})

    @page("messages.act")
    async def quarantine_release(self, request: web.Request) -> web.StreamResponse:
        message_id = request.match_info["id"]
        note = str((await request.post()).get("note", "")).strip()[:500]
        if not note:
            raise Refused(400, "say why the invoice may be released (for example: account confirmed by phone with ...)",
                          audit=False)
        entry = await self.c.store.quarantine.entry(message_id)
        if entry is None or entry.state != "held":
            raise Refused(409, "this invoice is not held (any more)", audit=False)
        try:
            await self.four_eyes.request("quarantine.release", message_id, {"message_id": message_id,
                                                                            "partner": entry.partner},
                                         note, self.c.actor(request), entry.partner, message_id)
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
            await self.c.store.quarantine.decide(message_id, False, self.c.actor(request), note)
        except GatewayError as exc:
            raise Refused(409, str(exc), audit=False) from None
        raise web.HTTPSeeOther("/console/quarantine?done=rejected")


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
