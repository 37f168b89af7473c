"""gateway/model.py: the frozen values passed between the pipeline's stages.

``stamp`` writes times in the one text form that is stored, sorted and compared.  ``DocumentType``
fails closed: an unknown root element is a typed 422 rejection, never a KeyError.  Certificate
windows (a rollover) accept from their start and refuse from their end on; a partner applies only
the window of the same key and purpose.  A ``Receipt`` tells the sender what happened and, for a
held invoice, not why.  Payloads (the invoice bytes, the sealed blob) stay out of ``repr``.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import UnsupportedDocument
from gateway.model import (
    CII_NS,
    UBL_CREDIT_NOTE_NS,
    UBL_INVOICE_NS,
    AcceptedInvoice,
    CertWindow,
    DocumentType,
    InboundMessage,
    InvoiceFacts,
    Partner,
    PartnerStatus,
    PeerIdentity,
    Receipt,
    Syntax,
    stamp,
)

START = datetime(2027, 1, 31, 12, 0, tzinfo=UTC)
END = datetime(2027, 6, 1, tzinfo=UTC)
FACTS = InvoiceFacts(DocumentType.UBL_INVOICE, "INV-1", "2.1", ("0088:1",), (), "urn:c", "urn:p", "2026-11-02")


def partner(*windows: CertWindow) -> Partner:
    return Partner("acme", PartnerStatus.ACTIVE, "test", "2026-01-01T00:00:00Z", frozenset({"aa", "bb"}),
                   ("certs/old.crt", "certs/new.crt"), frozenset({"0088:1"}), windows=windows)


def test_stamp_of_epoch_seconds_a_datetime_and_now() -> None:
    assert stamp(0) == "1970-01-01T00:00:00.000000Z"
    assert stamp(1_790_000_000.5) == "2026-09-21T14:13:20.500000Z"
    assert stamp(datetime(2026, 11, 2, 8, 30, 0, 7, tzinfo=UTC)) == "2026-11-02T08:30:00.000007Z"
    before, at, after = stamp(datetime.now(UTC)), stamp(), stamp(datetime.now(UTC))
    assert before <= at <= after


def test_stamps_sort_as_text_in_time_order() -> None:
    """Times are stored and compared as text: the order of the text must be the order of the times."""
    base = datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    times = [base + timedelta(microseconds=n) for n in (-1_000_000, -1, 0, 1, 2, 10**6, 86400 * 10**6)]
    texts = [stamp(t) for t in times]
    assert sorted(texts) == texts and len(set(texts)) == len(texts)
    assert {len(t) for t in texts} == {27}  # fixed width, so no prefix sorts wrongly


@pytest.mark.parametrize(("namespace", "local", "member", "syntax", "label"), [
    (UBL_INVOICE_NS, "Invoice", DocumentType.UBL_INVOICE, Syntax.UBL, "ubl:Invoice"),
    (UBL_CREDIT_NOTE_NS, "CreditNote", DocumentType.UBL_CREDIT_NOTE, Syntax.UBL, "ubl:CreditNote"),
    (CII_NS, "CrossIndustryInvoice", DocumentType.CII_INVOICE, Syntax.CII, "cii:CrossIndustryInvoice"),
])
def test_document_type_from_its_root(namespace: str, local: str, member: DocumentType, syntax: Syntax, label: str) -> None:
    found = DocumentType.from_root(namespace, local)
    assert found is member
    assert (found.syntax, found.label, found.root, found.namespace) == (syntax, label, local, namespace)


@pytest.mark.parametrize(("namespace", "local", "shown"), [
    (UBL_INVOICE_NS, "CreditNote", f"{{{UBL_INVOICE_NS}}}CreditNote"),  # a known name in the other's namespace
    (UBL_CREDIT_NOTE_NS, "Invoice", f"{{{UBL_CREDIT_NOTE_NS}}}Invoice"),
    ("urn:oasis:names:specification:ubl:schema:xsd:DebitNote-2", "DebitNote",
     "{urn:oasis:names:specification:ubl:schema:xsd:DebitNote-2}DebitNote"),
    (None, "Invoice", "Invoice"),  # no namespace at all
    ("", "Invoice", "Invoice"),
])
def test_unknown_root_is_a_typed_rejection(namespace: str | None, local: str, shown: str) -> None:
    with pytest.raises(UnsupportedDocument) as err:
        DocumentType.from_root(namespace, local)
    exc = err.value
    assert (exc.code, exc.http_status) == ("UNSUPPORTED_DOCUMENT_TYPE", 422)
    assert "send a UBL 2.1 Invoice or CreditNote, or a UN/CEFACT CrossIndustryInvoice" in exc.message
    assert [d.as_json() for d in exc.details] == [{"message": f"found root element {shown}", "path": "/*"}]


def test_what_the_sender_sent_is_bounded_and_kept_out_of_the_message() -> None:
    """The message is fixed (it is logged); the sender's text goes, cut short, into a detail."""
    with pytest.raises(UnsupportedDocument) as err:
        DocumentType.from_root("urn:" + "x" * 5000, "Evil")
    assert "xxx" not in err.value.message
    [detail] = err.value.details
    assert detail.message == "found root element {urn:" + "x" * 195


def test_labels_name_each_document_type_once() -> None:
    """The label is what is stored and shown; the CLI finds the member again by it."""
    labels = [t.label for t in DocumentType]
    assert len(set(labels)) == len(labels) == 3
    assert {t.syntax for t in DocumentType} == set(Syntax)


def test_cert_window_from_start_until_before_end() -> None:
    window = CertWindow("client", "certs/new.crt", "aa", start=START, end=END)
    just = timedelta(microseconds=1)
    assert window.refusal(START - just) == ("is registered from 2027-01-31T12:00:00Z on (a certificate rollover) "
                                            "and is not accepted yet")
    assert window.refusal(START) is None
    assert window.refusal(END - just) is None
    assert window.refusal(END) == "was retired at 2027-06-01T00:00:00Z (a certificate rollover); use the newer certificate"
    assert window.refusal(END + timedelta(days=400)) is not None


def test_open_ended_cert_windows() -> None:
    ancient, far = datetime(1990, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
    assert CertWindow("client", "p", "aa").refusal(ancient) is None  # no bounds: accepted while registered
    assert CertWindow("client", "p", "aa", end=END).refusal(ancient) is None
    assert CertWindow("client", "p", "aa", start=START).refusal(far) is None


def test_partner_applies_only_the_window_of_the_same_key_and_purpose() -> None:
    new = CertWindow("client", "certs/new.crt", "bb", start=START)
    signing = CertWindow("signing", "certs/new.crt", "aa", end=START)  # the same key may be registered for signing too
    p = partner(new, signing)
    before = START - timedelta(days=1)
    assert p.refusal("bb", before, "client") is not None  # not yet
    assert p.refusal("bb", START, "client") is None
    assert p.refusal("aa", START, "client") is None  # no client window for this key: accepted while registered
    assert p.refusal("aa", START, "signing") is not None  # its signing window has ended
    assert p.refusal("cc", START, "client") is None  # (whether the key is registered at all is not the window's business)
    assert p.window("client", "certs/new.crt") == new
    assert p.window("signing", "certs/new.crt") == signing
    assert p.window("smime", "certs/new.crt") is None and p.window("client", "certs/old.crt") is None


def test_receipt_of_a_held_invoice_does_not_say_why() -> None:
    common = ("m-1", "held", "ab" * 32, "2026-11-02T08:30:00.000000Z")
    held = Receipt(*common).as_json()
    assert held == {"message_id": "m-1", "status": "held", "sha256": "ab" * 32, "received_at": "2026-11-02T08:30:00.000000Z",
                    "duplicate": False, "message": "accepted and held for review before delivery"}
    accepted = Receipt("m-2", "accepted", "cd" * 32, common[3], duplicate=True, rules={"packs": ["en16931"], "warnings": []})
    assert accepted.as_json() == {"message_id": "m-2", "status": "accepted", "sha256": "cd" * 32, "received_at": common[3],
                                  "duplicate": True, "rules": {"packs": ["en16931"], "warnings": []}}


def test_credit_notes_have_a_numbering_series_of_their_own() -> None:
    assert FACTS.kind == "invoice"
    assert dataclasses.replace(FACTS, credit_note=True).kind == "credit-note"


def test_payloads_stay_out_of_repr_and_values_are_frozen() -> None:
    body, sealed = b"<Invoice>CANARY-BODY</Invoice>", b"CANARY-SEALED"
    message = InboundMessage(body, PeerIdentity("aa", "CN=acme", "https"), partner(), "2026-11-02T08:30:00.000000Z")
    invoice = AcceptedInvoice("m-1", "acme", "ab" * 32, "2026-11-02T08:30:00.000000Z", len(body), FACTS, sealed, "k1")
    assert "CANARY" not in repr(message) and "CN=acme" in repr(message)
    assert "CANARY" not in repr(invoice) and "INV-1" in repr(invoice)
    with pytest.raises(dataclasses.FrozenInstanceError):
        invoice.partner = "mallory"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.peer.spki_sha256 = "bb"  # type: ignore[misc]
