import asyncio
import hashlib
import re
import threading
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.cli.demo import SAMPLE
from gateway.config.model import XmlLimits
from gateway.errors import GatewayError
from gateway.model import DocumentType, Syntax
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.edit import edit_partners
from gateway.pipeline import PDF, read_facts
from gateway.stages import fraud, pdf, ubl, xmlparse
from gateway.stages.schema import SchemaRegistry
from gateway.stages.xmlparse import XmlParser
from tests.helpers import audit_of, eventually, numbered, post
from tests.helpers.invoices import pdf_of

ELSEWHERE = "0088:4000000000009"


async def test_valid_sample_is_accepted_and_delivered(gateway, client):
    answer = await post(client(), SAMPLE)
    assert answer.status == 202, answer.text
    body = answer.json
    assert body["status"] == "accepted" and body["duplicate"] is False
    await gateway.gw.outbox.run_once()
    delivered = gateway.inst.delivery_folder / f"{body['message_id']}.xml"
    assert delivered.read_bytes() == SAMPLE


async def test_a_resend_the_stages_would_now_refuse_gets_its_first_receipt(gateway, client):
    """A partner that lost the 202 and resends must learn its invoice was accepted, whatever changed since:
    the stages' refusal is answered only for content never accepted, and only that refusal is audited."""
    s = client()
    first = await post(s, SAMPLE)
    assert first.status == 202, first.text

    def move_the_partner(partners: list[Any], _store: Any) -> None:  # the invoice's seller is no longer theirs
        i = next(i for i, p in enumerate(partners) if p.name == DEMO_PARTNER)
        partners[i] = replace(partners[i], party_ids=(ELSEWHERE,))

    await asyncio.to_thread(edit_partners, gateway.inst.partners, DEMO_PARTNER, move_the_partner)
    book = gateway.gw.parts.partners
    await eventually(lambda: book.refresh() or book.current.get(DEMO_PARTNER).party_ids == (ELSEWHERE,),
                     "the partners file reloaded")

    again = await post(s, SAMPLE)
    assert (again.status, again.json.get("message_id"), again.json.get("duplicate")) == \
        (202, first.json["message_id"], True), again.text
    unsigned = numbered("PIPELINE-0002")
    fresh = await post(s, unsigned)
    assert (fresh.status, fresh.json["error"]) == (403, "SUPPLIER_NOT_AUTHORIZED"), fresh.text
    refused = await audit_of(gateway.gw.store, "invoice.rejected")
    assert [r["detail"]["sha256"] for r in refused] == [hashlib.sha256(unsigned).hexdigest()]


async def test_a_payment_account_hidden_in_an_extension_is_refused_and_nothing_stored(gateway, client):
    """Issue 20, item 2: an extension slot takes any XML, and a consumer searching descendants reads it."""
    hidden = (b'<ext:UBLExtensions xmlns:ext="urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2">'
              b'<ext:UBLExtension><ext:ExtensionContent><x:Notes xmlns:x="urn:example:x"><cac:PaymentMeans>'
              b'<cbc:PaymentMeansCode>30</cbc:PaymentMeansCode><cac:PayeeFinancialAccount><cbc:ID>GB82WEST12345698765432'
              b'</cbc:ID></cac:PayeeFinancialAccount></cac:PaymentMeans></x:Notes></ext:ExtensionContent></ext:UBLExtension>'
              b'</ext:UBLExtensions>')
    head, sep, rest = numbered("PIPELINE-EXT-1").partition(b"<cbc:")
    answer = await post(client(), head + hidden + sep + rest)
    assert (answer.status, answer.json["error"]) == (422, "EXTENSION_REFUSED"), answer.text
    assert [d["path"] for d in answer.json["details"]][0] == "/*/ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/x:Notes"
    assert (await gateway.gw.store.reports.counts()).get("invoices", 0) == 0


async def test_the_stage_threads_are_renewed_after_a_budget_of_parsing(gateway, client, monkeypatch):
    """lxml's per-thread name dictionary never shrinks: after RENEW_AFTER_BYTES of parsed structure the pipeline
    moves its work to fresh stage threads (here the budget is one sample invoice)."""
    monkeypatch.setattr(xmlparse, "RENEW_AFTER_BYTES", 1)
    s = client()
    threads = []
    for i in range(3):
        status, body = await post(s, numbered(f"RENEW-{i}"))
        assert status == 202, body
        threads.append({t for t in threading.enumerate() if t.name.startswith("stage")})
    assert gateway.gw.executor.renewals == 3
    assert not threads[0] & threads[2]  # the first invoice's threads are gone


# --- fuzz contract: whatever comes in, only the gateway's own errors come out (SECURITY-TESTS.md F-03) -------

EXT_OPEN = (b'<ext:UBLExtensions xmlns:ext="urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2">'
            b"<ext:UBLExtension><ext:ExtensionContent>")
EXT_CLOSE = b"</ext:ExtensionContent></ext:UBLExtension></ext:UBLExtensions>"
FRAGMENTS = [  # well-formed, so that mutated invoices get past the parser to the checks after it
    b"<cac:PaymentMeans><cbc:PaymentMeansCode>30</cbc:PaymentMeansCode><cac:PayeeFinancialAccount>"
    b"<cbc:ID>DE89370400440532013000</cbc:ID></cac:PayeeFinancialAccount></cac:PaymentMeans>",
    b"<cac:AccountingSupplierParty><cac:Party><cbc:EndpointID schemeID='0088'>\xef\xbc\x94000001000006</cbc:EndpointID>"
    b"</cac:Party></cac:AccountingSupplierParty>",
    b"<x:Evil xmlns:x='urn:example:evil'><x:IBAN>NL91ABNA0417164300</x:IBAN></x:Evil>",
    b"<ds:Signature xmlns:ds='http://www.w3.org/2000/09/xmldsig#'><ds:SignedInfo/></ds:Signature>",
    b"<cbc:Note>\xc2\xa0\xe2\x80\x8b</cbc:Note>", b"<!-- a comment -->", b"<?pi x?>",
]
TEXT = re.compile(rb">([^<]+)<")
START_TAG = re.compile(rb"<[A-Za-z][^<>]*?(?=/?>)")


def mutated(doc: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    """The sample with each mutation applied where the index points (modulo what there is)."""
    for kind, index, payload in mutations:
        if kind == "text":  # a text node's content replaced, escaped: still well-formed
            texts = list(TEXT.finditer(doc))
            m = texts[index % len(texts)]
            text = payload.replace("&", "&amp;").replace("<", "&lt;").encode("utf-8", "surrogatepass")
            doc = doc[:m.start(1)] + text + doc[m.end(1):]
        elif kind == "attribute":  # attributes added to a start tag
            tags = list(START_TAG.finditer(doc))
            m = tags[index % len(tags)]
            doc = doc[:m.end()] + b"".join(b' a%d="%s"' % (i, payload.encode()) for i in range(index % 80)) + doc[m.end():]
        elif kind == "extension":  # a fragment in an extension slot, first in the document as UBL places it
            root = doc.index(b">", doc.index(b"<Invoice")) + 1
            doc = doc[:root] + EXT_OPEN + payload + EXT_CLOSE + doc[root:]
        else:  # a fragment between two elements
            ends = [i + 1 for i in range(len(doc)) if doc[i:i + 1] == b">"]
            at = ends[index % len(ends)]
            doc = doc[:at] + payload + doc[at:]
    return doc


MUTATION = st.one_of(
    st.tuples(st.just("text"), st.integers(0, 200), st.text(max_size=40).filter(lambda t: "\x00" not in t)),
    st.tuples(st.just("attribute"), st.integers(0, 200), st.text("abc=&'", max_size=4).map(
        lambda t: t.replace("&", "&amp;").replace("'", "&apos;"))),
    st.tuples(st.just("extension"), st.just(0), st.sampled_from(FRAGMENTS)),
    st.tuples(st.just("fragment"), st.integers(0, 400), st.sampled_from(FRAGMENTS)),
)


def checked(parts: Any, doc: bytes, media_type: str = "application/xml") -> str:
    """The stages that need no partner key or store, as Pipeline.validated and check run them; the code."""
    try:
        xml = pdf.embedded_invoice(doc, 1 << 20) if media_type == PDF else doc
        root = parts.parser.parse(xml).root
        doc_type = DocumentType.from_root(etree.QName(root).namespace, etree.QName(root).localname)
        version = parts.schemas.validate(root, doc_type)
        if doc_type.syntax is Syntax.UBL:
            ubl.check_extensions(root)
        facts = read_facts(root, doc_type, version)
        fraud.check_accounts(facts)
    except GatewayError as exc:
        return exc.code
    return "ACCEPTED"


@pytest.fixture(scope="module")
def stages() -> Any:
    return SimpleNamespace(parser=XmlParser(XmlLimits(100, 100_000, 64, max_tree_bytes=1 << 20)),
                           schemas=SchemaRegistry())


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzzed_invoices_through_the_checks_raise_only_gateway_errors(stages: Any, mutations: list) -> None:
    checked(stages, mutated(SAMPLE, mutations))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 16), st.binary(max_size=12)), min_size=1, max_size=4))
def test_fuzzed_factur_x_pdfs_raise_only_gateway_errors(stages: Any, mutations: list) -> None:
    doc = pdf_of(b"<< /Type /Catalog /Names << /EmbeddedFiles << /Names [(factur-x.xml) 2 0 R] >> >> >>",
                 b"<< /Type /Filespec /F (factur-x.xml) /EF << /F 3 0 R >> >>",
                 b"<< /Type /EmbeddedFile /Length %d >>\nstream\n" % len(SAMPLE) + SAMPLE + b"\nendstream")
    assert checked(stages, doc, PDF) not in ("MALFORMED_PDF", "NO_EMBEDDED_INVOICE")  # the unmutated PDF opens
    for pos, cut, insert in mutations:
        pos = min(pos, len(doc))
        doc = doc[:pos] + insert + doc[pos + cut:]
    checked(stages, doc, PDF)
