"""Reading business facts from a schema-valid UN/CEFACT Cross Industry Invoice (CII D16B, EN 16931).

The same facts as from UBL, bound to the partner the same way.  Values are XPath string values.
Tax registrations (``SpecifiedTaxRegistration/ID``, schemeID ``VA``/``FC``) are kept as bare
values, as UBL writes the seller's VAT number, so one partner record fits both syntaxes.
"""

from __future__ import annotations

from lxml import etree

from ..errors import UnsupportedDocument
from ..model import CII_NS, DocumentType, InvoiceFacts
from .ubl import amount, ids_of

NS = {
    "rsm": CII_NS,
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
    "udt": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100",
}
# UNTDID 1001 document type codes of credit notes (BT-3), as the EN 16931 code list has them.
CREDIT_NOTE_CODES = frozenset({"81", "83", "261", "262", "296", "308", "381", "396", "420", "458", "532"})
_TRADE = "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction"
_SETTLEMENT = f"{_TRADE}/ram:ApplicableHeaderTradeSettlement"


def _party(role: str, where: str = "ApplicableHeaderTradeAgreement") -> tuple[etree.XPath, etree.XPath]:
    base = f"{_TRADE}/ram:{where}/ram:{role}"
    # BT-29/BT-46 (ID, GlobalID), BT-30/BT-47 (legal registration), BT-34/BT-49 (electronic address)
    schemed = etree.XPath(" | ".join(f"{base}/{p}" for p in (
        "ram:ID", "ram:GlobalID", "ram:SpecifiedLegalOrganization/ram:ID", "ram:URIUniversalCommunication/ram:URIID")),
        namespaces=NS)
    tax = etree.XPath(f"{base}/ram:SpecifiedTaxRegistration/ram:ID", namespaces=NS)  # BT-31/BT-32/BT-48
    return schemed, tax


_SELLER = _party("SellerTradeParty")
_BUYER = _party("BuyerTradeParty")
# Parties that act for the seller, read the same way: none may name another partner (docs/partners.md, Supplier binding).
_AGENTS = (("payee", _party("PayeeTradeParty", "ApplicableHeaderTradeSettlement")),  # BG-10
           ("tax representative", _party("SellerTaxRepresentativeTradeParty")),  # BG-11
           ("invoicer", _party("InvoicerTradeParty", "ApplicableHeaderTradeSettlement")))
_FIELD = {
    "number": etree.XPath("string(/rsm:CrossIndustryInvoice/rsm:ExchangedDocument/ram:ID)", namespaces=NS),
    "issue_date": etree.XPath(
        "string(/rsm:CrossIndustryInvoice/rsm:ExchangedDocument/ram:IssueDateTime/udt:DateTimeString)", namespaces=NS),
    "customization": etree.XPath("string(/rsm:CrossIndustryInvoice/rsm:ExchangedDocumentContext/"
                                 "ram:GuidelineSpecifiedDocumentContextParameter/ram:ID)", namespaces=NS),
    "profile": etree.XPath("string(/rsm:CrossIndustryInvoice/rsm:ExchangedDocumentContext/"
                           "ram:BusinessProcessSpecifiedDocumentContextParameter/ram:ID)", namespaces=NS),
    "type": etree.XPath("string(/rsm:CrossIndustryInvoice/rsm:ExchangedDocument/ram:TypeCode)", namespaces=NS),
    "currency": etree.XPath(f"string({_SETTLEMENT}/ram:InvoiceCurrencyCode)", namespaces=NS),
}
_ACCOUNTS = etree.XPath(f"{_SETTLEMENT}/ram:SpecifiedTradeSettlementPaymentMeans/ram:PayeePartyCreditorFinancialAccount/"
                        "*[self::ram:IBANID or self::ram:ProprietaryID]", namespaces=NS)  # BT-84
_PAYABLE = etree.XPath(f"{_SETTLEMENT}/ram:SpecifiedTradeSettlementHeaderMonetarySummation/ram:DuePayableAmount",
                       namespaces=NS)  # BT-115


def _ids(party: tuple[etree.XPath, etree.XPath], root: etree._Element) -> tuple[str, ...]:
    schemed, tax = party
    return tuple(dict.fromkeys(ids_of(schemed(root)) + ids_of(tax(root), schemes=False)))


def _iso_date(text: str) -> str:
    """CII writes dates as format 102 (CCYYMMDD); keep them as UBL does (CCYY-MM-DD), so the
    business-duplicate key (seller, number, issue date) is the same whichever syntax was sent."""
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def read_facts(root: etree._Element, doc_type: DocumentType, version: str) -> InvoiceFacts:
    number = _FIELD["number"](root).strip()
    if not number:
        raise UnsupportedDocument("the CrossIndustryInvoice has no rsm:ExchangedDocument/ram:ID (invoice number)",
                                  code="MISSING_INVOICE_NUMBER")
    payable, currency = amount(_PAYABLE(root))
    return InvoiceFacts(
        document_type=doc_type,
        invoice_number=number,
        ubl_version=version,
        supplier_ids=_ids(_SELLER, root),
        customer_ids=_ids(_BUYER, root),
        customization_id=_FIELD["customization"](root).strip(),
        profile_id=_FIELD["profile"](root).strip(),
        issue_date=_iso_date(_FIELD["issue_date"](root).strip()),
        payee_accounts=ids_of(_ACCOUNTS(root), schemes=False),
        payable_amount=payable,
        currency=currency or _FIELD["currency"](root).strip(),
        credit_note=_FIELD["type"](root).strip() in CREDIT_NOTE_CODES,
        agent_ids=tuple((party, i) for party, path in _AGENTS for i in _ids(path, root)),
    )
