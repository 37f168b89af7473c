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

Each command group lives in its own module of this package; this one only parses and dispatches.

Exit codes: 0 success, 1 runtime failure (or, for verify, an invalid signature), 2 usage or configuration
error (the message names the key).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import ConfigError
from . import audit, backup, documents, keys, messages, partners, serve, users

GROUPS = {"init": serve, "serve": serve, "check-config": serve, "demo": serve, "partners": partners,
          "quarantine": messages, "messages": messages, "dead-letters": messages, "sign": documents,
          "verify": documents, "keys": keys, "audit": audit, "backup": backup, "users": users}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="einvoice-gateway", description="Secure e-invoice gateway (UBL 2.1 over mutual-TLS HTTPS).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (serve, partners, documents, messages, keys, audit, backup, users):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(GROUPS[args.command].run(args))
    except ConfigError as exc:
        print(f"einvoice-gateway: configuration error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
