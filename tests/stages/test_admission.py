"""Admission (gateway/stages/admission.py): the intake decision every store takes inside its write transaction.

It promises, given what the store found:

* the same content stored before → the earlier receipt, marked duplicate, whatever else is known
  (a conflicting number or the payee history is not even looked at);
* the same seller, series, number and issue date with other content → Conflict (409
  DUPLICATE_CONFLICT) naming the number, the date and the earlier message;
* otherwise → an Admission: "accepted", or "held" when the invoice's own hold reasons or its payee
  accounts (compared with the seller's history, received invoices only) say so, with the accounts
  to record and the audit records to append, in order.

The store's side (the lookups, the SQL) is tested through the store contract; here the decision is
called directly with the facts a store would hand it.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest

from gateway.errors import Conflict
from gateway.model import AcceptedInvoice, DocumentType, InvoiceFacts, Receipt
from gateway.stages.admission import Admission, Earlier, admit, date_key, duplicate_receipt, needs_history, number_key

IBAN_A = "DE89370400440532013000"
IBAN_B = "GB82WEST12345698765432"

FACTS = InvoiceFacts(
    document_type=DocumentType.UBL_INVOICE, invoice_number="INV-7", ubl_version="2.1",
    supplier_ids=("0088:4000001000006",), customer_ids=("0088:4000002000005",), customization_id="urn:x", profile_id="urn:y",
    issue_date="2026-11-02", payee_accounts=(IBAN_A,), payable_amount="1250.00", currency="EUR")
INVOICE = AcceptedInvoice(
    message_id="m-new", partner="acme", sha256="ab" * 32, received_at="2026-11-03T10:00:00.000000Z", size=4321,
    facts=FACTS, sealed=b"sealed", key_id="k1", rules={"packs": ["en16931 1.3.16"], "warnings": []},
    accounts=(IBAN_A,), destinations=("erp",), route="routes[0]")
EARLIER = Earlier("m-old", "2026-11-01T09:00:00.000000Z", "cd" * 32, "delivered", {"packs": ["en16931 1.3.16"]})


def invoice(**changes: Any) -> AcceptedInvoice:
    return dataclasses.replace(INVOICE, **changes)


def accepted_record(inv: AcceptedInvoice, *, held: bool) -> tuple[str, dict[str, Any]]:
    action = "invoice.accepted" if inv.direction == "in" else "invoice.submitted"
    return action, {"sha256": inv.sha256, "document_type": "ubl:Invoice", "size": inv.size, "key_id": inv.key_id,
                    "destinations": list(inv.destinations), "held": held}


# --- the same content again ------------------------------------------------------------------------


def test_content_stored_before_is_the_earlier_receipt_and_nothing_else_is_decided():
    # A conflicting number and an unknown payee account would each change the outcome of a new
    # invoice; for a resend of the same bytes neither matters: the sender is told what it was told.
    got = admit(invoice(accounts=(IBAN_B,)), earlier=EARLIER, same_number="m-other", history={IBAN_A: "known"})
    assert got == Receipt("m-old", "delivered", "cd" * 32, "2026-11-01T09:00:00.000000Z", duplicate=True,
                          rules={"packs": ["en16931 1.3.16"]})


@pytest.mark.parametrize("earlier", [
    Earlier("m-old", "2026-11-01T09:00:00.000000Z", "cd" * 32, "held"),
    Earlier("m-old", "2026-11-01T09:00:00.000000Z", "cd" * 32, "delivered", retired=True),
], ids=["held-earlier", "retired-tombstone"])
def test_the_duplicate_receipt_is_the_earlier_message_as_it_stands_now(earlier: Earlier):
    receipt = duplicate_receipt(earlier)
    assert (receipt.message_id, receipt.status, receipt.sha256, receipt.received_at) == (
        earlier.message_id, earlier.status, earlier.sha256, earlier.received_at)
    assert receipt.duplicate and receipt.rules is None
    assert "rules" not in receipt.as_json()


def test_the_duplicate_receipt_carries_a_plain_copy_of_the_earlier_rules():
    stored = {"packs": ["en16931 1.3.16"], "warnings": [{"id": "BR-CL-10"}]}
    receipt = duplicate_receipt(dataclasses.replace(EARLIER, rules=MappingProxyType(stored)))
    assert type(receipt.rules) is dict and receipt.rules == stored  # JSON-serialisable, whatever mapping the store gave
    assert receipt.as_json()["rules"] == stored


# --- the same number, other content ------------------------------------------------------------------


@pytest.mark.parametrize(("doc_type", "credit_note", "kind"), [
    (DocumentType.UBL_INVOICE, False, "invoice"), (DocumentType.UBL_CREDIT_NOTE, True, "credit-note")])
def test_same_number_with_other_content_is_a_conflict(doc_type: DocumentType, credit_note: bool, kind: str):
    inv = invoice(facts=dataclasses.replace(FACTS, document_type=doc_type, credit_note=credit_note))
    with pytest.raises(Conflict) as caught:
        admit(inv, earlier=None, same_number="m-first", history={})
    exc = caught.value
    assert (exc.code, exc.http_status) == ("DUPLICATE_CONFLICT", 409)
    assert exc.message.startswith(f"{kind} number 'INV-7' of 2026-11-02 was already accepted from you with different content")
    assert "(message m-first)" in exc.message and "issue a new number, or a credit note" in exc.message
    assert [d.as_json() for d in exc.details] == [
        {"message": "earlier message_id m-first", "path": "invoice number (BT-1) and issue date (BT-2)"}]


# --- a new invoice -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "accounts", "expected"), [
    ("in", (IBAN_A,), True), ("in", (), False), ("out", (IBAN_A,), False), ("out", (), False)])
def test_only_received_invoices_naming_accounts_need_the_sellers_history(direction: str, accounts: tuple[str, ...],
                                                                         expected: bool):
    assert needs_history(invoice(direction=direction, accounts=accounts)) is expected


def test_a_new_invoice_with_a_known_account_is_accepted():
    decided = admit(INVOICE, earlier=None, same_number=None, history={IBAN_A: "known", IBAN_B: "pending"})
    assert isinstance(decided, Admission)
    assert decided.receipt == Receipt("m-new", "accepted", "ab" * 32, "2026-11-03T10:00:00.000000Z",
                                      rules={"packs": ["en16931 1.3.16"], "warnings": []})
    assert not decided.held and decided.holds == () and decided.new_accounts == ()
    assert decided.audit == (accepted_record(INVOICE, held=False),)


def test_a_new_sellers_first_accounts_are_recorded_as_known_and_flagged_not_held():
    inv = invoice(accounts=(IBAN_A, IBAN_B))
    decided = admit(inv, earlier=None, same_number=None, history={})
    assert isinstance(decided, Admission) and not decided.held and decided.receipt.status == "accepted"
    assert decided.new_accounts == ((IBAN_A, "known"), (IBAN_B, "known"))
    assert decided.audit == (("account.first_seen", {"accounts": ["DE89…3000", "GB82…5432"]}), accepted_record(inv, held=False))


def test_an_account_the_seller_never_used_holds_the_invoice():
    inv = invoice(accounts=(IBAN_B,))
    decided = admit(inv, earlier=None, same_number=None, history={IBAN_A: "known"})
    assert isinstance(decided, Admission) and decided.held
    assert decided.receipt.status == "held" and not decided.receipt.duplicate
    assert decided.holds == ("payee account GB82…5432 was never used by this seller before",)
    assert decided.new_accounts == ((IBAN_B, "pending"),)
    assert [action for action, _ in decided.audit] == ["account.changed", "invoice.accepted", "quarantine.held"]
    assert decided.audit[1] == accepted_record(inv, held=True)
    assert decided.audit[2] == ("quarantine.held", {"reasons": list(decided.holds)})
    assert IBAN_B not in repr(decided.audit)  # the audit log shows accounts masked


def test_the_invoices_own_hold_reasons_come_first_and_hold_it_without_any_account():
    ceiling = "payable amount 1250.00 EUR is over the ceiling 1000"
    inv = invoice(holds=(ceiling,), accounts=(IBAN_B,))
    decided = admit(inv, earlier=None, same_number=None, history={IBAN_A: "known"})
    assert isinstance(decided, Admission)
    assert decided.holds == (ceiling, "payee account GB82…5432 was never used by this seller before")
    assert decided.audit[-1] == ("quarantine.held", {"reasons": list(decided.holds)})

    no_accounts = admit(invoice(holds=(ceiling,), accounts=()), earlier=None, same_number=None, history={})
    assert isinstance(no_accounts, Admission)
    assert (no_accounts.receipt.status, no_accounts.holds, no_accounts.new_accounts) == ("held", (ceiling,), ())


def test_a_submitted_invoice_is_not_compared_with_any_payee_history():
    # Outbound, the gateway's own business is the seller: its accounts are neither recorded nor held.
    inv = invoice(direction="out", accounts=(IBAN_B,), rules=None)
    decided = admit(inv, earlier=None, same_number=None, history={IBAN_A: "known"})
    assert isinstance(decided, Admission) and not decided.held
    assert decided.new_accounts == ()
    assert decided.audit == (accepted_record(inv, held=False),)
    assert decided.receipt.rules is None and "rules" not in decided.receipt.as_json()


@pytest.mark.parametrize(("written", "key"), [
    ("INV-0042", "inv-42"), ("inv\u201342", "inv-42"), ("INV\u00a0-\u200b42", "inv-42"), ("ＩＮＶ－０４２", "inv-42"),
    ("\ufeffINV-42\t", "inv-42"), ("2026/0007", "2026/7"), ("A0B00", "a0b0"), ("Straße-1", "strasse-1"),
    ("INV-\u0664\u0662", "inv-42"),
])
def test_a_number_as_a_person_reads_it(written: str, key: str) -> None:
    assert number_key(written) == key


@pytest.mark.parametrize(("written", "key"), [
    ("2026-11-02", "2026-11-02"), ("2026-11-02Z", "2026-11-02"), ("2026-11-02+01:00", "2026-11-02"),
    ("2026-11-02-05:00", "2026-11-02"), (" 2026-11-02 ", "2026-11-02"), ("not a date", "not a date"),
])
def test_a_date_without_its_time_zone(written: str, key: str) -> None:
    assert date_key(written) == key

