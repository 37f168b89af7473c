"""Hardened XML parsing: the one place bytes become a tree.

No DTD is loaded and any DOCTYPE is refused (so no entity of any kind is expanded), nothing is
fetched from the network or the file system, XInclude is never processed and its elements are
refused, processing instructions are kept (a document signature covers them) but never acted
on.  ``huge_tree`` is on so a 50 MB invoice with an embedded PDF parses (libxml2's default caps
a text node at 10 MB); the gateway's own depth, element and attribute limits replace libxml2's
(SECURITY-TESTS.md X-01…X-04).

Memory is bounded before the tree is built: ``tree_cost`` bounds what libxml2 will allocate from the
bytes alone (a document of a few MiB with hundreds of attributes on every element would otherwise
take gigabytes), and a document over ``xml.max_tree_mib`` is refused unparsed.  What a parse leaves
behind is given back: the C heap is trimmed after a large tree is gone (``release``, gateway/memory.py), and because
lxml interns every element and attribute name in a dictionary per thread that never shrinks, the
threads that parse are renewed after a budget of parsed structure (gateway/threads.py).

Two passes: the first reads only the prolog and stops at a DOCTYPE (refused before libxml2
processes any declaration in it) or at the root element; the second builds the tree with a
resolver that answers every external entity or DTD with nothing, so no file is ever opened.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from lxml import etree

from .. import memory
from ..config.model import XmlLimits
from ..errors import Detail, LimitExceeded, Malformed

XINCLUDE_NAMESPACES = ("http://www.w3.org/2001/XInclude", "http://www.w3.org/2003/XInclude")
_XINCLUDE_TAGS = tuple(f"{{{ns}}}*" for ns in XINCLUDE_NAMESPACES)
_COUNT = etree.XPath("count(//*)")
_COUNT_ATTRIBUTES = etree.XPath("count(//@*)")

# What tree_cost charges per node: libxml2 allocates less on 64-bit Linux (lxml 6.0, libxml2 2.14, measured by
# `python benchmarks/xml_memory.py`: the estimate is 1.1 to 3.5 times what each shape of tree takes).
NODE_BYTES = 128
ATTRIBUTE_BYTES = 256
TRIM_AFTER_BYTES = 8 * 1024 * 1024  # a body and tree this large leave free heap behind: trim once they are gone
# Parsed structure after which the parsing threads are renewed (their name dictionaries go with them): the
# dictionaries then hold at most ~770,000 names, ~55 MiB at ~75 bytes a name; ordinary traffic (~200 KiB of
# structure per 20 KB invoice) renews them every ~1,000 invoices, at the cost of starting a few threads.
RENEW_AFTER_BYTES = 192 * 1024 * 1024


def tree_cost(body: bytes) -> int:
    """An upper bound of the memory libxml2 allocates for the nodes of ``body``'s tree, from its bytes alone.

    Every element, end tag, comment, PI and CDATA section begins with '<'; text lies between them, so
    at most one text node follows each; every attribute and namespace declaration holds a '='.  A raw
    '<' in a comment or CDATA section, or a '=' in text, only makes the bound looser.  The text itself
    costs its own length, which the byte limit bounds.
    """
    markup = body.count(b"<")
    elements = markup - body.count(b"</")
    return NODE_BYTES * (elements + markup + 1) + ATTRIBUTE_BYTES * body.count(b"=")


class _Stop(Exception):
    pass


class _Prolog:
    """Target of a first pass that stops at the DOCTYPE or at the root element, before any DTD is processed."""

    doctype_seen = False

    def doctype(self, *_: object) -> None:
        self.doctype_seen = True
        raise _Stop

    def start(self, *_: object) -> None:
        raise _Stop

    def close(self) -> None:
        return None


class _NoFetch(etree.Resolver):  # type: ignore[misc]
    """Every external entity or DTD resolves to nothing: no file is opened, nothing is fetched."""

    def resolve(self, url, pubid, context):  # type: ignore[no-untyped-def]
        return self.resolve_string("", context)


_OPTIONS = dict(resolve_entities=False, load_dtd=False, dtd_validation=False, no_network=True, huge_tree=True)


@dataclass(frozen=True, slots=True)
class ParsedXml:
    root: etree._Element


class XmlParser:
    """Parses untrusted bytes under fixed limits.  Safe to share between threads."""

    def __init__(self, limits: XmlLimits):
        self.limits = limits
        self._local = threading.local()
        self._lock = threading.Lock()
        self._trim_due = False  # a large body or tree was parsed since the heap was last trimmed
        self._since_renewal = 0  # estimated bytes of all trees built since the parsing threads were renewed
        # An element deeper than max_depth exists iff this location path selects anything.
        self._too_deep = etree.XPath("boolean(/" + "*/" * limits.max_depth + "*)")
        self._too_wide = etree.XPath(f"boolean(//*[count(@*) > {limits.max_attributes}])")

    def _parser(self) -> etree.XMLParser:
        # lxml parsers must not be used by two threads at once: one per thread.
        parser = getattr(self._local, "parser", None)
        if parser is None:
            parser = etree.XMLParser(**_OPTIONS, remove_pis=False, collect_ids=False)
            parser.resolvers.add(_NoFetch())
            self._local.parser = parser
        return parser

    def parse(self, body: bytes) -> ParsedXml:
        if not body.strip():
            raise Malformed("the request body is empty; send the invoice XML", code="MALFORMED_XML")
        # Cheap bounds before building a tree: every element needs at least one '<'.
        if body.count(b"<") > 2 * self.limits.max_elements:
            raise LimitExceeded(
                f"the document has more than {self.limits.max_elements} elements",
                code="XML_LIMIT_EXCEEDED",
            )
        cost = tree_cost(body)
        built = cost <= self.limits.max_tree_bytes
        with self._lock:
            # A large body (its chunks were read into the heap) or a large tree leaves free heap behind.
            self._trim_due |= len(body) + (cost if built else 0) >= TRIM_AFTER_BYTES
            self._since_renewal += cost if built else 0
        if not built:
            mib = 1024 * 1024
            raise LimitExceeded(
                f"the document holds far more markup than an invoice of its size needs: its tree would take about "
                f"{cost // mib} MiB (elements, attributes, text nodes), and this gateway allows "
                f"{self.limits.max_tree_bytes // mib} MiB; remove repeated or unneeded attributes and elements",
                code="XML_LIMIT_EXCEEDED",
            )
        prolog = _Prolog()
        try:
            etree.fromstring(body, etree.XMLParser(target=prolog, **_OPTIONS))
        except (_Stop, etree.LxmlError, ValueError):
            pass
        if prolog.doctype_seen:
            raise Malformed(
                "document type declarations (<!DOCTYPE …>) are not allowed; remove the DOCTYPE",
                code="DTD_FORBIDDEN",
            )
        try:
            root = etree.fromstring(body, self._parser())
        except etree.XMLSyntaxError as exc:
            last = exc.error_log.last_error
            if last is not None and last.type == etree.ErrorTypes.ERR_RESOURCE_LIMIT:
                raise LimitExceeded(
                    f"the document exceeds a parser limit (nesting deeper than {self.limits.max_depth} levels?)",
                    [Detail(_syntax_message(exc), line=exc.lineno or None)],
                    code="XML_LIMIT_EXCEEDED",
                ) from None
            raise Malformed(
                "the body is not well-formed XML",
                [Detail(_syntax_message(exc), line=exc.lineno or None)],
                code="MALFORMED_XML",
            ) from None
        except (etree.LxmlError, ValueError) as exc:
            raise Malformed("the body is not well-formed XML", [Detail(str(exc)[:300])], code="MALFORMED_XML") from None
        if root is None:
            raise Malformed("the body holds no XML element", code="MALFORMED_XML")
        docinfo = root.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
            raise Malformed(
                "document type declarations (<!DOCTYPE …>) are not allowed; remove the DOCTYPE",
                code="DTD_FORBIDDEN",
            )
        self._check_limits(root)
        if next(root.iter(*_XINCLUDE_TAGS), None) is not None:
            raise Malformed("XInclude elements are not allowed in an invoice", code="XINCLUDE_FORBIDDEN")
        return ParsedXml(root)

    def release(self) -> bool:
        """Once finished documents are gone: give the heap's free memory back if a large body or tree was
        parsed since the last time, and say whether the threads that parse should now be renewed."""
        with self._lock:
            trim, self._trim_due = self._trim_due, False
            renew = self._since_renewal >= RENEW_AFTER_BYTES
            if renew:
                self._since_renewal = 0
        if trim:
            memory.trim()
        return renew

    def _check_limits(self, root: etree._Element) -> None:
        lim = self.limits
        if self._too_deep(root):
            raise LimitExceeded(f"the document nests elements deeper than {lim.max_depth} levels", code="XML_LIMIT_EXCEEDED")
        if _COUNT(root) > lim.max_elements:
            raise LimitExceeded(f"the document has more than {lim.max_elements} elements", code="XML_LIMIT_EXCEEDED")
        # The per-element attribute check only runs when the whole document has enough attributes.
        if _COUNT_ATTRIBUTES(root) > lim.max_attributes and self._too_wide(root):
            raise LimitExceeded(
                f"an element carries more than {lim.max_attributes} attributes", code="XML_LIMIT_EXCEEDED"
            )


def _syntax_message(exc: etree.XMLSyntaxError) -> str:
    msg = exc.msg if isinstance(getattr(exc, "msg", None), str) else str(exc)
    # libxml2 appends "(<string>, line N)"; the line is reported separately.
    return msg.split(" (<string>, line")[0][:300]
