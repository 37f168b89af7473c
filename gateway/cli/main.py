"""Command line: parse arguments, load configuration, run.

    einvoice-gateway init DIR [--host H] [--port N] [--json]
    einvoice-gateway serve -c CONFIG
    einvoice-gateway check-config -c CONFIG
    einvoice-gateway partners add NAME --client-cert PEM | --smime-cert PEM --party-id ID [--party-id ID …] [--email ADDR …]
                                  [--signing-cert PEM …] [--signature-policy required|if-present|ignore] -c CONFIG
    einvoice-gateway partners edit NAME [--client-cert PEM …] [--signing-cert PEM …] [--smime-cert PEM …] [--remove-cert SPKI …]
                                   [--party-id ID …] [--remove-party-id ID …] [--email ADDR …] [--signature-policy P]
                                   [--active-from DATE] [--retire-cert SPKI … --retire-at DATE] -c CONFIG
    einvoice-gateway partners list|show NAME|suspend NAME|resume NAME|remove NAME -c CONFIG
    einvoice-gateway partners activate NAME --fingerprint SHA256 [--fingerprint …] -c CONFIG
        (add and edit also take [--rules PACK[,PACK…] | --no-rules] [--amount-ceiling CUR:AMOUNT …] [--endpoint URL|mailto:ADDR]
         [--smime-signed-only])
    einvoice-gateway quarantine list [--all] [--partner P] [--json] | show ID | release ID --reason R [--to DEST …]
                                | reject ID --reason R
    einvoice-gateway messages list [--partner P] [--status S] [--direction in|out] [--since T] [--until T] [--json]
                              | show ID | retry ID [--destination D] | requeue ID --reason R [--destination D]
    einvoice-gateway dead-letters [--partner P] [--destination D] [--since T] [--until T] [--json]
    einvoice-gateway sign IN OUT [-c CONFIG | --cert PEM --key PEM]
    einvoice-gateway verify FILE [--cert PEM …]
    einvoice-gateway demo [--dir DIR] [--no-wait]
    einvoice-gateway partners check -c CONFIG
    einvoice-gateway keys list|rotate|rewrap [--key ID]|retire ID -c CONFIG
    einvoice-gateway audit verify [--file EXPORT] | export -o FILE [--from-seq N] [--to-seq N] | checkpoint | list
    einvoice-gateway backup create DIR | verify DIR [--deep] | restore DIR [--state-dir DIR]

Exit codes: 0 success, 1 runtime failure (or, for verify, an invalid signature), 2 usage or configuration
error (the message names the key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__, logs
from ..config import load as config_mod
from ..errors import ConfigError
from ..model import Partner, PartnerStatus, SignaturePolicy
from . import ops as opscli
from . import users as usercli

DEFAULT_CONFIG = os.environ.get("EINVOICE_GATEWAY_CONFIG", "/etc/einvoice-gateway/config.toml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="einvoice-gateway", description="Secure e-invoice gateway (UBL 2.1 over mutual-TLS HTTPS).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
        return sp

    i = sub.add_parser("init", help="create a working instance with a development PKI and a demo partner")
    i.add_argument("dir")
    i.add_argument("--host", default="127.0.0.1")
    i.add_argument("--port", type=int, default=8443)
    i.add_argument("--json", action="store_true", help="print the paths and addresses as one JSON object")
    sv = with_config(sub.add_parser("serve", help="run the gateway in the foreground"))
    sv.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its children
    sv.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    sv.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)
    sv.add_argument("--smtp-fd", type=int, help=argparse.SUPPRESS)
    with_config(sub.add_parser("check-config", help="check a configuration; exit 2 naming the bad key"))
    d = sub.add_parser("demo", help="start a throwaway instance, send sample invoices, keep serving")
    d.add_argument("--dir", help="make the instance here and keep it (default: a temporary folder, removed at exit)")
    d.add_argument("--port", type=int, default=8443, help="preferred port (a free one is used if busy)")
    d.add_argument("--no-wait", action="store_true", help="exit after the samples instead of serving until Ctrl-C")

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

    sg = with_config(sub.add_parser("sign", help="add the gateway's XAdES-BES signature to an invoice"))
    sg.add_argument("input")
    sg.add_argument("output")
    sg.add_argument("--cert", help="signing certificate (default: [signing] of the configuration)")
    sg.add_argument("--key", help="signing key (default: [signing] of the configuration)")
    vf = sub.add_parser("verify", help="verify the XML signature of an invoice")
    vf.add_argument("file")
    vf.add_argument("--cert", action="append", default=[],
                    help="trusted signing certificate (PEM); without one, only integrity is checked against the embedded certificate")
    for action in ("show", "suspend", "resume", "remove"):
        sp = with_config(psub.add_parser(action, help=f"{action} a partner"))
        sp.add_argument("name")
    act = with_config(psub.add_parser("activate", help="activate a partner added in the console, once the partner has "
                                      "confirmed each certificate's SHA-256 fingerprint by another channel"))
    act.add_argument("name")
    act.add_argument("--fingerprint", action="append", default=[], required=True,
                     help="a certificate's SHA-256 fingerprint (or its key's), as read out by the partner; one per certificate")

    q = sub.add_parser("quarantine", help="invoices held for review (changed bank account, amount ceiling)")
    qsub = q.add_subparsers(dest="action", required=True)
    ql = with_config(qsub.add_parser("list", help="list held invoices (or every decision with --all)"))
    ql.add_argument("--all", action="store_true", help="include released and rejected ones")
    ql.add_argument("--partner")
    ql.add_argument("--json", action="store_true")
    qs = with_config(qsub.add_parser("show", help="one held invoice, with the seller's account history beside it"))
    qs.add_argument("message_id")
    for action, what in (("release", "deliver it"), ("reject", "never deliver it")):
        qd = with_config(qsub.add_parser(action, help=f"decide a held invoice: {what}"))
        qd.add_argument("message_id")
        qd.add_argument("--reason", required=True, help="why (recorded in the audit log with who decided)")
        qd.add_argument("--by", help="who decides (default: the current user)")
        if action == "release":
            qd.add_argument("--to", action="append", default=[], metavar="DESTINATION",
                            help="where to deliver it (default: what the routing rules say now)")

    m = sub.add_parser("messages", help="accepted and submitted invoices and their deliveries")
    msub = m.add_subparsers(dest="action", required=True)
    ml = with_config(msub.add_parser("list", help="newest first"))
    filters(ml)
    ml.add_argument("--status", help="accepted, held, delivered, dead-letter, rejected, or a delivery state (pending, dead)")
    ml.add_argument("--direction", choices=("in", "out"), help="in: from partners; out: submitted for sending")
    ms = with_config(msub.add_parser("show", help="one message: facts, deliveries and history (never its content)"))
    ms.add_argument("message_id")
    for action, what in (("retry", "attempt its waiting deliveries now"),
                         ("requeue", "put its dead-lettered deliveries back in the queue, with a new retry horizon")):
        mr = with_config(msub.add_parser(action, help=what))
        mr.add_argument("message_id")
        mr.add_argument("--destination", help="only this destination")
        mr.add_argument("--reason", required=action == "requeue", default="", help="why (recorded in the audit log)")
        mr.add_argument("--by", help="who asks (default: the current user)")
    dl = with_config(sub.add_parser("dead-letters", help="deliveries given up on, newest first, with the reason"))
    filters(dl)
    dl.add_argument("--destination")
    opscli.add_parsers(sub, with_config)
    usercli.add_parsers(sub, with_config)
    return p


def filters(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--partner")
    sp.add_argument("--since", type=_when, help="from this time on (YYYY-MM-DD or an RFC 3339 time, UTC)")
    sp.add_argument("--until", type=_when, help="before this time")
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")


def _when(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or time (2026-11-20T14:00:00Z)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _stamp(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


def _chosen_rules(args: argparse.Namespace, cfg: config_mod.Config) -> tuple[str, ...] | None:
    """The --rules/--no-rules choice, checked against the configured packs; None: no choice made."""
    from ..app.gateway import rule_specs
    from ..stages.rules import merge

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


def _partners(args: argparse.Namespace) -> int:
    from ..config.load import parse_email
    from ..operations.instance import current_user, register_partner
    from ..partners.directory import (
        activated,
        certificates_of,
        editing,
        instant_text,
        load_directory,
        parse_ceiling,
        parse_endpoint,
        parse_party_id,
        with_status,
    )
    from ..tls import cert_sha256, email_addresses, expires_soon

    cfg = config_mod.load(args.config)
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
        return opscli.partners_check(args)
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


def _audit_partner(cfg: config_mod.Config, args: argparse.Namespace, action: str, detail: dict[str, Any]) -> None:
    """Every change to the allowlist is an audit record with who made it (the partners file itself keeps no history)."""
    from ..operations.instance import current_user
    from ..storage.sqlite import SqliteStore

    store = SqliteStore(cfg.state_dir)
    try:
        opscli.record(cfg, store, current_user(), action, args.name, detail)
    finally:
        store.close()


def _edit_partner(path: Path, args: argparse.Namespace, rules: tuple[str, ...] | None) -> None:
    from dataclasses import replace

    from ..config.load import parse_email
    from ..operations.instance import edit_partners
    from ..partners.directory import certificates_of, parse_ceiling, parse_endpoint, parse_instant, parse_party_id, rollover
    from ..tls import inspect_certificate

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
        unknown = drop_ids - p.party_ids
        if unknown:
            raise ConfigError(f"--remove-party-id: {sorted(unknown)[0]!r} is not registered for {p.name!r}")
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
            p, party_ids=frozenset((p.party_ids | add_ids) - drop_ids),
            emails=tuple(e for e in dict.fromkeys(p.emails + add_emails) if e not in drop_emails),
            smime_signed_only=p.smime_signed_only if args.smime_signed_only is None else args.smime_signed_only,
            signature_policy=SignaturePolicy(args.signature_policy) if args.signature_policy else p.signature_policy,
            rules=None if args.default_rules else rules if rules is not None else p.rules,
            amount_ceilings=tuple(sorted(({c: v for c, v in p.amount_ceilings if c not in args.remove_amount_ceiling}
                                          | add_ceilings).items())),
            endpoint="" if args.remove_endpoint else p.endpoint if endpoint is None else endpoint,
            sign_outbound=p.sign_outbound if args.sign_outbound is None else args.sign_outbound)

    edit_partners(path, args.name, change)


def _quarantine(args: argparse.Namespace) -> int:
    from concurrent.futures import Future

    from ..operations.instance import current_user
    from ..storage.sqlite import NotHeld, SqliteStore

    cfg = config_mod.load(args.config)
    store = SqliteStore(cfg.state_dir)
    try:
        if args.action == "list":
            return _print_rows(store.quarantined(None if args.all else "held", args.partner), args.json, lambda e: (
                f"{e['message_id']}\t{e['state']}\t{e['partner']}\t{e['invoice_number']}\t{e['issue_date']}\t"
                f"{e['payable_amount']} {e['currency']}\t{'; '.join(e['reasons'])}"))
        if args.action == "show":
            return _print_one(store.quarantine_entry(args.message_id), f"no quarantined message {args.message_id}")
        release = args.action == "release"
        to = tuple(args.to) if release else ()
        unknown = [d for d in to if d not in {x.name for x in cfg.destinations}]
        if unknown:
            raise ConfigError(f"--to: no destination named {unknown[0]!r} (configured: "
                              f"{', '.join(d.name for d in cfg.destinations)})")
        if release and not to:  # held before routing found a destination: route it with today's rules
            to = _route_again(cfg, store, args.message_id)
        fut: Future[dict[str, object]] = store.decide(args.message_id, release, args.by or current_user(), args.reason, to)
        try:
            decided = fut.result()
        except NotHeld as exc:
            print(f"einvoice-gateway: {exc.message}", file=sys.stderr)
            return 1
        print(f"message {decided['message_id']} {decided['state']} by {decided['decided_by']}"
              + ("; the running gateway delivers it within seconds" if decided["state"] == "released" else ""))
        return 0
    finally:
        store.close()


def _print_rows(rows: list[dict[str, Any]], as_json: bool, line: Callable[[dict[str, Any]], str]) -> int:
    """A listing: one JSON array, or one tab-separated line per row."""
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(line(r))
    return 0


def _print_one(found: dict[str, Any] | None, missing: str) -> int:
    if found is None:
        print(f"einvoice-gateway: {missing}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2))
    return 0


def _route_again(cfg: config_mod.Config, store: Any, message_id: str) -> tuple[str, ...]:
    """Where the routing rules of the current configuration send a stored message."""
    from ..model import DocumentType, InvoiceFacts
    from ..stages.routing import Router

    m = store.message(message_id)
    if m is None or m["deliveries"]:
        return ()
    doc_type = next(t for t in DocumentType if t.label == m["document_type"])
    facts = InvoiceFacts(doc_type, m["invoice_number"], "", tuple(m["supplier_ids"] or ()), tuple(m["customer_ids"] or ()),
                         m["customization_id"], m["profile_id"], m["issue_date"])
    return Router(cfg.routes, cfg.routing_default).route(m["partner"], facts)


def _messages(args: argparse.Namespace) -> int:
    from ..operations.instance import current_user
    from ..storage.sqlite import NotHeld, SqliteStore

    cfg = config_mod.load(args.config)
    store = SqliteStore(cfg.state_dir)
    try:
        if args.command == "dead-letters":
            rows = store.dead_letters(partner=args.partner, destination=args.destination,
                                      since=args.since.timestamp() if args.since else None,
                                      until=args.until.timestamp() if args.until else None, limit=args.limit)
            return _print_rows(rows, args.json, lambda r: (
                f"{r['message_id']}\t{r['destination']}\t{r['partner']}\t{r['invoice_number']}\t"
                f"dead since {r['dead_at']}\tattempts {r['attempts']}\t{r['error']}"))
        if args.action == "list":
            rows = store.messages(direction=args.direction, partner=args.partner, status=args.status,
                                  since=_stamp(args.since), until=_stamp(args.until), limit=args.limit)
            return _print_rows(rows, args.json, lambda r: (
                f"{r['message_id']}\t{r['direction']}\t{r['received_at']}\t{r['partner']}\t{r['status']}\t"
                f"{r['document_type']}\t{r['invoice_number']}\t{r['payable_amount']} {r['currency']}"))
        if args.action == "show":
            return _print_one(store.message(args.message_id), f"no message {args.message_id}")
        try:
            done = store.retry(args.message_id, args.destination, args.by or current_user(),
                               requeue=args.action == "requeue", reason=args.reason).result()
        except NotHeld as exc:
            print(f"einvoice-gateway: {exc.message}", file=sys.stderr)
            return 1
        print(f"message {args.message_id}: {'requeued' if args.action == 'requeue' else 'due now'} for "
              f"{', '.join(done)}; the running gateway attempts it within a second")
        return 0
    finally:
        store.close()


def _sign(args: argparse.Namespace) -> int:
    from lxml import etree

    from ..config.load import DEFAULT_XML_LIMITS
    from ..stages.signature import SigningKey, sign
    from ..stages.xmlparse import XmlParser

    if args.cert and args.key:
        cert_path, key_path = Path(args.cert), Path(args.key)
        config_mod.check_secret_file(key_path, "--key")
    else:
        cfg = config_mod.load(args.config)
        if cfg.signing is None:
            raise ConfigError("signing: the configuration has no [signing] section (or give --cert and --key)")
        cert_path, key_path = cfg.signing.certificate, cfg.signing.private_key
    try:
        signer = SigningKey.load(cert_path.read_bytes(), key_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"signing: {exc}") from None
    root = XmlParser(DEFAULT_XML_LIMITS).parse(Path(args.input).read_bytes()).root
    sign(root, signer)
    Path(args.output).write_bytes(etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8"))
    print(f"signed {args.input} → {args.output} ({signer.method.name}, signer {signer.cert.subject.rfc4514_string()})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import base64

    from cryptography import x509

    from ..config.load import DEFAULT_XML_LIMITS
    from ..errors import GatewayError
    from ..stages.signature import NS, trusted, verify
    from ..stages.xmlparse import XmlParser
    from ..tls import inspect_certificate

    try:
        root = XmlParser(DEFAULT_XML_LIMITS).parse(Path(args.file).read_bytes()).root
        if args.cert:
            signers = trusted(inspect_certificate(Path(c), f"--cert[{i}]").cert for i, c in enumerate(args.cert))
        else:
            found = root.xpath("//ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=NS)
            if not found:
                print(f"{args.file}: INVALID: no ds:X509Certificate to check against; give --cert", file=sys.stderr)
                return 1
            signers = trusted([x509.load_der_x509_certificate(base64.b64decode("".join("".join(found[0].itertext()).split())))])
        info = verify(root, signers, valid_now=False)  # an archived document: validity at its signing time
    except GatewayError as exc:
        print(f"{args.file}: INVALID: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{args.file}: INVALID: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"file": args.file, "valid": True, "signer_pinned": bool(args.cert), **info.as_json()}, indent=2))
    if not args.cert:
        print("note: integrity only; the signer was taken from the document itself, not pinned (use --cert)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            from ..operations.instance import init

            inst = init(Path(args.dir), host=args.host, port=args.port)
            if args.json:
                print(json.dumps(inst.as_json(), indent=2))
            else:
                print(f"Instance created in {inst.root} (DEVELOPMENT PKI: not for production).")
                print(f"Run it:   einvoice-gateway serve -c {inst.config}")
            return 0
        if args.command == "demo":
            from . import demo

            return demo.main(args.dir, not args.no_wait, args.port)
        if args.command == "partners":
            return _partners(args)
        if args.command == "quarantine":
            return _quarantine(args)
        if args.command in ("messages", "dead-letters"):
            return _messages(args)
        if args.command == "sign":
            return _sign(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "users":
            return usercli.main(args)
        if args.command in ("keys", "audit", "backup"):
            return {"keys": opscli.keys, "audit": opscli.audit, "backup": opscli.backup}[args.command](args)
        cfg = config_mod.load(args.config)
        from ..app.gateway import LISTEN_BACKLOG, bind_probe, build, serve_forever, warnings
        from ..app.supervisor import supervise, worker_count

        if getattr(args, "worker", None) is not None:  # a child of the supervisor, serving the socket it was handed
            import socket

            logs.configure(cfg.log_level)
            asyncio.run(serve_forever(cfg, worker=args.worker, sock=socket.socket(fileno=args.listen_fd),
                                      status_fd=args.status_fd,
                                      smtp_sock=socket.socket(fileno=args.smtp_fd) if args.smtp_fd is not None else None))
            return 0
        # Build every part once to fail early, naming the key (the serving processes build their own).
        parts = build(cfg, processes=1)
        parts.rules.close()
        if args.command == "check-config":
            print(f"{cfg.source}: OK ({len(parts.partners.current.partners)} partner(s), "
                  f"UBL {', '.join(parts.schemas.versions)}, CII {parts.schemas.cii_name}, "
                  f"rule packs {', '.join(f'{n} {s.version}'.strip() for n, s in sorted(parts.rules.packs.items()))}, "
                  f"master key {parts.vault.current})")
            for warning in warnings(parts):
                print(f"warning: {warning}", file=sys.stderr)
            return 0
        logs.configure(cfg.log_level)
        if cfg.https.port:
            bind_probe(cfg.https.host, cfg.https.port)
        if cfg.smtp is not None and cfg.smtp.port:
            bind_probe(cfg.smtp.host, cfg.smtp.port, "smtp.listen_port")
        workers = worker_count(cfg.https.workers)
        if workers == 1:
            asyncio.run(serve_forever(cfg))
            return 0
        return supervise(cfg, workers, LISTEN_BACKLOG)
    except ConfigError as exc:
        print(f"einvoice-gateway: configuration error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
