"""The console's partner pages: the allowlist, a partner's certificates and bank settings.

What an administrator may do alone (fresh authentication, audited): add a partner — it starts
*pending* and sends nothing —, edit its e-mail addresses, identifiers, endpoint and signature
policy, suspend and resume it.

What needs a second administrator (a four-eyes request, ``approvals``):

* ``partner.activate``: a pending partner becomes active once the approver has confirmed every
  certificate's SHA-256 fingerprint with the partner by another channel (telephone, letter) and
  typed it in; the gateway compares it with the certificate before anything changes.
* ``partner.certificates``: a new certificate (again confirmed by fingerprint), accepted from an
  activation date; current certificates retired at a date (old and new are both accepted in
  between: a rollover) or removed at once.
* ``partner.bank``: amount ceilings, and the payee accounts registered as the partner's own or
  blocked (an invoice naming an account that is not the partner's is held for review).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import quote

from aiohttp import web
from multidict import MultiDictProxy

from ..errors import ConfigError
from ..identifiers import parse_email, parse_party_id
from ..model import Partner, PartnerStatus, SignaturePolicy
from ..partners.book import NAME, PURPOSES, editing, instant_text, parse_ceiling, parse_endpoint, parse_instant
from ..partners.edit import (
    OPTION,
    activated,
    certificates_of,
    edit_partners,
    inspect_as,
    register_partner,
    rollover,
    unconfirmed,
    with_status,
)
from ..stages.fraud import iban_valid, looks_like_iban, normalise
from ..storage.base import AccountError
from ..storage.records import Approval
from ..tls import CertInfo, cert_sha256, email_addresses
from .context import ConsoleContext
from .guard import CTX, Refused, page

MAX_PEM = 64 * 1024  # one certificate, pasted or uploaded
MAX_LINES = 50  # identifiers, addresses, accounts or ceilings in one form field
PURPOSE_LABEL = {"client": "client (TLS)", "signing": "document signing", "smime": "S/MIME"}
KINDS = ("partner.activate", "partner.certificates", "partner.bank")  # the four-eyes requests this module carries out


def _lines(form: MultiDictProxy[Any], key: str) -> list[str]:
    value = form.get(key, "")
    found = [x.strip() for x in str(value).splitlines() if x.strip()] if isinstance(value, str) else []
    if len(found) > MAX_LINES:
        raise ConfigError(f"{key}: at most {MAX_LINES} lines")
    return found


def _pem(form: MultiDictProxy[Any], key: str) -> bytes | None:
    """A certificate pasted into ``<key>_pem`` or uploaded as ``<key>_file``."""
    upload = form.get(f"{key}_file")
    data = upload.file.read(MAX_PEM + 1) if isinstance(upload, web.FileField) else str(form.get(f"{key}_pem", "")).encode()
    if len(data) > MAX_PEM:
        raise ConfigError(f"{key}: a certificate is at most {MAX_PEM // 1024} KiB")
    return data if data.strip() else None


def _inspect(purpose: str, pem: bytes) -> CertInfo:
    info = inspect_as(purpose, pem, f"{PURPOSE_LABEL[purpose]} certificate")
    if info.not_after < datetime.now(UTC):
        raise ConfigError(f"{PURPOSE_LABEL[purpose]} certificate: {info.subject} expired on {info.not_after:%Y-%m-%d}")
    return info


def _account(text: str) -> str:
    account = normalise(text)
    if not re.fullmatch(r"[A-Z0-9]{5,34}", account):
        raise ConfigError(f"accounts: {text!r} is not an account number (an IBAN, or 5-34 letters and digits)")
    if looks_like_iban(account) and not iban_valid(account):
        raise ConfigError(f"accounts: {text!r} fails the IBAN check digits (ISO 13616); check it with the partner")
    return account


def describe(kind: str, p: Mapping[str, Any]) -> list[str]:
    """What a partner request would change, line by line, for the approvals page."""
    if kind == "partner.activate":
        return [f"activate: confirm the SHA-256 fingerprint of {len(p['certificates'])} certificate(s) with the partner"]
    if kind == "partner.certificates":
        out = []
        if p.get("add"):
            a = p["add"]
            out.append(f"add a {PURPOSE_LABEL[a['purpose']]} certificate: {a['subject']}, expires {a['not_after'][:10]}, "
                       f"accepted {'from ' + p['start'] if p.get('start') else 'at once'}")
        out += [f"retire the certificate with key SHA-256 {k[:16]}… at {at}" for k, at in sorted(p.get("retire", {}).items())]
        out += [f"remove the certificate with key SHA-256 {k[:16]}… now" for k in p.get("remove", [])]
        return out
    out = []
    if p.get("ceilings") is not None:
        out.append(f"amount ceilings: {', '.join(p['ceilings']) or 'none (no amount is held)'}")
    out += [f"register payee account {a} as the partner's own" for a in p.get("known", [])]
    out += [f"block payee account {a} (invoices naming it are held)" for a in p.get("blocked", [])]
    return out


class PartnerPages:
    """Handlers for ``/console/partners…``, and the partner requests' confirmation and execution."""

    def __init__(self, console: ConsoleContext):
        self.c = console

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/partners", self.partners)
        r.add_get("/partners/new", self.new_page)  # before /partners/{name}
        r.add_post("/partners/new", self.add)
        r.add_get("/partners/{name}", self.partner)
        r.add_post("/partners/{name}/edit", self.edit)
        r.add_post("/partners/{name}/certificates", self.certificates)
        r.add_post("/partners/{name}/bank", self.bank)
        r.add_post("/partners/{name}/{action}", self.act)

    def _get(self, name: str) -> Partner:
        found = self.c.directory().get(name)
        if found is None:
            raise Refused(404, "no such partner", audit=False)
        return found

    async def _changed(self) -> None:
        """The console wrote the partners file: take it in now, so the next page shows the change."""
        if self.c.partners_changed is not None:
            await self.c.partners_changed()

    async def _again(self, request: web.Request, exc: ConfigError) -> web.Response:
        """The partner's page again, with what was wrong in the form (400)."""
        request[CTX].error, request[CTX].status = str(exc), 400
        return await self.partner(request)

    # --- pages --------------------------------------------------------------------------------

    @page("partners.read")
    async def partners(self, request: web.Request) -> web.Response:
        return self.c.render(request, "partners.html", {"partners": sorted(self.c.directory().partners, key=lambda p: p.name)})

    @page("partners.manage")
    async def new_page(self, request: web.Request) -> web.Response:
        form = await request.post() if request.method == "POST" else {}
        kept = {k: str(form.get(k, "")) for k in ("name", "party_ids", "emails", "endpoint", "signature_policy")}
        return self.c.render(request, "partner_new.html", {"error": request[CTX].error, "form": kept,
                                                            "policies": [p.value for p in SignaturePolicy]},
                             request[CTX].status)

    @page("partners.read")
    async def partner(self, request: web.Request) -> web.Response:
        p = self._get(request.match_info["name"])
        now = datetime.now(UTC)
        certs = []
        for purpose, path, info in await self.c.run(certificates_of, p):
            w = p.window(purpose, path)
            start, end = (w.start, w.end) if w else (None, None)
            certs.append({"purpose": PURPOSE_LABEL[purpose], "info": info, "sha256": cert_sha256(info.cert),
                          "from": instant_text(start) if start else "", "until": instant_text(end) if end else "",
                          "state": "expired" if info.not_after < now else "not yet accepted" if start and now < start
                          else "retired" if end and now >= end else "accepted"})
        waiting = [dataclasses.asdict(a) | {"lines": describe(a.kind, a.params)}
                   for a in await self.c.store.approvals.requests("pending") if a.kind in KINDS and a.target == p.name]
        accounts = await self.c.store.quarantine.seller_accounts(p.name)
        return self.c.render(request, "partner.html", {
            "p": p, "certs": certs, "waiting": waiting, "accounts": accounts, "error": request[CTX].error,
            "purposes": PURPOSE_LABEL, "policies": [x.value for x in SignaturePolicy],
            "ceilings": "\n".join(f"{c}:{v}" for c, v in p.amount_ceilings)}, request[CTX].status)

    # --- what an administrator does alone -----------------------------------------------------

    @page("partners.manage", fresh=True)
    async def add(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name = str(form.get("name", "")).strip()
        try:
            if not NAME.match(name) or name == "new":
                raise ConfigError("name: 1-64 letters, digits, '.', '_' or '-' (and not 'new')")
            ids = [parse_party_id(v, f"party_ids[{i}]") for i, v in enumerate(_lines(form, "party_ids"))]
            if not ids:
                raise ConfigError("party_ids: give at least one supplier identifier (scheme:value, e.g. 0088:5790000435975)")
            emails = [parse_email(v, f"emails[{i}]") for i, v in enumerate(_lines(form, "emails"))]
            endpoint = str(form.get("endpoint", "")).strip()
            certs = {purpose: _pem(form, purpose) for purpose in PURPOSES}
            for purpose, pem in certs.items():
                if pem is not None:
                    _inspect(purpose, pem)
            if certs["client"] is None and certs["smime"] is None:
                raise ConfigError("certificates: a partner needs a client certificate (HTTPS) or an S/MIME certificate "
                                  "(e-mail) that proves who it is")
            if certs["smime"] is not None and not emails:
                raise ConfigError("emails: a partner sending by e-mail needs the address(es) it sends from")
            policy = SignaturePolicy(str(form.get("signature_policy", SignaturePolicy.IF_PRESENT.value)))
            client, signing, smime = ([c for c in (certs[k],) if c is not None] for k in PURPOSES)

            def write() -> None:
                register_partner(self.c.config.partners_file, name, client, ids, emails, "", signing, policy,
                                 endpoint=parse_endpoint(endpoint, "endpoint") if endpoint else "", smime_certs=smime,
                                 pending=True)

            await self.c.run(write)
            await self._changed()
        except (ConfigError, ValueError) as exc:
            request[CTX].error = str(exc) if isinstance(exc, ConfigError) else "signature_policy: not a known policy"
            request[CTX].status = 400
            return await self.new_page(request)
        await self.c.store.audit.append(self.c.actor(request), "partner.added", name, None,
                                             {"party_ids": sorted(ids), "status": "pending",
                                              "certificates": sorted(k for k, v in certs.items() if v is not None)})
        raise web.HTTPSeeOther(f"/console/partners/{quote(name)}?done=added,+pending+activation:+request+it+below")

    @page("partners.manage", fresh=True)
    async def edit(self, request: web.Request) -> web.StreamResponse:
        name = self._get(request.match_info["name"]).name
        form = await request.post()
        try:
            ids = frozenset(parse_party_id(v, f"party_ids[{i}]") for i, v in enumerate(_lines(form, "party_ids")))
            if not ids:
                raise ConfigError("party_ids: a partner needs at least one supplier identifier")
            emails = tuple(dict.fromkeys(parse_email(v, f"emails[{i}]") for i, v in enumerate(_lines(form, "emails"))))
            text = str(form.get("endpoint", "")).strip()
            endpoint = parse_endpoint(text, "endpoint") if text else ""
            policy = SignaturePolicy(str(form.get("signature_policy", "")))
        except ValueError:
            return await self._again(request, ConfigError("signature_policy: not a known policy"))
        except ConfigError as exc:
            return await self._again(request, exc)
        changed: list[str] = []

        def write() -> None:
            with editing(self.c.config.partners_file) as partners:
                i = next(i for i, p in enumerate(partners) if p.name == name)
                old = partners[i]
                new = replace(old, party_ids=ids, emails=emails, endpoint=endpoint, signature_policy=policy)
                changed.extend(f for f in ("party_ids", "emails", "endpoint", "signature_policy")
                               if getattr(old, f) != getattr(new, f))
                partners[i] = new

        try:
            await self.c.run(write)
        except ConfigError as exc:
            return await self._again(request, exc)
        await self._changed()
        await self.c.store.audit.append(self.c.actor(request), "partner.edited", name, None,
                                             {"changed": changed, "party_ids": sorted(ids), "emails": list(emails),
                                              "endpoint": endpoint, "signature_policy": policy.value})
        raise web.HTTPSeeOther(f"/console/partners/{quote(name)}?done=saved+(takes+effect+within+seconds)")

    @page("partners.manage", fresh=True)
    async def act(self, request: web.Request) -> web.StreamResponse:
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ("suspend", "resume", "activate"):
            raise Refused(404, "no such action", audit=False)
        p = self._get(name)
        reason = str((await request.post()).get("reason", "")).strip()[:500]
        if (action == "activate") != (p.status is PartnerStatus.PENDING):
            raise Refused(409, f"partner {name!r} is pending activation: request the activation (a second administrator "
                          "confirms the certificate fingerprints with the partner)" if action != "activate" else
                          f"partner {name!r} is {p.status.value}, not pending activation", audit=False)
        if action == "activate":
            certs = [{"purpose": purpose, "subject": info.subject, "spki": info.spki_sha256}
                     for purpose, _, info in await self.c.run(certificates_of, p)]
            await self._request(request, "partner.activate", name, {"certificates": certs}, reason,
                                "activation+requested:+a+second+administrator+confirms+the+fingerprints+with+the+"
                                "partner+and+approves")
        status = PartnerStatus.SUSPENDED if action == "suspend" else PartnerStatus.ACTIVE

        def write() -> None:
            with editing(self.c.config.partners_file) as partners:
                i = next(i for i, x in enumerate(partners) if x.name == name)
                partners[i] = with_status(partners[i], status)

        await self.c.run(write)
        await self._changed()
        done = {"suspend": "suspended", "resume": "resumed"}[action]
        await self.c.store.audit.append(self.c.actor(request), f"partner.{done}", name, None, {"reason": reason})
        raise web.HTTPSeeOther(f"/console/partners/{quote(name)}?done={done}+(takes+effect+within+seconds)")

    # --- four-eyes requests -------------------------------------------------------------------

    async def _request(self, request: web.Request, kind: str, name: str, params: dict[str, Any], reason: str,
                       done: str) -> NoReturn:
        """Record a four-eyes request, then back to the partner's page saying ``done``.  Its audit record
        names the change without any fingerprint in full (the approver must get those from the partner,
        not from the log)."""
        if not reason:
            raise Refused(400, "give a reason: the second administrator decides on it", audit=False)
        try:
            await self.c.store.approvals.request(kind, name, params, reason, self.c.actor(request), name,
                                                 shown={"changes": describe(kind, params)})
        except AccountError as exc:
            raise Refused(409, str(exc), audit=False) from None
        raise web.HTTPSeeOther(f"/console/partners/{quote(name)}?done={done}")

    @page("partners.manage", fresh=True)
    async def certificates(self, request: web.Request) -> web.StreamResponse:
        p = self._get(request.match_info["name"])
        form = await request.post()
        reason = str(form.get("reason", "")).strip()[:500]
        current = {info.spki_sha256 for _, _, info in await self.c.run(certificates_of, p)}
        try:
            purpose = str(form.get("purpose", "client"))
            if purpose not in PURPOSES:
                raise ConfigError("purpose: client, signing or smime")
            pem = _pem(form, "new")
            params: dict[str, Any] = {"add": None, "start": None, "retire": {}, "remove": []}
            if pem is not None:
                info = _inspect(purpose, pem)
                if info.spki_sha256 in current:
                    raise ConfigError(f"certificate: this key is registered for {p.name!r} already")
                params["add"] = {"purpose": purpose, "pem": pem.decode("ascii", "replace"), "subject": info.subject,
                                 "spki": info.spki_sha256, "sha256": cert_sha256(info.cert),
                                 "not_after": info.not_after.isoformat(),
                                 "addresses": sorted(email_addresses(info.cert)) if purpose == "smime" else []}
                if str(form.get("start", "")).strip():
                    params["start"] = instant_text(parse_instant(str(form["start"]).strip(), "start"))
            retire = [k for k in current if form.get(f"retire_{k[:16]}")]  # the form names keys by a prefix only
            remove = sorted(k for k in current if form.get(f"remove_{k[:16]}"))
            if retire:
                text = str(form.get("retire_at", "")).strip()
                if not text:
                    raise ConfigError("retire_at: give the date the retired certificate(s) stop being accepted")
                at = instant_text(parse_instant(text, "retire_at"))
                if params["start"] and at <= params["start"]:
                    raise ConfigError("retire_at: must be later than the new certificate's start, so both are accepted "
                                      "for a while (the overlap)")
                params["retire"] = dict.fromkeys(sorted(retire), at)
            params["remove"] = remove
            if set(retire) & set(remove):
                raise ConfigError("a certificate is either retired at a date or removed now, not both")
            if not (params["add"] or retire or remove):
                raise ConfigError("nothing to change: add a certificate, or choose one to retire or remove")
        except ConfigError as exc:
            return await self._again(request, exc)
        await self._request(request, "partner.certificates", p.name, params, reason,
                            "certificate+change+requested:+a+second+administrator+confirms+the+fingerprint+with+"
                            "the+partner+and+approves")

    @page("partners.manage", fresh=True)
    async def bank(self, request: web.Request) -> web.StreamResponse:
        p = self._get(request.match_info["name"])
        form = await request.post()
        reason = str(form.get("reason", "")).strip()[:500]
        seen = [a.account for a in await self.c.store.quarantine.seller_accounts(p.name)]
        try:
            ceilings = [parse_ceiling(v, f"ceilings[{i}]") for i, v in enumerate(_lines(form, "ceilings"))]
            shown = [f"{c}:{v}" for c, v in sorted(dict(ceilings).items())]
            before = [f"{c}:{v}" for c, v in sorted(p.amount_ceilings)]
            known = sorted({_account(a) for a in _lines(form, "known")})
            blocked = sorted(a for a in seen if form.get(f"block_{a}"))
            params = {"ceilings": shown if shown != before else None, "known": known, "blocked": blocked}
            if set(known) & set(blocked):
                raise ConfigError("accounts: an account is either registered or blocked, not both")
            if params["ceilings"] is None and not known and not blocked:
                raise ConfigError("nothing to change")
        except ConfigError as exc:
            return await self._again(request, exc)
        await self._request(request, "partner.bank", p.name, params, reason,
                            "bank+settings+change+requested:+a+second+administrator+must+approve+it")

    # --- deciding and carrying out ------------------------------------------------------------

    def to_confirm(self, found: Approval) -> list[CertInfo]:
        """The certificates whose fingerprints the approver must confirm with the partner."""
        if found.kind == "partner.activate":
            p = self.c.directory().get(found.target)
            return [info for _, _, info in certificates_of(p)] if p is not None else []
        if found.kind == "partner.certificates" and found.params.get("add"):
            a = found.params["add"]
            return [inspect_as(a["purpose"], a["pem"].encode(), f"{PURPOSE_LABEL[a['purpose']]} certificate")]
        return []

    def confirm(self, found: Approval, fingerprints: list[str], how: str) -> None:
        """Refuse an approval whose fingerprints do not match (nothing is decided then)."""
        certs = self.to_confirm(found)
        if not certs:
            return
        if not how:
            raise ConfigError("say how you confirmed the fingerprint with the partner (who, which channel, when)")
        problems = unconfirmed(certs, fingerprints)
        if problems:
            raise ConfigError("not approved: " + "; ".join(problems) + ". Ask the partner to read the fingerprint "
                              "out again (openssl x509 -noout -fingerprint -sha256 -in CERT)")

    async def carry_out(self, found: Approval, actor: str, fingerprints: list[str], how: str) -> str:
        """Do what an approved partner request asks; ConfigError when it cannot be done."""
        kind, name, p = found.kind, found.target, found.params
        by = f"{actor} (confirmed: {how}; requested by {found.requested_by})"
        detail: dict[str, Any] = {"request": found.id, "requested_by": found.requested_by}
        file = self.c.config.partners_file
        if kind == "partner.activate":
            def activate(partners: list[Partner], _store: Callable[..., str]) -> None:
                i = self._index(partners, name)
                partners[i] = activated(partners[i], fingerprints, by)

            await self.c.run(edit_partners, file, name, activate)
            await self._changed()
            await self.c.store.audit.append(actor, "partner.activated", name, None, detail | {"confirmed": how})
            return "activated"
        if kind == "partner.certificates":
            def change(partners: list[Partner], store: Callable[..., str]) -> None:
                i = self._index(partners, name)
                a = p.get("add")
                added = [(a["purpose"], store(a["pem"].encode(), OPTION[a["purpose"]]), a["spki"])] if a else []
                partners[i] = rollover(partners[i], added, parse_instant(p["start"], "start") if p.get("start") else None,
                                       {k: parse_instant(v, "retire") for k, v in p.get("retire", {}).items()},
                                       frozenset(p.get("remove", [])))

            await self.c.run(edit_partners, file, name, change)
            await self._changed()
            await self.c.store.audit.append(actor, "partner.certificates_changed", name, None, detail | {
                "added": p["add"]["spki"] if p.get("add") else None, "start": p.get("start"), "retire": p.get("retire", {}),
                "remove": p.get("remove", []), **({"confirmed": how} if p.get("add") else {})})
            return "certificates changed"
        if kind == "partner.bank":
            if p.get("ceilings") is not None:
                ceilings = tuple(parse_ceiling(c, "ceilings") for c in p["ceilings"])

                def set_ceilings(partners: list[Partner], _store: Callable[..., str]) -> None:
                    i = self._index(partners, name)
                    partners[i] = replace(partners[i], amount_ceilings=ceilings)

                await self.c.run(edit_partners, file, name, set_ceilings)
                await self._changed()
            await self.c.store.quarantine.set_accounts(name, p.get("known", []), p.get("blocked", []), actor,
                                                       f"{found.reason} (request {found.id}, requested by "
                                                       f"{found.requested_by}, ceilings: {p.get('ceilings')})")
            return "bank settings changed"
        raise ConfigError(f"unknown request kind {kind}")

    @staticmethod
    def _index(partners: list[Partner], name: str) -> int:
        i = next((i for i, x in enumerate(partners) if x.name == name), None)
        if i is None:
            raise ConfigError(f"partner {name!r} no longer exists")
        return i

