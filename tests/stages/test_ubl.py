"""Reading the facts of UBL invoices and credit notes (gateway/stages/ubl.py).

The module promises: the invoice number (BT-1, a typed rejection when it is missing), the supplier's
and customer's identifiers as ``scheme:value`` (electronic address, party identification, tax and
legal registrations: nothing else the party holds), distinct and in document order and as written
(compared elsewhere by their keys, gateway/identifiers.py), the same of the parties acting for the
seller (payee, tax representative, UBL's seller party), the payee
accounts (BT-84, bare), the payable amount (BT-115) and its currency as written, the credit-note
series for credit notes, every value read as an XPath string value so that a comment cannot
truncate it (SECURITY-TESTS.md S-06).

Documents are the bundled sample and public examples from the corpus, parsed by the gateway's own
hardened parser; edits are made on the text so that what is read is visibly what was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from gateway.config.model import DEFAULT_XML_LIMITS
from gateway.errors import UnsupportedDocument
from gateway.model import DocumentType, InvoiceFacts
from gateway.stages.ubl import NS, amount, check_extensions, ids_of, read_facts
from gateway.stages.xmlparse import XmlParser
from tests.helpers import ROOT

SAMPLE = (ROOT / "gateway" / "samples" / "invoice.xml").read_bytes()
CREDIT_NOTE = Path("invoices/valid/en16931/ubl-examples/ubl-tc434-creditnote1.xml")
OASIS_INVOICE = Path("invoices/valid/oasis-ubl/examples/UBL-Invoice-2.1-Example.xml")


def parse(data: bytes) -> etree._Element:
    return XmlParser(DEFAULT_XML_LIMITS).parse(data).root


def facts(data: bytes, doc_type: DocumentType = DocumentType.UBL_INVOICE, version: str = "2.1") -> InvoiceFacts:
    return read_facts(parse(data), doc_type, version)


def edited(old: str, new: str, doc: bytes = SAMPLE) -> bytes:
    assert doc.count(old.encode()) == 1, f"{old!r} is not once in the document"
    return doc.replace(old.encode(), new.encode())


def test_the_facts_of_the_sample_invoice():
    assert facts(SAMPLE) == InvoiceFacts(
        document_type=DocumentType.UBL_INVOICE,
        invoice_number="DEMO-2026-0001",
        ubl_version="2.1",
        # EndpointID and PartyIdentification name the same GLN: it is listed once
        supplier_ids=("0088:4000001000006", "DE123456789"),
        customer_ids=("0088:4000002000005", "NL123456789B01"),
        customization_id="urn:cen.eu:en16931:2017#compliant#urn:fdc:peppol.eu:2017:poacc:billing:3.0",
        profile_id="urn:fdc:peppol.eu:2017:poacc:billing:01:1.0",
        issue_date="2026-11-02",
        payee_accounts=("DE89370400440532013000",),
        payable_amount="1250.00",
        currency="EUR",
        credit_note=False,
    )
    assert facts(SAMPLE).kind == "invoice"


def test_a_credit_note_is_numbered_in_the_credit_note_series(corpus: Path):
    got = facts((corpus / CREDIT_NOTE).read_bytes(), DocumentType.UBL_CREDIT_NOTE)
    assert (got.document_type, got.credit_note, got.kind) == (DocumentType.UBL_CREDIT_NOTE, True, "credit-note")
    assert (got.invoice_number, got.issue_date) == ("018304 / 28865", "2019-09-23")
    assert got.supplier_ids == ("0201:0000000196", "BE0000000196", "0000000196")
    assert got.customer_ids == ("0201:0000000295", "BE0000000295", "0000000295")
    assert got.payee_accounts == ("BE91000000143476",)  # the account, not the bank's BIC beside it
    assert (got.payable_amount, got.currency) == ("100.11", "EUR")


def test_only_the_identifying_elements_of_a_party_count(corpus: Path):
    # The OASIS example fills every corner of its parties: the postal address has a GLN of its own
    # (cbc:ID), the tax scheme an ID ("VAT"), and schemeAgencyID attributes are everywhere.
    got = facts((corpus / OASIS_INVOICE).read_bytes(), version="2.0")
    assert got.ubl_version == "2.0"  # as the schema stage decided, not re-read here
    assert got.invoice_number == "TOSL108"
    assert got.supplier_ids == ("GLN:1234567890123", "ZZZ:Supp123", "DKVAT:DK12345", "CVR:5402697509")
    assert got.customer_ids == ("GLN:1234567987654", "ZZZ:345KS5324", "BEVAT:BE54321", "ZZZ:5645342123")
    assert "GLN:1231412341324" not in got.supplier_ids and "VAT" not in got.supplier_ids
    assert got.payee_accounts == ("DK1212341234123412",)
    assert (got.payable_amount, got.currency) == ("729", "EUR")


def test_parties_acting_for_the_seller_are_read_apart():
    """The payee (BG-10), the tax representative (BG-11) and UBL's seller are never the supplier, but
    gateway/partners/directory.py refuses them naming another partner: their identifiers are read too."""
    others = ("<cac:PayeeParty><cac:PartyIdentification><cbc:ID schemeID=\"0088\">7300010000001</cbc:ID>"
              "</cac:PartyIdentification><cac:PartyName><cbc:Name>Factor</cbc:Name></cac:PartyName>"
              "<cac:PartyLegalEntity><cbc:RegistrationName>Factor</cbc:RegistrationName><cbc:CompanyID>NL 1234</cbc:CompanyID>"
              "</cac:PartyLegalEntity></cac:PayeeParty>\n"
              "<cac:SellerSupplierParty><cac:Party><cbc:EndpointID schemeID=\"9925\">0123456789</cbc:EndpointID>"
              "</cac:Party></cac:SellerSupplierParty>\n"
              "<cac:TaxRepresentativeParty><cac:PartyName><cbc:Name>Rep</cbc:Name></cac:PartyName><cac:PartyTaxScheme>"
              "<cbc:CompanyID>FR 12 345678901</cbc:CompanyID><cac:TaxScheme><cbc:ID>VAT</cbc:ID></cac:TaxScheme>"
              "</cac:PartyTaxScheme></cac:TaxRepresentativeParty>\n  <cac:Delivery>")
    got = facts(edited("<cac:Delivery>", others))
    assert got.supplier_ids == ("0088:4000001000006", "DE123456789")
    assert "0088:7300010000001" not in got.customer_ids
    assert got.agent_ids == (("payee", "0088:7300010000001"), ("payee", "NL 1234"), ("tax representative", "FR 12 345678901"),
                             ("seller", "9925:0123456789"))
    assert facts(SAMPLE).agent_ids == ()


@pytest.mark.parametrize(("old", "new", "field", "expected"), [
    ("<cbc:ID>DEMO-2026-0001</cbc:ID>", "<cbc:ID>DEMO-2026<!-- x -->-0001</cbc:ID>", "invoice_number", "DEMO-2026-0001"),
    ("<cbc:ID>DE89370400440532013000</cbc:ID>", "<cbc:ID>DE8937040044<!---->0532013000</cbc:ID>", "payee_accounts",
     ("DE89370400440532013000",)),
    ("<cbc:CompanyID>DE123456789</cbc:CompanyID>", "<cbc:CompanyID>DE123<!--?-->456789</cbc:CompanyID>", "supplier_ids",
     ("0088:4000001000006", "DE123456789")),
    ('<cbc:PayableAmount currencyID="EUR">1250.00</cbc:PayableAmount>',
     '<cbc:PayableAmount currencyID="EUR">12<!---->50.00</cbc:PayableAmount>', "payable_amount", "1250.00"),
], ids=["number", "payee-account", "supplier-id", "amount"])
def test_a_comment_inside_a_value_does_not_truncate_it(old: str, new: str, field: str, expected: object):
    assert getattr(facts(edited(old, new)), field) == expected


def test_values_are_trimmed_and_amounts_read_without_whitespace():
    doc = edited("<cbc:ID>DEMO-2026-0001</cbc:ID>", "<cbc:ID>\n   DEMO-2026-0001\t</cbc:ID>")
    doc = edited('<cbc:EndpointID schemeID="0088">4000001000006</cbc:EndpointID>',
                 '<cbc:EndpointID schemeID=" 0088 "> 4000001000006\n</cbc:EndpointID>', doc)
    doc = edited('<cbc:PayableAmount currencyID="EUR">1250.00</cbc:PayableAmount>',
                 '<cbc:PayableAmount currencyID=" EUR ">\n 1 250.00 </cbc:PayableAmount>', doc)
    got = facts(doc)
    assert got.invoice_number == "DEMO-2026-0001"
    assert got.supplier_ids == ("0088:4000001000006", "DE123456789")  # still the same identifier as the party's ID
    assert (got.payable_amount, got.currency) == ("1250.00", "EUR")


def test_empty_identifiers_are_skipped():
    doc = edited('<cbc:EndpointID schemeID="0088">4000001000006</cbc:EndpointID>', '<cbc:EndpointID schemeID="0088"> </cbc:EndpointID>')
    doc = edited("<cbc:CompanyID>DE123456789</cbc:CompanyID>", "<cbc:CompanyID/>", doc)
    assert facts(doc).supplier_ids == ("0088:4000001000006",)  # only the party identification is left


def test_an_identifier_of_invisible_characters_only_is_none():
    doc = edited("<cbc:CompanyID>DE123456789</cbc:CompanyID>", "<cbc:CompanyID>\u200b\u00a0\ufeff\u2060</cbc:CompanyID>")
    assert facts(doc).supplier_ids == ("0088:4000001000006",)


def test_identifiers_are_kept_as_written():
    """What the invoice wrote is what is stored and shown; gateway/identifiers.py compares it."""
    doc = edited("<cbc:CompanyID>DE123456789</cbc:CompanyID>", "<cbc:CompanyID>DE\u00a0123.456\u200b789</cbc:CompanyID>")
    assert facts(doc).supplier_ids == ("0088:4000001000006", "DE\u00a0123.456\u200b789")


def test_the_currency_falls_back_to_the_document_currency():
    without = edited('<cbc:PayableAmount currencyID="EUR">1250.00</cbc:PayableAmount>',
                     "<cbc:PayableAmount>1250.00</cbc:PayableAmount>")
    assert (facts(without).payable_amount, facts(without).currency) == ("1250.00", "EUR")
    other = edited("<cbc:DocumentCurrencyCode>EUR</cbc:DocumentCurrencyCode>", "<cbc:DocumentCurrencyCode>SEK</cbc:DocumentCurrencyCode>")
    assert facts(other).currency == "EUR"  # the amount's own currencyID wins
    no_total = edited('<cbc:PayableAmount currencyID="EUR">1250.00</cbc:PayableAmount>', "", other)
    assert (facts(no_total).payable_amount, facts(no_total).currency) == ("", "SEK")


@pytest.mark.parametrize("number", ["", "<cbc:ID>   </cbc:ID>", "<cbc:ID><!-- DEMO-2026-0001 --></cbc:ID>"],
                         ids=["absent", "blank", "only-a-comment"])
def test_an_invoice_without_a_number_is_refused(number: str):
    # The invoice lines keep their own cbc:ID (1, 2): only the document's counts.
    doc = edited("<cbc:ID>DEMO-2026-0001</cbc:ID>", number)
    with pytest.raises(UnsupportedDocument) as caught:
        facts(doc)
    assert caught.value.code == "MISSING_INVOICE_NUMBER" and caught.value.http_status == 422
    assert caught.value.message == "the Invoice has no cbc:ID (invoice number)"
    with pytest.raises(UnsupportedDocument, match="^the CreditNote has no cbc:ID"):
        read_facts(parse(doc), DocumentType.UBL_CREDIT_NOTE, "2.1")


def test_ids_of_and_amount_on_their_own():
    root = etree.fromstring(
        f'<r xmlns:cbc="{NS["cbc"]}"><cbc:ID schemeID="0088">1</cbc:ID><cbc:ID>2</cbc:ID><cbc:ID schemeID="0088">1</cbc:ID>'
        '<cbc:ID schemeID="9930">2</cbc:ID><cbc:PayableAmount currencyID="NOK">-10.5</cbc:PayableAmount>'
        '<cbc:PayableAmount currencyID="EUR">99</cbc:PayableAmount></r>')
    ids = root.findall("cbc:ID", NS)
    assert ids_of(ids) == ("0088:1", "2", "9930:2")  # distinct by scheme and value, in document order
    assert ids_of(ids, schemes=False) == ("1", "2")
    assert amount(root.findall("cbc:PayableAmount", NS)) == ("-10.5", "NOK")  # the first, as written
    assert amount([]) == ("", "")


# --- extension slots hold signatures, or what the operator allows (issue 20, item 2) -------------------------

EXT = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"
SIG = ('<sig:UBLDocumentSignatures xmlns:sig="urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2" '
       'xmlns:sac="urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2">'
       '<sac:SignatureInformation><cbc:ID>urn:sig:1</cbc:ID>{inside}'
       '<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"/></sac:SignatureInformation></sig:UBLDocumentSignatures>')
PAYMENT = ("<cac:PaymentMeans><cbc:PaymentMeansCode>30</cbc:PaymentMeansCode><cac:PayeeFinancialAccount>"
           "<cbc:ID>GB82WEST12345698765432</cbc:ID></cac:PayeeFinancialAccount></cac:PaymentMeans>")
NATIONAL = "urn:example:national-extension"


def with_extension(content: str) -> etree._Element:
    """The sample with one extension whose content is ``content`` (cbc and cac prefixes as the sample binds them)."""
    slot = f'<ext:UBLExtensions xmlns:ext="{EXT}"><ext:UBLExtension><ext:ExtensionContent>{content}' \
           '</ext:ExtensionContent></ext:UBLExtension></ext:UBLExtensions>'
    head, sep, rest = SAMPLE.partition(b"<cbc:")
    return parse(head + slot.encode() + sep + rest)


def refusal(root: etree._Element, allowed: frozenset[str] = frozenset()) -> list[str]:
    with pytest.raises(UnsupportedDocument) as refused:
        check_extensions(root, allowed)
    assert (refused.value.code, refused.value.http_status) == ("EXTENSION_REFUSED", 422)
    return [f"{d.path}: {d.message}" for d in refused.value.details]


def test_a_signature_is_what_an_extension_holds() -> None:
    check_extensions(parse(SAMPLE))
    check_extensions(with_extension(SIG.format(inside="")))


def test_a_payment_means_hidden_in_a_signature_is_refused_by_its_path() -> None:
    found = refusal(with_extension(SIG.format(inside=PAYMENT)))
    assert [f.rsplit(": the business component ", 1)[1] for f in found] == [
        "PaymentMeans inside an extension", "PaymentMeansCode inside an extension", "PayeeFinancialAccount inside an extension"]
    assert found[0].startswith("/*/ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/sig:UBLDocumentSignatures/"
                            "sac:SignatureInformation/cac:PaymentMeans: the business component PaymentMeans")


def test_a_basic_component_other_than_the_signature_id_is_refused_in_a_signature() -> None:
    found = refusal(with_extension(SIG.format(inside='<cbc:PayableAmount currencyID="EUR">1.00</cbc:PayableAmount>')))
    assert [f.split(": ", 1)[1] for f in found] == ["the business component PayableAmount inside an extension"]


def test_another_namespace_needs_the_operators_word() -> None:
    national = f'<n:Control xmlns:n="{NATIONAL}"><cbc:IdentificationCode>CO</cbc:IdentificationCode></n:Control>'
    [found] = refusal(with_extension(national))
    assert f"an extension in {NATIONAL}, which is neither a signature nor allowed" in found
    check_extensions(with_extension(national), frozenset({NATIONAL}))  # its own codes, allowed
    hidden = f'<n:Control xmlns:n="{NATIONAL}"><cac:AccountingSupplierParty><cac:Party/></cac:AccountingSupplierParty></n:Control>'
    assert len(refusal(with_extension(hidden), frozenset({NATIONAL}))) == 2  # never a party, even there


def test_a_whole_invoice_or_cii_in_an_extension_is_refused() -> None:
    inner = '<Invoice xmlns="urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"/>'
    cii = '<ram:SellerTradeParty xmlns:ram="urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100"/>'
    for content in (inner, cii):
        assert len(refusal(with_extension(f'<n:Box xmlns:n="{NATIONAL}">{content}</n:Box>'), frozenset({NATIONAL}))) == 1
