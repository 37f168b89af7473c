"""Checks against the invoice frauds businesses actually suffer, on facts already bound to the partner.

* A payee account that fails the IBAN check digits (ISO 13616, mod 97) is rejected outright.
* A payee account the seller has never used before is *held* for review (``payee_history``,
  decided inside the store's write transaction against the accounts recorded for that partner); a
  new seller's first accounts are recorded and flagged, not held.
* A payable amount over the partner's ceiling, or in a currency it has no ceiling for, is held.

Held invoices are stored and acknowledged ("held for review", no reason given to the sender) but
not delivered until an operator releases them (`einvoice-gateway quarantine …`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import Detail, Rejected
from ..model import InvoiceFacts, Partner

_IBAN_SHAPE = re.compile(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$")


def looks_like_iban(account: str) -> bool:
    return bool(_IBAN_SHAPE.match(normalise(account)))


def normalise(account: str) -> str:
    return "".join(account.split()).upper()


def iban_valid(account: str) -> bool:
    """ISO 13616 check digits: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    iban = normalise(account)
    digits = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


class InvalidAccount(Rejected):
    code = "INVALID_IBAN"
    http_status = 422


def check_accounts(facts: InvoiceFacts, *, hold_invalid: bool = False) -> tuple[tuple[str, ...], list[str]]:
    """Reject IBANs with wrong check digits (or, with ``hold_invalid``, hold the invoice for review);
    return the accounts, normalised, for the account history, and the reasons to hold."""
    bad = [a for a in facts.payee_accounts if looks_like_iban(a) and not iban_valid(a)]
    accounts = tuple(dict.fromkeys(normalise(a) for a in facts.payee_accounts))
    if bad and hold_invalid:
        return accounts, [f"payee account {normalise(a)[:4]}…{normalise(a)[-4:]} fails the IBAN check digits" for a in bad]
    if bad:
        raise InvalidAccount("the payee account is not a valid IBAN (its check digits are wrong); correct it and resend",
                       [Detail(f"account {a!r} fails the IBAN check (ISO 13616 mod 97)",
                               path="cac:PayeeFinancialAccount/cbc:ID or ram:PayeePartyCreditorFinancialAccount")
                        for a in bad],
                       code="INVALID_IBAN")
    return accounts, []


def hold_reasons(partner: Partner, facts: InvoiceFacts) -> list[str]:
    """Reasons to hold that need no history (the account history is checked in the store)."""
    if not partner.amount_ceilings:
        return []
    ceilings = dict(partner.amount_ceilings)
    if facts.currency not in ceilings:
        return [f"currency {facts.currency or '(none)'} has no amount ceiling for this partner"]
    try:
        amount = Decimal(facts.payable_amount)
    except InvalidOperation:
        return ["the payable amount could not be read"]
    if amount > ceilings[facts.currency]:
        return [f"payable amount {amount} {facts.currency} is over the ceiling {ceilings[facts.currency]}"]
    return []


def masked(account: str) -> str:
    """Enough of an account for an operator to recognise it in a log line; not the whole number."""
    return account if len(account) <= 8 else f"{account[:4]}…{account[-4:]}"


@dataclass(frozen=True, slots=True)
class PayeeHistory:
    """What the payee accounts of one invoice change in its seller's history."""

    new: tuple[tuple[str, str], ...] = ()  # (account, state) to record: known for a new seller, pending otherwise
    holds: tuple[str, ...] = ()  # reasons to hold the invoice
    audit: tuple[tuple[str, dict[str, Any]], ...] = ()  # (action, detail) records


def payee_history(accounts: tuple[str, ...], history: Mapping[str, str]) -> PayeeHistory:
    """Compare the payee accounts with the seller's history (account → known | pending | rejected).

    A seller's first accounts become its known ones (flagged in the audit log, not held); after
    that, an account that is not known holds the invoice until someone decides."""
    if not accounts:
        return PayeeHistory()
    first = not history
    new = tuple((a, "known" if first else "pending") for a in accounts if a not in history)
    if first:
        return PayeeHistory(new, audit=(("account.first_seen", {"accounts": [masked(a) for a, _ in new]}),))
    unknown = [a for a in accounts if history.get(a, "pending") != "known"]
    if not unknown:
        return PayeeHistory(new)
    return PayeeHistory(new, tuple(f"payee account {masked(a)} was never used by this seller before" for a in unknown),
                        (("account.changed", {"accounts": [masked(a) for a in unknown]}),))
