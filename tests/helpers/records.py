"""Records for the storage tests: an accepted invoice as the intake hands it to the store."""

from __future__ import annotations

import hashlib
import uuid

from gateway.model import AcceptedInvoice, DocumentType, InvoiceFacts, stamp

WAIT = 10  # seconds; a storage future that takes longer is a failure, not a hang


def accepted_invoice(number: str, *, partner: str = "acme", content: str = "", destinations: tuple[str, ...] = ("erp",),
                     kind: DocumentType = DocumentType.UBL_INVOICE, direction: str = "in", accounts: tuple[str, ...] = (),
                     holds: tuple[str, ...] = (), issue_date: str = "2026-11-02", amount: str = "100.00") -> AcceptedInvoice:
    """An invoice past every check, sealed (a stand-in ciphertext) and ready for ``intake.put``; ``content``
    makes a different document under the same number."""
    body = f"<Invoice>{number}{content}</Invoice>".encode()
    facts = InvoiceFacts(kind, number, "2.1", ("0088:1",), ("0088:2",), "urn:c", "urn:p", issue_date, accounts,
                         amount, "EUR", credit_note=kind is DocumentType.UBL_CREDIT_NOTE)
    return AcceptedInvoice(str(uuid.uuid4()), partner, hashlib.sha256(body).hexdigest(), stamp(), len(body), facts,
                           b"sealed:" + body, "k1", accounts=accounts, holds=holds, destinations=destinations,
                           route="routing.default", direction=direction)
