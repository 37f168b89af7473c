"""Command line: parse arguments, load configuration, run.

    einvoice-gateway init DIR [--host H] [--port N] [--json]
    einvoice-gateway serve -c CONFIG
    einvoice-gateway check-config -c CONFIG
    einvoice-gateway partners add NAME --client-cert PEM --party-id ID [--party-id ID …] [--email ADDR …] -c CONFIG
    einvoice-gateway partners list|show NAME|suspend NAME|resume NAME|remove NAME -c CONFIG
    einvoice-gateway demo [--dir DIR] [--no-wait]

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (the message names the key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from . import __version__, logs
from . import config as config_mod
from .errors import ConfigError
from .model import PartnerStatus

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
    with_config(sub.add_parser("serve", help="run the gateway in the foreground"))
    with_config(sub.add_parser("check-config", help="check a configuration; exit 2 naming the bad key"))
    d = sub.add_parser("demo", help="start a throwaway instance, send sample invoices, keep serving")
    d.add_argument("--dir", help="make the instance here and keep it (default: a temporary folder, removed at exit)")
    d.add_argument("--port", type=int, default=8443, help="preferred port (a free one is used if busy)")
    d.add_argument("--no-wait", action="store_true", help="exit after the samples instead of serving until Ctrl-C")

    pa = sub.add_parser("partners", help="manage the partner allowlist (takes effect without a restart)")
    psub = pa.add_subparsers(dest="action", required=True)
    add = with_config(psub.add_parser("add", help="register a partner"))
    add.add_argument("name")
    add.add_argument("--client-cert", action="append", required=True, help="partner's client certificate (PEM); repeat for rollover")
    add.add_argument("--party-id", action="append", required=True, help="supplier identifier, scheme:value (e.g. 0088:5790000435975)")
    add.add_argument("--email", action="append", default=[])
    add.add_argument("--verified-by", help="who verified this partner (default: the current user)")
    with_config(psub.add_parser("list", help="list partners"))
    for action in ("show", "suspend", "resume", "remove"):
        sp = with_config(psub.add_parser(action, help=f"{action} a partner"))
        sp.add_argument("name")
    return p


def _partners(args: argparse.Namespace) -> int:
    from .instance import current_user, register_partner
    from .partners import editing, load_directory, parse_party_id, with_status
    from .tls import expires_soon, inspect_certificate

    cfg = config_mod.load(args.config)
    path = cfg.partners_file
    if args.action == "add":
        ids = [parse_party_id(v, f"--party-id[{i}]") for i, v in enumerate(args.party_id)]
        certs = [Path(c) for c in args.client_cert]
        for i, c in enumerate(certs):
            if not c.is_file():
                raise ConfigError(f"--client-cert[{i}]: {c} not found")
        register_partner(path, args.name, certs, ids, args.email, args.verified_by or current_user())
        print(f"partner {args.name!r} added; the running gateway picks it up within seconds")
        return 0
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
        shown: list[dict[str, object]] = []
        for cert_path in partner.client_certs:
            info = inspect_certificate(Path(cert_path), "client_certs")
            shown.append({"path": cert_path, "spki_sha256": info.spki_sha256, "subject": info.subject,
                          "not_after": info.not_after.isoformat(), "expires_within_30_days": expires_soon(info)})
        print(json.dumps({"name": partner.name, "status": partner.status.value, "verified_by": partner.verified_by,
                          "verified_at": partner.verified_at, "party_ids": sorted(partner.party_ids),
                          "emails": list(partner.emails), "client_certs": shown}, indent=2))
        return 0
    with editing(path) as partners:
        idx = next(i for i, p in enumerate(partners) if p.name == args.name)
        if args.action == "remove":
            del partners[idx]
        else:
            partners[idx] = with_status(partners[idx], PartnerStatus.SUSPENDED if args.action == "suspend" else PartnerStatus.ACTIVE)
    print(f"partner {args.name!r}: {args.action} done")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            from .instance import init

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
        cfg = config_mod.load(args.config)
        from .app import bind_probe, build

        parts = build(cfg)
        if args.command == "check-config":
            print(f"{cfg.source}: OK ({len(parts.partners.current.partners)} partner(s), "
                  f"UBL {', '.join(parts.schemas.versions)}, master key {parts.vault.current})")
            return 0
        logs.configure(cfg.log_level)
        if cfg.https.port:
            bind_probe(cfg.https.host, cfg.https.port)
        from .app import serve_forever

        asyncio.run(serve_forever(cfg, parts))
        return 0
    except ConfigError as exc:
        print(f"einvoice-gateway: configuration error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
