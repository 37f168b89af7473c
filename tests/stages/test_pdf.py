"""Factur-X / ZUGFeRD PDFs (gateway/stages/pdf.py): the invoice XML embedded in a PDF/A-3.

``embedded_invoice`` promises the bytes of the one attachment named as Factur-X, ZUGFeRD 2.x or
XRechnung name it (in any letter case), unchanged; and otherwise a precise rejection: NOT_PDF for
a body that is not a readable PDF, NO_EMBEDDED_INVOICE, SEVERAL_EMBEDDED_INVOICES (with the
attachments named), TOO_LARGE for an invoice over ``max_bytes`` once inflated or a PDF with more than
MAX_ATTACHMENTS attachments.  Whatever a hostile PDF makes pypdf raise, only those errors come out.

PDFs are made at test time: with the ``factur-x`` library (what a sender's software would use),
with pypdf's writer, and by hand where a compressed stream is needed.  The HTTP side (media types,
the stored PDF) is tested in tests/stages/test_cii.py.
"""

from __future__ import annotations

import random
import tracemalloc
import zlib
from pathlib import Path

import facturx
import pytest

from gateway.errors import LimitExceeded, Malformed, Rejected, UnsupportedDocument
from gateway.stages.pdf import (
    INFLATION_RATIO,
    INVOICE_NAMES,
    MAX_ATTACHMENTS,
    MIN_INFLATION,
    embedded_invoice,
    inflation_limit,
)
from tests.helpers import CORPUS
from tests.helpers.invoices import PDF_PAGE, PDF_PAGES, pdf_of, pdf_with

CII_EXAMPLE = CORPUS / "invoices/valid/en16931/cii-examples/CII_business_example_01.xml"
LIMIT = 10_000_000


def stream(data: bytes, entries: bytes = b"/Type /EmbeddedFile") -> bytes:
    return b"<< %s /Length %d >>\nstream\n" % (entries, len(data)) + data + b"\nendstream"


def hand_made(name: str, data: bytes, filters: bytes = b"/Filter /FlateDecode") -> bytes:
    """A minimal PDF with one attachment whose stream is given as stored."""
    return pdf_of(b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names [(%s) 4 0 R] >> >> >>" % name.encode(),
                  PDF_PAGES, PDF_PAGE, b"<< /Type /Filespec /F (%s) /UF (%s) /EF << /F 5 0 R >> >>" % (name.encode(), name.encode()),
                  stream(data, b"/Type /EmbeddedFile " + filters))


@pytest.fixture(scope="module")
def cii(corpus: Path) -> bytes:
    return CII_EXAMPLE.read_bytes()


@pytest.fixture(scope="module")
def factur_x(cii: bytes) -> bytes:
    """A Factur-X PDF as the factur-x library makes it (the XML compressed, XMP metadata, a second attachment)."""
    return facturx.generate_from_binary(pdf_with(), cii, attachments={"delivery-note.txt": {"filedata": b"delivered 2013-06-30"}})


def test_the_invoice_of_a_factur_x_pdf_comes_out_byte_for_byte(factur_x: bytes, cii: bytes):
    assert len(factur_x) < len(cii)  # the library compresses it: what comes out was inflated
    assert embedded_invoice(factur_x, LIMIT) == cii
    assert facturx.get_xml_from_pdf(factur_x, check_xsd=False) == ("factur-x.xml", cii)  # the reference reader agrees


@pytest.mark.parametrize("name", [*INVOICE_NAMES, "ZUGFeRD-invoice.xml", "Factur-X.XML", "XRechnung.xml"])
def test_the_names_the_specifications_give_in_any_case(name: str):
    assert embedded_invoice(pdf_with(("logo.png", b"\x89PNG"), (name, b"<Invoice/>")), LIMIT) == b"<Invoice/>"


@pytest.mark.parametrize("names", [(), ("invoice.xml",), ("factur-x.xml.exe", "zugferd.xml", "xrechnung.xml.p7m")],
                         ids=["none", "other-name", "look-alikes"])
def test_a_pdf_without_an_invoice_attachment_says_how_to_send_one(names: tuple[str, ...]):
    with pytest.raises(UnsupportedDocument) as caught:
        embedded_invoice(pdf_with(*((n, b"<Invoice/>") for n in names)), LIMIT)
    assert (caught.value.code, caught.value.http_status) == ("NO_EMBEDDED_INVOICE", 422)
    assert "attach the CII XML as factur-x.xml" in caught.value.message
    assert "or send the XML itself as application/xml" in caught.value.message


def test_several_invoices_in_one_pdf_are_refused_and_named():
    names = [f"{'factur-x'[:k]}{'FACTUR-X'[k:]}.xml" for k in (0, 1, 2, 3, 4, 5, 6, 8)] + [
        "xrechnung.xml", "XRechnung.xml", "zugferd-invoice.xml", "ZUGFeRD-invoice.xml"]
    assert len(set(names)) == 12
    with pytest.raises(UnsupportedDocument) as caught:
        embedded_invoice(pdf_with(*((n, b"<Invoice/>") for n in names)), LIMIT)
    exc = caught.value
    assert (exc.code, exc.message) == ("SEVERAL_EMBEDDED_INVOICES", "the PDF carries more than one embedded invoice; "
                                                                    "send one invoice per PDF")
    assert len(exc.details) == 10  # a sender is shown the first ten
    assert {d.message for d in exc.details} <= {f"attachment {n!r}" for n in names}


def test_the_limit_is_on_the_inflated_invoice(factur_x: bytes, cii: bytes):
    assert embedded_invoice(factur_x, len(cii)) == cii
    with pytest.raises(LimitExceeded) as caught:
        embedded_invoice(factur_x, len(cii) - 1)
    assert (caught.value.code, caught.value.http_status) == ("TOO_LARGE", 413)
    assert caught.value.message == f"the embedded factur-x.xml is larger than the limit of {len(cii) - 1} bytes"

    small_pdf = hand_made("factur-x.xml", zlib.compress(b"<a>" + b" " * 2_000_000 + b"</a>", 9))
    assert len(small_pdf) < 10_000
    with pytest.raises(LimitExceeded, match="inflates to more than 1000000 bytes"):
        embedded_invoice(small_pdf, 1_000_000)


def test_more_attachments_than_an_invoice_carries_are_refused():
    others = [(f"page-{i}.txt", b"x") for i in range(MAX_ATTACHMENTS - 1)]
    assert embedded_invoice(pdf_with(*others, ("factur-x.xml", b"<Invoice/>")), LIMIT) == b"<Invoice/>"
    with pytest.raises(LimitExceeded) as caught:
        embedded_invoice(pdf_with(*others, ("page-x.txt", b"x"), ("factur-x.xml", b"<Invoice/>")), LIMIT)
    assert (caught.value.code, caught.value.message) == ("TOO_LARGE", f"the PDF has more than {MAX_ATTACHMENTS} attachments")


@pytest.mark.parametrize("body", [b"", b" %PDF-1.7\n", b"\xef\xbb\xbf%PDF-1.7\n", b"<?xml version='1.0'?><Invoice/>",
                                  b"%PDF", b"%pdf-1.7\n"], ids=["empty", "space-first", "bom-first", "xml", "short", "lowercase"])
def test_a_body_that_does_not_start_as_a_pdf_is_refused_unread(body: bytes):
    with pytest.raises(Malformed) as caught:
        embedded_invoice(body, LIMIT)
    assert (caught.value.code, caught.value.http_status) == ("NOT_PDF", 400)
    assert caught.value.message == "the body is not a PDF (it does not start with %PDF-)"


def test_hostile_pdfs_give_only_the_gateways_own_errors(factur_x: bytes):
    rng = random.Random(20261102)
    bodies = [factur_x[:n] for n in range(6, len(factur_x), 131)]  # truncated anywhere
    for _ in range(150):  # a few bytes changed anywhere after the header
        body = bytearray(factur_x)
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(5, len(body))] = rng.randrange(256)
        bodies.append(bytes(body))
    bodies.append(hand_made("factur-x.xml", b"x" * 40, b"/Filter /LZWDecode /DecodeParms << /EarlyChange 7 >>"))
    outcomes = set()
    for body in bodies:
        try:
            embedded_invoice(body, LIMIT)
            outcomes.add("read")
        except Rejected as exc:  # anything else escaping is the defect looked for
            outcomes.add(exc.code)
    assert "NOT_PDF" in outcomes  # the mutations did reach the refusals, not only harmless corners
    assert outcomes <= {"read", "NOT_PDF", "NO_EMBEDDED_INVOICE", "SEVERAL_EMBEDDED_INVOICES", "EXTRA_XML_ATTACHMENT",
                        "TOO_LARGE"}


def test_a_decompression_bomb_is_too_large_without_being_inflated():
    bomb = hand_made("factur-x.xml", zlib.compress(b"<a>" + b" " * 80_000_000 + b"</a>", 9))
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded):
            embedded_invoice(bomb, 1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak


# --- everything the PDF carries is the invoice or is refused (issue 20, item 1) ---------------------------

INVOICE = b"<Invoice/>"
CATALOG = b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names [(factur-x.xml) 4 0 R] >> >>%s >>"
INVOICE_SPEC = b"<< /Type /Filespec /F (factur-x.xml) /EF << /F 5 0 R >> >>"


def refused_as_extra_xml(body: bytes) -> list[str]:
    with pytest.raises(UnsupportedDocument) as caught:
        embedded_invoice(body, LIMIT)
    assert (caught.value.code, caught.value.http_status) == ("EXTRA_XML_ATTACHMENT", 422), caught.value.message
    assert "which a receiver's software could read instead of the invoice" in caught.value.message
    return [d.message for d in caught.value.details]


@pytest.mark.parametrize(("name", "data"), [
    ("invoice.xml", b"not even markup"),
    ("INVOICE.XML ", b"not even markup"),
    ("notes.txt", b"<?xml version='1.0'?><Invoice/>"),
    ("data.bin", b"\xef\xbb\xbf \r\n<Invoice/>"),
    ("data.bin", "<Invoice/>".encode("utf-16")),
    ("data.bin", "\n<Invoice/>".encode("utf-16-le")),
    ("data.bin", "<Invoice/>".encode("utf-16-be")),
], ids=["by-name", "by-name-in-capitals", "xml-declaration", "utf8-bom", "utf16-bom", "utf16le", "utf16be"])
def test_xml_besides_the_invoice_is_refused_and_named(name: str, data: bytes):
    assert refused_as_extra_xml(pdf_with(("factur-x.xml", INVOICE), ("delivery-note.txt", b"ok"), (name, data))) == \
        [f"attachment {name!r}"]


def test_xml_by_its_mime_type_is_refused():
    other = b"<< /Type /Filespec /F (data.bin) /EF << /F 7 0 R >> >>"
    body = pdf_of(b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names [(data.bin) 6 0 R (factur-x.xml) 4 0 R] "
                  b">> >> >>", PDF_PAGES, PDF_PAGE, INVOICE_SPEC, stream(INVOICE), other,
                  stream(b"plain words", b"/Type /EmbeddedFile /Subtype /application#2Fxml"))
    assert refused_as_extra_xml(body) == ["attachment 'data.bin'"]


def test_xml_attached_outside_the_name_tree_is_found():
    """A page's file-attachment annotation, the catalog's associated files, a stream nothing names."""
    annotation = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Annots [<< /Type /Annot /Subtype /FileAttachment " \
                 b"/Rect [0 0 9 9] /FS << /Type /Filespec /F (note.txt) /EF << /F 6 0 R >> >> >>] >>"
    assert refused_as_extra_xml(pdf_of(CATALOG % b"", PDF_PAGES, annotation, INVOICE_SPEC, stream(INVOICE),
                                       stream(b"<Invoice>other</Invoice>"))) == ["attachment 'note.txt'"]
    associated = pdf_of(CATALOG % b" /AF [4 0 R 6 0 R]", PDF_PAGES, PDF_PAGE, INVOICE_SPEC, stream(INVOICE),
                        b"<< /Type /Filespec /UF (extra.dat) /AFRelationship /Supplement /EF << /F 7 0 R >> >>",
                        stream(b"<Invoice>other</Invoice>"))
    assert refused_as_extra_xml(associated) == ["attachment 'extra.dat'"]
    orphan = pdf_of(CATALOG % b"", PDF_PAGES, PDF_PAGE, INVOICE_SPEC, stream(INVOICE), stream(b"<Invoice>other</Invoice>"))
    assert refused_as_extra_xml(orphan) == ["attachment object 6"]


def test_one_file_specification_with_two_different_streams_is_two_invoices():
    spec = b"<< /Type /Filespec /F (factur-x.xml) /UF (factur-x.xml) /EF << /F 5 0 R /UF 6 0 R >> >>"
    body = pdf_of(CATALOG % b"", PDF_PAGES, PDF_PAGE, spec, stream(INVOICE), stream(b"<Invoice>other</Invoice>"))
    with pytest.raises(UnsupportedDocument) as caught:
        embedded_invoice(body, LIMIT)
    assert caught.value.code == "SEVERAL_EMBEDDED_INVOICES"


def test_the_invoice_may_carry_other_names_and_be_referenced_twice():
    """Factur-X names the invoice in the name tree and in the catalog's /AF: one file, found once."""
    spec = b"<< /Type /Filespec /F (factur-x.xml) /UF (Rechnung.xml) /AFRelationship /Data /EF << /F 5 0 R /UF 5 0 R >> >>"
    body = pdf_of(CATALOG % b" /AF [4 0 R]", PDF_PAGES, PDF_PAGE, spec, stream(INVOICE), stream(b"XMP", b"/Type /Metadata"))
    assert embedded_invoice(body, LIMIT) == INVOICE


def test_other_files_are_welcome_when_they_are_not_xml(factur_x: bytes, cii: bytes):
    body = pdf_with(("factur-x.xml", cii), ("scan.png", b"\x89PNG\r\n"), ("terms.pdf", b"%PDF-1.7 ..."), ("readme.txt", b"a < b"))
    assert embedded_invoice(body, LIMIT) == cii


def test_a_bomb_in_another_attachment_is_too_large_without_being_inflated():
    bomb = zlib.compress(b" " * 80_000_000, 9)
    body = pdf_of(b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names [(factur-x.xml) 4 0 R (a.txt) 6 0 R] "
                  b">> >> >>", PDF_PAGES, PDF_PAGE, INVOICE_SPEC, stream(INVOICE),
                  b"<< /Type /Filespec /F (a.txt) /EF << /F 7 0 R >> >>", stream(bomb, b"/Type /EmbeddedFile /Filter /FlateDecode"))
    assert len(body) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded) as caught:
            embedded_invoice(body, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak
    assert caught.value.message.startswith(f"a stream in the PDF inflates to more than {inflation_limit(len(body), LIMIT)} bytes")


def test_the_inflation_limit_is_the_smaller_of_the_xml_limit_and_a_ratio_of_the_pdf():
    assert inflation_limit(1024, LIMIT) == MIN_INFLATION  # a 1 KiB request inflates to 1 MiB at the most
    assert inflation_limit(50_000, LIMIT) == INFLATION_RATIO * 50_000
    assert inflation_limit(5_000_000, LIMIT) == LIMIT


def test_other_attachments_share_one_inflation_budget():
    files = [(f"part-{i}.txt", b"x" * 400_000) for i in range(3)]
    body = pdf_with(("factur-x.xml", INVOICE), *files[:2])
    assert embedded_invoice(body, 1_000_000) == INVOICE
    with pytest.raises(LimitExceeded, match="the files embedded in the PDF inflate beyond 1000000 bytes together"):
        embedded_invoice(pdf_with(("factur-x.xml", INVOICE), *files), 1_000_000)

