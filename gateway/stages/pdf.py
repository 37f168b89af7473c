"""Factur-X / ZUGFeRD: the CII invoice embedded in a PDF/A-3 as a file attachment.

Only the XML is read (with pypdf); it then goes through the same hardened parser and every stage
an XML invoice goes through.  The PDF itself is what the gateway stores and delivers, unchanged.
"""

from __future__ import annotations

import io
import logging

from ..errors import Detail, LimitExceeded, Malformed, UnsupportedDocument

# The names the Factur-X 1.0 / ZUGFeRD 2.x / XRechnung specifications give the embedded invoice.
INVOICE_NAMES = ("factur-x.xml", "zugferd-invoice.xml", "xrechnung.xml")
MAX_ATTACHMENTS = 100  # a PDF/A-3 invoice carries one XML and perhaps a few supporting documents

logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every quirk of a hostile file


def embedded_invoice(pdf: bytes, max_bytes: int) -> bytes:
    """The embedded invoice's bytes; a precise rejection when there is none, or more than one."""
    from pypdf import PdfReader

    if not pdf.startswith(b"%PDF-"):
        raise Malformed("the body is not a PDF (it does not start with %PDF-)", code="NOT_PDF")
    try:
        reader = PdfReader(io.BytesIO(pdf), strict=False)
        found = []
        for n, attachment in enumerate(reader.attachment_list):  # names only: no content is decompressed here
            if n >= MAX_ATTACHMENTS:
                raise LimitExceeded(f"the PDF has more than {MAX_ATTACHMENTS} attachments", code="TOO_LARGE")
            if (attachment.name or "").lower() in INVOICE_NAMES:
                found.append(attachment)
        content = found[0].content if len(found) == 1 else b""  # decompressed only once it is the one
    except LimitExceeded:
        raise
    except Exception:  # pypdf on hostile input raises many kinds of exceptions; each means "unreadable"
        raise Malformed("the PDF could not be read; send a PDF/A-3 with the invoice attached as factur-x.xml",
                        code="NOT_PDF") from None
    if not found:
        raise UnsupportedDocument(
            "the PDF carries no embedded invoice; attach the CII XML as factur-x.xml (Factur-X / ZUGFeRD 2.x) "
            "or send the XML itself as application/xml", code="NO_EMBEDDED_INVOICE")
    if len(found) > 1:
        raise UnsupportedDocument(
            "the PDF carries more than one embedded invoice; send one invoice per PDF",
            [Detail(f"attachment {a.name!r}") for a in found[:10]], code="SEVERAL_EMBEDDED_INVOICES")
    if len(content) > max_bytes:
        raise LimitExceeded(f"the embedded {found[0].name} is larger than the limit of {max_bytes} bytes", code="TOO_LARGE")
    return bytes(content)
