"""``einvoice-gateway pki issue-partner``: certificates for a test partner, from the instance's development CA.

``init`` makes a development CA (``pki/ca.crt``, its key ``pki/ca.key`` beside it) and trusts it for
partner client certificates (``https.client_ca``) and S/MIME (``smtp.partner_ca``); it keeps the key for
exactly this.  The command issues only from such a CA, recognised by the certificate itself: a
self-signed CA whose name carries ``einvoice-gateway DEVELOPMENT ONLY`` (gateway/devpki.py), listed in
``https.client_ca``, with its key beside it and that key matching.  A configuration that trusts
another CA is refused: a production CA's certificates are issued by its own tooling and process, never
by a command that writes an unencrypted key into a folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
from pathlib import Path
from typing import Any

from cryptography import x509

from .. import devpki
from ..config.load import load
from ..config.model import Config
from ..errors import Transient
from ..identifiers import parse_email, parse_party_id
from ..operations.audit import record
from ..partners.book import NAME, load_directory
from ..tls import inspect_certificate
from .common import actor, opened, with_by, with_config
from .errors import Failed, Refused, UsageError, said_as
from .output import printable

PROG = "einvoice-gateway"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("pki", help="the instance's development PKI (made by init): certificates for test partners")
    psub = p.add_subparsers(dest="action", required=True)
    ip = with_config(psub.add_parser(
        "issue-partner", help="issue a TLS client certificate (and with --email an S/MIME certificate) for a test "
                              "partner from the development CA that init made; refused for any other CA"))
    ip.add_argument("name", help="the partner's name (1-64 letters, digits, '.', '_' or '-'); names the files")
    ip.add_argument("--email", action="append", default=[], metavar="ADDR",
                    help="also issue an S/MIME certificate with this address in its SubjectAltName (repeatable): the "
                         "address the partner sends invoices from by e-mail")
    ip.add_argument("--party-id", action="append", default=[], metavar="ID",
                    help="the partner's supplier identifier (scheme:value), put into the printed `partners add` command")
    ip.add_argument("--out", metavar="DIR", help="folder for the certificates and keys (default: clients/ beside the "
                                                 "development CA, where init put the demo partner's)")
    ip.add_argument("--force", action="store_true", help="write over certificate and key files of the same name")
    ip.add_argument("--json", action="store_true", help="print the files and the command as one JSON object")
    with_by(ip)


def run(args: argparse.Namespace) -> int:
    if not NAME.match(args.name):
        raise UsageError(f"pki issue-partner: {args.name!r} is not a partner name: 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    with said_as(UsageError):
        emails = tuple(dict.fromkeys(parse_email(e, f"--email[{i}]") for i, e in enumerate(args.email)))
        party_ids = [parse_party_id(v, f"--party-id[{i}]") for i, v in enumerate(args.party_id)]
    cfg = load(args.config)
    ca = development_ca(cfg, smime=bool(emails))
    out = Path(args.out) if args.out else ca.cert.parent / "clients"
    names = [args.name] + ([f"{args.name}-smime"] if emails else [])
    if not args.force:
        taken = [f for n in names for f in (out / f"{n}.crt", out / f"{n}.key") if f.exists()]
        if taken:
            raise Refused(f"pki issue-partner: {taken[0]} exists; choose another name or --out folder, or pass --force "
                          "to write over it")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    cn = f"{args.name} (test partner)"
    try:
        client = devpki.issue(ca, out, args.name, role="client", cn=cn, replace=args.force)
        smime = devpki.issue(ca, out, f"{args.name}-smime", role="smime", cn=cn, emails=emails, key_kind="rsa2048",
                             replace=args.force) if emails else None
    except FileExistsError as exc:  # made meanwhile, by someone else
        raise Refused(f"pki issue-partner: {exc.filename} exists; choose another name or --out folder, or pass --force "
                      "to write over it") from None
    issued = [("client", client)] + ([("smime", smime)] if smime is not None else [])
    registered = load_directory(cfg.partners_file).get(args.name) is not None
    command = _register_command(args.name, cfg, client, smime, emails, party_ids, registered)
    asyncio.run(_audit(cfg, args, ca, issued, emails))
    result = {"partner": args.name, "ca_certificate": str(ca.cert),
              "client_certificate": str(client.cert), "client_key": str(client.key),
              **({"smime_certificate": str(smime.cert), "smime_key": str(smime.key), "emails": list(emails)}
                 if smime is not None else {}),
              "register_command": command}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Issued from the development CA {ca.cert} (DEVELOPMENT ONLY: for tests, never for production):")
    rows = [("client certificate", client.cert), ("client key (0600)", client.key)]
    if smime is not None:
        rows += [("S/MIME certificate", smime.cert), ("S/MIME key (0600)", smime.key)]
    for label, path in rows:
        print(f"  {label:<20} {printable(path)}")
    if registered:
        print(f"\n{args.name!r} is registered already; to add these certificates beside its others (a rollover):")
    else:
        print("\nRegister the partner (the running gateway picks it up within seconds):")
    print(f"  {command}")
    if not party_ids and not registered:
        print("  (replace SCHEME:VALUE with the partner's supplier identifier; repeat --party-id for each)")
    return 0


def development_ca(cfg: Config, *, smime: bool) -> devpki.Issued:
    """The development CA that ``https.client_ca`` trusts, with its key; refused for anything else."""
    cas = devpki.development_cas(cfg.https.client_ca)
    if not cas:
        trusted = "; ".join(f"{p} ({_subjects(p)})" for p in cfg.https.client_ca)
        raise Refused(f"pki issue-partner: https.client_ca trusts {trusted}; none is a development CA made by "
                      f"`{PROG} init` (a self-signed CA named '{devpki.ORGANIZATION}'); issue partner certificates "
                      "with your CA's own tooling: this command never issues from a production CA")
    path, cert = cas[0]
    key_path = path.with_suffix(".key")
    if not key_path.exists():
        raise Refused(f"pki issue-partner: the development CA {path} has no key beside it ({key_path} is absent); "
                      f"init keeps it there, and without it no certificate can be issued (a new instance: {PROG} init DIR)")
    if not devpki.key_matches(cert, key_path):
        raise Refused(f"pki issue-partner: {key_path} is not the key of the development CA {path}; put that CA's own "
                      "key there")
    if smime and cfg.smtp is not None:
        partner_cas = {c for p in cfg.smtp.partner_ca for c in _certificates(p)}
        if cert not in partner_cas:
            raise Refused(f"pki issue-partner: --email: smtp.partner_ca does not trust the development CA {path}, so the "
                          f"gateway would refuse mail signed with an S/MIME certificate from it; add {path} to "
                          "smtp.partner_ca, or leave out --email")
    return devpki.Issued(path, key_path)


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


def _subjects(path: Path) -> str:
    certs = _certificates(path)
    return ", ".join(c.subject.rfc4514_string() for c in certs) if certs else "no certificate readable"


def _register_command(name: str, cfg: Config, client: devpki.Issued, smime: devpki.Issued | None,
                      emails: tuple[str, ...], party_ids: list[str], registered: bool) -> str:
    """The ``partners add`` (or, for a registered partner, ``partners edit``) command that registers what was issued."""
    words = [PROG, "partners", "edit" if registered else "add", name, "--client-cert", str(client.cert)]
    if smime is not None:
        words += ["--smime-cert", str(smime.cert)]
        for e in emails:
            words += ["--email", e]
    if not registered:
        for i in party_ids or ["SCHEME:VALUE"]:
            words += ["--party-id", i]
    words += ["-c", str(cfg.source)]
    return shlex.join(words)


async def _audit(cfg: Config, args: argparse.Namespace, ca: devpki.Issued, issued: list[tuple[str, devpki.Issued]],
                 emails: tuple[str, ...]) -> None:
    """Issuing from a CA the gateway trusts is recorded, with each certificate's key fingerprint."""
    certificates = []
    for purpose, files in issued:
        info = inspect_certificate(files.cert, purpose)
        certificates.append({"purpose": purpose, "file": str(files.cert), "spki_sha256": info.spki_sha256,
                             "not_after": info.not_after.isoformat()})
    try:
        async with opened(cfg) as store:
            await record(cfg, store.audit, actor(args.by), "pki.partner_issued", args.name,
                         {"ca": str(ca.cert), "certificates": certificates, "emails": list(emails)})
    except (OSError, Transient) as exc:
        raise Failed(f"the certificates were issued, but the audit log could not record it: {exc}") from None
