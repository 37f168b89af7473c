"""``einvoice-gateway quarantine …``, ``messages …`` and ``dead-letters``: the message flow, from the host.

They read and change the instance's store beside the running daemon; decisions and retries are
audit records naming who asked.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..config.load import load
from ..config.model import Config
from ..errors import ConfigError
from ..model import DocumentType, InvoiceFacts, stamp
from ..stages.routing import Router
from ..storage.base import NotHeld, Store
from .common import current_user, opened, print_one, print_rows, refused, when, with_config


def add_parsers(sub: Any) -> None:
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


def filters(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--partner")
    sp.add_argument("--since", type=when, help="from this time on (YYYY-MM-DD or an RFC 3339 time, UTC)")
    sp.add_argument("--until", type=when, help="before this time")
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")



def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.command == "quarantine":
        return asyncio.run(_quarantine(cfg, args))
    return asyncio.run(_messages(cfg, args))


async def _quarantine(cfg: Config, args: argparse.Namespace) -> int:
    async with opened(cfg) as store:
        if args.action == "list":
            return print_rows(await store.quarantine.held(None if args.all else "held", args.partner), args.json, lambda e: (
                f"{e.message_id}\t{e.state}\t{e.partner}\t{e.invoice_number}\t{e.issue_date}\t"
                f"{e.payable_amount} {e.currency}\t{'; '.join(e.reasons)}"))
        if args.action == "show":
            return print_one(await store.quarantine.entry(args.message_id), f"no quarantined message {args.message_id}")
        release = args.action == "release"
        to = tuple(args.to) if release else ()
        unknown = [d for d in to if d not in {x.name for x in cfg.destinations}]
        if unknown:
            raise ConfigError(f"--to: no destination named {unknown[0]!r} (configured: "
                              f"{', '.join(d.name for d in cfg.destinations)})")
        if release and not to:  # held before routing found a destination: route it with today's rules
            to = await _route_again(cfg, store, args.message_id)
        try:
            decided = await store.quarantine.decide(args.message_id, release, args.by or current_user(), args.reason, to)
        except NotHeld as exc:
            return refused(exc.message)
        print(f"message {decided.message_id} {decided.state} by {decided.decided_by}"
              + ("; the running gateway delivers it within seconds" if decided.state == "released" else ""))
        return 0


async def _route_again(cfg: Config, store: Store, message_id: str) -> tuple[str, ...]:
    """Where the routing rules of the current configuration send a stored message."""
    m = await store.reports.message(message_id)
    if m is None or m.deliveries:
        return ()
    doc_type = next(t for t in DocumentType if t.label == m.document_type)
    facts = InvoiceFacts(doc_type, m.invoice_number, "", tuple(m.supplier_ids or ()), tuple(m.customer_ids or ()),
                         m.customization_id, m.profile_id, m.issue_date)
    return Router(cfg.routes, cfg.routing_default).route(m.partner, facts)


async def _messages(cfg: Config, args: argparse.Namespace) -> int:
    async with opened(cfg) as store:
        if args.command == "dead-letters":
            rows = await store.reports.dead_letters(partner=args.partner, destination=args.destination,
                                                    since=args.since.timestamp() if args.since else None,
                                                    until=args.until.timestamp() if args.until else None, limit=args.limit)
            return print_rows(rows, args.json, lambda r: (
                f"{r.message_id}\t{r.destination}\t{r.partner}\t{r.invoice_number}\t"
                f"dead since {r.dead_at}\tattempts {r.attempts}\t{r.error}"))
        if args.action == "list":
            found = await store.reports.messages(direction=args.direction, partner=args.partner, status=args.status,
                                                 since=stamp(args.since) if args.since else None,
                                                 until=stamp(args.until) if args.until else None, limit=args.limit)
            return print_rows(found, args.json, lambda r: (
                f"{r.message_id}\t{r.direction}\t{r.received_at}\t{r.partner}\t{r.status}\t"
                f"{r.document_type}\t{r.invoice_number}\t{r.payable_amount} {r.currency}"))
        if args.action == "show":
            return print_one(await store.reports.message(args.message_id), f"no message {args.message_id}")
        try:
            done = await store.outbox.retry(args.message_id, args.destination, args.by or current_user(),
                                            requeue=args.action == "requeue", reason=args.reason)
        except NotHeld as exc:
            return refused(exc.message)
        print(f"message {args.message_id}: {'requeued' if args.action == 'requeue' else 'due now'} for "
              f"{', '.join(done)}; the running gateway attempts it within a second")
        return 0
