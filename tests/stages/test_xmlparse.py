"""Hostile XML (SECURITY-TESTS.md §C, X-01…X-06 and F-03): XmlParser unit tests and end to end over mTLS.

Every case runs with a loopback canary HTTP server that records each connection: the parser must
never fetch anything (G6), and no byte of a local file may come back in a reply or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import memory
from gateway.cli.demo import SAMPLE
from gateway.config.model import (
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_TREE_BYTES,
    DEFAULT_XML_LIMITS,
    XmlLimits,
)
from gateway.errors import GatewayError
from gateway.stages import xmlparse
from gateway.stages.xmlparse import ATTRIBUTE_BYTES, NODE_BYTES, XmlParser, tree_cost
from tests.helpers import ROOT, XML, numbered
from tests.helpers.daemon import Daemon, make_instance, post_many

PARSER = XmlParser(XmlLimits(DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, DEFAULT_MAX_ATTRIBUTES))
STATUS = {"MALFORMED_XML": 400, "DTD_FORBIDDEN": 400, "XINCLUDE_FORBIDDEN": 400, "XML_LIMIT_EXCEEDED": 413}
SECRET = "CANARY-7f3a9c1e-file-content"  # written to a file that hostile documents point at
DECL = b'<?xml version="1.0" encoding="UTF-8"?>\n'
NOTE = b"<cbc:Note>Sample invoice shipped with einvoice-gateway.</cbc:Note>"
EXT_NS = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"


# --- documents ---------------------------------------------------------------------------------


def sub(doc: bytes, old: bytes, new: bytes) -> bytes:
    assert old in doc, f"sample lacks {old!r}"
    return doc.replace(old, new, 1)


def doctype(decl: str, note: str = "") -> bytes:
    """The valid sample with a DOCTYPE, and `note` (an entity reference) as the cbc:Note text."""
    doc = sub(SAMPLE, DECL, DECL + decl.encode() + b"\n")
    return sub(doc, NOTE, f"<cbc:Note>{note}</cbc:Note>".encode()) if note else doc


def in_note(xml: str) -> bytes:
    return sub(SAMPLE, NOTE, f"<cbc:Note>{xml}</cbc:Note>".encode())


def nested(depth: int) -> bytes:
    return b"<a>" * depth + b"</a>" * depth


def deep_extension(depth: int, n: int) -> bytes:
    """A valid invoice whose deepest element (inside ext:ExtensionContent, which takes any foreign XML) is at `depth`
    (in the XMLDSig namespace: an extension holds signatures unless the operator allows another)."""
    chain = depth - 4  # Invoice / UBLExtensions / UBLExtension / ExtensionContent
    ext = (f'<ext:UBLExtensions xmlns:ext="{EXT_NS}"><ext:UBLExtension><ext:ExtensionContent>'
           + '<d:n xmlns:d="http://www.w3.org/2000/09/xmldsig#">' + "<d:n>" * (chain - 1) + "</d:n>" * chain
           + "</ext:ExtensionContent></ext:UBLExtension></ext:UBLExtensions>")
    return numbered(f"XT-{n:04d}", sub(SAMPLE, b"<cbc:CustomizationID>", ext.encode() + b"<cbc:CustomizationID>"))


def billion_laughs() -> bytes:
    ents = '<!ENTITY lol0 "lol">' + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    return doctype(f"<!DOCTYPE Invoice [{ents}]>", "&lol9;")


def quadratic() -> bytes:
    return doctype(f'<!DOCTYPE Invoice [<!ENTITY a "{"x" * 100_000}">]>', "&a;" * 10_000)


def with_attachment(doc: bytes, payload: bytes) -> bytes:
    """cac:AdditionalDocumentReference goes after cbc:BuyerReference and before the supplier (UBL 2.1 order)."""
    ref = (b"<cac:AdditionalDocumentReference><cbc:ID>ATT-1</cbc:ID><cac:Attachment>"
           b'<cbc:EmbeddedDocumentBinaryObject mimeCode="application/pdf" filename="scan.pdf">' + payload
           + b"</cbc:EmbeddedDocumentBinaryObject></cac:Attachment></cac:AdditionalDocumentReference>")
    return sub(doc, b"</cbc:BuyerReference>", b"</cbc:BuyerReference>" + ref)


XI = 'xmlns:xi="http://www.w3.org/2001/XInclude"'
# name → (document from (canary URL, secret file URI), expected error code)
REJECTED: dict[str, tuple[Callable[[str, str], bytes], str]] = {
    "X-01 entity file:///etc/hostname": (
        lambda url, f: doctype('<!DOCTYPE Invoice [<!ENTITY x SYSTEM "file:///etc/hostname">]>', "&x;"), "DTD_FORBIDDEN"),
    "X-01 entity to canary file": (
        lambda url, f: doctype(f'<!DOCTYPE Invoice [<!ENTITY x SYSTEM "{f}">]>', "&x;"), "DTD_FORBIDDEN"),
    "X-01 entity to canary server": (
        lambda url, f: doctype(f'<!DOCTYPE Invoice [<!ENTITY x SYSTEM "{url}/x.xml">]>', "&x;"), "DTD_FORBIDDEN"),
    "X-01 parameter entity OOB to canary server": (
        lambda url, f: doctype(f'<!DOCTYPE Invoice [<!ENTITY % p SYSTEM "{url}/p.dtd"> %p;]>'), "DTD_FORBIDDEN"),
    "X-01 parameter entity to canary file": (
        lambda url, f: doctype(f'<!DOCTYPE Invoice [<!ENTITY % p SYSTEM "{f}"> %p;]>'), "DTD_FORBIDDEN"),
    "X-01 external DTD on canary server": (
        lambda url, f: doctype(f'<!DOCTYPE Invoice SYSTEM "{url}/evil.dtd">'), "DTD_FORBIDDEN"),
    "X-01 external DTD canary file": (lambda url, f: doctype(f'<!DOCTYPE Invoice SYSTEM "{f}">'), "DTD_FORBIDDEN"),
    "X-01 empty internal subset": (lambda url, f: doctype("<!DOCTYPE Invoice []>"), "DTD_FORBIDDEN"),
    "X-01 bare DOCTYPE": (lambda url, f: doctype("<!DOCTYPE Invoice>"), "DTD_FORBIDDEN"),
    "X-02 billion laughs": (lambda url, f: billion_laughs(), "DTD_FORBIDDEN"),
    "X-02 quadratic blowup": (lambda url, f: quadratic(), "DTD_FORBIDDEN"),
    "X-02 cyclic entities": (
        lambda url, f: doctype('<!DOCTYPE Invoice [<!ENTITY a "&b;"><!ENTITY b "&a;">]>', "&a;"), "DTD_FORBIDDEN"),
    "X-03 xinclude /etc/hostname": (
        lambda url, f: in_note(f'<xi:include {XI} href="/etc/hostname" parse="text"/>'), "XINCLUDE_FORBIDDEN"),
    "X-03 xinclude canary server": (
        lambda url, f: in_note(f'<xi:include {XI} href="{url}/x.txt" parse="text"/>'), "XINCLUDE_FORBIDDEN"),
    "X-03 xinclude 2003 canary file": (
        lambda url, f: in_note(f'<xi:include xmlns:xi="http://www.w3.org/2003/XInclude" href="{f}" parse="text"/>'),
        "XINCLUDE_FORBIDDEN"),
    "X-04 10,000-deep nesting": (lambda url, f: nested(10_000), "XML_LIMIT_EXCEEDED"),
    "X-04 depth max_depth+1": (lambda url, f: deep_extension(DEFAULT_MAX_DEPTH + 1, 1), "XML_LIMIT_EXCEEDED"),
    "X-04 100,000 attributes": (
        lambda url, f: sub(SAMPLE, b"<Invoice ", b"<Invoice " + b" ".join(b'a%d="1"' % i for i in range(100_000)) + b" "),
        "XML_LIMIT_EXCEEDED"),
    "X-06 empty body": (lambda url, f: b"", "MALFORMED_XML"),
    "X-06 whitespace body": (lambda url, f: b" \r\n\t ", "MALFORMED_XML"),
    "X-06 non-XML bytes": (lambda url, f: b"%PDF-1.7\n\x00\xff\xfe\x80binary", "MALFORMED_XML"),
    "X-06 truncated invoice": (lambda url, f: SAMPLE[: len(SAMPLE) // 2], "MALFORMED_XML"),
}

# name → valid invoice (from canary URL) that must be accepted untouched and unfetched
ACCEPTED: dict[str, Callable[[str], bytes]] = {
    "X-03 xsi:schemaLocation to canary server": lambda url: numbered("XT-0002", sub(
        SAMPLE, b"<Invoice ", b'<Invoice xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation='
        b'"urn:oasis:names:specification:ubl:schema:xsd:Invoice-2 ' + f'{url}/evil.xsd" '.encode())),
    "X-03 xml-stylesheet PI to canary server": lambda url: numbered("XT-0003", sub(
        SAMPLE, DECL, DECL + f'<?xml-stylesheet type="text/xsl" href="{url}/x.xsl"?>\n'.encode())),
    "X-06 UTF-16LE with BOM": lambda url: b"\xff\xfe" + numbered("XT-0004").decode().replace(
        'encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16-le"),
    "X-04 depth exactly max_depth": lambda url: deep_extension(DEFAULT_MAX_DEPTH, 5),
}


# --- the canary ----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # serves something entity-shaped, so a fetch would have an effect
        body = b'<!ENTITY leak "FETCHED">'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Canary(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.hits: list[tuple[str, int]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    def verify_request(self, request: object, client_address: tuple[str, int]) -> bool:  # type: ignore[override]
        self.hits.append(client_address)  # every connection, HTTP or not
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def canary() -> Iterator[Canary]:
    server = Canary()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def secret(tmp_path: Path) -> str:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET + "\n")
    return path.as_uri()


def outcome(doc: bytes, parser: XmlParser = PARSER) -> str:
    try:
        parser.parse(doc)
    except GatewayError as exc:
        return exc.code
    return "ACCEPTED"


# --- unit: XmlParser ------------------------------------------------------------------------------


def test_canary_records_a_fetch(canary):
    """Positive control: a fetch does show up (the "zero hits" assertions below can fail)."""
    with urllib.request.urlopen(f"{canary.url}/evil.dtd", timeout=5) as r:
        assert b"ENTITY" in r.read()
    assert len(canary.hits) == 1


@pytest.mark.parametrize("case", REJECTED)
def test_parser_rejects(case, canary, secret):
    build, code = REJECTED[case]
    with pytest.raises(GatewayError) as caught:
        PARSER.parse(build(canary.url, secret))
    assert (caught.value.code, caught.value.http_status) == (code, STATUS[code])
    assert SECRET not in str(caught.value.as_json())
    assert canary.hits == []


@pytest.mark.parametrize("case", ACCEPTED)
def test_parser_accepts(case, canary):
    root = PARSER.parse(ACCEPTED[case](canary.url)).root
    # a PI stays in the tree (a document signature covers it) but is never acted on: no canary hit.
    assert root.findtext("{urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2}ID").startswith("XT-")
    assert canary.hits == []


def test_utf16_parses_to_the_same_tree_as_utf8():  # one tree, identical business fields
    utf8, utf16 = numbered("XT-0004"), ACCEPTED["X-06 UTF-16LE with BOM"]("")
    assert etree.tostring(PARSER.parse(utf16).root, method="c14n") == etree.tostring(PARSER.parse(utf8).root, method="c14n")


SMALL = XmlParser(XmlLimits(max_depth=16, max_elements=100, max_attributes=8))


@pytest.mark.parametrize(("doc", "expected"), [
    (b"<r>" + b"<a/>" * 99 + b"</r>", "ACCEPTED"),  # exactly max_elements
    (b"<r>" + b"<a/>" * 100 + b"</r>", "XML_LIMIT_EXCEEDED"),  # one over: counted in the tree
    (b"<r>" + b"<a/>" * 1000 + b"</r>", "XML_LIMIT_EXCEEDED"),  # far over: refused before parsing
    (nested(16), "ACCEPTED"),
    (nested(17), "XML_LIMIT_EXCEEDED"),
    (b"<r " + b" ".join(b'a%d=""' % i for i in range(8)) + b"/>", "ACCEPTED"),
    (b"<r><a " + b" ".join(b'a%d=""' % i for i in range(9)) + b"/></r>", "XML_LIMIT_EXCEEDED"),
], ids=["elements=max", "elements=max+1", "elements=10*max", "depth=max", "depth=max+1", "attrs=max", "attrs=max+1"])
def test_small_limits(doc, expected):  # X-04, with limits from XmlLimits
    assert outcome(doc, SMALL) == expected


def test_depth_at_and_over_configured_limit():
    assert outcome(nested(DEFAULT_MAX_DEPTH)) == "ACCEPTED"
    assert outcome(nested(DEFAULT_MAX_DEPTH + 1)) == "XML_LIMIT_EXCEEDED"


@pytest.mark.parametrize("decl", [
    '<!DOCTYPE Invoice [<!ENTITY % p SYSTEM "{uri}"> %p;]>',
    '<!DOCTYPE Invoice SYSTEM "{uri}">',
    '<!DOCTYPE Invoice [<!ENTITY x SYSTEM "{uri}">]>',
], ids=["parameter-entity", "external-dtd", "general-entity"])
def test_parser_never_opens_a_local_file(tmp_path, decl):
    """X-01: nothing is read from the file system.  A FIFO shows an open(): it blocks until a writer comes."""
    fifo = tmp_path / "probe.fifo"
    os.mkfifo(fifo)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(outcome(doctype(decl.format(uri=fifo.as_uri()), "&x;"))),
                              daemon=True)
    worker.start()
    opened, deadline = False, time.monotonic() + 2
    while worker.is_alive() and time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only if someone has it open for reading
        except OSError:
            time.sleep(0.005)
            continue
        os.close(fd)  # EOF for the reader, so the parse finishes
        opened = True
        break
    worker.join(5)
    assert not opened, "the parser opened a local file named in the document"
    assert result == ["DTD_FORBIDDEN"]


def test_parameter_entity_to_dev_zero_is_refused_fast():
    """X-02/G6: a 90-byte body naming an endless file must not pin a parser thread (run in a child, killed at 5 s)."""
    doc = '<!DOCTYPE Invoice [<!ENTITY % p SYSTEM "file:///dev/zero"> %p;]><Invoice/>'
    script = ("import sys\n"
              "from gateway.config.model import DEFAULT_MAX_ATTRIBUTES, DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, XmlLimits\n"
              "from gateway.errors import GatewayError\n"
              "from gateway.stages.xmlparse import XmlParser\n"
              "parser = XmlParser(XmlLimits(DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, DEFAULT_MAX_ATTRIBUTES))\n"
              "try:\n    parser.parse(sys.argv[1].encode())\nexcept GatewayError as exc:\n    print(exc.code)\n"
              "else:\n    print('ACCEPTED')\n")
    try:
        run = subprocess.run([sys.executable, "-c", script, doc], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("parsing a parameter entity to file:///dev/zero did not finish within 5 s")
    assert run.stdout.strip() == "DTD_FORBIDDEN", run.stderr


FUZZ_TOKENS = [b"<!DOCTYPE Invoice [<!ENTITY x 'y'>]>", b"&x;", b"&#0;", b"&#xD800;", b"<![CDATA[", b"]]>",
               b"<?pi x?>", b"<!--", b"-->", b"</", b"<", b">", b'"', b"xmlns:a='urn:x'", b"a:b", b"\x00",
               b"\xff\xfe", b"\xef\xbb\xbf", b"\xc0\x80", f"<xi:include {XI} href='x'/>".encode(), b"<a>" * 300]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE)), st.integers(0, 16),
                          st.one_of(st.binary(max_size=16), st.sampled_from(FUZZ_TOKENS))), min_size=1, max_size=6))
def test_fuzzed_sample_raises_only_gateway_errors(mutations):  # F-03: no other exception type escapes
    doc = SAMPLE
    for pos, cut, insert in mutations:
        pos = min(pos, len(doc))
        doc = doc[:pos] + insert + doc[pos + cut:]
    outcome(doc)


# --- end to end: the real listener ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", REJECTED)
async def test_listener_rejects_hostile_xml(gateway, client, canary, secret, capfd, case):
    build, code = REJECTED[case]
    async with client().post("/v1/invoices", data=io.BytesIO(build(canary.url, secret)), headers=XML) as r:
        text = await r.text()
        assert r.status == STATUS[code], text
        assert (await r.json())["error"] == code
    assert SECRET not in text
    assert canary.hits == []
    assert (await gateway.gw.store.reports.counts())["invoices"] == 0
    logs = capfd.readouterr().out
    assert "invoice.rejected" in logs and SECRET not in logs


@pytest.mark.parametrize("case", ACCEPTED)
async def test_listener_accepts(gateway, client, canary, case):
    body = ACCEPTED[case](canary.url)
    async with client().post("/v1/invoices", data=io.BytesIO(body), headers=XML) as r:
        assert r.status == 202, await r.text()
        reply = await r.json()
    assert reply["status"] == "accepted" and reply["duplicate"] is False
    assert reply["sha256"] == hashlib.sha256(body).hexdigest()
    assert canary.hits == []


@pytest.mark.slow
async def test_listener_accepts_50mb_invoice_with_embedded_pdf(gateway, client):  # X-04 positive control
    body = numbered("XT-0006", with_attachment(SAMPLE, base64.b64encode(os.urandom(1 << 20) * 36)))
    assert 50_000_000 < len(body) < 64 * 1024 * 1024
    async with client().post("/v1/invoices", data=io.BytesIO(body), headers=XML) as r:
        assert r.status == 202, (await r.text())[:2000]
        reply = await r.json()
    assert reply["status"] == "accepted" and reply["sha256"] == hashlib.sha256(body).hexdigest()


# --- memory: the tree's cost is bounded before it is built, and given back after (issue 20, item 5) -----------


def wide_document(elements: int, attributes: int, *, unique: str = "") -> bytes:
    """An invoice-shaped document with ``attributes`` attributes on each of ``elements`` elements (names made
    unique per document with ``unique``): a few MiB of bytes that would cost libxml2 ~32 times that."""
    names = b" ".join(b'%sa%d=""' % (unique.encode(), i) for i in range(attributes))
    return (b'<Invoice xmlns="urn:oasis:names:specification:ubl:schema:xsd:Invoice-2">'
            + (b"<e " + names + b"/>") * elements + b"</Invoice>")


def nodes_of(root: etree._Element) -> tuple[int, int, int]:
    """(elements and other nodes, text nodes, attributes and namespace declarations) of a parsed tree."""
    nodes = texts = attrs = 0
    for el in root.iter():
        nodes += 1
        texts += (el.text is not None) + (el.tail is not None)
        attrs += len(el.attrib) + len(set(el.nsmap.items()) - set((el.getparent().nsmap if el.getparent() is not None
                                                                      else {}).items()))
    return nodes, texts, attrs


SHAPES = {
    "sample invoice": SAMPLE,
    "pretty-printed": etree.tostring(etree.fromstring(SAMPLE), pretty_print=True),
    "comments, PIs, CDATA": b"<r><!-- a < b --><?pi x=1?><![CDATA[ <x> = ]]><a b='1' c=\"2\">t<b/>u</a>v</r>",
    "entities": b"<r a='&lt;&amp;'>&lt;&#60;x&gt;<i>&#x3c;</i></r>",
    "namespaces": b'<p:r xmlns:p="u:1" xmlns:q="u:2"><q:a xmlns:s="u:3" s:x="1"/></p:r>',
    "attribute-heavy": wide_document(50, 200),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_tree_cost_bounds_every_node_the_tree_holds(shape: str) -> None:
    body = SHAPES[shape]
    nodes, texts, attrs = nodes_of(etree.fromstring(body))
    assert tree_cost(body) >= NODE_BYTES * (nodes + texts) + ATTRIBUTE_BYTES * attrs


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.text("ab <>&=\"'", max_size=8).map(lambda t: ("text", t)),
                    lambda kids: st.tuples(st.just("el"), st.integers(0, 3), st.lists(kids, max_size=4)), max_leaves=30))
def test_tree_cost_is_an_upper_bound_for_any_tree(tree: tuple) -> None:
    def render(node: tuple) -> str:
        if node[0] == "text":
            return node[1].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        attrs = "".join(f' a{i}="={i}"' for i in range(node[1]))
        return f"<e{attrs}>{''.join(render(k) for k in node[2])}</e>"
    body = f"<r>{render(tree)}</r>".encode()
    nodes, texts, attrs = nodes_of(etree.fromstring(body))
    assert tree_cost(body) >= NODE_BYTES * (nodes + texts) + ATTRIBUTE_BYTES * attrs


def test_a_document_whose_tree_would_exceed_the_budget_is_refused_before_it_is_built() -> None:
    body = wide_document(2000, 250)  # 4 MiB with 500,000 attributes: ~120 MiB as a tree
    assert len(body) < 5 * 2**20 and tree_cost(body) > 64 * 2**20
    with pytest.raises(GatewayError) as e:
        PARSER.parse(body)
    assert e.value.code == "XML_LIMIT_EXCEEDED" and "64 MiB" in e.value.message
    # Below the budget, the same shape parses (the schema refuses it later).
    assert PARSER.parse(wide_document(20, 250)).root is not None


def test_every_corpus_invoice_is_far_below_the_budget(corpus: Path) -> None:
    costs = [tree_cost(p.read_bytes()) for p in (corpus / "invoices").rglob("*.xml")]
    assert len(costs) > 500 and max(costs) < DEFAULT_MAX_TREE_BYTES // 32


def test_release_trims_after_a_large_tree_and_asks_for_fresh_threads_after_the_budget(monkeypatch) -> None:
    parser = XmlParser(DEFAULT_XML_LIMITS)
    trims: list[int] = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(1))
    parser.parse(SAMPLE)
    assert parser.release() is False and trims == []  # a small tree leaves nothing worth trimming
    parser.parse(wide_document(400, 250))  # ~25 MiB of tree
    assert parser.release() is False and trims == [1]
    assert parser.release() is False and trims == [1]  # once per large tree
    monkeypatch.setattr(xmlparse, "RENEW_AFTER_BYTES", 2 * tree_cost(SAMPLE))
    parser = XmlParser(DEFAULT_XML_LIMITS)
    renewals = [parser.release() for _ in range(4) if parser.parse(SAMPLE)]
    assert renewals == [False, True, False, True]  # every second document, then the count starts again


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")
def test_an_attribute_bomb_costs_a_real_worker_little_and_its_memory_comes_back(tmp_path: Path) -> None:
    """A gateway process (python -m gateway serve) receives, at once, four 16 MiB documents whose trees would
    take ~550 MiB each, then, one by one, documents just under the tree budget: its peak memory stays within the
    budget plus the bodies it holds, and what each took goes back once it is answered."""
    inst = make_instance(tmp_path, 1)
    daemon = Daemon(inst)
    try:
        daemon.wait_ready(workers=1)
        asyncio.run(post_many(inst, [numbered("MEM-0")]))  # warm: every stage has run once
        pid = daemon.pid
        baseline = peak_from_here(pid)
        bomb = wide_document(9000, 256)
        assert len(bomb) > 16 * 2**20 and tree_cost(bomb) > 8 * DEFAULT_MAX_TREE_BYTES
        replies = asyncio.run(post_many(inst, [bomb] * 4))
        assert [(s, r["error"]) for s, r in replies] == [(413, "XML_LIMIT_EXCEEDED")] * 4
        bodies = 4 * len(bomb) // 1024
        # Each body is held twice at most (its chunks as read, then joined): 3x leaves room for the rest of the
        # process; the trees alone would have taken 2.2 GiB.
        assert kib(pid, "VmHWM") - baseline < 3 * bodies, (baseline, kib(pid, "VmHWM"))
        assert kib(pid, "VmRSS") - baseline < 16 * 1024, (baseline, kib(pid, "VmRSS"))

        for i in range(3):
            near = wide_document(900, 250, unique=f"n{i}x")  # ~55 MiB of tree from 1.8 MiB of bytes
            assert DEFAULT_MAX_TREE_BYTES * 0.8 < tree_cost(near) < DEFAULT_MAX_TREE_BYTES
            baseline = peak_from_here(pid)
            ((status, reply),) = asyncio.run(post_many(inst, [near]))
            assert status == 422 and reply["error"] == "SCHEMA_INVALID"
            assert kib(pid, "VmHWM") - baseline < 64 * 1024 + 4 * len(near) // 1024, (baseline, kib(pid, "VmHWM"))
            assert kib(pid, "VmRSS") - baseline < 16 * 1024, (baseline, kib(pid, "VmRSS"))
        assert daemon.named("invoice.accepted") and daemon.terminate() == 0
    finally:
        daemon.kill()


def peak_from_here(pid: int) -> int:
    """Reset the process's peak resident memory (VmHWM) to now, and return its resident memory in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return kib(pid, "VmRSS")


def kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: the peak since clear_refs)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")
