"""Admission: what happens to a checked invoice given what is already stored.

The one decision every storage backend takes inside the transaction that stores an invoice, so
that two writers racing on the same invoice cannot both win.  The backend looks up what the
decision needs (the earlier acceptance of the same content, an earlier invoice with the same
number, the seller's payee accounts) and carries out what it says; the rules live here once.

    same content stored before  → the earlier receipt (a duplicate: nothing new is stored)
    same number, other content  → Conflict (409 DUPLICATE_CONFLICT)
    otherwise                   → stored, held for review when any hold reason applies

"Same number" is the business key (seller, series, number, issue date) compared as a person reads it
(``number_key``, ``date_key``): written with other letter case, dashes, spaces, invisible characters,
full-width or leading-zero digits, or a date with a time-zone suffix, it is the same invoice, and a
second payment of it is what the check exists to stop.  The sender's own values are kept for display.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Conflict, Detail
from ..model import AcceptedInvoice, Receipt
from .fraud import PayeeHistory, payee_history

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"), "-")
_DIGITS = re.compile(r"\d+")
_DATE = re.compile(r"\s*(-?\d{4,}-\d{2}-\d{2})")


def number_key(number: str) -> str:
    """An invoice number as a person reads it: compatibility forms folded (full-width letters and digits),
    spaces and invisible characters gone, every dash one hyphen, case folded, and each run of digits
    without its leading zeros.  ("INV-1-23" and "INV-12-3" stay two numbers: separators are kept.)"""
    text = unicodedata.normalize("NFKC", number).translate(_DASHES)
    text = "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Zs"))
    return _DIGITS.sub(lambda m: str(int(m.group())), text.casefold())


def date_key(issue_date: str) -> str:
    """The calendar date of an xs:date as written (YYYY-MM-DD), without a time-zone suffix or offset."""
    match = _DATE.match(issue_date)
    return match.group(1) if match else issue_date.strip()


@dataclass(frozen=True, slots=True)
class Earlier:
    """A stored acceptance of the same content (``retired``: deleted by retention, only its tombstone is left)."""

    message_id: str
    received_at: str
    sha256: str
    status: str  # what its sender is told now
    rules: Mapping[str, Any] | None = None
    retired: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """Store the invoice: with this status, these hold reasons, these payee accounts recorded and
    these audit records (in order, actor "gateway")."""

    receipt: Receipt
    holds: tuple[str, ...]
    new_accounts: tuple[tuple[str, str], ...]
    audit: tuple[tuple[str, dict[str, Any]], ...]

    @property
    def held(self) -> bool:
        return bool(self.holds)


def needs_history(invoice: AcceptedInvoice) -> bool:
    """Whether the decision reads the seller's payee accounts (received invoices that name any)."""
    return invoice.direction == "in" and bool(invoice.accounts)


def duplicate_receipt(earlier: Earlier) -> Receipt:
    """What the sender of content stored before is told: the earlier message, as it stands now."""
    return Receipt(earlier.message_id, earlier.status, earlier.sha256, earlier.received_at, duplicate=True,
                   rules=dict(earlier.rules) if earlier.rules is not None else None)


def admit(invoice: AcceptedInvoice, *, earlier: Earlier | None, same_number: str | None,
          history: Mapping[str, str]) -> Admission | Receipt:
    """The receipt of an earlier identical submission, or how to store this one.  Raises Conflict
    when ``same_number`` (the message id of a stored invoice with this seller, series, number and
    issue date) holds other content."""
    if earlier is not None:
        return duplicate_receipt(earlier)
    f = invoice.facts
    if same_number is not None:
        raise Conflict(
            f"{f.kind} number {f.invoice_number!r} of {f.issue_date} was already accepted from you with different "
            f"content (message {same_number}); issue a new number, or a credit note to correct it",
            [Detail(f"earlier message_id {same_number}", path="invoice number (BT-1) and issue date (BT-2)")],
            code="DUPLICATE_CONFLICT",
        )
    payees = payee_history(invoice.accounts, history) if needs_history(invoice) else PayeeHistory()
    holds = invoice.holds + payees.holds
    accepted = "invoice.accepted" if invoice.direction == "in" else "invoice.submitted"
    audit = [*payees.audit, (accepted, {
        "sha256": invoice.sha256, "document_type": f.document_type.label, "size": invoice.size, "key_id": invoice.key_id,
        "destinations": list(invoice.destinations), "held": bool(holds)})]
    if holds:
        audit.append(("quarantine.held", {"reasons": list(holds)}))
    receipt = Receipt(invoice.message_id, "held" if holds else "accepted", invoice.sha256, invoice.received_at,
                      rules=invoice.rules)
    return Admission(receipt, holds, payees.new, tuple(audit))
