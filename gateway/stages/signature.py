"""XML signatures on the invoice document: a strict verifier and an XAdES-BES signer.

The verifier accepts one narrow, common profile and refuses everything else before doing any
cryptography with the attacker's choices (SECURITY-TESTS.md S-01…S-10, §3.1-3.3):

* exactly one ``ds:Signature``, in the UBL extension slot
  (``ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/sig:UBLDocumentSignatures/
  sac:SignatureInformation/ds:Signature``) or directly under the root;
* algorithms from allowlists only: C14N 1.0 or exclusive C14N (with or without comments),
  RSA-SHA256/384/512 or ECDSA-SHA256/384/512, SHA-256/384/512 digests.  No SHA-1, no MD5, no
  HMAC, no XPath/XSLT/base64 transforms, no external or cross-document URIs;
* exactly one reference to the document itself, covering all of it (``URI=""`` or the root's own
  unique Id, with the enveloped-signature transform); the only other references allowed point to
  this signature's own XAdES ``SignedProperties`` or ``KeyInfo``;
* the key is one of the partner's registered signing certificates (matched by SPKI), never a
  certificate merely found in ``KeyInfo`` or the system store;
* XAdES ``SignedProperties``, when present, must be signed, name the signer's certificate digest,
  and give a signing time inside the certificate's validity and not in the future.

The verifier works on the tree the pipeline already parsed (one parse, SECURITY-TESTS.md X-06),
so the facts read later come from exactly the bytes whose digest was checked.  Every failure is
``SignatureInvalid`` with a specific reason; no other exception leaves ``verify``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from lxml import etree

from ..errors import Detail, Rejected
from ..tls import spki_sha256

DS = "http://www.w3.org/2000/09/xmldsig#"
XADES = "http://uri.etsi.org/01903/v1.3.2#"
XADES141 = "http://uri.etsi.org/01903/v1.4.1#"
EXT = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"
SIG = "urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2"
SAC = "urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2"
SBC = "urn:oasis:names:specification:ubl:schema:xsd:SignatureBasicComponents-2"
CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
NS = {"ds": DS, "xades": XADES, "xades141": XADES141}

ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SIGNED_PROPERTIES_TYPE = "http://uri.etsi.org/01903#SignedProperties"
CLOCK_SKEW = timedelta(minutes=5)  # a signing time this far in the future is still accepted
MAX_SIGNATURE_BYTES = 16 * 1024  # a SignatureValue or certificate larger than this is refused unread
MAX_REFERENCES = 8


class C14N(enum.Enum):
    """Canonicalization algorithms: (exclusive, with_comments)."""

    C14N10 = ("http://www.w3.org/TR/2001/REC-xml-c14n-20010315", False, False)
    C14N10_COMMENTS = ("http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments", False, True)
    EXC = ("http://www.w3.org/2001/10/xml-exc-c14n#", True, False)
    EXC_COMMENTS = ("http://www.w3.org/2001/10/xml-exc-c14n#WithComments", True, True)

    @classmethod
    def of(cls, uri: str | None) -> C14N:
        for m in cls:
            if m.value[0] == uri:
                return m
        raise SignatureInvalid(f"canonicalization {uri!r} is not allowed (use C14N 1.0 or exclusive C14N)")


class Digest(enum.Enum):
    SHA256 = ("http://www.w3.org/2001/04/xmlenc#sha256", "sha256")
    SHA384 = ("http://www.w3.org/2001/04/xmldsig-more#sha384", "sha384")
    SHA512 = ("http://www.w3.org/2001/04/xmlenc#sha512", "sha512")

    @classmethod
    def of(cls, uri: str | None) -> Digest:
        for m in cls:
            if m.value[0] == uri:
                return m
        raise SignatureInvalid(f"digest algorithm {uri!r} is not allowed (SHA-256, SHA-384 or SHA-512 only)")

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.value[1], data).digest()


class SignatureMethod(enum.Enum):
    RSA_SHA256 = ("http://www.w3.org/2001/04/xmldsig-more#rsa-sha256", "rsa", hashes.SHA256)
    RSA_SHA384 = ("http://www.w3.org/2001/04/xmldsig-more#rsa-sha384", "rsa", hashes.SHA384)
    RSA_SHA512 = ("http://www.w3.org/2001/04/xmldsig-more#rsa-sha512", "rsa", hashes.SHA512)
    ECDSA_SHA256 = ("http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256", "ec", hashes.SHA256)
    ECDSA_SHA384 = ("http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384", "ec", hashes.SHA384)
    ECDSA_SHA512 = ("http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512", "ec", hashes.SHA512)

    @classmethod
    def of(cls, uri: str | None) -> SignatureMethod:
        for m in cls:
            if m.value[0] == uri:
                return m
        raise SignatureInvalid(
            f"signature method {uri!r} is not allowed (RSA-SHA256/384/512 or ECDSA-SHA256/384/512 only)")


class SignatureInvalid(Rejected):
    code = "SIGNATURE_INVALID"
    http_status = 422

    def __init__(self, reason: str):
        super().__init__(f"the invoice's XML signature was refused: {reason}", [Detail(reason, path="//ds:Signature")],
                         code="SIGNATURE_INVALID")
        self.reason = reason


class SignatureRequired(Rejected):
    code = "SIGNATURE_REQUIRED"
    http_status = 422


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """What a successful verification proved (only trusted data)."""

    signer_spki: str
    signer_subject: str
    method: str
    signing_time: str | None
    xades: bool

    def as_json(self) -> dict[str, object]:
        return {"signer_spki_sha256": self.signer_spki, "signer_subject": self.signer_subject, "method": self.method,
                "signing_time": self.signing_time, "xades": self.xades}


@dataclass(frozen=True, slots=True)
class TrustedSigner:
    cert: x509.Certificate
    spki: str
    der: bytes = field(repr=False)

    @classmethod
    def of(cls, cert: x509.Certificate, spki: str | None = None) -> TrustedSigner:
        return cls(cert, spki or spki_sha256(cert), cert.public_bytes(serialization.Encoding.DER))


def trusted(certs: Iterable[x509.Certificate]) -> list[TrustedSigner]:
    return [TrustedSigner.of(c) for c in certs]


def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def _only(parent: etree._Element, ns: str, local: str, what: str) -> etree._Element:
    found = parent.findall(_q(ns, local))
    if len(found) != 1:
        raise SignatureInvalid(f"{what} must appear exactly once, found {len(found)}")
    return found[0]


def _b64(el: etree._Element, what: str) -> bytes:
    text = "".join(el.itertext())
    if len(text) > MAX_SIGNATURE_BYTES * 2:
        raise SignatureInvalid(f"{what} is too large")
    try:
        return base64.b64decode("".join(text.split()).encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SignatureInvalid(f"{what} is not valid base64") from None


def _c14n(node: etree._Element | etree._ElementTree, method: C14N, prefixes: list[str] | None = None) -> bytes:
    _, exclusive, comments = method.value
    # URI="" and "#id" references select node-sets without comments (XMLDSig §4.4.3.3), so a
    # reference is always canonicalized without them; SignedInfo follows its own algorithm.
    out: bytes = etree.tostring(node, method="c14n", exclusive=exclusive, with_comments=comments,
                                inclusive_ns_prefixes=prefixes if exclusive else None)
    return out


def _prefix_list(parent: etree._Element) -> list[str] | None:
    inc = parent.find("{http://www.w3.org/2001/10/xml-exc-c14n#}InclusiveNamespaces")
    if inc is None:
        return None
    return (inc.get("PrefixList") or "").split()


_SLOT = [_q(EXT, "ExtensionContent"), _q(EXT, "UBLExtension"), _q(EXT, "UBLExtensions")]
_UBL_SIGNATURES = [_q(SAC, "SignatureInformation"), _q(SIG, "UBLDocumentSignatures")]


def _placement_ok(sig: etree._Element, root: etree._Element) -> bool:
    """Directly under the root, or in the extension slot: inside the UBL signature structure
    (…/ext:ExtensionContent/sig:UBLDocumentSignatures/sac:SignatureInformation) or, as national
    profiles such as Colombia's DIAN do, directly in ext:ExtensionContent."""
    parent = sig.getparent()
    if parent is root:
        return True
    for chain in (_UBL_SIGNATURES + _SLOT, _SLOT):
        node = parent
        for tag in chain:
            if node is None or node.tag != tag:
                break
            node = node.getparent()
        else:
            if node is root:
                return True
    return False


# Id, ID, id in any namespace (xml:id, wsu:Id included): one pass over the attributes.
_ID_ATTRIBUTES = etree.XPath("//@*[local-name()='Id' or local-name()='ID' or local-name()='id']")


def _ids(root: etree._Element) -> dict[str, list[etree._Element]]:
    """Every element by every id-like attribute value: a value held twice is ambiguous (S-04)."""
    out: dict[str, list[etree._Element]] = {}
    for value in _ID_ATTRIBUTES(root):
        out.setdefault(str(value), []).append(value.getparent())
    return out


@contextmanager
def _enveloped(root: etree._Element, sig: etree._Element) -> Iterator[etree._ElementTree]:
    """The document with the signature element taken out and everything else in place (its tail
    text stays): the enveloped-signature transform.  The tree is restored on leaving, so the
    document is never copied (it belongs to one request)."""
    parent = sig.getparent()
    assert parent is not None
    index, prev = parent.index(sig), sig.getprevious()
    saved = prev.tail if prev is not None else parent.text
    parent.remove(sig)  # the element keeps its tail
    if sig.tail:
        if prev is not None:
            prev.tail = (saved or "") + sig.tail
        else:
            parent.text = (saved or "") + sig.tail
    try:
        yield root.getroottree()
    finally:
        if prev is not None:
            prev.tail = saved
        else:
            parent.text = saved
        parent.insert(index, sig)


_SIGNATURES = etree.XPath("//ds:Signature", namespaces=NS)


def find_signatures(root: etree._Element) -> list[etree._Element]:
    return list(_SIGNATURES(root))


def verify(root: etree._Element, signers: list[TrustedSigner], now: datetime | None = None,
           *, valid_now: bool = True, found: list[etree._Element] | None = None) -> SignatureInfo:
    """Verify the one signature on the document, or raise SignatureInvalid (never anything else).

    The signer's certificate must be valid at the signing time XAdES states and, for an invoice
    arriving now (``valid_now``), also now: a claimed signing time is the signer's own word, so an
    expired or stolen key cannot backdate its way in.  ``valid_now=False`` is for checking archived
    documents (the `verify` command), where validity at the stated signing time is what is asked.
    ``found`` is the result of ``find_signatures(root)`` when the caller already has it."""
    try:
        return _verify(root, signers, now or datetime.now(UTC), valid_now, found)
    except SignatureInvalid:
        raise
    except Exception as exc:  # lxml, cryptography and our own parsing raise many types on hostile input
        raise SignatureInvalid(f"the signature could not be processed ({exc.__class__.__name__})") from None


def _is_document_ref(uri: str | None, root_id: str | None) -> bool:
    return uri == "" or (root_id is not None and uri == f"#{root_id}")


def _verify(root: etree._Element, signers: list[TrustedSigner], now: datetime, valid_now: bool,
            found: list[etree._Element] | None) -> SignatureInfo:
    sigs = found if found is not None else find_signatures(root)
    if len(sigs) != 1:
        raise SignatureInvalid(f"exactly one ds:Signature is allowed, found {len(sigs)}")
    sig = sigs[0]
    if not _placement_ok(sig, root):
        raise SignatureInvalid("ds:Signature must sit in the UBL extension slot "
                               "(ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/…) or directly under the root")
    signed_info = _only(sig, DS, "SignedInfo", "ds:SignedInfo")
    c14n_el = _only(signed_info, DS, "CanonicalizationMethod", "ds:CanonicalizationMethod")
    si_c14n = C14N.of(c14n_el.get("Algorithm"))
    method = SignatureMethod.of(_only(signed_info, DS, "SignatureMethod", "ds:SignatureMethod").get("Algorithm"))
    refs = signed_info.findall(_q(DS, "Reference"))
    if not 1 <= len(refs) <= MAX_REFERENCES:
        raise SignatureInvalid(f"ds:SignedInfo has {len(refs)} references")
    root_id = next((root.get(a) for a in ("Id", "ID", "id") if root.get(a)), None)
    doc_refs = sum(_is_document_ref(ref.get("URI"), root_id) for ref in refs)
    if doc_refs > 1:  # before any digest is computed; none at all is reported after the other references
        raise SignatureInvalid(f"exactly one reference must cover the whole document, found {doc_refs}")
    key_info = sig.find(_q(DS, "KeyInfo"))
    ids = _ids(root)
    signed_props: etree._Element | None = None
    for ref in refs:
        uri = ref.get("URI")
        transforms = [t.get("Algorithm") for t in ref.findall(f"{_q(DS, 'Transforms')}/{_q(DS, 'Transform')}")]
        if ref.find(_q(DS, "Transforms")) is not None and len(ref.find(_q(DS, "Transforms"))) != len(transforms):
            raise SignatureInvalid("ds:Transforms may only contain ds:Transform elements")
        digest = Digest.of(_only(ref, DS, "DigestMethod", "ds:DigestMethod").get("Algorithm"))
        expected = _b64(_only(ref, DS, "DigestValue", "ds:DigestValue"), "ds:DigestValue")
        c14ns = [C14N.of(t) for t in transforms if t != ENVELOPED]
        if len(c14ns) > 1:
            raise SignatureInvalid("a reference may have at most one canonicalization transform")
        ref_c14n = c14ns[0] if c14ns else C14N.C14N10
        ref_c14n = {C14N.C14N10_COMMENTS: C14N.C14N10, C14N.EXC_COMMENTS: C14N.EXC}.get(ref_c14n, ref_c14n)
        prefixes = None
        for t in ref.findall(f"{_q(DS, 'Transforms')}/{_q(DS, 'Transform')}"):
            prefixes = prefixes or _prefix_list(t)
        if _is_document_ref(uri, root_id):
            if uri != "" and len(ids.get(root_id or "", [])) != 1:
                raise SignatureInvalid("the document's Id is not unique")
            if ENVELOPED not in transforms:
                raise SignatureInvalid("the reference to the document must use the enveloped-signature transform")
            with _enveloped(root, sig) as doc:
                data = _c14n(doc, ref_c14n, prefixes)
        elif uri is not None and uri.startswith("#") and len(uri) > 1:
            targets = ids.get(uri[1:], [])
            if len(targets) != 1:
                raise SignatureInvalid(f"reference {uri[:80]!r} resolves to {len(targets)} elements")
            target = targets[0]
            if ENVELOPED in transforms:
                raise SignatureInvalid("only the document reference may use the enveloped-signature transform")
            if target.tag == _q(XADES, "SignedProperties") and _owner(target) is sig:
                signed_props = target
            elif target is key_info:
                pass
            else:
                raise SignatureInvalid("a reference may only cover the whole document, this signature's "
                                       "XAdES SignedProperties or its KeyInfo")
            data = _c14n(target, ref_c14n, prefixes)
        else:
            raise SignatureInvalid(f"reference URI {str(uri)[:80]!r} is not allowed (only \"\" or a local #Id)")
        if not hmac.compare_digest(digest.hash(data), expected):
            raise SignatureInvalid(f"digest mismatch for reference {uri[:80]!r}: the signed content was changed")
    if doc_refs == 0:
        raise SignatureInvalid("exactly one reference must cover the whole document, found 0")

    signer = _signer(key_info, signers)
    value = _b64(_only(sig, DS, "SignatureValue", "ds:SignatureValue"), "ds:SignatureValue")
    _check_value(signer.cert, method, value, _c14n(signed_info, si_c14n, _prefix_list(c14n_el)))

    signing_time = None
    qualifying = sig.findall(f"{_q(DS, 'Object')}/{_q(XADES, 'QualifyingProperties')}")
    if qualifying and signed_props is None:
        raise SignatureInvalid("XAdES SignedProperties are present but not covered by the signature")
    if signed_props is not None:
        signing_time = _check_xades(signed_props, signer, now)
    cert = signer.cert
    if signing_time and not cert.not_valid_before_utc <= datetime.fromisoformat(signing_time) <= cert.not_valid_after_utc:
        raise SignatureInvalid("the signing certificate was not valid at the signing time")
    if (valid_now or not signing_time) and not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SignatureInvalid("the signing certificate is not valid now (expired or not yet valid)")
    return SignatureInfo(signer.spki, signer.cert.subject.rfc4514_string(), method.name, signing_time,
                         signed_props is not None)


def _owner(el: etree._Element) -> etree._Element | None:
    node = el.getparent()
    while node is not None and node.tag != _q(DS, "Signature"):
        node = node.getparent()
    return node


def _signer(key_info: etree._Element | None, signers: list[TrustedSigner]) -> TrustedSigner:
    if not signers:
        raise SignatureInvalid("no signing certificate is registered for this partner")
    if key_info is None:
        if len(signers) == 1:
            return signers[0]
        raise SignatureInvalid("ds:KeyInfo is missing and several signing certificates are registered")
    certs = key_info.findall(f"{_q(DS, 'X509Data')}/{_q(DS, 'X509Certificate')}")
    if not certs:
        if len(signers) == 1:
            return signers[0]
        raise SignatureInvalid("ds:KeyInfo names no X509Certificate and several signing certificates are registered")
    der = _b64(certs[0], "ds:X509Certificate")
    exact = next((s for s in signers if s.der == der), None)  # the usual case: the registered certificate itself
    try:
        embedded = exact.cert if exact else x509.load_der_x509_certificate(der)
    except ValueError:
        raise SignatureInvalid("ds:X509Certificate is not a certificate") from None
    spki = exact.spki if exact else spki_sha256(embedded)
    for s in signers:
        if s.spki == spki:
            key_value = key_info.find(f"{_q(DS, 'KeyValue')}")
            if key_value is not None and not _key_value_matches(key_value, s.cert):
                raise SignatureInvalid("ds:KeyValue and ds:X509Certificate name different keys")
            return s
    raise SignatureInvalid(f"the signer's certificate (key SHA-256 {spki}) is not registered for this partner")


DSIG11 = "http://www.w3.org/2009/xmldsig11#"


def _key_value_matches(key_value: etree._Element, cert: x509.Certificate) -> bool:
    """A KeyValue next to the certificate must name the same key (S-08); a kind we cannot compare is refused."""
    pub = cert.public_key()
    if len(key_value) != 1:
        return False
    value = key_value[0]
    if value.tag == _q(DS, "RSAKeyValue") and isinstance(pub, rsa.RSAPublicKey):
        numbers = pub.public_numbers()
        modulus = int.from_bytes(_b64(_only(value, DS, "Modulus", "ds:Modulus"), "ds:Modulus"), "big")
        exponent = int.from_bytes(_b64(_only(value, DS, "Exponent", "ds:Exponent"), "ds:Exponent"), "big")
        return (modulus, exponent) == (numbers.n, numbers.e)
    if value.tag == _q(DSIG11, "ECKeyValue") and isinstance(pub, ec.EllipticCurvePublicKey):
        point = _b64(_only(value, DSIG11, "PublicKey", "dsig11:PublicKey"), "dsig11:PublicKey")
        return hmac.compare_digest(point, pub.public_bytes(serialization.Encoding.X962,
                                                           serialization.PublicFormat.UncompressedPoint))
    return False


def _check_value(cert: x509.Certificate, method: SignatureMethod, value: bytes, signed: bytes) -> None:
    _, kind, hash_cls = method.value
    key = cert.public_key()
    try:
        if kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise SignatureInvalid("RSA keys under 2048 bits are refused")
            key.verify(value, signed, padding.PKCS1v15(), hash_cls())
        elif kind == "ec" and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(value) // 2
            if len(value) % 2 or half * 8 < key.curve.key_size:
                raise SignatureInvalid("the ECDSA signature value has the wrong length")
            der = encode_dss_signature(int.from_bytes(value[:half], "big"), int.from_bytes(value[half:], "big"))
            key.verify(der, signed, ec.ECDSA(hash_cls()))
        else:
            raise SignatureInvalid("the signature method does not fit the signer's key type")
    except InvalidSignature:
        raise SignatureInvalid("the signature value does not verify with the signer's key") from None


def verify_raw_signature(cert: x509.Certificate, data: bytes, value: bytes) -> bool:
    """Does ``value`` (as SigningKey.raw_signature makes it, SHA-256) sign ``data`` with the certificate's key?"""
    key = cert.public_key()
    method = SignatureMethod.RSA_SHA256 if isinstance(key, rsa.RSAPublicKey) else SignatureMethod.ECDSA_SHA256
    try:
        _check_value(cert, method, value, data)
    except SignatureInvalid:
        return False
    return True


def _check_xades(props: etree._Element, signer: TrustedSigner, now: datetime) -> str | None:
    ssp = props.find(_q(XADES, "SignedSignatureProperties"))
    if ssp is None:
        raise SignatureInvalid("XAdES SignedSignatureProperties are missing")
    cert_refs = ssp.findall(f"{_q(XADES, 'SigningCertificate')}/{_q(XADES, 'Cert')}")
    if not cert_refs:
        raise SignatureInvalid("XAdES SigningCertificate is missing")
    der = signer.der
    matched = False
    for c in cert_refs:
        cd = _only(c, XADES, "CertDigest", "xades:CertDigest")
        alg = _only(cd, DS, "DigestMethod", "ds:DigestMethod").get("Algorithm")
        value = _b64(_only(cd, DS, "DigestValue", "ds:DigestValue"), "xades:CertDigest")
        matched = matched or hmac.compare_digest(Digest.of(alg).hash(der), value)
    if not matched:
        raise SignatureInvalid("XAdES SigningCertificate does not name the certificate that signed")
    st = ssp.find(_q(XADES, "SigningTime"))
    if st is None:
        return None
    try:
        when = datetime.fromisoformat("".join(st.itertext()).strip().replace("Z", "+00:00"))
    except ValueError:
        raise SignatureInvalid("XAdES SigningTime is not a date-time") from None
    if when.tzinfo is None:
        raise SignatureInvalid("XAdES SigningTime has no time zone")
    if when > now + CLOCK_SKEW:
        raise SignatureInvalid("XAdES SigningTime is in the future")
    return when.astimezone(UTC).isoformat()


# --- signing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningKey:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> SigningKey:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 3072:
                raise ValueError("the gateway's RSA signing key must have at least 3072 bits")
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
                raise ValueError("the gateway's ECDSA signing key must be on P-256, P-384 or P-521")
        else:
            raise ValueError("the gateway's signing key must be RSA or ECDSA")
        if spki_sha256(cert) != hashlib.sha256(key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest():
            raise ValueError("the signing certificate does not belong to the signing key")
        return cls(cert, key)

    @property
    def method(self) -> SignatureMethod:
        return SignatureMethod.RSA_SHA256 if isinstance(self.key, rsa.RSAPrivateKey) else SignatureMethod.ECDSA_SHA256

    def raw_signature(self, data: bytes) -> bytes:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
        size = (self.key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _slot(root: etree._Element) -> etree._Element:
    """Create ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/sig:UBLDocumentSignatures/
    sac:SignatureInformation as the root's first child (or a new UBLExtension in an existing one)."""
    exts = root.find(_q(EXT, "UBLExtensions"))
    if exts is None:
        exts = etree.Element(_q(EXT, "UBLExtensions"), nsmap={"ext": EXT})
        exts.tail = root.text
        root.insert(0, exts)
    ext = etree.SubElement(exts, _q(EXT, "UBLExtension"))
    content = etree.SubElement(ext, _q(EXT, "ExtensionContent"))
    docsigs = etree.SubElement(content, _q(SIG, "UBLDocumentSignatures"), nsmap={"sig": SIG, "sac": SAC, "sbc": SBC})
    info = etree.SubElement(docsigs, _q(SAC, "SignatureInformation"))
    return info


def sign(root: etree._Element, signer: SigningKey, now: datetime | None = None) -> etree._Element:
    """Add an enveloped XAdES-BES signature in the UBL extension slot; returns the ds:Signature."""
    if find_signatures(root):
        raise ValueError("the document is already signed")
    sig_id = f"signature-{uuid.uuid4()}"
    props_id = f"{sig_id}-signedprops"
    when = (now or datetime.now(UTC)).replace(microsecond=0)

    def d(tag: str) -> str:
        return _q(DS, tag)

    sig = etree.SubElement(_slot(root), d("Signature"), nsmap={"ds": DS}, Id=sig_id)
    si = etree.SubElement(sig, d("SignedInfo"))
    etree.SubElement(si, d("CanonicalizationMethod"), Algorithm=C14N.EXC.value[0])
    etree.SubElement(si, d("SignatureMethod"), Algorithm=signer.method.value[0])

    def reference(uri: str, transforms: list[str], type_: str | None = None) -> etree._Element:
        ref = etree.SubElement(si, d("Reference"), URI=uri)
        if type_:
            ref.set("Type", type_)
        tr = etree.SubElement(ref, d("Transforms"))
        for t in transforms:
            etree.SubElement(tr, d("Transform"), Algorithm=t)
        etree.SubElement(ref, d("DigestMethod"), Algorithm=Digest.SHA256.value[0])
        return etree.SubElement(ref, d("DigestValue"))

    doc_digest = reference("", [ENVELOPED, C14N.EXC.value[0]])
    props_digest = reference(f"#{props_id}", [C14N.EXC.value[0]], SIGNED_PROPERTIES_TYPE)
    value = etree.SubElement(sig, d("SignatureValue"))
    cert_der = signer.cert.public_bytes(serialization.Encoding.DER)
    x509data = etree.SubElement(etree.SubElement(sig, d("KeyInfo")), d("X509Data"))
    etree.SubElement(x509data, d("X509Certificate")).text = base64.b64encode(cert_der).decode()
    qp = etree.SubElement(etree.SubElement(sig, d("Object")), _q(XADES, "QualifyingProperties"),
                          nsmap={"xades": XADES}, Target=f"#{sig_id}")
    props = etree.SubElement(qp, _q(XADES, "SignedProperties"), Id=props_id)
    ssp = etree.SubElement(props, _q(XADES, "SignedSignatureProperties"))
    etree.SubElement(ssp, _q(XADES, "SigningTime")).text = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    cert_el = etree.SubElement(etree.SubElement(ssp, _q(XADES, "SigningCertificate")), _q(XADES, "Cert"))
    cd = etree.SubElement(cert_el, _q(XADES, "CertDigest"))
    etree.SubElement(cd, d("DigestMethod"), Algorithm=Digest.SHA256.value[0])
    etree.SubElement(cd, d("DigestValue")).text = base64.b64encode(hashlib.sha256(cert_der).digest()).decode()
    serial = etree.SubElement(cert_el, _q(XADES, "IssuerSerial"))
    etree.SubElement(serial, d("X509IssuerName")).text = signer.cert.issuer.rfc4514_string()
    etree.SubElement(serial, d("X509SerialNumber")).text = str(signer.cert.serial_number)

    props_digest.text = base64.b64encode(hashlib.sha256(_c14n(props, C14N.EXC)).digest()).decode()
    with _enveloped(root, sig) as doc:
        doc_digest.text = base64.b64encode(hashlib.sha256(_c14n(doc, C14N.EXC)).digest()).decode()
    value.text = base64.b64encode(signer.raw_signature(_c14n(si, C14N.EXC))).decode()
    return sig
