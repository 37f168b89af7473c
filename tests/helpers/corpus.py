"""Sending the public corpus: the supplier identifiers of a document, and which belong to one partner."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from lxml import etree

from gateway.stages.ubl import EXT_NS, SIGNATURE_NAMESPACES
from tests.helpers import rewrite_config

NS = {
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
}
_UBL_PARTY = "/*/cac:AccountingSupplierParty/cac:Party/"
_CII_SELLER = "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeAgreement/ram:SellerTradeParty/"
# EN 16931 BT-29, BT-30, BT-31/32, BT-34: scheme:value (tax registrations bare, as UBL writes them).
SCHEMED_IDS = etree.XPath(" | ".join(
    [_UBL_PARTY + p for p in ("cbc:EndpointID", "cac:PartyIdentification/cbc:ID", "cac:PartyTaxScheme/cbc:CompanyID",
                              "cac:PartyLegalEntity/cbc:CompanyID")]
    + [_CII_SELLER + p for p in ("ram:ID", "ram:GlobalID", "ram:SpecifiedLegalOrganization/ram:ID",
                                 "ram:URIUniversalCommunication/ram:URIID")]), namespaces=NS)
BARE_IDS = etree.XPath(_CII_SELLER + "ram:SpecifiedTaxRegistration/ram:ID", namespaces=NS)


def supplier_ids(root: etree._Element) -> tuple[str, ...]:
    """The seller's identifiers in a UBL or CII document, ``scheme:value`` where a scheme is given, in
    document order without repeats: what a partner sending it must be registered with."""
    out: dict[str, None] = {}
    for el in SCHEMED_IDS(root):
        value, scheme = el.xpath("string()").strip(), (el.get("schemeID") or "").strip()
        if value:
            out[f"{scheme}:{value}" if scheme else value] = None
    for el in BARE_IDS(root):
        if value := el.xpath("string()").strip():
            out[value] = None
    return tuple(out)


def partner_groups(id_sets: Iterable[Sequence[str]]) -> dict[str, str]:
    """identifier -> partner name (p000, p001, ...): identifiers that ever appear together in one
    document's supplier belong to one partner."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for ids in id_sets:
        for i in ids:
            parent[find(i)] = find(ids[0])
    roots = sorted({find(i) for i in parent})
    return {i: f"p{roots.index(find(i)):03d}" for i in parent}


def extension_namespaces(documents: Iterable[bytes]) -> set[str]:
    """The namespaces of the UBL extensions in these documents, signatures aside: what an operator receiving
    them lists in validation.extension_namespaces."""
    found: set[str] = set()
    for data in documents:
        root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
        for content in root.iterfind(f"{{{EXT_NS}}}UBLExtensions/{{{EXT_NS}}}UBLExtension/{{{EXT_NS}}}ExtensionContent"):
            found |= {str(etree.QName(child).namespace) for child in content.iterchildren(etree.Element)}
    return found - SIGNATURE_NAMESPACES


def allow_extensions(config: Path, namespaces: Iterable[str]) -> None:
    """``validation.extension_namespaces`` of an instance's configuration."""
    rewrite_config(config, lambda c: c.setdefault("validation", {}).update(extension_namespaces=sorted(namespaces)))

