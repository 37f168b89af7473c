"""UN/CEFACT CII (D16B) invoices and Factur-X / ZUGFeRD PDFs, over the real mutual-TLS listener.

The instance here is configured as an operator would for CII (``cii_inst``): the official EN 16931
CII stylesheet and the official CII D16B schema, both from the shared corpus.  PDFs are built at
test time with pypdf: a blank page and the invoice attached as ``factur-x.xml``.

``gateway`` is overridden: the same listener as conftest's, on ``cii_inst``, with the background
delivery loop stopped so that ``outbox.run_once()`` is the only deliverer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.demo import SAMPLE
from gateway.config.model import DEFAULT_XML_LIMITS
from gateway.errors import UnsupportedDocument
from gateway.model import DocumentType
from gateway.operations import instance
from gateway.stages import cii, pdf
from gateway.stages.xmlparse import XmlParser
from tests.helpers import CORPUS, Running, add_partner, post, serving, stop_delivery_loop
from tests.helpers.invoices import PDF_PAGE, PDF_PAGES, pdf_of, pdf_with

PDF = {"Content-Type": "application/pdf"}
EXAMPLES = CORPUS / "invoices" / "valid" / "en16931" / "cii-examples"
INVOICE = EXAMPLES / "CII_business_example_01.xml"  # seller 0088:1238764941386, legal 123456789, VAT NO123456789MVA
SELLER = "nordic-seller"
SELLER_IDS = ["NO123456789MVA"]  # registered by its bare VAT number, as UBL writes it
RULES_VERSION = "1.3.16"  # what tests.helpers.with_corpus_cii configures


@pytest.fixture
async def gateway(cii_inst: instance.Instance) -> AsyncIterator[Running]:
    async with serving(cii_inst, "warning") as running:
        stop_delivery_loop()
        yield running


@pytest.fixture
def seller(gateway: Running) -> tuple[Path, Path]:
    """A partner registered with the supplier identifiers of INVOICE; returns its client cert and key."""
    issued = add_partner(gateway.inst, SELLER, SELLER_IDS)
    assert gateway.gw.parts.partners.refresh()
    return issued.cert, issued.key


async def deliver_all(gateway: Running) -> None:
    for _ in range(10):
        if await gateway.gw.outbox.run_once() == 0:
            return
    raise AssertionError("delivery did not drain in 10 rounds")


def parse(data: bytes) -> Any:
    return XmlParser(DEFAULT_XML_LIMITS).parse(data).root


def facts_of(data: bytes) -> Any:
    return cii.read_facts(parse(data), DocumentType.CII_INVOICE, "D16B")


# --- facts --------------------------------------------------------------------------------------------


def test_facts_of_a_cii_invoice(corpus):
    facts = facts_of(INVOICE.read_bytes())
    assert facts.document_type is DocumentType.CII_INVOICE and facts.ubl_version == "D16B"
    assert facts.invoice_number == "TOSL108"
    # BT-29 GlobalID with its scheme, BT-30 legal registration, BT-31 VAT number bare (schemeID VA is no party scheme)
    assert facts.supplier_ids == ("0088:1238764941386", "123456789", "NO123456789MVA")
    assert facts.customer_ids == ("0088:3456789012098", "987654321", "NO987654321MVA")
    assert facts.issue_date == "2013-06-30"  # format 102 (CCYYMMDD) written as UBL writes dates
    assert facts.customization_id == "urn:cen.eu:en16931:2017"
    assert facts.payee_accounts == ("NO9386011117947",)  # BT-84 (the document gives it twice)
    assert (facts.payable_amount, facts.currency) == ("801.78", "NOK")
    assert facts.credit_note is False and facts.kind == "invoice"


def test_facts_of_the_parties_acting_for_the_seller(corpus):
    """BG-10 payee and BG-11 tax representative, read like the seller (tax registrations bare)."""
    assert facts_of(INVOICE.read_bytes()).agent_ids == (
        ("payee", "2298740918237"), ("payee", "989823401"), ("tax representative", "NO967611265MVA"))
    doc = INVOICE.read_bytes().replace(b"<ram:PayeeTradeParty>", b"<ram:InvoicerTradeParty><ram:GlobalID schemeID=\"0088\">"
                                       b"7300010000001</ram:GlobalID><ram:Name>Invoicer</ram:Name></ram:InvoicerTradeParty>"
                                       b"<ram:PayeeTradeParty>", 1)
    assert ("invoicer", "0088:7300010000001") in facts_of(doc).agent_ids


def test_facts_tax_registrations_and_electronic_address(corpus):
    facts = facts_of((EXAMPLES / "CII_example5.xml").read_bytes())
    # VA and FC registrations of the same value are one identifier; URIUniversalCommunication keeps its scheme.
    assert facts.supplier_ids == ("0088:5790000436101", "NL16356706", "EM:info@selco.nl")


def test_facts_credit_note_and_dates(corpus):
    doc = INVOICE.read_bytes()
    assert doc.count(b"<ram:TypeCode>380</ram:TypeCode>") == 1
    credit = facts_of(doc.replace(b"<ram:TypeCode>380</ram:TypeCode>", b"<ram:TypeCode>381</ram:TypeCode>"))
    assert credit.credit_note is True and credit.kind == "credit-note"
    assert facts_of(doc.replace(b"<ram:TypeCode>380</ram:TypeCode>", b"<ram:TypeCode>384</ram:TypeCode>")).credit_note is False
    other_format = doc.replace(b'format="102">20130630<', b'format="203">201306301200<')
    assert other_format != doc
    assert facts_of(other_format).issue_date == "201306301200"  # only format 102 is rewritten


# --- CII over HTTPS ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_valid_cii_invoice_is_accepted(gateway, client, seller):
    s = client(*seller)
    body = INVOICE.read_bytes()
    status, sent = await post(s, body)
    assert status == 202, sent
    assert sent["status"] == "accepted" and sent["duplicate"] is False
    assert sent["sha256"] == hashlib.sha256(body).hexdigest()
    assert sent["rules"] == {"packs": [f"en16931 {RULES_VERSION}"], "warnings": []}
    async with s.get(f"/v1/invoices/{sent['message_id']}") as r:
        assert r.status == 200
        got = await r.json()
    assert (got["status"], got["document_type"], got["invoice_number"]) == ("accepted", "cii:CrossIndustryInvoice", "TOSL108")
    assert got["rules"] == sent["rules"]

    await deliver_all(gateway)
    outbox = gateway.inst.delivery_folder
    assert sorted(p.name for p in outbox.iterdir()) == sorted(f"{sent['message_id']}.{x}" for x in ("json", "xml"))
    assert (outbox / f"{sent['message_id']}.xml").read_bytes() == body
    meta = json.loads((outbox / f"{sent['message_id']}.json").read_text())
    assert meta["media_type"] == "application/xml" and meta["issue_date"] == "2013-06-30"
    assert meta["supplier_ids"] == ["0088:1238764941386", "123456789", "NO123456789MVA"]


@pytest.mark.slow
async def test_cii_from_a_partner_the_seller_is_not_registered_for(gateway, client):
    s = client()  # the demo partner: none of the invoice's seller ids is its own
    status, body = await post(s, INVOICE.read_bytes())
    assert (status, body["error"]) == (403, "SUPPLIER_NOT_AUTHORIZED"), body
    assert "found '0088:1238764941386'" in [d["message"] for d in body["details"]]

    add_partner(gateway.inst, SELLER, SELLER_IDS)  # once the seller is someone else's, it says so
    assert gateway.gw.parts.partners.refresh()
    status, body = await post(s, INVOICE.read_bytes())
    assert (status, body["error"]) == (403, "SUPPLIER_NOT_AUTHORIZED"), body
    assert "belong to another trading partner" in body["message"]
    assert (await gateway.gw.store.reports.counts()).get("invoices", 0) == 0


@pytest.mark.slow
async def test_cii_naming_another_partner_as_tax_representative_is_refused_and_nothing_stored(gateway, client, seller):
    """Issue 20, item 3: the tax representative's VAT number (NO967611265MVA) registered to another partner in
    another form; the seller's own invoice names it, so it is refused, naming it as written."""
    add_partner(gateway.inst, "nordic-rep", ["9909:967 611 265"])
    assert gateway.gw.parts.partners.refresh()
    status, body = await post(client(*seller), INVOICE.read_bytes())
    assert (status, body["error"]) == (403, "SUPPLIER_NOT_AUTHORIZED"), body
    assert body["details"] == [{
        "message": "tax representative identifier 'NO967611265MVA' (compared as 'VAT:NO967611265') is registered to "
                   "another partner",
        "path": "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeAgreement/"
                "ram:SellerTaxRepresentativeTradeParty"}]
    assert "nordic-rep" not in json.dumps(body)  # the other partner is not named
    assert (await gateway.gw.store.reports.counts()).get("invoices", 0) == 0
    await deliver_all(gateway)
    assert list(gateway.inst.delivery_folder.iterdir()) == []


@pytest.mark.slow
async def test_cii_breaking_the_xsd_is_schema_invalid(gateway, client, seller):
    doc = INVOICE.read_bytes().replace(b"<ram:TypeCode>380</ram:TypeCode>",
                                       b"<ram:TypeCode>380</ram:TypeCode><ram:Unexpected>1</ram:Unexpected>")
    status, body = await post(client(*seller), doc)
    assert (status, body["error"]) == (422, "SCHEMA_INVALID"), body
    assert "CII D16B" in body["message"]
    assert body["details"]
    for d in body["details"]:
        assert d["path"].startswith("/rsm:CrossIndustryInvoice/rsm:ExchangedDocument"), d  # prefixes, not {urn:…}
        assert isinstance(d["line"], int) and d["line"] > 0, d
        assert "{urn:" not in d["message"], d
    assert any("ram:Unexpected" in d["message"] for d in body["details"]), body


@pytest.mark.slow
async def test_cii_breaking_a_business_rule_is_rules_failed(gateway, client, seller):
    doc = INVOICE.read_bytes()
    assert doc.count(b"<ram:DuePayableAmount>801.78<") == 1
    status, body = await post(client(*seller), doc.replace(b"<ram:DuePayableAmount>801.78<", b"<ram:DuePayableAmount>800.00<"))
    assert (status, body["error"]) == (422, "RULES_FAILED"), body
    detail = next(d for d in body["details"] if d["message"].startswith("[BR-CO-16]"))
    assert "SpecifiedTradeSettlementHeaderMonetarySummation" in detail["path"]


# --- Factur-X / ZUGFeRD PDFs ------------------------------------------------------------------------


@pytest.mark.slow
async def test_factur_x_pdf_is_accepted_and_delivered_as_sent(gateway, client, seller):
    s = client(*seller)
    pdf = pdf_with(("factur-x.xml", INVOICE.read_bytes()))
    status, sent = await post(s, pdf, PDF)
    assert status == 202, sent
    assert sent["sha256"] == hashlib.sha256(pdf).hexdigest()  # of the PDF, not of the XML inside
    assert sent["rules"]["packs"] == [f"en16931 {RULES_VERSION}"]
    message_id = sent["message_id"]
    async with s.get(f"/v1/invoices/{message_id}") as r:
        got = await r.json()
    assert (got["document_type"], got["invoice_number"]) == ("cii:CrossIndustryInvoice", "TOSL108")

    stored = gateway.gw.parts.vault.open(await gateway.gw.store.outbox.load_sealed(message_id), message_id, sent["sha256"])
    assert stored == pdf

    await deliver_all(gateway)
    outbox = gateway.inst.delivery_folder
    assert sorted(p.name for p in outbox.iterdir()) == [f"{message_id}.json", f"{message_id}.pdf"]
    delivered = (outbox / f"{message_id}.pdf").read_bytes()
    assert hashlib.sha256(delivered).hexdigest() == sent["sha256"] and delivered == pdf
    meta = json.loads((outbox / f"{message_id}.json").read_text())
    assert meta["media_type"] == "application/pdf" and meta["sha256"] == sent["sha256"]
    assert meta["invoice_number"] == "TOSL108" and meta["size"] == len(pdf)


@pytest.mark.slow
async def test_zugferd_attachment_names_are_recognised(gateway, client, seller):
    status, body = await post(client(*seller), pdf_with(("ZUGFeRD-invoice.xml", INVOICE.read_bytes())), PDF)
    assert status == 202, body


@pytest.mark.slow
async def test_the_same_invoice_as_xml_and_as_pdf_is_one_invoice(gateway, client, seller):
    s = client(*seller)
    assert (await post(s, INVOICE.read_bytes())).status == 202
    status, body = await post(s, pdf_with(("factur-x.xml", INVOICE.read_bytes())), PDF)
    assert (status, body["error"]) == (409, "DUPLICATE_CONFLICT"), body  # same seller, number and date; other bytes
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1


@pytest.mark.parametrize("attachments", [(), (("invoice.xml", b"<x/>"),)], ids=["no-attachment", "other-name"])
async def test_pdf_without_an_embedded_invoice(gateway, client, attachments):
    status, body = await post(client(), pdf_with(*attachments), PDF)
    assert (status, body["error"]) == (422, "NO_EMBEDDED_INVOICE"), body


async def test_pdf_with_two_embedded_invoices(gateway, client, seller):
    xml = INVOICE.read_bytes()
    status, body = await post(client(*seller), pdf_with(("factur-x.xml", xml), ("zugferd-invoice.xml", xml)), PDF)
    assert (status, body["error"]) == (422, "SEVERAL_EMBEDDED_INVOICES"), body
    assert sorted(d["message"] for d in body["details"]) == ["attachment 'factur-x.xml'", "attachment 'zugferd-invoice.xml'"]
    assert (await gateway.gw.store.reports.counts()).get("invoices", 0) == 0


@pytest.mark.slow
async def test_a_second_invoice_under_another_name_is_refused_and_nothing_stored(gateway, client, seller):
    """The attack: the checked factur-x.xml is clean, another XML rides along for a reader that takes it instead."""
    xml = INVOICE.read_bytes()
    other = xml.replace(b"TOSL108", b"TOSL109")
    status, body = await post(client(*seller), pdf_with(("factur-x.xml", xml), ("invoice-copy.dat", other)), PDF)
    assert (status, body["error"]) == (422, "EXTRA_XML_ATTACHMENT"), body
    assert [d["message"] for d in body["details"]] == ["attachment 'invoice-copy.dat'"]
    assert (await gateway.gw.store.reports.counts()).get("invoices", 0) == 0
    await deliver_all(gateway)
    assert list(gateway.inst.delivery_folder.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("body", [os.urandom(4096), SAMPLE, b"%PDF-1.7\n" + bytes(range(256)) * 8],
                         ids=["random", "xml", "pdf-header-then-garbage"])
async def test_not_a_pdf(gateway, client, body):
    status, reply = await post(client(), body, PDF)
    assert (status, reply["error"]) == (400, "NOT_PDF"), reply  # a %PDF- header that pypdf cannot read is no PDF either


async def test_embedded_xml_goes_through_the_hardened_parser(gateway, client, seller):
    s = client(*seller)
    xml = INVOICE.read_bytes()
    head, sep, rest = xml.partition(b"<rsm:CrossIndustryInvoice")
    assert sep
    hostile = head + b'<!DOCTYPE rsm:CrossIndustryInvoice [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + sep + rest
    hostile = hostile.replace(b"<ram:ID>TOSL108</ram:ID>", b"<ram:ID>&x;</ram:ID>", 1)
    plain = await post(s, hostile)
    embedded = await post(s, pdf_with(("factur-x.xml", hostile)), PDF)
    assert (plain.status, plain.json["error"]) == (400, "DTD_FORBIDDEN"), plain
    assert (embedded.status, embedded.json["error"]) == (400, "DTD_FORBIDDEN"), embedded
    assert "root:" not in json.dumps(embedded.json)


async def test_a_pdf_embedding_ubl_is_processed_as_ubl(gateway, client):
    # pdf.py takes whatever invoice is attached under a Factur-X name; the pipeline then treats it by its root
    # element, so a UBL invoice inside a PDF is checked (XSD, binding, UBL rules) and accepted like the XML.
    pdf = pdf_with(("factur-x.xml", SAMPLE))
    status, body = await post(client(), pdf, PDF)
    assert status == 202, body
    assert body["rules"]["packs"] == ["en16931 " + RULES_VERSION]
    await deliver_all(gateway)
    assert (gateway.inst.delivery_folder / f"{body['message_id']}.pdf").read_bytes() == pdf


def compressed_pdf(n: int, size: int) -> bytes:
    """A PDF written by hand with ``n`` attachments named factur-x.xml, each a FlateDecode stream that
    inflates to ``size`` bytes (pypdf's writer stores attachments uncompressed)."""
    stream = zlib.compress(b"<a>" + b" " * size + b"</a>", 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names ["
        + b" ".join(b"(factur-x.xml) %d 0 R" % (4 + 2 * i) for i in range(n)) + b"] >> >> >>", PDF_PAGES, PDF_PAGE,
    ]
    for i in range(n):
        objects.append(b"<< /Type /Filespec /F (factur-x.xml) /UF (factur-x.xml) /EF << /F %d 0 R >> >>" % (5 + 2 * i))
        objects.append(b"<< /Type /EmbeddedFile /Filter /FlateDecode /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    return pdf_of(*objects)


def test_several_compressed_invoices_are_refused_before_inflating_them():
    """A Factur-X PDF is a zip file in disguise: 4 attachments of 25 MB each fit in 100 KB of PDF."""
    body = compressed_pdf(4, 25_000_000)
    assert len(body) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedDocument) as exc:
            pdf.embedded_invoice(body, 64 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.code == "SEVERAL_EMBEDDED_INVOICES"
    assert peak < 30_000_000, peak  # none of them was inflated
