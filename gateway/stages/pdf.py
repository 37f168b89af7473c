"""Factur-X / ZUGFeRD: the CII invoice embedded in a PDF/A-3 as a file attachment.

Only the XML is read (with pypdf); it then goes through the same hardened parser and every stage
an XML invoice goes through.  The PDF itself is what the gateway stores and delivers, unchanged, so
everything it carries is either the invoice that was checked or refused:

- every embedded file is found, however it is referenced (the EmbeddedFiles name tree, an ``/AF``
  array, a file-attachment annotation, or a stream marked ``/Type /EmbeddedFile`` that nothing
  names): one of them, by a name the specifications give, is the invoice; a second such file is
  ``SEVERAL_EMBEDDED_INVOICES``, and any other embedded file that is XML by its name, its MIME type or
  its content is ``EXTRA_XML_ATTACHMENT`` (a receiver's reader could take it for the invoice);
- nothing is inflated beyond a limit known before decompression starts: the XML limit, and at most
  ``INFLATION_RATIO`` times the size of the PDF (``MIN_INFLATION`` at least), per stream and for all
  embedded files together; beyond it, ``TOO_LARGE`` without the rest being inflated.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..errors import Detail, LimitExceeded, Malformed, UnsupportedDocument

# The names the Factur-X 1.0 / ZUGFeRD 2.x / XRechnung specifications give the embedded invoice.
INVOICE_NAMES = ("factur-x.xml", "zugferd-invoice.xml", "xrechnung.xml")
MAX_ATTACHMENTS = 100  # a PDF/A-3 invoice carries one XML and perhaps a few supporting documents
MAX_OBJECTS = 200_000  # indirect objects looked at for embedded files
MAX_NESTING = 8  # how deep into an object's own dictionaries and arrays a file specification is looked for
INFLATION_RATIO = 100  # XML compresses 5-30 times; a zlib bomb about 1000 times
MIN_INFLATION = 1 << 20
SNIFF_BYTES = 1024
_OUTPUT_LIMITS = ("zlib_maximum_output_length", "lzw_maximum_output_length", "run_length_maximum_output_length",
                  "jbig2_maximum_output_length", "brotli_maximum_output_length",
                  "array_based_stream_maximum_output_length")
_FILE_NAME_KEYS = ("/UF", "/F", "/DOS", "/Mac", "/Unix")

logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every quirk of a hostile file


@dataclass
class _Embedded:
    """One embedded file stream and every name and MIME type anything in the PDF gives it."""

    stream: Any  # a pypdf StreamObject
    names: list[str] = field(default_factory=list)
    types: set[str] = field(default_factory=set)

    @property
    def shown(self) -> str:
        return repr(self.names[0]) if self.names else f"object {self.stream.indirect_reference.idnum}"

    def named_as_invoice(self) -> bool:
        return any(n.strip().lower() in INVOICE_NAMES for n in self.names)

    def named_as_xml(self) -> bool:
        return any(".xml" in n.lower() for n in self.names) or any("xml" in t.lower() for t in self.types)


def inflation_limit(pdf_size: int, max_bytes: int) -> int:
    """How many bytes any stream of a PDF of this size may inflate to, and all its embedded files together."""
    return min(max_bytes, max(MIN_INFLATION, INFLATION_RATIO * pdf_size))


def embedded_invoice(pdf: bytes, max_bytes: int) -> bytes:
    """The embedded invoice's bytes; a precise rejection when there is none, more than one, or other XML."""
    from pypdf import PdfReader, apply_configuration
    from pypdf.errors import LimitReachedError

    if not pdf.startswith(b"%PDF-"):
        raise Malformed("the body is not a PDF (it does not start with %PDF-)", code="NOT_PDF")
    limit = inflation_limit(len(pdf), max_bytes)
    try:
        # One byte over the limit: zlib stops at its cap before the checksum, so an exact fit must be below it.
        # pypdf counts every filter's input and output as a stream's decoding work: a chain of two at the most.
        with apply_configuration(None, **dict.fromkeys(_OUTPUT_LIMITS, limit + 1),
                                 stream_decoding_work_maximum_length=len(pdf) + 4 * (limit + 1)):
            files = _embedded_files(PdfReader(io.BytesIO(pdf), strict=False))
            invoices = [f for f in files if f.named_as_invoice()]
            if len(invoices) != 1:
                _no_single_invoice(invoices)
            _refuse_other_xml([f for f in files if f is not invoices[0]], limit)
            content = invoices[0].stream.get_data()
    except LimitReachedError:
        raise LimitExceeded(f"a stream in the PDF inflates to more than {limit} bytes, the most a PDF of {len(pdf)} bytes "
                            f"may inflate to on this gateway ({INFLATION_RATIO} times its size, at most {max_bytes})",
                            code="TOO_LARGE") from None
    except (LimitExceeded, UnsupportedDocument):
        raise
    except Exception:  # pypdf on hostile input raises many kinds of exceptions; each means "unreadable"
        raise Malformed("the PDF could not be read; send a PDF/A-3 with the invoice attached as factur-x.xml",
                        code="NOT_PDF") from None
    if len(content) > max_bytes:
        raise LimitExceeded(f"the embedded {invoices[0].names[0]} is larger than the limit of {max_bytes} bytes", code="TOO_LARGE")
    return bytes(content)


def _no_single_invoice(invoices: list[_Embedded]) -> NoReturn:
    if not invoices:
        raise UnsupportedDocument(
            "the PDF carries no embedded invoice; attach the CII XML as factur-x.xml (Factur-X / ZUGFeRD 2.x) "
            "or send the XML itself as application/xml", code="NO_EMBEDDED_INVOICE")
    raise UnsupportedDocument(
        "the PDF carries more than one embedded invoice; send one invoice per PDF",
        [Detail(f"attachment {f.shown}") for f in invoices[:10]], code="SEVERAL_EMBEDDED_INVOICES")


def _refuse_other_xml(others: list[_Embedded], limit: int) -> None:
    """Every embedded file but the invoice must not be XML: by name, MIME type, or (inflated within the
    budget the invoice shares) by content."""
    budget = limit
    xml = []
    for f in others:
        if f.named_as_xml():
            xml.append(f)
            continue
        data = f.stream.get_data()
        budget -= len(data)
        if budget < 0:
            raise LimitExceeded(f"the files embedded in the PDF inflate beyond {limit} bytes together", code="TOO_LARGE")
        if looks_like_xml(data):
            xml.append(f)
    if xml:
        raise UnsupportedDocument(
            "the PDF carries XML besides the invoice, which a receiver's software could read instead of the invoice "
            "this gateway checked; attach the invoice as the only XML file",
            [Detail(f"attachment {f.shown}") for f in xml[:10]], code="EXTRA_XML_ATTACHMENT")


def looks_like_xml(data: bytes) -> bool:
    """Markup, as a lenient reader would take it: after a byte-order mark and white space, a '<'."""
    head = data[:SNIFF_BYTES]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head.decode("utf-16", "ignore")
    elif head[1:2] == b"\x00":
        text = head.decode("utf-16-le", "ignore")
    elif head[:1] == b"\x00":
        text = head.decode("utf-16-be", "ignore")
    else:
        text = head.decode("latin-1")
    return text.lstrip(" \t\r\n\f\x00\ufeff\xef\xbb\xbf").startswith("<")


def _embedded_files(reader: Any) -> list[_Embedded]:
    """Every embedded file stream of the PDF with the names and types given to it anywhere."""
    from pypdf.generic import IndirectObject, StreamObject

    found: dict[tuple[int, int], _Embedded] = {}

    def add(ref: Any, names: list[str]) -> None:
        stream = ref.get_object() if isinstance(ref, IndirectObject) else None
        where = getattr(stream, "indirect_reference", None)
        if not isinstance(stream, StreamObject) or where is None:
            return
        entry = found.setdefault((where.idnum, where.generation), _Embedded(stream))
        entry.names += [n for i, n in enumerate(names) if n not in entry.names and n not in names[:i]]
        entry.types.add(str(stream.get("/Subtype", "")))
        if len(found) > MAX_ATTACHMENTS:
            raise LimitExceeded(f"the PDF has more than {MAX_ATTACHMENTS} attachments", code="TOO_LARGE")

    tree_names: dict[int, list[str]] = {}  # the EmbeddedFiles name tree's keys, by file specification
    for attachment in reader.attachment_list:
        tree_names.setdefault(id(attachment.pdf_object), []).append(str(attachment.name))
    for obj in _indirect_objects(reader):
        if isinstance(obj, StreamObject) and obj.get("/Type") == "/EmbeddedFile":
            add(obj.indirect_reference, [])
        for spec in _file_specifications(obj, MAX_NESTING):
            names = tree_names.get(id(spec), []) + [str(spec[k]) for k in _FILE_NAME_KEYS if k in spec]
            for ref in _values(spec["/EF"]):
                add(ref, names)
    return list(found.values())


def _indirect_objects(reader: Any) -> Iterator[Any]:
    from pypdf.generic import IndirectObject

    numbers = {(n, g) for g, table in reader.xref.items() for n in table} | {(n, 0) for n in reader.xref_objStm}
    if len(numbers) > MAX_OBJECTS:
        raise LimitExceeded(f"the PDF has more than {MAX_OBJECTS} objects", code="TOO_LARGE")
    for number, generation in sorted(numbers):
        obj = reader.get_object(IndirectObject(number, generation, reader))
        if obj is not None:
            yield obj


def _file_specifications(obj: Any, depth: int) -> Iterator[Any]:
    """The dictionaries with an /EF entry within ``obj`` itself (not behind references: those are objects
    of their own, looked at in turn)."""
    from pypdf.generic import ArrayObject, DictionaryObject

    if depth < 0:
        return
    if isinstance(obj, DictionaryObject):
        if "/EF" in obj:
            yield obj
        children: Any = obj.values()
    elif isinstance(obj, ArrayObject):
        children = obj
    else:
        return
    for child in children:
        yield from _file_specifications(child, depth - 1)


def _values(obj: Any) -> list[Any]:
    from pypdf.generic import DictionaryObject

    return list(obj.values()) if isinstance(obj, DictionaryObject) else []
