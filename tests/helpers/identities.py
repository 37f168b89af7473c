"""One party identifier written the ways a sender can disguise it, and the sample invoice naming it.

``DISGUISES`` rewrites a value (spacing, punctuation, invisible characters, full-width forms, case);
``forms`` gives an identifier in each of them, and ``vat_forms`` a VAT number under every scheme that
names it.  ``naming`` puts an identifier into a party of the sample invoice (edited with lxml: the
attacks are built here, never copied from files).
"""

from __future__ import annotations

from collections.abc import Callable

from lxml import etree

from gateway.cli.demo import SAMPLE
from tests.helpers import numbered

CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
NS = {"cac": CAC, "cbc": CBC}


def _groups(value: str, sep: str) -> str:
    """The value in groups of three, joined by ``sep`` (as people write long numbers)."""
    return sep.join(value[i:i + 3] for i in range(0, len(value), 3))


def _full_width(value: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in value)


DISGUISES: dict[str, Callable[[str], str]] = {
    "spaces": lambda v: _groups(v, " "),
    "dots": lambda v: _groups(v, "."),
    "dashes": lambda v: _groups(v, "-"),
    "slashes": lambda v: _groups(v, "/"),
    "non-breaking hyphens": lambda v: _groups(v, "\u2011"),
    "en dashes": lambda v: _groups(v, "\u2013"),
    "minus signs": lambda v: _groups(v, "\u2212"),
    "nbsp": lambda v: _groups(v, "\u00a0"),
    "narrow nbsp": lambda v: _groups(v, "\u202f"),
    "figure spaces": lambda v: _groups(v, "\u2007"),
    "zero-width spaces": lambda v: _groups(v, "\u200b"),
    "zero-width joiners": lambda v: _groups(v, "\u200d"),
    "word joiners": lambda v: _groups(v, "\u2060"),
    "byte order marks": lambda v: "\ufeff" + _groups(v, "\ufeff"),
    "soft hyphens": lambda v: _groups(v, "\u00ad"),
    "bidi marks": lambda v: "\u200e" + _groups(v, "\u200f") + "\u202c",
    "full-width": _full_width,
    "lowercase": str.lower,
    "padded": lambda v: f" \u3000{v}\t ",
    "all at once": lambda v: _full_width(_groups(v.lower(), "\u00a0.\u200b-")),
}


def forms(scheme: str, value: str) -> dict[str, tuple[str, str]]:
    """(schemeID, value) of the identifier in each disguise, and under a scheme written otherwise."""
    out = {name: (scheme, disguise(value)) for name, disguise in DISGUISES.items()}
    out["scheme padded"] = (f" {scheme}\u00a0", value)
    out["scheme full-width"] = (_full_width(scheme), value)
    return out


def vat_forms(country: str, number: str, eas: str) -> dict[str, tuple[str, str]]:
    """(schemeID, value) of one VAT number (``number`` without its prefix) under every scheme that names it:
    its EAS VAT scheme with and without the prefix, the EU VAT scheme, the scheme names, none at all
    (as cac:PartyTaxScheme writes it), and disguised."""
    vat = country + number
    return {
        f"EAS {eas} with prefix": (eas, vat),
        f"EAS {eas} without prefix": (eas, number),
        f"EAS {eas} grouped": (eas, _groups(number, ".")),
        "EAS 9912 (EU:VAT)": ("9912", vat),
        f"scheme {country}:VAT": (f"{country}:VAT", vat),
        "scheme VAT": ("VAT", vat),
        "scheme VA (UN/CEFACT 1153)": ("VA", vat),
        "bare": ("", vat),
        "bare lowercase": ("", vat.lower()),
        "bare, written as on paper": ("", f"{country} {number[:4]}.{number[4:7]}.{number[7:]}"),
        "bare, full-width with a zero-width space": ("", _full_width(country) + "\u200b" + _full_width(number)),
    }


def _el(tag: str, text: str | None = None, scheme: str = "", *children: etree._Element) -> etree._Element:
    prefix, _, local = tag.partition(":")
    el = etree.Element(f"{{{NS[prefix]}}}{local}")
    if scheme:
        el.set("schemeID", scheme)
    el.text = text
    el.extend(children)
    return el


def _party(scheme: str, value: str, name: str) -> list[etree._Element]:
    """The children of a cac:Party that names one identifier: id, name, address, tax registration."""
    return [_el("cac:PartyIdentification", None, "", _el("cbc:ID", value, scheme)),
            _el("cac:PartyName", None, "", _el("cbc:Name", name)),
            _el("cac:PostalAddress", None, "", _el("cac:Country", None, "", _el("cbc:IdentificationCode", "BE")))]


PLACES = ("EndpointID", "PartyIdentification", "PartyTaxScheme", "PartyLegalEntity", "payee", "tax representative",
          "seller")


def naming(number: str, scheme: str, value: str, place: str = "PartyIdentification", doc: bytes = SAMPLE) -> bytes:
    """The sample invoice, numbered ``number``, naming ``scheme``/``value`` (no schemeID when ``scheme`` is
    empty) in one of ``PLACES``: in the supplier party beside the demo partner's own identifiers (its
    EndpointID and its VAT number replaced), or as the payee, the tax representative or UBL's seller."""
    root = etree.fromstring(numbered(number, doc))
    [party] = root.xpath("/*/cac:AccountingSupplierParty/cac:Party", namespaces=NS)
    if place == "EndpointID":
        [el] = party.xpath("cbc:EndpointID", namespaces=NS)
        el.text = value
        el.attrib.pop("schemeID", None)
        if scheme:
            el.set("schemeID", scheme)
    elif place == "PartyIdentification":
        [own] = party.xpath("cac:PartyIdentification", namespaces=NS)
        own.addnext(_el("cac:PartyIdentification", None, "", _el("cbc:ID", value, scheme)))
    elif place == "PartyTaxScheme":
        [el] = party.xpath("cac:PartyTaxScheme/cbc:CompanyID", namespaces=NS)
        el.text = value
        if scheme:
            el.set("schemeID", scheme)
    elif place == "PartyLegalEntity":
        [name] = party.xpath("cac:PartyLegalEntity/cbc:RegistrationName", namespaces=NS)
        name.addnext(_el("cbc:CompanyID", value, scheme))
    else:
        [customer] = root.xpath("/*/cac:AccountingCustomerParty", namespaces=NS)
        other = _party(scheme, value, "Someone Else BV")
        if place == "payee":
            customer.addnext(_el("cac:PayeeParty", None, "", *other))
        elif place == "tax representative":
            tax = _el("cac:PartyTaxScheme", None, "", _el("cbc:CompanyID", value, scheme),
                      _el("cac:TaxScheme", None, "", _el("cbc:ID", "VAT")))
            customer.addnext(_el("cac:TaxRepresentativeParty", None, "", *other[1:], tax))
        elif place == "seller":
            customer.addnext(_el("cac:SellerSupplierParty", None, "", _el("cac:Party", None, "", *other)))
        else:
            raise ValueError(f"no place {place!r}")
    return etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8")
