"""Reading business facts from a schema-valid UBL document.

Values are read as XPath string-values (all descendant text, comments excluded), never with
``.text``: a comment inside a value (``DE8937040044<!---->0532013000``) must not truncate it
(SECURITY-TESTS.md S-06).
"""

from __future__ import annotations

from lxml import etree

from ..errors import Detail, UnsupportedDocument
from ..identifiers import blank, identifier
from ..model import BUSINESS_NAMESPACES, UBL_CBC_NS, DocumentType, InvoiceFacts

NS = {
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
}
# The supplier identifiers the issue binds to a partner: EN 16931 BT-34 (electronic address),
# BT-29 (seller identifier), BT-31/BT-32 (tax registration), BT-30 (legal registration).
_PARTY_IDS = "cbc:EndpointID | cac:PartyIdentification/cbc:ID | cac:PartyTaxScheme/cbc:CompanyID | cac:PartyLegalEntity/cbc:CompanyID"


def _party_ids(party: str) -> etree.XPath:
    paths = (p.strip() for p in _PARTY_IDS.split("|"))
    return etree.XPath(" | ".join(f"/*/{party}/{p}" for p in paths), namespaces=NS)


_SUPPLIER = _party_ids("cac:AccountingSupplierParty/cac:Party")
_CUSTOMER = _party_ids("cac:AccountingCustomerParty/cac:Party")
# Parties that act for the seller, read the same way: none may name another partner (docs/partners.md, Supplier binding).
_AGENTS = (("payee", _party_ids("cac:PayeeParty")),  # BG-10
           ("tax representative", _party_ids("cac:TaxRepresentativeParty")),  # BG-11
           ("seller", _party_ids("cac:SellerSupplierParty/cac:Party")))  # UBL's seller, beside the accounting supplier
_STRING = etree.XPath("string(.)")
_FIELD = {
    name: etree.XPath(f"string(/*/cbc:{name})", namespaces=NS)
    for name in ("ID", "CustomizationID", "ProfileID", "IssueDate", "DocumentCurrencyCode")
}
_ACCOUNTS = etree.XPath("/*/cac:PaymentMeans/cac:PayeeFinancialAccount/cbc:ID", namespaces=NS)  # BT-84
_PAYABLE = etree.XPath("/*/cac:LegalMonetaryTotal/cbc:PayableAmount", namespaces=NS)  # BT-115


def ids_of(elements: list[etree._Element], *, schemes: bool = True) -> tuple[str, ...]:
    """Distinct identifiers of the elements, in document order (``scheme:value`` where asked for)."""
    seen: dict[str, None] = {}
    for el in elements:
        value = _STRING(el)
        if not blank(value):  # (nothing but whitespace or invisible characters is no identifier)
            seen[identifier(el.get("schemeID") if schemes else None, value)] = None
    return tuple(seen)


def amount(elements: list[etree._Element]) -> tuple[str, str]:
    """The first amount and its currencyID, as written."""
    if not elements:
        return "", ""
    return "".join(_STRING(elements[0]).split()), (elements[0].get("currencyID") or "").strip()


EXT_NS = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"
# What a signature puts in an extension slot: XMLDSig, UBL's signature components, XAdES.
SIGNATURE_NAMESPACES = frozenset({
    "http://www.w3.org/2000/09/xmldsig#",
    "urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2",
    "urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2",
    "urn:oasis:names:specification:ubl:schema:xsd:SignatureBasicComponents-2",
    "http://uri.etsi.org/01903/v1.3.2#",
    "http://uri.etsi.org/01903/v1.4.1#",
})
_CONTENTS = etree.XPath("/*/ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent", namespaces={"ext": EXT_NS})
MAX_REPORTED = 10


def check_extensions(root: etree._Element, allowed: frozenset[str] = frozenset()) -> None:
    """``ext:UBLExtensions`` take any XML, and a consumer that searches descendants reads a payment means or
    a party hidden there.  An extension may hold a signature, or content in a namespace the operator
    allows (``validation.extension_namespaces``: a national profile's own extension); never a UBL
    aggregate, a document, or CII, and inside a signature no UBL basic component but the ``cbc:ID`` its
    structure uses.  Else 422 EXTENSION_REFUSED, naming each element."""
    found: list[Detail] = []
    tree = root.getroottree()
    for content in _CONTENTS(root):
        for child in content.iterchildren(etree.Element):
            namespace = etree.QName(child).namespace
            if namespace not in SIGNATURE_NAMESPACES and namespace not in allowed:
                found.append(Detail(f"an extension in {namespace or 'no namespace'}, which is neither a signature nor "
                                    "allowed by this gateway's validation.extension_namespaces", child.sourceline,
                                    tree.getpath(child)))
                continue
            for el in child.iter(etree.Element):
                name = etree.QName(el)
                if name.namespace in BUSINESS_NAMESPACES or (
                        name.namespace == UBL_CBC_NS and namespace in SIGNATURE_NAMESPACES and name.localname != "ID"):
                    found.append(Detail(f"the business component {name.localname} inside an extension",
                                        el.sourceline, tree.getpath(el)))
    if found:
        raise UnsupportedDocument(
            "the invoice carries content other than a signature in ext:UBLExtensions, where a receiver's software "
            "could read it as part of the invoice; put business content in the invoice itself",
            found[:MAX_REPORTED], code="EXTENSION_REFUSED")


def read_facts(root: etree._Element, doc_type: DocumentType, ubl_version: str) -> InvoiceFacts:
    number = _FIELD["ID"](root).strip()
    if not number:
        raise UnsupportedDocument(f"the {doc_type.root} has no cbc:ID (invoice number)", code="MISSING_INVOICE_NUMBER")
    payable, currency = amount(_PAYABLE(root))
    return InvoiceFacts(
        document_type=doc_type,
        invoice_number=number,
        ubl_version=ubl_version,
        supplier_ids=ids_of(_SUPPLIER(root)),
        customer_ids=ids_of(_CUSTOMER(root)),
        customization_id=_FIELD["CustomizationID"](root).strip(),
        profile_id=_FIELD["ProfileID"](root).strip(),
        issue_date=_FIELD["IssueDate"](root).strip(),
        payee_accounts=ids_of(_ACCOUNTS(root), schemes=False),
        payable_amount=payable,
        currency=currency or _FIELD["DocumentCurrencyCode"](root).strip(),
        credit_note=doc_type is DocumentType.UBL_CREDIT_NOTE,
        agent_ids=tuple((party, i) for party, path in _AGENTS for i in ids_of(path(root))),
    )
