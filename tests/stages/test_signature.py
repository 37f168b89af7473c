"""XML signatures on invoices (SECURITY-TESTS.md D. S-01…S-11): gateway/stages/signature.py and its wiring.

* round trip and interop both ways with xmlsec1 (S-11);
* the per-partner policies over the real mutual-TLS listener;
* an attack table (S-01…S-10): each variant is refused by ``verify`` with its own exact reason, and a
  representative subset is sent over HTTPS (422 SIGNATURE_INVALID, nothing stored).  Variants that need
  a *valid* signature over attacker content are re-signed by ``resign`` below (a signer written here,
  not the gateway's), with the legitimate key when the point is the structure, or with the attacker's
  own CA-valid key when the point is trust;
* a Hypothesis byte-mutation property (never "accepted but different", only GatewayError escapes).

The ``sign`` and ``verify`` commands are tested in tests/cli/test_documents.py, ``partners add/edit`` with
signing certificates in tests/cli/test_partners.py; ``Pki`` and its signers are in tests/helpers/signatures.py.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.cli.demo import SAMPLE
from gateway.errors import GatewayError
from gateway.model import DocumentType, SignaturePolicy
from gateway.operations import instance
from gateway.partners.edit import edit_partners
from gateway.stages.schema import SchemaRegistry
from gateway.stages.signature import (
    CBC,
    DS,
    ENVELOPED,
    EXT,
    SIGNED_PROPERTIES_TYPE,
    XADES,
    SignatureInvalid,
    TrustedSigner,
    sign,
    verify,
)
from gateway.stages.ubl import read_facts
from tests.helpers import Running, post
from tests.helpers.signatures import (
    CAC,
    DIGEST_MISMATCH,
    EVIL_IBAN,
    IBAN,
    PARSER,
    Pki,
    Signer,
    add_signing_partner,
    bad_method,
    parse,
    reload_partners,
    signing_pki,
)

INV = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
NS = {"ds": DS, "xades": XADES, "ext": EXT, "cac": CAC, "cbc": CBC}
EXC = "http://www.w3.org/2001/10/xml-exc-c14n#"
SHA256, SHA1 = "http://www.w3.org/2001/04/xmlenc#sha256", "http://www.w3.org/2000/09/xmldsig#sha1"
MD5 = "http://www.w3.org/2001/04/xmldsig-more#md5"
RSA_SHA1, RSA_MD5 = "http://www.w3.org/2000/09/xmldsig#rsa-sha1", "http://www.w3.org/2001/04/xmldsig-more#rsa-md5"
HMAC_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256"
DIGESTS = {SHA256: "sha256", SHA1: "sha1", MD5: "md5"}
IBAN_PATH = "/*/cac:PaymentMeans/cac:PayeeFinancialAccount/cbc:ID"
DEMO = instance.DEMO_PARTNER
XSD_INVOICE_ID = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2:Invoice"
XSD_PROPS_ID = "http://uri.etsi.org/01903/v1.3.2#:SignedProperties"

NOT_IN_SLOT = ("ds:Signature must sit in the UBL extension slot "
               "(ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/…) or directly under the root")
ONLY_WHOLE = "a reference may only cover the whole document, this signature's XAdES SignedProperties or its KeyInfo"
NOT_REGISTERED = "the signer's certificate (key SHA-256 {}) is not registered for this partner"


# --- keys, trees and an independent signer ----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return signing_pki(tmp_path_factory.mktemp("sigpki"))


@pytest.fixture(scope="module")
def schemas() -> SchemaRegistry:
    return SchemaRegistry()


def q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dump(root: etree._Element) -> bytes:
    return etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8")


def one(node: etree._Element, path: str) -> etree._Element:
    found = node.xpath(path, namespaces=NS)
    assert len(found) == 1, (path, len(found))
    return found[0]


def ds(tag: str, parent: etree._Element | None = None, text: str | None = None, **attrs: str) -> etree._Element:
    el = etree.Element(q(DS, tag), attrs) if parent is None else etree.SubElement(parent, q(DS, tag), attrs)
    el.text = text
    return el


def signed(s: Signer, doc: bytes = SAMPLE, now: datetime | None = None) -> etree._Element:
    root = parse(doc)
    sign(root, s.signing_key, now)
    return root


def sig_of(root: etree._Element) -> etree._Element:
    return one(root, "//ds:Signature")


def doc_ref(root: etree._Element) -> etree._Element:
    return one(root, "//ds:SignedInfo/ds:Reference[@URI='']")


def set_iban(root: etree._Element, value: str = EVIL_IBAN) -> None:
    one(root, IBAN_PATH).text = value


def new_extension(root: etree._Element) -> etree._Element:
    """A fresh ext:UBLExtension/ext:ExtensionContent in the root's ext:UBLExtensions."""
    exts = root.find(q(EXT, "UBLExtensions"))
    if exts is None:
        exts = etree.Element(q(EXT, "UBLExtensions"))
        root.insert(0, exts)
    return etree.SubElement(etree.SubElement(exts, q(EXT, "UBLExtension")), q(EXT, "ExtensionContent"))


def _enveloped(root: etree._Element, sig: etree._Element, target: etree._Element) -> etree._Element | etree._ElementTree:
    """The enveloped-signature transform, written independently: a copy without `sig`, its tail kept."""
    def steps(el: etree._Element) -> list[int]:
        return [] if el is root else [*steps(el.getparent()), el.getparent().index(el)]

    def walk(el: etree._Element, path: list[int]) -> etree._Element:
        for i in path:
            el = el[i]
        return el

    doc = copy.deepcopy(root.getroottree())
    s, t = walk(doc.getroot(), steps(sig)), walk(doc.getroot(), steps(target))
    if s.tail:
        prev = s.getprevious()
        if prev is not None:
            prev.tail = (prev.tail or "") + s.tail
        else:
            s.getparent().text = (s.getparent().text or "") + s.tail
    s.getparent().remove(s)
    return doc if target is root else t


def _raw_signature(key: Any, method: str, data: bytes) -> bytes:
    if isinstance(key, bytes):
        return hmac.new(key, data, "sha256").digest()
    alg = hashes.SHA1() if method == RSA_SHA1 else hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), alg)
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(alg)))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def resign(root: etree._Element, key: Any, cert: x509.Certificate | None = None) -> etree._Element:
    """Recompute every same-document digest and the SignatureValue of the one ds:Signature, as whoever
    holds `key` (a private key, or HMAC key bytes) would; `cert` replaces the embedded X509Certificate."""
    sig = one(root, "//ds:Signature")
    si = one(sig, "ds:SignedInfo")
    if cert is not None:
        for el in sig.iterfind(".//ds:X509Certificate", NS):
            el.text = b64(cert.public_bytes(serialization.Encoding.DER))
    for ref in si.iterfind("ds:Reference", NS):
        uri = ref.get("URI", "")
        if uri and not uri.startswith("#"):
            continue  # external: nothing to digest here
        algs = [t.get("Algorithm") for t in ref.iterfind("ds:Transforms/ds:Transform", NS)]
        target = root if uri == "" else next((e for e in root.iter() if uri[1:] in (e.get("Id"), e.get("ID"), e.get("id"))), None)
        if target is None:
            continue
        node = _enveloped(root, sig, target) if ENVELOPED in algs else target
        data = etree.tostring(node, method="c14n", exclusive=EXC in algs, with_comments=False)
        alg = DIGESTS[one(ref, "ds:DigestMethod").get("Algorithm")]
        one(ref, "ds:DigestValue").text = b64(hashlib.new(alg, data).digest())
    method = one(si, "ds:SignatureMethod").get("Algorithm")
    signed_info = etree.tostring(si, method="c14n", exclusive=True, with_comments=False)
    one(sig, "ds:SignatureValue").text = b64(_raw_signature(key, method, signed_info))
    return root


def refused(root: etree._Element, signers: list[TrustedSigner]) -> str:
    """verify() on the serialised-and-reparsed tree (what the pipeline sees) must refuse; returns the reason."""
    with pytest.raises(SignatureInvalid) as info:
        verify(parse(dump(root)), signers)
    assert (info.value.code, info.value.http_status) == ("SIGNATURE_INVALID", 422)
    return info.value.reason


@pytest.fixture
def canary() -> Iterator[int]:
    """A loopback listener nobody may connect to: a fetched URI, XSLT document() or RetrievalMethod would (S-09)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        srv.setblocking(False)
        yield srv.getsockname()[1]
        with pytest.raises(BlockingIOError):
            srv.accept()


# --- HTTPS helpers -----------------------------------------------------------------------------------


async def set_signing(running: Running, name: str, policy: SignaturePolicy, signers: list[Signer]) -> None:
    def change(partners: list[Any], store: Callable[[Path, str], str]) -> None:
        i = next(i for i, p in enumerate(partners) if p.name == name)
        partners[i] = replace(partners[i], signature_policy=policy,
                              signing_certs=tuple(store(s.cert_path, "--signing-cert") for s in signers))

    await asyncio.to_thread(edit_partners, running.inst.partners, name, change)
    want = {s.spki for s in signers}
    await reload_partners(running, lambda d: (p := d.get(name)) is not None and p.signature_policy is policy
                          and p.signing_spki == want)


async def delivered(running: Running, message_id: str) -> tuple[dict[str, Any], bytes]:
    """Run a delivery pass; return the delivered sidecar and document."""
    await running.gw.outbox.run_once()
    folder = running.inst.delivery_folder
    sidecar = await asyncio.to_thread((folder / f"{message_id}.json").read_text)
    return json.loads(sidecar), await asyncio.to_thread((folder / f"{message_id}.xml").read_bytes)


def info_json(s: Signer, method: str, signing_time: object = None, xades: bool = False) -> dict[str, object]:
    return {"signer_spki_sha256": s.spki, "signer_subject": s.cert.subject.rfc4514_string(), "method": method,
            "signing_time": signing_time, "xades": xades}


# --- round trip and interop (S-11) -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "method"), [("ec", "ECDSA_SHA256"), ("rsa", "RSA_SHA256")])
def test_round_trip_is_xades_and_schema_valid(pki: Pki, schemas: SchemaRegistry, kind: str, method: str) -> None:
    s = getattr(pki, kind)
    root = parse(dump(signed(s)))
    info = verify(root, s.trusted)
    assert (info.method, info.xades, info.signer_spki) == (method, True, s.spki)
    assert info.signing_time is not None
    assert abs(datetime.fromisoformat(info.signing_time) - datetime.now(UTC)) < timedelta(minutes=1)
    assert schemas.validate(root, DocumentType.UBL_INVOICE) == "2.1"
    assert read_facts(root, DocumentType.UBL_INVOICE, "2.1") == read_facts(parse(SAMPLE), DocumentType.UBL_INVOICE, "2.1")
    with pytest.raises(ValueError, match="already signed"):
        sign(root, s.signing_key)


def test_resign_helper_is_faithful(pki: Pki) -> None:
    """The attack table's signer makes signatures the verifier accepts, so each refusal is the attack's own."""
    root = signed(pki.ec)
    set_iban(root)
    assert verify(parse(dump(resign(root, pki.ec.key))), pki.ec.trusted).xades
    assert verify(parse(dump(resign(signed(pki.rsa), pki.rsa.key))), pki.rsa.trusted).method == "RSA_SHA256"
    assert verify(parse(dump(signed_by_root_id(pki))), pki.ec.trusted).xades  # URI="#<root Id>" is allowed


def xmlsec1(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/xmlsec1", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_xmlsec1_verifies_gateway_signatures(pki: Pki, tmp_path: Path, kind: str) -> None:
    good, bad = tmp_path / "signed.xml", tmp_path / "tampered.xml"
    good.write_bytes(dump(signed(getattr(pki, kind))))
    bad.write_bytes(good.read_bytes().replace(IBAN.encode(), EVIL_IBAN.encode()))
    common = ["--verify", "--trusted-pem", str(pki.ca.cert), "--id-attr:Id", XSD_INVOICE_ID, "--id-attr:Id", XSD_PROPS_ID]
    ok = xmlsec1(*common, str(good))
    assert ok.returncode == 0, ok.stderr
    assert "SignedInfo References (ok/all): 2/2" in ok.stderr
    fail = xmlsec1(*common, str(bad))
    assert fail.returncode == 1 and "FAIL" in fail.stderr, fail.stderr


TEMPLATE = """<ext:UBLExtensions xmlns:ext="urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2">
<ext:UBLExtension><ext:ExtensionContent>
<sig:UBLDocumentSignatures xmlns:sig="urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2"
    xmlns:sac="urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2"><sac:SignatureInformation>
<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:SignedInfo>
<ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>
<ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#ALG"/>
<ds:Reference URI=""><ds:Transforms>
<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>
<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/></ds:Transforms>
<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/><ds:DigestValue/></ds:Reference>
</ds:SignedInfo><ds:SignatureValue/><ds:KeyInfo><ds:X509Data/></ds:KeyInfo></ds:Signature>
</sac:SignatureInformation></sig:UBLDocumentSignatures></ext:ExtensionContent></ext:UBLExtension></ext:UBLExtensions>"""
XMLSEC_KINDS = {"ec": ("ecdsa-sha256", "ECDSA_SHA256"), "rsa": ("rsa-sha256", "RSA_SHA256")}


@pytest.fixture(scope="module")
def xmlsec_signed(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The sample invoice signed BY xmlsec1 (plain enveloped XMLDSig, no XAdES), per key type."""
    folder = tmp_path_factory.mktemp("xmlsec")
    out = {}
    for kind, (alg, _) in XMLSEC_KINDS.items():
        root = parse(SAMPLE)
        root.insert(0, etree.fromstring(TEMPLATE.replace("ALG", alg)))
        (folder / "template.xml").write_bytes(dump(root))
        s = getattr(pki, kind)
        key = s.cert_path.with_suffix(".key")
        done = xmlsec1("--sign", "--privkey-pem", f"{key},{s.cert_path}", "--output", str(folder / f"{kind}.xml"),
                       str(folder / "template.xml"))
        assert done.returncode == 0, done.stderr
        out[kind] = (folder / f"{kind}.xml").read_bytes()
        assert b"<ds:X509Certificate>" in out[kind]  # xmlsec1 filled the empty X509Data
    return out


@pytest.mark.parametrize("kind", XMLSEC_KINDS)
def test_xmlsec1_signed_invoice_verifies(pki: Pki, schemas: SchemaRegistry, xmlsec_signed: dict[str, bytes], kind: str) -> None:
    s = getattr(pki, kind)
    root = parse(xmlsec_signed[kind])
    assert verify(root, s.trusted).as_json() == info_json(s, XMLSEC_KINDS[kind][1])
    schemas.validate(root, DocumentType.UBL_INVOICE)
    assert refused(root, pki.attacker.trusted) == NOT_REGISTERED.format(s.spki)


@pytest.mark.parametrize("kind", XMLSEC_KINDS)
async def test_xmlsec1_signed_invoice_accepted_over_https(gateway: Running, client: Any, pki: Pki,
                                                         xmlsec_signed: dict[str, bytes], kind: str) -> None:
    s = getattr(pki, kind)
    await set_signing(gateway, DEMO, SignaturePolicy.REQUIRED, [s])
    body = xmlsec_signed[kind]
    status, reply = await post(client(), body)
    assert status == 202, reply
    sidecar, document = await delivered(gateway, reply["message_id"])
    assert document == body
    assert sidecar["signature"] == info_json(s, XMLSEC_KINDS[kind][1])


async def test_status_reports_the_verified_signature(gateway: Running, client: Any, pki: Pki) -> None:
    """The partner can see what the gateway proved about its signature (GET /v1/invoices/{id})."""
    await set_signing(gateway, DEMO, SignaturePolicy.REQUIRED, [pki.ec])
    session = client()
    status, reply = await post(session, await asyncio.to_thread(lambda: dump(signed(pki.ec))))
    assert status == 202, reply
    async with session.get(f"/v1/invoices/{reply['message_id']}") as r:
        shown = await r.json()
    assert r.status == 200, shown
    assert shown.get("signature", {}).get("signer_spki_sha256") == pki.ec.spki, shown


# --- policies over HTTPS ---------------------------------------------------------------------------

POLICY_CASES = [
    # (policy, document, HTTP status, error code, detail message or None)
    (SignaturePolicy.REQUIRED, "unsigned", 422, "SIGNATURE_REQUIRED", None),
    (SignaturePolicy.IF_PRESENT, "unsigned", 202, None, None),
    (SignaturePolicy.IF_PRESENT, "tampered", 422, "SIGNATURE_INVALID", DIGEST_MISMATCH),
    (SignaturePolicy.IGNORE, "tampered", 202, None, None),
    (SignaturePolicy.REQUIRED, "registered", 202, None, None),
    (SignaturePolicy.REQUIRED, "attacker", 422, "SIGNATURE_INVALID", NOT_REGISTERED),  # CA-valid, registered nowhere (S-08)
    (SignaturePolicy.IF_PRESENT, "other", 422, "SIGNATURE_INVALID", NOT_REGISTERED),  # registered for another partner
]


@pytest.mark.parametrize(("policy", "doc", "status", "code", "detail"), POLICY_CASES,
                         ids=[f"{c[0].value}-{c[1]}" for c in POLICY_CASES])
async def test_signature_policy_over_https(gateway: Running, client: Any, pki: Pki, policy: SignaturePolicy, doc: str,
                                           status: int, code: str | None, detail: str | None) -> None:
    await add_signing_partner(gateway, "other-supplier", ["0088:4000009000001"], [pki.other.cert_path])
    await set_signing(gateway, DEMO, policy, [pki.ec])

    def body() -> bytes:
        if doc == "unsigned":
            return SAMPLE
        if doc == "tampered":
            return dump(signed(pki.ec)).replace(IBAN.encode(), EVIL_IBAN.encode())
        return dump(signed({"registered": pki.ec, "attacker": pki.attacker, "other": pki.other}[doc]))

    got, reply = await post(client(), await asyncio.to_thread(body))
    assert (got, reply.get("error")) == (status, code), reply
    if status == 202:
        sidecar, _ = await delivered(gateway, reply["message_id"])
        assert (sidecar["signature"] or {}).get("signer_spki_sha256") == (pki.ec.spki if doc == "registered" else None)
        return
    if detail is not None:
        signer = {"attacker": pki.attacker, "other": pki.other}.get(doc)
        assert reply["details"][0]["message"] == (detail.format(signer.spki) if signer else detail)
    assert (await gateway.gw.store.reports.counts())["invoices"] == 0


# --- S-06 comments and CDATA -----------------------------------------------------------------------

COMMENTED = [(IBAN.encode(), b"DE8937040044<!---->0532013000"),
             (b"<cbc:ID>DEMO-2026-0001</cbc:ID>", b"<cbc:ID>DEMO-2026<!---->-0001</cbc:ID>"),
             (b"<cbc:CompanyID>DE123456789</cbc:CompanyID>", b"<cbc:CompanyID>DE123456<!-- x -->789</cbc:CompanyID>")]


def with_comments(doc: bytes) -> bytes:
    for old, new in COMMENTED:
        assert doc.count(old) == 1, old
        doc = doc.replace(old, new)
    return doc


def test_comment_injection_keeps_signature_and_full_values(pki: Pki) -> None:
    root = parse(with_comments(dump(signed(pki.ec))))
    assert verify(root, pki.ec.trusted).xades  # comments are outside the canonical form
    assert one(root, IBAN_PATH).text == "DE8937040044"  # the trap: .text stops at the comment
    assert root.xpath(f"string({IBAN_PATH})", namespaces=NS) == IBAN
    facts = read_facts(root, DocumentType.UBL_INVOICE, "2.1")
    assert facts == read_facts(parse(SAMPLE), DocumentType.UBL_INVOICE, "2.1")
    assert facts.invoice_number == "DEMO-2026-0001" and "DE123456789" in facts.supplier_ids


async def test_comment_injection_accepted_over_https_with_full_values(gateway: Running, client: Any, pki: Pki) -> None:
    await set_signing(gateway, DEMO, SignaturePolicy.REQUIRED, [pki.ec])
    body = await asyncio.to_thread(lambda: with_comments(dump(signed(pki.ec))))
    status, reply = await post(client(), body)
    assert status == 202, reply  # a truncated supplier id (DE123456) would have been 403
    sidecar, document = await delivered(gateway, reply["message_id"])
    assert document == body
    assert sidecar["invoice_number"] == "DEMO-2026-0001"
    assert "DE123456789" in sidecar["supplier_ids"]
    assert sidecar["signature"]["signer_spki_sha256"] == pki.ec.spki


def test_cdata_is_canonicalised_to_text(pki: Pki) -> None:
    doc = dump(signed(pki.ec))
    same = doc.replace(b"<cbc:ID>DEMO-2026-0001</cbc:ID>", b"<cbc:ID>DEMO-<![CDATA[2026]]>-0001</cbc:ID>")
    other = doc.replace(b"<cbc:ID>DEMO-2026-0001</cbc:ID>", b"<cbc:ID>DEMO-<![CDATA[2027]]>-0001</cbc:ID>")
    assert same != doc
    root = parse(same)
    verify(root, pki.ec.trusted)
    assert read_facts(root, DocumentType.UBL_INVOICE, "2.1").invoice_number == "DEMO-2026-0001"
    assert refused(parse(other), pki.ec.trusted) == DIGEST_MISMATCH


# --- the attack table (S-01…S-10) ------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    case: str
    expect: str  # the exact reason; {attacker} and {port} are filled in
    build: Callable[[Pki, int], etree._Element]
    signer: str = "ec"  # the partner's registered signer
    https: bool = False  # also sent over HTTPS (the result stays schema-valid)
    # Over HTTPS, refused before the signature check by the stage that owns the class (code, reason), if any.
    earlier: tuple[str, str] | None = None


ATTACKS: list[Attack] = []


def attack(case: str, expect: str, signer: str = "ec", https: bool = False,
           earlier: tuple[str, str] | None = None) -> Callable[[Any], Any]:
    def register(build: Callable[[Pki, int], etree._Element]) -> Callable[[Pki, int], etree._Element]:
        ATTACKS.append(Attack(case, expect, build, signer, https, earlier))
        return build

    return register


def set_method(root: etree._Element, uri: str) -> None:
    one(root, "//ds:SignatureMethod").set("Algorithm", uri)


def drop_transform(ref: etree._Element, uri: str) -> None:
    t = one(ref, f"ds:Transforms/ds:Transform[@Algorithm='{uri}']")
    t.getparent().remove(t)


def add_reference(root: etree._Element, uri: str, transforms: tuple[str, ...] = (EXC,)) -> etree._Element:
    ref = ds("Reference", URI=uri)
    if transforms:
        tr = ds("Transforms", ref)
        for t in transforms:
            ds("Transform", tr, Algorithm=t)
    ds("DigestMethod", ref, Algorithm=SHA256)
    ds("DigestValue", ref, text=b64(bytes(32)))
    root.xpath("//ds:SignedInfo/ds:Reference", namespaces=NS)[-1].addnext(ref)
    return ref


@attack("S-01 IBAN changed after signing", DIGEST_MISMATCH, https=True)
def tampered(pki: Pki, port: int) -> etree._Element:
    return parse(dump(signed(pki.ec)).replace(IBAN.encode(), EVIL_IBAN.encode()))


def signed_by_root_id(pki: Pki) -> etree._Element:
    """A legitimately signed invoice <Invoice Id="inv1"> whose Reference is URI="#inv1" (not schema-valid UBL)."""
    root = parse(SAMPLE)
    root.set("Id", "inv1")
    sign(root, pki.ec.signing_key)
    doc_ref(root).set("URI", "#inv1")
    return resign(root, pki.ec.key)


def hide_signed_copy(pki: Pki, keep_id: bool = False, enveloped: bool = True) -> etree._Element:
    """§3.1: the attacker's root carries the legitimate Signature; the signed <Invoice Id="inv1"> hides in UBLExtensions."""
    legit = signed_by_root_id(pki)
    sig = sig_of(legit)
    evil = copy.deepcopy(legit)
    if not keep_id:
        del evil.attrib["Id"]
    set_iban(evil)
    sig.getparent().remove(sig)
    slot = sig_of(evil)
    slot.getparent().replace(slot, sig)
    new_extension(evil).append(legit)
    if not enveloped:
        drop_transform(one(sig, "ds:SignedInfo/ds:Reference[@URI='#inv1']"), ENVELOPED)
    return evil


attack("S-02 wrapping: #inv1 points into a hidden signed copy",
       "only the document reference may use the enveloped-signature transform")(lambda pki, port: hide_signed_copy(pki))
attack("S-02 wrapping without the enveloped transform", ONLY_WHOLE)(lambda pki, port: hide_signed_copy(pki, enveloped=False))
attack("S-04 attacker root and hidden copy both Id=inv1",
       "the document's Id is not unique")(lambda pki, port: hide_signed_copy(pki, keep_id=True))


@attack("S-02 signed invoice nested whole under an attacker root", NOT_IN_SLOT)
def nested_whole(pki: Pki, port: int) -> etree._Element:
    evil = parse(SAMPLE)
    set_iban(evil)
    new_extension(evil).append(signed(pki.ec))
    return evil


@attack("S-03 unsigned evil copy before the signed invoice", NOT_IN_SLOT)
def unsigned_copy_first(pki: Pki, port: int) -> etree._Element:
    evil = parse(SAMPLE)
    set_iban(evil)
    wrapper = etree.Element(q(INV, "Invoice"))
    wrapper.extend([evil, signed(pki.ec)])
    return wrapper


@attack("S-03 unsigned evil copy inside the signed invoice's extensions", DIGEST_MISMATCH, https=True,
        earlier=("EXTENSION_REFUSED", f"an extension in {INV}, which is neither a signature nor allowed by this "
                 "gateway's validation.extension_namespaces"))  # no document in an extension (issue 20, item 2)
def unsigned_copy_inside(pki: Pki, port: int) -> etree._Element:
    root, evil = signed(pki.ec), parse(SAMPLE)
    set_iban(evil)
    new_extension(root).append(evil)
    return root


def for_id_attr(attr: str) -> Callable[[Pki, int], etree._Element]:
    def build(pki: Pki, port: int) -> etree._Element:
        root = signed_by_root_id(pki)
        one(root, "cac:InvoiceLine[2]").set(attr, "inv1")
        return resign(root, pki.ec.key)

    return build


for _label, _attr in (("Id", "Id"), ("ID", "ID"), ("id", "id"), ("xml:id", "{http://www.w3.org/XML/1998/namespace}id")):
    attack(f"S-04 duplicate id via {_label}", "the document's Id is not unique")(for_id_attr(_attr))


def with_line_id(pki: Pki) -> etree._Element:
    root = parse(SAMPLE)
    one(root, "cac:InvoiceLine[1]").set("Id", "line1")
    sign(root, pki.ec.signing_key)
    return root


@attack("S-05 the only reference covers one invoice line", ONLY_WHOLE)
def inner_reference(pki: Pki, port: int) -> etree._Element:
    root = with_line_id(pki)
    ref = doc_ref(root)
    ref.set("URI", "#line1")
    drop_transform(ref, ENVELOPED)
    return resign(root, pki.ec.key)


@attack("S-05 a second reference covers one invoice line", ONLY_WHOLE)
def subtree_reference(pki: Pki, port: int) -> etree._Element:
    root = with_line_id(pki)
    add_reference(root, "#line1")
    return resign(root, pki.ec.key)


@attack("S-05 two document references", "exactly one reference must cover the whole document, found 2", https=True)
def two_document_refs(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    doc_ref(root).addnext(copy.deepcopy(doc_ref(root)))
    return resign(root, pki.ec.key)


@attack("S-05 payload in ds:Object, referenced instead of the document", ONLY_WHOLE)
def object_payload(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    set_iban(root)
    ds("Object", sig_of(root), Id="obj").append(parse(SAMPLE))
    ref = doc_ref(root)
    ref.set("URI", "#obj")
    drop_transform(ref, ENVELOPED)
    return resign(root, pki.ec.key)


@attack("S-05 two ds:Signature elements", "exactly one ds:Signature is allowed, found 2", https=True)
def two_signatures(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    one(root, "ext:UBLExtensions").append(one(signed(pki.ec), "ext:UBLExtensions/ext:UBLExtension"))
    return root


@attack("S-05 signature inside cac:PaymentMeans", NOT_IN_SLOT)
def in_payment_means(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    one(root, "cac:PaymentMeans").append(sig_of(root))
    return resign(root, pki.ec.key)


@attack("S-07 HMAC-SHA256 keyed with the partner's certificate PEM", bad_method(HMAC_SHA256), https=True)
def hmac_with_cert(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    set_iban(root)
    set_method(root, HMAC_SHA256)
    return resign(root, pki.ec.cert_path.read_bytes())


@attack("S-07 RSA-SHA1 with SHA-1 digests", bad_method(RSA_SHA1), signer="rsa")
def rsa_sha1(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.rsa)
    set_method(root, RSA_SHA1)
    for dm in root.iterfind(".//ds:SignedInfo/ds:Reference/ds:DigestMethod", NS):
        dm.set("Algorithm", SHA1)
    return resign(root, pki.rsa.key)


@attack("S-07 RSA-MD5 signature method", bad_method(RSA_MD5), signer="rsa")
def rsa_md5(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.rsa)
    set_method(root, RSA_MD5)
    return root


@attack("S-07 MD5 digest", f"digest algorithm {MD5!r} is not allowed (SHA-256, SHA-384 or SHA-512 only)")
def md5_digest(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    one(doc_ref(root), "ds:DigestMethod").set("Algorithm", MD5)
    return resign(root, pki.ec.key)


attack("S-07 RSA-1024 signing key", "RSA keys under 2048 bits are refused", signer="weak")(lambda pki, port: signed(pki.weak))


@attack("S-08 re-signed by a CA-valid attacker key with the same CN", NOT_REGISTERED.format("{attacker}"), https=True)
def attacker_resigned(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    set_iban(root)
    return resign(root, pki.attacker.key, pki.attacker.cert)


@attack("S-08 attacker key, KeyInfo only a KeyName and a RetrievalMethod",
        "the signature value does not verify with the signer's key", https=True)
def key_name_only(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    set_iban(root)
    key_info = one(root, "//ds:KeyInfo")
    for child in list(key_info):
        key_info.remove(child)
    ds("KeyName", key_info, text=pki.ec.cert.subject.rfc4514_string())
    ds("RetrievalMethod", key_info, URI=f"http://127.0.0.1:{port}/key")
    return resign(root, pki.attacker.key)


@attack("S-08 KeyValue of another RSA key beside the X509Certificate", "ds:KeyValue and ds:X509Certificate name different keys",
        signer="rsa")
def key_value_mismatch(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.rsa)
    numbers = pki.weak.cert.public_key().public_numbers()
    kv = ds("RSAKeyValue", ds("KeyValue", one(root, "//ds:KeyInfo")))
    ds("Modulus", kv, text=b64(numbers.n.to_bytes(128, "big")))
    ds("Exponent", kv, text=b64(numbers.e.to_bytes(3, "big")))
    return root


@attack("S-08 dsig11 ECKeyValue of another EC key beside the X509Certificate", "ds:KeyValue and ds:X509Certificate name different keys")
def ec_key_value_mismatch(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    point = pki.attacker.cert.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    dsig11 = "http://www.w3.org/2009/xmldsig11#"
    kv = etree.SubElement(ds("KeyValue", one(root, "//ds:KeyInfo")), q(dsig11, "ECKeyValue"), nsmap={"dsig11": dsig11})
    etree.SubElement(kv, q(dsig11, "NamedCurve"), URI="urn:oid:1.2.840.10045.3.1.7")
    etree.SubElement(kv, q(dsig11, "PublicKey")).text = b64(point)
    return root


@attack("S-08 DSAKeyValue beside an RSA X509Certificate", "ds:KeyValue and ds:X509Certificate name different keys", signer="rsa")
def dsa_key_value(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.rsa)
    kv = ds("DSAKeyValue", ds("KeyValue", one(root, "//ds:KeyInfo")))
    for part in ("P", "Q", "G", "Y"):
        ds(part, kv, text=b64(b"\x01" * 20))
    return root


TRANSFORMS = [
    ("XPath", "http://www.w3.org/TR/1999/REC-xpath-19991116",
     f'<ds:XPath xmlns:ds="{DS}" xmlns:cac="{CAC}">not(ancestor-or-self::cac:PaymentMeans)</ds:XPath>'),
    ("XPath-Filter2", "http://www.w3.org/2002/06/xmldsig-filter2",
     f'<f:XPath xmlns:f="http://www.w3.org/2002/06/xmldsig-filter2" xmlns:cac="{CAC}" Filter="subtract">//cac:PaymentMeans</f:XPath>'),
    ("XSLT", "http://www.w3.org/TR/1999/REC-xslt-19991116",
     '<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform"><xsl:template match="/">'
     "<xsl:copy-of select=\"document('http://127.0.0.1:PORT/xslt')\"/></xsl:template></xsl:stylesheet>"),
    ("base64", "http://www.w3.org/2000/09/xmldsig#base64", None),
]


def with_transform(uri: str, body: str | None) -> Callable[[Pki, int], etree._Element]:
    """Signed by the attacker's own key: the refusal must come before any trust decision or transform run."""
    def build(pki: Pki, port: int) -> etree._Element:
        root = signed(pki.ec)
        set_iban(root)
        t = ds("Transform", one(doc_ref(root), "ds:Transforms"), Algorithm=uri)
        if body:
            t.append(etree.fromstring(body.replace("PORT", str(port))))
        return resign(root, pki.attacker.key, pki.attacker.cert)

    return build


for _name, _uri, _body in TRANSFORMS:
    attack(f"S-09 {_name} transform", f"canonicalization {_uri!r} is not allowed (use C14N 1.0 or exclusive C14N)",
           https=_name == "XPath")(with_transform(_uri, _body))


def with_external_reference(uri: str) -> Callable[[Pki, int], etree._Element]:
    def build(pki: Pki, port: int) -> etree._Element:
        root = signed(pki.ec)
        add_reference(root, uri.replace("{port}", str(port)), ())
        return resign(root, pki.attacker.key, pki.attacker.cert)

    return build


for _uri in ("http://127.0.0.1:{port}/x", "file:///etc/passwd", "cid:invoice@attacker.example"):
    attack(f"S-09 external reference {_uri}", f"reference URI {_uri!r} is not allowed (only \"\" or a local #Id)")(
        with_external_reference(_uri))
attack("S-09 XPointer reference", "reference '#xpointer(/)' resolves to 0 elements")(with_external_reference("#xpointer(/)"))


@attack("XAdES SignedProperties present but not referenced", "XAdES SignedProperties are present but not covered by the signature",
        https=True)
def props_unreferenced(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    ref = one(root, f"//ds:Reference[@Type='{SIGNED_PROPERTIES_TYPE}']")
    ref.getparent().remove(ref)
    return resign(root, pki.ec.key)


@attack("XAdES SigningCertificate digest of another certificate", "XAdES SigningCertificate does not name the certificate that signed")
def props_other_cert(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    der = pki.attacker.cert.public_bytes(serialization.Encoding.DER)
    one(root, "//xades:CertDigest/ds:DigestValue").text = b64(hashlib.sha256(der).digest())
    return resign(root, pki.ec.key)


attack("XAdES SigningTime in the future", "XAdES SigningTime is in the future", https=True)(
    lambda pki, port: signed(pki.ec, now=datetime.now(UTC) + timedelta(hours=1)))
attack("signing certificate expired at the signing time", "the signing certificate was not valid at the signing time",
       signer="expired")(lambda pki, port: signed(pki.expired))


def edit_value(change: Callable[[etree._Element], None]) -> Callable[[Pki, int], etree._Element]:
    def build(pki: Pki, port: int) -> etree._Element:
        root = signed(pki.ec)
        change(one(root, "//ds:SignatureValue"))
        return root

    return build


def _set_text(el: etree._Element, text: str | None) -> None:
    el.text = text


@attack("S-10 relative namespace URI inside SignedInfo", "the signature could not be processed (C14NError)", https=True)
def relative_namespace(pki: Pki, port: int) -> etree._Element:
    return parse(dump(signed(pki.ec)).replace(b"<ds:SignedInfo>", b'<ds:SignedInfo xmlns="/rn:x">'))


@attack("S-10 ds:Signature without SignedInfo", "ds:SignedInfo must appear exactly once, found 0")
def no_signed_info(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    si = one(root, "//ds:SignedInfo")
    si.getparent().remove(si)
    return root


@attack("S-10 empty DigestValue", DIGEST_MISMATCH)
def empty_digest(pki: Pki, port: int) -> etree._Element:
    root = signed(pki.ec)
    one(doc_ref(root), "ds:DigestValue").text = None
    return root


attack("S-10 non-ASCII base64 in SignatureValue", "ds:SignatureValue is not valid base64")(
    edit_value(lambda v: _set_text(v, "é" + v.text)))
attack("S-10 truncated SignatureValue", "the ECDSA signature value has the wrong length")(
    edit_value(lambda v: _set_text(v, v.text[:-4])))
attack("S-10 SignatureValue text doubled", "ds:SignatureValue is not valid base64")(
    edit_value(lambda v: _set_text(v, v.text * 2)))
attack("S-10 two SignatureValue elements", "ds:SignatureValue must appear exactly once, found 2")(
    edit_value(lambda v: v.addnext(copy.deepcopy(v))))
attack("S-10 10 MB SignatureValue", "ds:SignatureValue is too large")(
    edit_value(lambda v: _set_text(v, "QUFB" * (10 * 1024 * 1024 // 4))))


@pytest.mark.parametrize("a", ATTACKS, ids=[a.case for a in ATTACKS])
def test_attack_is_refused_with_its_reason(pki: Pki, canary: int, a: Attack) -> None:
    reason = refused(a.build(pki, canary), getattr(pki, a.signer).trusted)
    assert reason == a.expect.format(attacker=pki.attacker.spki, port=canary)


HTTPS_ATTACKS = [a for a in ATTACKS if a.https]


@pytest.mark.slow
@pytest.mark.parametrize("a", HTTPS_ATTACKS, ids=[a.case for a in HTTPS_ATTACKS])
async def test_attack_over_https_is_422_and_nothing_stored(gateway: Running, client: Any, pki: Pki, canary: int,
                                                           a: Attack) -> None:
    await set_signing(gateway, DEMO, SignaturePolicy.IF_PRESENT, [pki.ec])
    body = await asyncio.to_thread(lambda: dump(a.build(pki, canary)))
    status, reply = await post(client(), body)
    code, reason = a.earlier or ("SIGNATURE_INVALID", a.expect.format(attacker=pki.attacker.spki, port=canary))
    assert (status, reply.get("error")) == (422, code), reply
    assert reply["details"][0]["message"] == reason
    assert (await gateway.gw.store.reports.counts())["invoices"] == 0


def test_signing_time_within_clock_skew_is_accepted(pki: Pki) -> None:
    assert verify(signed(pki.ec, now=datetime.now(UTC) + timedelta(minutes=4)), pki.ec.trusted).xades


# --- S-10 no 500s: byte mutations --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutation_base(pki: Pki) -> tuple[bytes, Any]:
    doc = dump(signed(pki.ec))
    return doc, read_facts(parse(doc), DocumentType.UBL_INVOICE, "2.1")


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(data=st.data())
def test_byte_mutation_fails_or_changes_nothing(pki: Pki, mutation_base: tuple[bytes, Any], data: st.DataObject) -> None:
    doc, facts = mutation_base
    start, end = doc.index(b"<ds:Signature"), doc.index(b"</ds:Signature>")
    pos = data.draw(st.one_of(st.integers(0, len(doc) - 1), st.integers(start, end)), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != doc[pos]), label="byte")
    try:
        root = PARSER.parse(doc[:pos] + bytes([byte]) + doc[pos + 1:]).root
        verify(root, pki.ec.trusted)
    except GatewayError:
        return  # refused with one of our errors: fine (anything else escapes and fails the test)
    assert read_facts(root, DocumentType.UBL_INVOICE, "2.1") == facts
    assert root.xpath(f"string({IBAN_PATH})", namespaces=NS) == IBAN

