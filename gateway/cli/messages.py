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
from ..model import DocumentType, InvoiceFacts, stamp
from ..partners.book import load_directory
from ..stages.routing import Router
from ..storage.base import Store
from ..storage.records import SUMMARIES, DeadLetter, MessageSummary, QuarantineEntry
from .common import actor, count, opened, when, with_by, with_config, with_json
from .errors import NotFound
from .output import Column, listing, record

STATUSES = (*SUMMARIES, "pending", "dead")  # a message's status, or the state of one of its deliveries


def add_parsers(sub: Any) -> None:
    q = sub.add_parser("quarantine", help="invoices held for review (changed bank account, amount ceiling)")
    qsub = q.add_subparsers(dest="action", required=True)
    ql = with_config(qsub.add_parser("list", help="list held invoices (or every decision with --all)"))
    ql.add_argument("--all", action="store_true", help="include released and rejected ones")
    ql.add_argument("--partner", help="only this partner's")
    with_json(ql)
    qs = with_config(qsub.add_parser("show", help="one held invoice, with the seller's account history beside it"))
    qs.add_argument("message_id", help="the message id (quarantine list shows them)")
    with_json(qs, "it")
    for action, what in (("release", "deliver it"), ("reject", "never deliver it")):
        qd = with_config(qsub.add_parser(action, help=f"decide a held invoice: {what}"))
        qd.add_argument("message_id", help="the held message's id")
        qd.add_argument("--reason", required=True, help="why (recorded in the audit log with who decided)")
        with_by(qd, "who decides, if not you")
        if action == "release":
            qd.add_argument("--to", action="append", default=[], metavar="DESTINATION",
                            help="where to deliver it (default: what the routing rules say now)")

    m = sub.add_parser("messages", help="accepted and submitted invoices and their deliveries")
    msub = m.add_subparsers(dest="action", required=True)
    ml = with_config(msub.add_parser("list", help="newest first"))
    filters(ml)
    ml.add_argument("--status", type=str.lower, choices=STATUSES, metavar="STATUS",
                    help=f"only messages in this status, or with a delivery in this state: {', '.join(STATUSES)} "
                         "(any case)")
    ml.add_argument("--direction", choices=("in", "out"), help="in: from partners; out: submitted for sending")
    ms = with_config(msub.add_parser("show", help="one message: facts, deliveries and history (never its content)"))
    ms.add_argument("message_id", help="the message id (messages list shows them)")
    with_json(ms, "it")
    for action, what in (("retry", "attempt its waiting deliveries now"),
                         ("requeue", "put its dead-lettered deliveries back in the queue, with a new retry horizon")):
        mr = with_config(msub.add_parser(action, help=what))
        mr.add_argument("message_id", help="the message id")
        mr.add_argument("--destination", help="only this destination")
        mr.add_argument("--reason", required=action == "requeue", default="", help="why (recorded in the audit log)")
        with_by(mr, "who asks, if not you")
    dl = with_config(sub.add_parser("dead-letters", help="deliveries given up on, newest first, with the reason"))
    filters(dl)
    dl.add_argument("--destination", help="only deliveries to this destination")


def filters(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--partner", help="only this partner's (the recipient's, for messages sent out)")
    sp.add_argument("--since", type=when, help="from this time on (YYYY-MM-DD or an RFC 3339 time, UTC)")
    sp.add_argument("--until", type=when, help="before this time")
    sp.add_argument("--limit", type=count, default=100, help="at most this many, newest first (default 100)")
    with_json(sp)


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.command == "quarantine":
        return asyncio.run(_quarantine(cfg, args))
    return asyncio.run(_messages(cfg, args))


async def known_partner(cfg: Config, store: Store, name: str | None) -> str | None:
    """``--partner``: a registered partner (its name in any case), or one removed since whose messages are
    stored; else not found."""
    if name is None:
        return None
    names = [p.name for p in load_directory(cfg.partners_file).partners]
    folded = [n for n in names if n.casefold() == name.casefold()]
    if name in names or await store.reports.messages(partner=name, limit=1):
        return name
    if len(folded) == 1:
        return folded[0]
    raise NotFound(f"--partner: no partner named {name!r} (see: einvoice-gateway partners list)")


async def known_destination(cfg: Config, store: Store, name: str | None, option: str = "--destination") -> str | None:
    """A configured destination, or one removed since that dead letters still name; else not found."""
    configured = [d.name for d in cfg.destinations]
    if name is None or name in configured or await store.reports.dead_letters(destination=name, limit=1):
        return name
    raise NotFound(f"{option}: no destination named {name!r} (configured: {', '.join(configured) or 'none'})")


QUARANTINE: list[Column[QuarantineEntry]] = [
    ("message id", lambda e: e.message_id), ("state", lambda e: e.state), ("partner", lambda e: e.partner),
    ("invoice", lambda e: e.invoice_number), ("issued", lambda e: e.issue_date),
    ("amount", lambda e: f"{e.payable_amount} {e.currency}"), ("reasons", lambda e: "; ".join(e.reasons))]
MESSAGES: list[Column[MessageSummary]] = [
    ("message id", lambda r: r.message_id), ("dir", lambda r: r.direction), ("received", lambda r: r.received_at),
    ("partner", lambda r: r.partner), ("status", lambda r: r.status), ("type", lambda r: r.document_type),
    ("invoice", lambda r: r.invoice_number), ("amount", lambda r: f"{r.payable_amount} {r.currency}")]
DEAD_LETTERS: list[Column[DeadLetter]] = [
    ("message id", lambda r: r.message_id), ("destination", lambda r: r.destination), ("partner", lambda r: r.partner),
    ("invoice", lambda r: r.invoice_number), ("dead since", lambda r: r.dead_at), ("attempts", lambda r: r.attempts),
    ("error", lambda r: r.error)]


async def _quarantine(cfg: Config, args: argparse.Namespace) -> int:
    async with opened(cfg) as store:
        if args.action == "list":
            partner = await known_partner(cfg, store, args.partner)
            return listing(await store.quarantine.held(None if args.all else "held", partner), args.json, QUARANTINE,
                           "no invoices are held" if not args.all else "no invoice was ever held")
        if args.action == "show":
            found = await store.quarantine.entry(args.message_id)
            if found is None:
                raise NotFound(f"no quarantined message {args.message_id}")
            return record(found.as_json(), args.json)
        release = args.action == "release"
        to = tuple(args.to) if release else ()
        for d in to:
            await known_destination(cfg, store, d, "--to")
        if release and not to:  # held before routing found a destination: route it with today's rules
            to = await _route_again(cfg, store, args.message_id)
        decided = await store.quarantine.decide(args.message_id, release, actor(args.by), args.reason, to)
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
            rows = await store.reports.dead_letters(partner=await known_partner(cfg, store, args.partner),
                                                    destination=await known_destination(cfg, store, args.destination),
                                                    since=args.since.timestamp() if args.since else None,
                                                    until=args.until.timestamp() if args.until else None, limit=args.limit)
            return listing(rows, args.json, DEAD_LETTERS, "no dead letters")
        if args.action == "list":
            found = await store.reports.messages(direction=args.direction, partner=await known_partner(cfg, store, args.partner),
                                                 status=args.status, since=stamp(args.since) if args.since else None,
                                                 until=stamp(args.until) if args.until else None, limit=args.limit)
            return listing(found, args.json, MESSAGES, "no messages")
        if args.action == "show":
            shown = await store.reports.message(args.message_id)
            if shown is None:
                raise NotFound(f"no message {args.message_id}")
            return record(shown.as_json(), args.json)
        done = await store.outbox.retry(args.message_id, args.destination, actor(args.by),
                                        requeue=args.action == "requeue", reason=args.reason)
        print(f"message {args.message_id}: {'requeued' if args.action == 'requeue' else 'due now'} for "
              f"{', '.join(done)}; the running gateway attempts it within a second")
        return 0
