"""Reading business facts from a schema-valid UBL document.

Values are read as XPath string-values (all descendant text, comments excluded), never with
``.text``: a comment inside a value (``DE8937040044<!---->0532013000``) must not truncate it
(SECURITY-TESTS.md S-06).
"""

from __future__ import annotations

from lxml import etree

from .errors import UnsupportedDocument
from .model import DocumentType, InvoiceFacts

NS = {
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
}
# The supplier identifiers the issue binds to a partner: EN 16931 BT-34 (electronic address),
# BT-29 (seller identifier), BT-31/BT-32 (tax registration), BT-30 (legal registration).
_PARTY_IDS = "cbc:EndpointID | cac:PartyIdentification/cbc:ID | cac:PartyTaxScheme/cbc:CompanyID | cac:PartyLegalEntity/cbc:CompanyID"


def _party_ids(role: str) -> etree.XPath:
    paths = (p.strip() for p in _PARTY_IDS.split("|"))
    return etree.XPath(" | ".join(f"/*/cac:{role}/cac:Party/{p}" for p in paths), namespaces=NS)


_SUPPLIER = _party_ids("AccountingSupplierParty")
_CUSTOMER = _party_ids("AccountingCustomerParty")
_STRING = etree.XPath("string(.)")
_FIELD = {
    name: etree.XPath(f"string(/*/cbc:{name})", namespaces=NS)
    for name in ("ID", "CustomizationID", "ProfileID", "IssueDate")
}


def identifier(scheme: str | None, value: str) -> str:
    """The canonical ``scheme:value`` form (or the bare value when no scheme is given)."""
    value = value.strip()
    scheme = (scheme or "").strip()
    return f"{scheme}:{value}" if scheme else value


def _ids(elements: list[etree._Element]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for el in elements:
        value = _STRING(el)
        if value.strip():
            seen[identifier(el.get("schemeID"), value)] = None
    return tuple(seen)


def read_facts(root: etree._Element, doc_type: DocumentType, ubl_version: str) -> InvoiceFacts:
    number = _FIELD["ID"](root).strip()
    if not number:
        raise UnsupportedDocument(f"the {doc_type.root} has no cbc:ID (invoice number)", code="MISSING_INVOICE_NUMBER")
    return InvoiceFacts(
        document_type=doc_type,
        invoice_number=number,
        ubl_version=ubl_version,
        supplier_ids=_ids(_SUPPLIER(root)),
        customer_ids=_ids(_CUSTOMER(root)),
        customization_id=_FIELD["CustomizationID"](root).strip(),
        profile_id=_FIELD["ProfileID"](root).strip(),
        issue_date=_FIELD["IssueDate"](root).strip(),
    )
