"""Sending the public corpus: the supplier identifiers of a document, and which belong to one partner."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

from lxml import etree

from gateway.identifiers import party_key
from gateway.stages.ubl import EXT_NS, SIGNATURE_NAMESPACES
from tests.helpers import rewrite_config

NS = {
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
}
_UBL = ("cbc:EndpointID", "cac:PartyIdentification/cbc:ID", "cac:PartyTaxScheme/cbc:CompanyID", "cac:PartyLegalEntity/cbc:CompanyID")
_CII = ("ram:ID", "ram:GlobalID", "ram:SpecifiedLegalOrganization/ram:ID", "ram:URIUniversalCommunication/ram:URIID")
_CII_TRADE = "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/"
_CII_AGREEMENT = _CII_TRADE + "ram:ApplicableHeaderTradeAgreement/"
_CII_SETTLEMENT = _CII_TRADE + "ram:ApplicableHeaderTradeSettlement/"


def _xpaths(ubl: Sequence[str], cii: Sequence[str]) -> tuple[etree.XPath, etree.XPath]:
    """(scheme:value identifiers, bare tax registrations) of these UBL and CII parties."""
    schemed = [f"{party}/{p}" for party in ubl for p in _UBL] + [f"{party}/{p}" for party in cii for p in _CII]
    return (etree.XPath(" | ".join(schemed), namespaces=NS),
            etree.XPath(" | ".join(f"{party}/ram:SpecifiedTaxRegistration/ram:ID" for party in cii), namespaces=NS))


# EN 16931 BT-29, BT-30, BT-31/32, BT-34: scheme:value (tax registrations bare, as UBL writes them).
SUPPLIER = _xpaths(["/*/cac:AccountingSupplierParty/cac:Party"], [_CII_AGREEMENT + "ram:SellerTradeParty"])
# The parties that act for the seller (payee, tax representative, UBL's seller, CII's invoicer): the gateway
# refuses any of them naming another partner.
AGENTS = _xpaths(["/*/cac:PayeeParty", "/*/cac:TaxRepresentativeParty", "/*/cac:SellerSupplierParty/cac:Party"],
                 [_CII_SETTLEMENT + "ram:PayeeTradeParty", _CII_AGREEMENT + "ram:SellerTaxRepresentativeTradeParty",
                  _CII_SETTLEMENT + "ram:InvoicerTradeParty"])


def _ids(root: etree._Element, xpaths: tuple[etree.XPath, etree.XPath]) -> tuple[str, ...]:
    schemed, bare = xpaths
    out: dict[str, None] = {}
    for el in schemed(root):
        value, scheme = el.xpath("string()").strip(), (el.get("schemeID") or "").strip()
        if value:
            out[f"{scheme}:{value}" if scheme else value] = None
    for el in bare(root):
        if value := el.xpath("string()").strip():
            out[value] = None
    return tuple(out)


def supplier_ids(root: etree._Element) -> tuple[str, ...]:
    """The seller's identifiers in a UBL or CII document, ``scheme:value`` where a scheme is given, in
    document order without repeats: what a partner sending it must be registered with."""
    return _ids(root, SUPPLIER)


def agent_ids(root: etree._Element) -> tuple[str, ...]:
    """The identifiers of the parties acting for the seller, read the same way: none may be another partner's."""
    return _ids(root, AGENTS)


def partner_groups(id_sets: Iterable[Sequence[str]], agent_sets: Iterable[Sequence[str]] = ()) -> dict[str, str]:
    """identifier -> partner name (p000, p001, ...) for the supplier identifiers of documents: one
    document's belong to one partner, and so do identifiers the gateway may take for one another
    (``PartyKey.clashes``: one number written otherwise, or a value under no known scheme that is
    another's value).  ``agent_sets`` (the documents' ``agent_ids``, in the same order): a document whose
    payee or tax representative names an identifier of a partner is that partner's too."""
    docs = [tuple(ids) for ids in id_sets]
    agents = [tuple(a) for a in agent_sets] or [() for _ in docs]
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for ids in docs:
        for i in ids:
            parent[find(i)] = find(ids[0])
    keys = {i: party_key(i) for i in parent}
    for a, b in itertools.combinations(sorted(keys), 2):
        if keys[a].clashes(keys[b]):
            parent[find(a)] = find(b)
    for ids, named in zip(docs, agents, strict=True):
        for agent in map(party_key, named):
            for i in (i for i, k in keys.items() if ids and agent.clashes(k)):
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

