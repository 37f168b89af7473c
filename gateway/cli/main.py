"""Command line: parse arguments, load configuration, run.

    einvoice-gateway init DIR [--host H] [--port N] [--json]
    einvoice-gateway serve -c CONFIG
    einvoice-gateway check-config -c CONFIG
    einvoice-gateway partners add NAME --client-cert PEM | --smime-cert PEM --party-id ID [--party-id ID …] [--email ADDR …]
                                  [--signing-cert PEM …] [--signature-policy required|if-present|ignore] -c CONFIG
    einvoice-gateway partners edit NAME [--client-cert PEM …] [--signing-cert PEM …] [--smime-cert PEM …] [--remove-cert SPKI …]
                                   [--party-id ID …] [--remove-party-id ID …] [--email ADDR …] [--signature-policy P]
                                   [--active-from DATE] [--retire-cert SPKI … --retire-at DATE] -c CONFIG
    einvoice-gateway partners list [--json] | show NAME [--json] | check [--json] -c CONFIG
    einvoice-gateway partners suspend NAME|resume NAME|remove NAME -c CONFIG
    einvoice-gateway partners activate NAME --fingerprint SHA256 [--fingerprint …] -c CONFIG
        (add and edit also take [--rules PACK[,PACK…] | --no-rules] [--amount-ceiling CUR:AMOUNT …] [--endpoint URL|mailto:ADDR]
         [--smime-signed-only])
    einvoice-gateway quarantine list [--all] [--partner P] [--json] | show ID [--json] | release ID --reason R [--to DEST …]
                                | reject ID --reason R
    einvoice-gateway messages list [--partner P] [--status S] [--direction in|out] [--since T] [--until T] [--limit N] [--json]
                              | show ID [--json] | retry ID [--destination D] | requeue ID --reason R [--destination D]
    einvoice-gateway dead-letters [--partner P] [--destination D] [--since T] [--until T] [--limit N] [--json]
    einvoice-gateway sign IN OUT [-c CONFIG | --cert PEM --key PEM]
    einvoice-gateway verify FILE [--cert PEM …] [--json]
    einvoice-gateway demo [--dir DIR] [--port N] [--no-wait]
    einvoice-gateway keys list [--json] | rotate | rewrap [--key ID] | retire ID -c CONFIG
    einvoice-gateway audit verify [--file EXPORT] [--json] | export -o FILE [--from-seq N] [--to-seq N] | checkpoint
                           | list [--limit N] [--json]
    einvoice-gateway users add NAME --role R … | list [--json] | disable|enable|reset-mfa|unlock|reset-password NAME
    einvoice-gateway backup create DIR [--include-master-keys] | verify DIR [--deep]
                          | restore DIR [--config-dir DIR] [--state-dir DIR] [--overwrite]
    einvoice-gateway send FILE [--url https://H:P|unix:PATH] [--cert PEM --key PEM] [--cacert PEM] [--timeout S] [--json]
    einvoice-gateway pki issue-partner NAME [--email ADDR …] [--party-id ID …] [--out DIR] [--force] [--json]

Each command group lives in its own module of this package; this one only parses and dispatches.
Every listing and ``show`` prints a table (or labelled lines) for people and, with ``--json``, JSON
(gateway/cli/output.py).  Every command that changes something takes ``--by NAME``, recorded beside the
OS account that runs it (gateway/cli/common.py).

Exit codes (gateway/cli/errors.py): 0 done; 1 the command ran and reports a problem (a check that found
one, or ``failed: …``: a file or the store could not be read or written); 2 what was asked cannot be
done as asked (argparse's usage errors, ``usage error: …``, ``configuration error: KEY: …``,
``not found: …``, ``refused: …``); 141 the reader of standard output went away (``| head``), silently.
"""

from __future__ import annotations

import argparse
import os
import select
import sys

from .. import __version__
from ..errors import GatewayError
from . import audit, backup, documents, keys, messages, partners, pki, send, serve, users
from .errors import CommandError, said

GROUPS = {"init": serve, "serve": serve, "check-config": serve, "demo": serve, "partners": partners,
          "quarantine": messages, "messages": messages, "dead-letters": messages, "sign": documents,
          "verify": documents, "keys": keys, "audit": audit, "backup": backup, "users": users,
          "send": send, "pki": pki}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="einvoice-gateway", description="Secure e-invoice gateway (UBL 2.1 over mutual-TLS HTTPS).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (serve, partners, documents, messages, keys, audit, backup, users, send, pki):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = int(GROUPS[args.command].run(args))
        sys.stdout.flush()  # here, where a reader that went away can be told from a failure
        return code
    except BrokenPipeError as exc:
        return READER_GONE if _stdout_gone() else said(exc)
    except (CommandError, GatewayError, OSError) as exc:
        return said(exc)


READER_GONE = 141  # what a shell reports for a command a closed pipe stopped (128 + SIGPIPE)


def _stdout_gone() -> bool:
    """Whether standard output's reader went away (``| head``): not an error to report, and nothing
    more can be written there, the interpreter's last flush included."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured, replaced): not what broke
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poll.poll(0)):  # a pipe without a reader polls as an error
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True
