"""``einvoice-gateway partners …``: the allowlist (the partners file; the daemon re-reads it within seconds).

Every change is an audit record naming who made it, sealed by a signed checkpoint at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config.load import load
from ..config.model import Config
from ..errors import Forbidden
from ..identifiers import keys_of, parse_email, parse_party_id, party_key
from ..model import Partner, PartnerStatus, SignaturePolicy
from ..operations.audit import record as record_audit
from ..operations.housekeeping import expiring, inventory
from ..partners.book import editing, instant_text, load_directory, parse_ceiling, parse_endpoint, parse_instant
from ..partners.directory import PartnerDirectory
from ..partners.edit import activated, certificates_of, edit_partners, register_partner, rollover, with_status
from ..stages.revocation import Revocation, RevocationPolicy
from ..stages.rules import merge, rule_specs
from ..tls import ca_certificates, cert_sha256, email_addresses, expires_soon, inspect_certificate
from .common import actor, opened, with_by, with_config, with_json
from .errors import NotFound, Refused, UsageError, said_as
from .output import Column, listing, print_json, record


def add_parsers(sub: Any) -> None:
    pa = sub.add_parser("partners", help="manage the partner allowlist (takes effect without a restart)")
    psub = pa.add_subparsers(dest="action", required=True)
    add = with_config(psub.add_parser("add", help="register a partner"))
    add.add_argument("name", help="the partner's name (1-64 letters, digits, '.', '_' or '-')")
    add.add_argument("--client-cert", action="append", default=[],
                     help="partner's TLS client certificate (PEM); repeat for rollover (a partner needs this or --smime-cert)")
    add.add_argument("--party-id", action="append", required=True, help="supplier identifier, scheme:value (e.g. 0088:5790000435975)")
    add.add_argument("--email", action="append", default=[], help="an address the partner sends invoices from (repeatable)")
    add.add_argument("--verified-by", help="who verified this partner (default: who runs the command, as the audit log "
                                           "records it)")
    add.add_argument("--signing-cert", action="append", default=[], help="certificate (PEM) the partner signs invoices with")
    add.add_argument("--signature-policy", choices=[p.value for p in SignaturePolicy], default=SignaturePolicy.IF_PRESENT.value,
                     help="required: unsigned invoices are refused; if-present (default): a signature must be valid; "
                          "ignore: signatures are not checked")
    add.add_argument("--smime-cert", action="append", default=[],
                     help="partner's S/MIME certificate (PEM): signs its e-mail, and mail to it is encrypted to it")
    rules_options(add)
    ed = with_config(psub.add_parser("edit", help="add or remove certificates and identifiers, set the signature policy"))
    ed.add_argument("name", help="the partner to change")
    ed.add_argument("--client-cert", action="append", default=[], help="add a client certificate (rollover)")
    ed.add_argument("--signing-cert", action="append", default=[], help="add a document-signing certificate")
    ed.add_argument("--smime-cert", action="append", default=[], help="add an S/MIME certificate (rollover)")
    ed.add_argument("--remove-cert", action="append", default=[], metavar="SPKI",
                    help="remove the client, signing or S/MIME certificate whose key SHA-256 starts with this (>= 16 hex digits)")
    ed.add_argument("--active-from", metavar="DATE",
                    help="the certificates this command adds are accepted from DATE (2027-01-31 or 2027-01-31T12:00:00Z)")
    ed.add_argument("--retire-cert", action="append", default=[], metavar="SPKI",
                    help="the certificate whose key SHA-256 starts with this stops being accepted at --retire-at "
                         "(a rollover: old and new are accepted until then)")
    ed.add_argument("--retire-at", metavar="DATE", help="when the --retire-cert certificates stop being accepted")
    ed.add_argument("--remove-email", action="append", default=[], metavar="ADDR", help="remove a sending address")
    ed.add_argument("--party-id", action="append", default=[], metavar="ID", help="add a supplier identifier (scheme:value)")
    ed.add_argument("--remove-party-id", action="append", default=[], metavar="ID",
                    help="remove a supplier identifier (found in any of its written forms)")
    ed.add_argument("--email", action="append", default=[], metavar="ADDR", help="add a sending address")
    ed.add_argument("--signature-policy", choices=[p.value for p in SignaturePolicy],
                    help="required, if-present or ignore (see partners add --help)")
    rules_options(ed)
    ed.add_argument("--default-rules", action="store_true", help="use the configured rules.default again")
    ed.add_argument("--remove-amount-ceiling", action="append", default=[], metavar="CURRENCY",
                    help="remove the amount ceiling of this currency")
    ed.add_argument("--remove-endpoint", action="store_true", help="send nothing to this partner any more")
    with_json(with_config(psub.add_parser("list", help="list partners")))
    with_json(with_config(psub.add_parser("check", help="expired and expiring certificates, and revocation status (exit 1 "
                                          "if any certificate is expired or revoked)")), "the findings")
    sh = with_config(psub.add_parser("show", help="a partner: identifiers, addresses, certificates with their fingerprints"))
    sh.add_argument("name", help="the partner's name")
    with_json(sh, "it")
    for action, what in (("suspend", "refuse a partner's invoices until it is resumed"),
                         ("resume", "accept a suspended partner's invoices again"),
                         ("remove", "remove a partner from the allowlist (its stored invoices stay)")):
        sp = with_config(psub.add_parser(action, help=what))
        sp.add_argument("name", help="the partner's name")
    act = with_config(psub.add_parser("activate", help="activate a partner added in the console, once the partner has "
                                      "confirmed each certificate's SHA-256 fingerprint by another channel"))
    act.add_argument("name", help="the pending partner's name")
    act.add_argument("--fingerprint", action="append", default=[], required=True,
                     help="a certificate's SHA-256 fingerprint (or its key's), as read out by the partner; one per certificate")
    for action in ("add", "edit", "suspend", "resume", "remove", "activate"):
        with_by(psub.choices[action])


def rules_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--endpoint", metavar="URL",
                    help="where invoices for this partner are sent: https://… (another einvoice-gateway: …/v1/invoices) "
                         "or mailto:ADDRESS (S/MIME through [smarthost])")
    sp.add_argument("--sign-outbound", action=argparse.BooleanOptionalAction, default=None,
                    help="sign invoices sent to this partner with the gateway's [signing] key")
    sp.add_argument("--smime-signed-only", action=argparse.BooleanOptionalAction, default=None,
                    help="accept e-mail from this partner that is signed but not encrypted (default: sign, then encrypt)")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--rules", metavar="PACK[,PACK…]", help="business rule packs for this partner (default: rules.default)")
    group.add_argument("--no-rules", action="store_true",
                       help="check this partner's invoices against no business rules (warned at every start)")
    sp.add_argument("--amount-ceiling", action="append", default=[], metavar="CUR:AMOUNT",
                    help="hold invoices over this payable amount for review, e.g. EUR:50000 (repeat per currency; "
                         "invoices in a currency without a ceiling are then held too)")


def _chosen_rules(args: argparse.Namespace, cfg: Config) -> tuple[str, ...] | None:
    """The --rules/--no-rules choice, checked against the configured packs; None: no choice made."""
    if args.no_rules:
        print("warning: this partner's invoices will not be checked against any business rules", file=sys.stderr)
        return ()
    if not args.rules:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in args.rules.split(",") if n.strip()))
    known = merge(rule_specs(cfg))
    for n in names:
        if n not in known:
            raise NotFound(f"--rules: no rule pack named {n!r} (configured: {', '.join(sorted(known))})")
    return names


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.action == "check":
        return check(cfg, args.json)
    path = cfg.partners_file
    directory = load_directory(path)  # a broken partners file is a configuration error, before anything is asked of it
    if args.action == "list":
        return listing(directory.partners, args.json, PARTNERS, "no partners (add one: einvoice-gateway partners add)",
                       summary)
    if args.action == "add":
        return _add(cfg, args)
    partner = directory.get(args.name)
    if partner is None:
        raise NotFound(f"no partner named {args.name!r} (see: einvoice-gateway partners list)")
    if args.action == "show":
        return record(shown(partner, cfg), args.json)
    if args.action == "edit":
        rules = _chosen_rules(args, cfg)
        with said_as(Refused):
            _edit_partner(path, args, rules)
        _audit_partner(cfg, args, "partner.edited", {"changed": sorted(
            k for k, v in vars(args).items() if k not in ("command", "action", "name", "config", "by")
            and v not in (None, [], False))})
        print(f"partner {args.name!r} edited; the running gateway picks it up within seconds")
        return 0
    with said_as(Refused), editing(path) as partners:
        idx = next((i for i, p in enumerate(partners) if p.name == args.name), None)
        if idx is None:  # removed meanwhile
            raise NotFound(f"no partner named {args.name!r} (see: einvoice-gateway partners list)")
        if args.action == "remove":
            del partners[idx]
        elif args.action == "activate":
            partners[idx] = activated(partners[idx], args.fingerprint, actor(args.by))
        elif partners[idx].status is PartnerStatus.PENDING:
            raise Refused(f"partners {args.action}: {args.name!r} is pending activation; confirm its certificate "
                          f"fingerprints with `partners activate {args.name} --fingerprint …`")
        else:
            partners[idx] = with_status(partners[idx], PartnerStatus.SUSPENDED if args.action == "suspend" else PartnerStatus.ACTIVE)
    _audit_partner(cfg, args, {"remove": "partner.removed", "suspend": "partner.suspended",
                               "activate": "partner.activated"}.get(args.action, "partner.resumed"), {})
    print(f"partner {args.name!r}: {args.action} done")
    return 0


def _add(cfg: Config, args: argparse.Namespace) -> int:
    certs = [Path(c) for c in args.client_cert]
    smime = [Path(c) for c in args.smime_cert]
    for option, paths in (("--client-cert", certs), ("--smime-cert", smime)):
        for i, c in enumerate(paths):
            if not c.is_file():
                raise UsageError(f"{option}[{i}]: {c} not found")
    if not certs and not smime:
        raise UsageError("partners add: give --client-cert (HTTPS) and/or --smime-cert (e-mail): the certificate "
                         "that proves it is this partner")
    with said_as(UsageError):
        ids = [parse_party_id(v, f"--party-id[{i}]") for i, v in enumerate(args.party_id)]
        emails = [parse_email(e, f"--email[{i}]") for i, e in enumerate(args.email)]
        ceilings = tuple(parse_ceiling(v, f"--amount-ceiling[{i}]") for i, v in enumerate(args.amount_ceiling))
        endpoint = parse_endpoint(args.endpoint, "--endpoint") if args.endpoint else ""
    if smime and not emails:
        raise UsageError("--email: a partner sending by e-mail needs the address(es) it sends from (--email ADDR)")
    rules = _chosen_rules(args, cfg)
    with said_as(Refused):
        register_partner(cfg.partners_file, args.name, certs, ids, emails, args.verified_by or actor(args.by),
                         [Path(c) for c in args.signing_cert], SignaturePolicy(args.signature_policy),
                         rules=rules, ceilings=ceilings, endpoint=endpoint, sign_outbound=bool(args.sign_outbound),
                         smime_certs=smime, smime_signed_only=bool(args.smime_signed_only))
    _audit_partner(cfg, args, "partner.added", {"party_ids": sorted(ids), "client_certs": len(certs),
                                               "signing_certs": len(args.signing_cert), "smime_certs": len(smime),
                                               "emails": emails})
    print(f"partner {args.name!r} added; the running gateway picks it up within seconds")
    return 0


PARTNERS: list[Column[Partner]] = [
    ("name", lambda p: p.name), ("status", lambda p: p.status.value),
    ("certificates", lambda p: ", ".join(f"{n} {what}" for n, what in ((len(p.client_certs), "client"),
                                                                      (len(p.smime_certs), "S/MIME"),
                                                                      (len(p.signing_certs), "signing")) if n)),
    ("party ids", lambda p: ", ".join(sorted(p.party_ids))), ("emails", lambda p: ", ".join(p.emails))]


def summary(p: Partner) -> dict[str, Any]:
    """A partner in ``partners list --json``: what the table shows, the certificates counted."""
    return {"name": p.name, "status": p.status.value, "party_ids": sorted(p.party_ids), "emails": list(p.emails),
            "client_certs": len(p.client_certs), "smime_certs": len(p.smime_certs), "signing_certs": len(p.signing_certs),
            "signature_policy": p.signature_policy.value, "endpoint": p.endpoint or None,
            "verified_by": p.verified_by, "verified_at": p.verified_at}


def shown(partner: Partner, cfg: Config) -> dict[str, Any]:
    """Everything ``partners show`` tells of a partner, its certificates inspected."""
    listed: dict[str, list[dict[str, object]]] = {"client": [], "signing": [], "smime": []}
    for purpose, cert_path, info in certificates_of(partner):
        w = partner.window(purpose, cert_path)
        listed[purpose].append({
            "path": cert_path, "spki_sha256": info.spki_sha256, "sha256": cert_sha256(info.cert), "subject": info.subject,
            "not_after": info.not_after.isoformat(), "expires_within_30_days": expires_soon(info),
            **({"addresses": sorted(email_addresses(info.cert))} if purpose == "smime" else {}),
            **({"accepted_from": instant_text(w.start)} if w and w.start else {}),
            **({"accepted_until": instant_text(w.end)} if w and w.end else {})})
    return {"name": partner.name, "status": partner.status.value, "verified_by": partner.verified_by,
            "verified_at": partner.verified_at, "party_ids": sorted(partner.party_ids),
            "emails": list(partner.emails), "client_certs": listed["client"],
            "signature_policy": partner.signature_policy.value, "signing_certs": listed["signing"],
            "rules": list(partner.rules) if partner.rules is not None else f"default ({', '.join(cfg.rules_default)})",
            "amount_ceilings": {c: str(v) for c, v in partner.amount_ceilings},
            "endpoint": partner.endpoint or None, "sign_outbound": partner.sign_outbound,
            "smime_certs": listed["smime"], "smime_signed_only": partner.smime_signed_only}


def _audit_partner(cfg: Config, args: argparse.Namespace, action: str, detail: dict[str, Any]) -> None:
    """Every change to the allowlist is an audit record with who made it (the partners file itself keeps no history)."""
    async def write() -> None:
        async with opened(cfg) as store:
            await record_audit(cfg, store.audit, actor(args.by), action, args.name, detail)

    asyncio.run(write())


def _edit_partner(path: Path, args: argparse.Namespace, rules: tuple[str, ...] | None) -> None:
    with said_as(UsageError):
        add_emails = tuple(parse_email(e, f"--email[{i}]") for i, e in enumerate(args.email))
        drop_emails = {parse_email(e, f"--remove-email[{i}]") for i, e in enumerate(args.remove_email)}
        endpoint = parse_endpoint(args.endpoint, "--endpoint") if args.endpoint else None
        add_ids = {parse_party_id(v, f"--party-id[{i}]") for i, v in enumerate(args.party_id)}
        add_ceilings = dict(parse_ceiling(v, f"--amount-ceiling[{i}]") for i, v in enumerate(args.amount_ceiling))
        drop_ids = {parse_party_id(v, f"--remove-party-id[{i}]") for i, v in enumerate(args.remove_party_id)}
        start = parse_instant(args.active_from, "--active-from") if args.active_from else None
        retire_at = parse_instant(args.retire_at, "--retire-at") if args.retire_at else None
    if bool(args.retire_cert) != (retire_at is not None):
        raise UsageError("--retire-cert and --retire-at go together: which certificate (key SHA-256, >= 16 hex digits) "
                         "stops being accepted, and when")
    if start is not None and not (args.client_cert or args.signing_cert or args.smime_cert):
        raise UsageError("--active-from: it applies to the certificates this command adds; add one (--client-cert, "
                         "--signing-cert, --smime-cert)")

    def matching(p: Partner, prefixes: list[str], option: str) -> frozenset[str]:
        keys = {info.spki_sha256 for _, _, info in certificates_of(p)}
        found = set()
        for prefix in prefixes:
            if len(prefix) < 16:
                raise UsageError(f"{option}: {prefix!r} is too short; give at least 16 hex digits of the key SHA-256")
            hits = {k for k in keys if k.startswith(prefix.lower())}
            if not hits:
                raise NotFound(f"{option}: no registered certificate of {p.name!r} has a key SHA-256 starting {prefix!r}")
            found |= hits
        return frozenset(found)

    def change(partners: list[Partner], store: Callable[[Path | bytes, str], str]) -> None:
        idx = next((i for i, p in enumerate(partners) if p.name == args.name), None)
        if idx is None:  # removed meanwhile
            raise NotFound(f"no partner named {args.name!r} (see: einvoice-gateway partners list)")
        p = partners[idx]
        unknown = {i for i in drop_ids if party_key(i).key not in keys_of(p.party_ids)}  # in any of its forms
        if unknown:
            raise NotFound(f"--remove-party-id: {sorted(unknown)[0]!r} is not registered for {p.name!r}")
        ids: dict[str, str] = {}  # key → as written; one added that is registered in another form stays as registered
        for i in sorted(p.party_ids) + sorted(add_ids):
            if party_key(i).key not in keys_of(drop_ids):
                ids.setdefault(party_key(i).key, i)
        if drop_emails - set(p.emails):
            raise NotFound(f"--remove-email: {sorted(drop_emails - set(p.emails))[0]!r} is not registered for {p.name!r}")
        added = [(purpose, stored, inspect_certificate(Path(stored), option).spki_sha256)
                 for purpose, option, paths in (("client", "--client-cert", args.client_cert),
                                                ("signing", "--signing-cert", args.signing_cert),
                                                ("smime", "--smime-cert", args.smime_cert))
                 for stored in [store(Path(c), option) for c in paths]]
        retire = dict.fromkeys(matching(p, args.retire_cert, "--retire-cert"), retire_at) if retire_at else {}
        p = rollover(p, added, start, retire, matching(p, args.remove_cert, "--remove-cert"))
        partners[idx] = replace(
            p, party_ids=frozenset(ids.values()),
            emails=tuple(e for e in dict.fromkeys(p.emails + add_emails) if e not in drop_emails),
            smime_signed_only=p.smime_signed_only if args.smime_signed_only is None else args.smime_signed_only,
            signature_policy=SignaturePolicy(args.signature_policy) if args.signature_policy else p.signature_policy,
            rules=None if args.default_rules else rules if rules is not None else p.rules,
            amount_ceilings=tuple(sorted(({c: v for c, v in p.amount_ceilings if c not in args.remove_amount_ceiling}
                                          | add_ceilings).items())),
            endpoint="" if args.remove_endpoint else p.endpoint if endpoint is None else endpoint,
            sign_outbound=p.sign_outbound if args.sign_outbound is None else args.sign_outbound)

    edit_partners(path, args.name, change)


CERTIFICATES: list[Column[dict[str, Any]]] = [
    ("owner", lambda c: c["owner"]), ("purpose", lambda c: c["purpose"]), ("state", lambda c: c["state"]),
    ("not after", lambda c: c["not_after"][:10]), ("subject", lambda c: c["subject"]),
    ("key sha-256", lambda c: c["spki_sha256"][:16])]
CRLS: list[Column[dict[str, Any]]] = [
    ("crl issuer", lambda c: c["issuer"]), ("next update", lambda c: c["next_update"]),
    ("revoked", lambda c: c["revoked"]), ("file", lambda c: c["file"])]


def check(cfg: Config, as_json: bool) -> int:
    """Expired and expiring certificates (gateway and partners), and partner certificates' revocation status;
    exit 1 if any certificate is expired or revoked."""
    directory = load_directory(cfg.partners_file)
    horizon = max(cfg.operations.expiry_warn_days, default=30)
    found = [{"owner": e.owner, "purpose": e.purpose, "state": "EXPIRED" if days <= 0 else f"expires in {days:.0f} day(s)",
              "problem": days <= 0, "not_after": e.not_after.isoformat(), "subject": e.subject, "spki_sha256": e.spki_sha256}
             for e, days in expiring(inventory(cfg, directory), horizon)]
    revocation, crls = _revocation(cfg, directory)
    found += revocation
    problems = sum(bool(c["problem"]) for c in found)
    if as_json:
        print_json({"horizon_days": horizon, "ok": not problems, "certificates": found, "crls": crls})
        return 1 if problems else 0
    if found:
        listing(found, False, CERTIFICATES, "")
    else:
        print(f"no certificate expires within {horizon} days, none is revoked")
    if crls:
        print()
        listing(crls, False, CRLS, "")
    return 1 if problems else 0


def _revocation(cfg: Config, directory: PartnerDirectory) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Partner client certificates revoked or of unknown status (soft-fail), and the state of each CRL."""
    if not cfg.operations.crls:
        return [], []
    cas = ca_certificates(cfg.https.client_ca)
    rev = Revocation(RevocationPolicy(cfg.operations.crls, cfg.operations.crl_soft_fail, cfg.operations.crl_max_age_s), cas)
    found = []
    for p in directory.partners:
        for spki in sorted(p.client_spki):
            info = directory.certificates[spki]
            try:
                state = "REVOCATION_UNKNOWN (soft-fail)" if rev.check_peer(info.cert) == "unknown" else ""
            except Forbidden as exc:
                state = exc.code
            if state:
                found.append({"owner": p.name, "purpose": "client", "problem": not state.endswith("(soft-fail)"),
                              "state": state, "not_after": info.not_after.isoformat(), "subject": info.subject,
                              "spki_sha256": spki})
    return found, rev.status()
