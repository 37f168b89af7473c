"""``einvoice-gateway init``, ``serve``, ``check-config`` and ``demo``: making and running an instance."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

from .. import logs
from ..config.load import load
from ..operations.instance import init
from .common import with_config


def add_parsers(sub: Any) -> None:
    i = sub.add_parser("init", help="create a working instance with a development PKI and a demo partner")
    i.add_argument("dir", help="a new (or empty) folder for the instance")
    i.add_argument("--host", default="127.0.0.1", help="address the partner listener binds to (default 127.0.0.1)")
    i.add_argument("--port", type=int, default=8443, help="partner listener port (default 8443; the SMTP port is this + 3)")
    i.add_argument("--json", action="store_true", help="print the paths and addresses as one JSON object")
    sv = with_config(sub.add_parser("serve", help="run the gateway in the foreground (SIGTERM/SIGINT stop it, SIGHUP reloads)"))
    sv.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its children
    sv.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    sv.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)
    sv.add_argument("--smtp-fd", type=int, help=argparse.SUPPRESS)
    with_config(sub.add_parser("check-config", help="check a configuration; exit 2 naming the bad key"))
    d = sub.add_parser("demo", help="start a throwaway instance, send sample invoices, keep serving until Ctrl-C, "
                                    "SIGTERM or SIGHUP")
    d.add_argument("--dir", help="make the instance here and keep it (default: a temporary folder, removed at exit)")
    d.add_argument("--port", type=int, default=8443, help="preferred port (a free one is used if busy)")
    d.add_argument("--no-wait", action="store_true", help="exit after the samples instead of serving until Ctrl-C")


def run(args: argparse.Namespace) -> int:
    if args.command == "init":
        inst = init(Path(args.dir), host=args.host, port=args.port)
        if args.json:
            print(json.dumps(inst.as_json(), indent=2))
        else:
            print(f"Instance created in {inst.root} (DEVELOPMENT PKI: not for production).")
            print(f"Run it:   einvoice-gateway serve -c {inst.config}")
        return 0
    if args.command == "demo":
        from . import demo  # starts a whole gateway in this process: imported only for the demo

        return demo.main(args.dir, not args.no_wait, args.port)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    # The daemon's code (aiohttp, the console, the rules engine) is imported only by the commands that run it.
    from ..app.build import build, warnings
    from ..app.gateway import LISTEN_BACKLOG
    from ..app.serve import bind_probe, serve_forever
    from ..app.supervisor import supervise, worker_count

    if getattr(args, "worker", None) is not None:  # a child of the supervisor, serving the socket it was handed
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
