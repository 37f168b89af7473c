"""The audit pages: the log, searched; a check of its hash chain and seals; a signed export."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from aiohttp import web

from ..operations import audit as audit_mod
from ..operations.audit import trusted_certificates, unsealed_limit
from .context import ConsoleContext
from .guard import Refused, page


class AuditPages:
    """Handlers for ``/console/audit…``."""

    def __init__(self, console: ConsoleContext):
        self.c = console

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/audit", self.audit)
        r.add_post("/audit/verify", self.audit_verify)
        r.add_get("/audit/export", self.audit_export)

    @page("audit.read")
    async def audit(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            before = int(q["before"]) if q.get("before") else None
        except ValueError:
            before = None
        rows = await self.c.store.audit.page(actor=q.get("actor", "").strip(), action=q.get("action", "").strip(),
                                             partner=q.get("partner", "").strip(), before=before)
        return self.c.render(request, "audit.html", {"rows": rows, "q": q, "report": None})

    @page("audit.read")
    async def audit_verify(self, request: web.Request) -> web.Response:
        records = await audit_mod.read_chain(self.c.store.audit)
        report = await self.c.run(lambda: audit_mod.verify(records, trusted_certificates(self.c.config),
                                                           max_unsealed_s=unsealed_limit(self.c.config)))
        await self.c.store.audit.append(self.c.actor(request), "console.audit_verified", None, None,
                                        {"ok": report.ok, "records": report.records})
        return self.c.render(request, "audit.html", {"rows": [], "q": {}, "report": report})

    @page("audit.export")
    async def audit_export(self, request: web.Request) -> web.StreamResponse:
        """Records ``from``..``to`` as the CLI's export format, closed by a line signed with the gateway's
        signing key over the SHA-256 of everything before it."""
        try:
            first = int(request.query.get("from") or 0) or None
            last = int(request.query.get("to") or 0) or None
        except ValueError:
            raise Refused(400, "from and to are record numbers", audit=False) from None
        signer = self.c.signer()
        if signer is None:
            raise Refused(409, "a signed export needs the [signing] key, which is not configured", audit=False)

        records = await audit_mod.read_chain(self.c.store.audit, first, last)

        def build() -> bytes:
            body = audit_mod.export_text(records, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")).encode()
            return body + (json.dumps(audit_mod.export_seal(signer, body)) + "\n").encode()

        body, n = await self.c.run(build), len(records)
        await self.c.store.audit.append(self.c.actor(request), "console.audit_exported", None, None,
                                        {"from": first, "to": last, "records": n})
        return web.Response(body=body, content_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="audit-{first or 1}-{last or "head"}.jsonl"'})
