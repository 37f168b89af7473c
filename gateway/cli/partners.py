"""``einvoice-gateway partners …``: the allowlist (the partners file; the daemon re-reads it within seconds).

Every change is an audit record naming who made it, sealed by a signed checkpoint at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config.load import load
from ..config.model import Config
from ..errors import ConfigError, Forbidden
from ..identifiers import keys_of, parse_email, parse_party_id, party_key
from ..model import Partner, PartnerStatus, SignaturePolicy
from ..operations.audit import record
from ..operations.housekeeping import expiring, inventory
from ..partners.book import editing, instant_text, load_directory, parse_ceiling, parse_endpoint, parse_instant
from ..partners.directory import PartnerDirectory
from ..partners.edit import activated, certificates_of, edit_partners, register_partner, rollover, with_status
from ..stages.revocation import Revocation, RevocationPolicy
from ..stages.rules import merge, rule_specs
from ..tls import ca_certificates, cert_sha256, email_addresses, expires_soon, inspect_certificate
from .common import current_user, opened, with_config


def add_parsers(sub: Any) -> None:
    pa = sub.add_parser("partners", help="manage the partner allowlist (takes effect without a restart)")
    psub = pa.add_subparsers(dest="action", required=True)
    add = with_config(psub.add_parser("add", help="register a partner"))
    add.add_argument("name")
    add.add_argument("--client-cert", action="append", default=[],
                     help="partner's TLS client certificate (PEM); repeat for rollover (a partner needs this or --smime-cert)")
    add.add_argument("--party-id", action="append", required=True, help="supplier identifier, scheme:value (e.g. 0088:5790000435975)")
    add.add_argument("--email", action="append", default=[])
    add.add_argument("--verified-by", help="who verified this partner (default: the current user)")
    add.add_argument("--signing-cert", action="append", default=[], help="certificate (PEM) the partner signs invoices with")
    add.add_argument("--signature-policy", choices=[p.value for p in SignaturePolicy], default=SignaturePolicy.IF_PRESENT.value)
    add.add_argument("--smime-cert", action="append", default=[],
                     help="partner's S/MIME certificate (PEM): signs its e-mail, and mail to it is encrypted to it")
    rules_options(add)
    ed = with_config(psub.add_parser("edit", help="add or remove certificates and identifiers, set the signature policy"))
    ed.add_argument("name")
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
    ed.add_argument("--remove-email", action="append", default=[])
    ed.add_argument("--party-id", action="append", default=[])
    ed.add_argument("--remove-party-id", action="append", default=[])
    ed.add_argument("--email", action="append", default=[])
    ed.add_argument("--signature-policy", choices=[p.value for p in SignaturePolicy])
    rules_options(ed)
    ed.add_argument("--default-rules", action="store_true", help="use the configured rules.default again")
    ed.add_argument("--remove-amount-ceiling", action="append", default=[], metavar="CURRENCY")
    ed.add_argument("--remove-endpoint", action="store_true", help="send nothing to this partner any more")
    with_config(psub.add_parser("list", help="list partners"))
    with_config(psub.add_parser("check", help="expired and expiring certificates, and revocation status (exit 1 if any "
                                "certificate is expired or revoked)"))

    for action in ("show", "suspend", "resume", "remove"):
        sp = with_config(psub.add_parser(action, help=f"{action} a partner"))
        sp.add_argument("name")
    act = with_config(psub.add_parser("activate", help="activate a partner added in the console, once the partner has "
                                      "confirmed each certificate's SHA-256 fingerprint by another channel"))
    act.add_argument("name")
    act.add_argument("--fingerprint", action="append", default=[], required=True,
                     help="a certificate's SHA-256 fingerprint (or its key's), as read out by the partner; one per certificate")



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
            raise ConfigError(f"--rules: no rule pack named {n!r} (configured: {', '.join(sorted(known))})")
    return names


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    path = cfg.partners_file
    if args.action == "add":
        ids = [parse_party_id(v, f"--party-id[{i}]") for i, v in enumerate(args.party_id)]
        certs = [Path(c) for c in args.client_cert]
        smime = [Path(c) for c in args.smime_cert]
        for option, paths in (("--client-cert", certs), ("--smime-cert", smime)):
            for i, c in enumerate(paths):
                if not c.is_file():
                    raise ConfigError(f"{option}[{i}]: {c} not found")
        if not certs and not smime:
            raise ConfigError("partners add: give --client-cert (HTTPS) and/or --smime-cert (e-mail): the certificate "
                              "that proves it is this partner")
        emails = [parse_email(e, f"--email[{i}]") for i, e in enumerate(args.email)]
        if smime and not emails:
            raise ConfigError("--email: a partner sending by e-mail needs the address(es) it sends from (--email ADDR)")
        ceilings = tuple(parse_ceiling(v, f"--amount-ceiling[{i}]") for i, v in enumerate(args.amount_ceiling))
        register_partner(path, args.name, certs, ids, emails, args.verified_by or current_user(),
                         [Path(c) for c in args.signing_cert], SignaturePolicy(args.signature_policy),
                         rules=_chosen_rules(args, cfg), ceilings=ceilings,
                         endpoint=parse_endpoint(args.endpoint, "--endpoint") if args.endpoint else "",
                         sign_outbound=bool(args.sign_outbound), smime_certs=smime,
                         smime_signed_only=bool(args.smime_signed_only))
        _audit_partner(cfg, args, "partner.added", {"party_ids": sorted(ids), "client_certs": len(certs),
                                                   "signing_certs": len(args.signing_cert), "smime_certs": len(smime),
                                                   "emails": emails})
        print(f"partner {args.name!r} added; the running gateway picks it up within seconds")
        return 0
    if args.action == "edit":
        _edit_partner(path, args, _chosen_rules(args, cfg))
        _audit_partner(cfg, args, "partner.edited", {"changed": sorted(
            k for k, v in vars(args).items() if k not in ("command", "action", "name", "config") and v not in (None, [], False))})
        print(f"partner {args.name!r} edited; the running gateway picks it up within seconds")
        return 0
    if args.action == "check":
        return check(args)
    directory = load_directory(path)
    if args.action == "list":
        for p in directory.partners:
            print(f"{p.name}\t{p.status.value}\t{len(p.client_spki)} cert(s)\t{', '.join(sorted(p.party_ids))}")
        return 0
    if directory.get(args.name) is None:
        raise ConfigError(f"partners: no partner named {args.name!r}")
    if args.action == "show":
        partner = directory.get(args.name)
        assert partner is not None
        listed: dict[str, list[dict[str, object]]] = {"client": [], "signing": [], "smime": []}
        for purpose, cert_path, info in certificates_of(partner):
            w = partner.window(purpose, cert_path)
            listed[purpose].append({
                "path": cert_path, "spki_sha256": info.spki_sha256, "sha256": cert_sha256(info.cert), "subject": info.subject,
                "not_after": info.not_after.isoformat(), "expires_within_30_days": expires_soon(info),
                **({"addresses": sorted(email_addresses(info.cert))} if purpose == "smime" else {}),
                **({"accepted_from": instant_text(w.start)} if w and w.start else {}),
                **({"accepted_until": instant_text(w.end)} if w and w.end else {})})
        shown, signing, mail_certs = listed["client"], listed["signing"], listed["smime"]
        print(json.dumps({"name": partner.name, "status": partner.status.value, "verified_by": partner.verified_by,
                          "verified_at": partner.verified_at, "party_ids": sorted(partner.party_ids),
                          "emails": list(partner.emails), "client_certs": shown,
                          "signature_policy": partner.signature_policy.value, "signing_certs": signing,
                          "rules": list(partner.rules) if partner.rules is not None else f"default ({', '.join(cfg.rules_default)})",
                          "amount_ceilings": {c: str(v) for c, v in partner.amount_ceilings},
                          "endpoint": partner.endpoint or None, "sign_outbound": partner.sign_outbound,
                          "smime_certs": mail_certs, "smime_signed_only": partner.smime_signed_only}, indent=2))
        return 0
    with editing(path) as partners:
        idx = next(i for i, p in enumerate(partners) if p.name == args.name)
        if args.action == "remove":
            del partners[idx]
        elif args.action == "activate":
            partners[idx] = activated(partners[idx], args.fingerprint, current_user())
        elif partners[idx].status is PartnerStatus.PENDING:
            raise ConfigError(f"partners {args.action}: {args.name!r} is pending activation; confirm its certificate "
                              f"fingerprints with `partners activate {args.name} --fingerprint …`")
        else:
            partners[idx] = with_status(partners[idx], PartnerStatus.SUSPENDED if args.action == "suspend" else PartnerStatus.ACTIVE)
    _audit_partner(cfg, args, {"remove": "partner.removed", "suspend": "partner.suspended",
                               "activate": "partner.activated"}.get(args.action, "partner.resumed"), {})
    print(f"partner {args.name!r}: {args.action} done")
    return 0


def _audit_partner(cfg: Config, args: argparse.Namespace, action: str, detail: dict[str, Any]) -> None:
    """Every change to the allowlist is an audit record with who made it (the partners file itself keeps no history)."""
    async def write() -> None:
        async with opened(cfg) as store:
            await record(cfg, store.audit, current_user(), action, args.name, detail)

    asyncio.run(write())


def _edit_partner(path: Path, args: argparse.Namespace, rules: tuple[str, ...] | None) -> None:
    add_emails = tuple(parse_email(e, f"--email[{i}]") for i, e in enumerate(args.email))
    drop_emails = {parse_email(e, f"--remove-email[{i}]") for i, e in enumerate(args.remove_email)}
    endpoint = parse_endpoint(args.endpoint, "--endpoint") if args.endpoint else None
    add_ids = {parse_party_id(v, f"--party-id[{i}]") for i, v in enumerate(args.party_id)}
    add_ceilings = dict(parse_ceiling(v, f"--amount-ceiling[{i}]") for i, v in enumerate(args.amount_ceiling))
    drop_ids = {parse_party_id(v, f"--remove-party-id[{i}]") for i, v in enumerate(args.remove_party_id)}

    start = parse_instant(args.active_from, "--active-from") if args.active_from else None
    retire_at = parse_instant(args.retire_at, "--retire-at") if args.retire_at else None
    if bool(args.retire_cert) != (retire_at is not None):
        raise ConfigError("--retire-cert and --retire-at go together: which certificate (key SHA-256, >= 16 hex digits) "
                          "stops being accepted, and when")
    if start is not None and not (args.client_cert or args.signing_cert or args.smime_cert):
        raise ConfigError("--active-from: it applies to the certificates this command adds; add one (--client-cert, "
                          "--signing-cert, --smime-cert)")

    def matching(p: Partner, prefixes: list[str], option: str) -> frozenset[str]:
        keys = {info.spki_sha256 for _, _, info in certificates_of(p)}
        found = set()
        for prefix in prefixes:
            if len(prefix) < 16:
                raise ConfigError(f"{option}: {prefix!r} is too short; give at least 16 hex digits of the key SHA-256")
            hits = {k for k in keys if k.startswith(prefix.lower())}
            if not hits:
                raise ConfigError(f"{option}: no registered certificate of {p.name!r} has a key SHA-256 starting {prefix!r}")
            found |= hits
        return frozenset(found)

    def change(partners: list[Partner], store: Callable[[Path | bytes, str], str]) -> None:
        idx = next((i for i, p in enumerate(partners) if p.name == args.name), None)
        if idx is None:
            raise ConfigError(f"partners: no partner named {args.name!r}")
        p = partners[idx]
        unknown = {i for i in drop_ids if party_key(i).key not in keys_of(p.party_ids)}  # in any of its forms
        if unknown:
            raise ConfigError(f"--remove-party-id: {sorted(unknown)[0]!r} is not registered for {p.name!r}")
        ids: dict[str, str] = {}  # key → as written; one added that is registered in another form stays as registered
        for i in sorted(p.party_ids) + sorted(add_ids):
            if party_key(i).key not in keys_of(drop_ids):
                ids.setdefault(party_key(i).key, i)
        if drop_emails - set(p.emails):
            raise ConfigError(f"--remove-email: {sorted(drop_emails - set(p.emails))[0]!r} is not registered for {p.name!r}")
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


def check(args: argparse.Namespace) -> int:
    """Expired and expiring certificates (gateway and partners), and partner certificates' revocation status."""
    cfg = load(args.config)
    directory = load_directory(cfg.partners_file)
    horizon = max(cfg.operations.expiry_warn_days, default=30)
    found = expiring(inventory(cfg, directory), horizon)
    problems = 0
    for entry, days in found:
        state = "EXPIRED" if days <= 0 else f"expires in {days:.0f} day(s)"
        problems += days <= 0
        print(f"{entry.owner}\t{entry.purpose}\t{state}\t{entry.not_after:%Y-%m-%d}\t{entry.subject}\t{entry.spki_sha256[:16]}")
    revoked = _revocation_report(cfg, directory)
    problems += revoked
    if not found and not revoked:
        print(f"no certificate expires within {horizon} days")
    return 1 if problems else 0


def _revocation_report(cfg: Config, directory: PartnerDirectory) -> int:
    if not cfg.operations.crls:
        return 0
    cas = ca_certificates(cfg.https.client_ca)
    rev = Revocation(RevocationPolicy(cfg.operations.crls, cfg.operations.crl_soft_fail, cfg.operations.crl_max_age_s), cas)
    bad = 0
    for p in directory.partners:
        for spki in sorted(p.client_spki):
            info = directory.certificates[spki]
            try:
                status = rev.check_peer(info.cert)
            except Forbidden as exc:
                bad += 1
                print(f"{p.name}\tclient\t{exc.code}\t{info.subject}\t{spki[:16]}")
                continue
            if status == "unknown":
                print(f"{p.name}\tclient\tREVOCATION_UNKNOWN (soft-fail)\t{info.subject}\t{spki[:16]}")
    for s in rev.status():
        print(f"crl\t{s['issuer']}\tnext update {s['next_update']}\t{s['revoked']} revoked\t{s['file']}")
    return bad

