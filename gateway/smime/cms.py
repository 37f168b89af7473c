"""CMS (RFC 5652) for S/MIME: a strict decrypter and verifier, and the encrypter and signer to match.

Structures are parsed with asn1crypto; every cryptographic operation is a ``cryptography`` primitive
(cryptography has no CMS verifier, and its PKCS#7 decrypter knows only PKCS#1 v1.5 with CBC).  The
module is pure: bytes in, values out.  MIME framing and size limits are the caller's business.

::

    CmsRejected (gateway.errors.Rejected)   403  base; never raised itself
    ├── CmsMalformed (also errors.Malformed) 400  SMIME_MALFORMED           not CMS, missing/extra parts
    ├── CmsAlgorithmRefused                  403  SMIME_ALGORITHM_REFUSED   an algorithm off the allowlist
    ├── CmsWrongRecipient                    403  SMIME_WRONG_RECIPIENT     encrypted to another certificate
    ├── CmsDecryptionFailed                  403  SMIME_DECRYPTION_FAILED   one opaque error for every failure
    ├── CmsSignerCount                       403  SMIME_SIGNER_COUNT        not exactly one SignerInfo
    ├── CmsSignatureInvalid                  403  SMIME_SIGNATURE_INVALID   digest or signature mismatch
    └── CmsSignerCertInvalid                 403  SMIME_SIGNER_CERT_INVALID from check_signer()

The allowlists ("no SHA-1 anywhere"):

* key transport: RSAES-PKCS1-v1_5, RSAES-OAEP with SHA-1/256/384/512 and MGF1 with any of them (RFC 8017,
  RFC 4055): OAEP's security does not rest on its hash's collision resistance, and SHA-1 is its default,
  which ``openssl cms`` and most S/MIME and AS2 software send (NIST SP 800-131A allows SHA-1 outside
  signatures).  SHA-1 stays refused for every signature and digest;
* content encryption: AES-CBC only inside EnvelopedData, AES-GCM only inside AuthEnvelopedData
  (RFC 5083, RFC 5084, RFC 9709);
* digests: SHA-256/384/512; signatures: RSA PKCS#1 v1.5, RSASSA-PSS (SHA-2, MGF1-SHA-2), ECDSA on
  P-256/384/521; RSA keys of at least 2048 bits.

Algorithms are checked after parsing and before any key is unwrapped or any content hashed.  The
input is hostile: ``decrypt``, ``verify`` and ``content_type`` let nothing but ``CmsRejected`` out.
BER (indefinite lengths, chunked OCTET STRINGs) is accepted as RFC 5652 allows; trailing bytes are not.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

from ..errors import Detail, Malformed, Rejected

MIN_RSA_BITS = 2048  # keys below this are refused (project policy; NIST SP 800-131A)
CLOCK_SKEW = timedelta(minutes=5)  # a signingTime this far after the check time is still accepted
GCM_NONCE_BYTES = 12  # RFC 5084 §3.2 recommends 12; the only size we take
GCM_TAG_BYTES = (12, 16)  # RFC 5084 §3.2 allows 12..16 (icvLen; the default is 12)
MAX_PSS_SALT = 1024  # far above any real salt; bounds the integer before it reaches cryptography

ID_DATA = "1.2.840.113549.1.7.1"
SIGNED_DATA = "1.2.840.113549.1.7.2"
ENVELOPED_DATA = "1.2.840.113549.1.7.3"
AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"  # RFC 5083
STRUCTURES = {SIGNED_DATA: "signed-data", ENVELOPED_DATA: "enveloped-data", AUTH_ENVELOPED_DATA: "authenveloped-data"}

ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
ATTR_SIGNING_TIME = "1.2.840.113549.1.9.5"
ATTR_ALGORITHM_PROTECTION = "1.2.840.113549.1.9.52"  # RFC 6211

DIGESTS = {"2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512"}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
# RSAES-OAEP only (key transport): its hash and mask generation hash, never a digest or a signature.
OAEP_DIGESTS = DIGESTS | {"1.3.14.3.2.26": "sha1"}
_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = _HASHES | {"sha1": hashes.SHA1}

RSA_ENCRYPTION = "1.2.840.113549.1.1.1"  # rsaEncryption: PKCS#1 v1.5 for both key transport and signatures
RSAES_OAEP = "1.2.840.113549.1.1.7"
MGF1 = "1.2.840.113549.1.1.8"
P_SPECIFIED = "1.2.840.113549.1.1.9"
RSASSA_PSS = "1.2.840.113549.1.1.10"
RSA_PKCS1 = {"1.2.840.113549.1.1.11": "sha256", "1.2.840.113549.1.1.12": "sha384", "1.2.840.113549.1.1.13": "sha512"}
ECDSA = {"1.2.840.10045.4.3.2": "sha256", "1.2.840.10045.4.3.3": "sha384", "1.2.840.10045.4.3.4": "sha512"}
EC_PUBLIC_KEY = "1.2.840.10045.2.1"  # some senders name the key type and let digestAlgorithm give the hash
EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")

CBC = {"2.16.840.1.101.3.4.1.2": ("aes-128-cbc", 16), "2.16.840.1.101.3.4.1.22": ("aes-192-cbc", 24),
       "2.16.840.1.101.3.4.1.42": ("aes-256-cbc", 32)}
GCM = {"2.16.840.1.101.3.4.1.6": ("aes-128-gcm", 16), "2.16.840.1.101.3.4.1.26": ("aes-192-gcm", 24),
       "2.16.840.1.101.3.4.1.46": ("aes-256-gcm", 32)}

_NAMES = {
    ID_DATA: "data", SIGNED_DATA: "signed-data", ENVELOPED_DATA: "enveloped-data", AUTH_ENVELOPED_DATA: "authenveloped-data",
    "1.2.840.113549.1.7.6": "encrypted-data", "1.2.840.113549.1.9.16.1.2": "authenticated-data",
    "1.2.840.113549.1.9.16.1.9": "compressed-data", "1.2.840.113549.1.7.4": "signed-and-enveloped-data",
    "1.3.14.3.2.26": "SHA-1", "1.2.840.113549.2.5": "MD5", "1.2.840.113549.2.2": "MD2", "2.16.840.1.101.3.4.2.4": "SHA-224",
    "2.16.840.1.101.3.4.2.1": "SHA-256", "2.16.840.1.101.3.4.2.2": "SHA-384", "2.16.840.1.101.3.4.2.3": "SHA-512",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption", "1.2.840.113549.1.1.4": "md5WithRSAEncryption",
    "1.2.840.113549.1.1.14": "sha224WithRSAEncryption", "1.2.840.10045.4.1": "ecdsa-with-SHA1",
    "1.2.840.10045.4.3.1": "ecdsa-with-SHA224", "1.3.101.112": "Ed25519", "1.3.101.113": "Ed448",
    "1.2.840.10040.4.3": "dsa-with-SHA1", "2.16.840.1.101.3.4.3.2": "dsa-with-SHA256",
    "1.2.840.113549.3.7": "DES-EDE3-CBC", "1.3.14.3.2.7": "DES-CBC", "1.2.840.113549.3.2": "RC2-CBC",
    "1.2.840.113549.3.4": "RC4", "2.16.840.1.101.3.4.1.7": "AES-128-CCM", "2.16.840.1.101.3.4.1.27": "AES-192-CCM",
    "2.16.840.1.101.3.4.1.47": "AES-256-CCM", "1.2.840.113549.1.9.16.3.18": "ChaCha20-Poly1305",
    RSA_ENCRYPTION: "rsaEncryption (PKCS#1 v1.5)", RSAES_OAEP: "RSAES-OAEP", RSASSA_PSS: "RSASSA-PSS",
    **{oid: name.upper() for oid, (name, _) in (CBC | GCM).items()},
}

_CIPHER_ADVICE = "this gateway accepts AES-128/192/256 in CBC (EnvelopedData) or GCM (AuthEnvelopedData)"
_DIGEST_ADVICE = "this gateway accepts SHA-256, SHA-384 or SHA-512 (e.g. openssl cms -sign -md sha256)"
_SIGNATURE_ADVICE = ("this gateway accepts RSA PKCS#1 v1.5 or RSASSA-PSS with SHA-2, "
                     "or ECDSA with SHA-2 on P-256/P-384/P-521")


def _name(oid: str) -> str:
    return _NAMES.get(oid, oid)


# -- errors --------------------------------------------------------------------------------------------


class CmsRejected(Rejected):
    """Base of this module's errors: the sender must change the S/MIME message before resending."""

    code = "SMIME_REJECTED"
    http_status = 403

    def __init__(self, message: str, details: list[Detail] | None = None):
        super().__init__(message, details)


class CmsMalformed(CmsRejected, Malformed):
    """Not a CMS structure of the expected shape (not DER/BER, wrong type, missing or extra parts)."""

    code = "SMIME_MALFORMED"
    http_status = 400


class CmsAlgorithmRefused(CmsRejected):
    code = "SMIME_ALGORITHM_REFUSED"


class CmsWrongRecipient(CmsRejected):
    code = "SMIME_WRONG_RECIPIENT"


class CmsDecryptionFailed(CmsRejected):
    """Key unwrap, padding or authentication tag failed; deliberately does not say which (RFC 3218)."""

    code = "SMIME_DECRYPTION_FAILED"

    def __init__(self) -> None:
        super().__init__("the message could not be decrypted: it was damaged in transit or not encrypted "
                         "with this gateway's public key; encrypt it again to the gateway's current certificate")


class CmsSignerCount(CmsRejected):
    code = "SMIME_SIGNER_COUNT"


class CmsSignatureInvalid(CmsRejected):
    code = "SMIME_SIGNATURE_INVALID"


class CmsSignerCertInvalid(CmsRejected):
    code = "SMIME_SIGNER_CERT_INVALID"

    def __init__(self, reason: str):
        super().__init__(f"the signer's certificate is not acceptable: {reason}", [Detail(reason, path="SignerInfo.sid")])
        self.reason = reason


def _malformed(reason: str, path: str | None = None) -> NoReturn:
    raise CmsMalformed(f"the S/MIME message is not acceptable CMS: {reason}", [Detail(reason, path=path)])


def _refuse(reason: str, path: str) -> NoReturn:
    raise CmsAlgorithmRefused(reason, [Detail(reason, path=path)])


@contextmanager
def _parsing(path: str) -> Iterator[None]:
    """asn1crypto parses lazily and raises ValueError, TypeError, KeyError... on hostile bytes: translate."""
    try:
        yield
    except CmsRejected:
        raise
    except Exception as exc:  # the boundary: nothing foreign leaves this module
        _malformed(f"{path} cannot be parsed ({type(exc).__name__})", path)


# -- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decrypted:
    """The plaintext of an EnvelopedData/AuthEnvelopedData and the algorithms that protected it."""

    content: bytes = field(repr=False)
    structure: str  # "enveloped-data" | "authenveloped-data"
    key_transport: str  # "rsaes-pkcs1-v1_5" | "rsaes-oaep-<hash>", "-mgf1-<hash>" when MGF1's differs (sha1/256/384/512)
    cipher: str  # "aes-{128,192,256}-cbc" | "aes-{128,192,256}-gcm"


@dataclass(frozen=True, slots=True)
class Verified:
    """A SignedData whose signature is mathematically valid; whether the signer is trusted is check_signer()'s job."""

    content: bytes = field(repr=False)  # exactly the bytes the signature covers
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]  # every certificate the SignedData carries (chain candidates)
    digest: str  # "sha256" | "sha384" | "sha512"
    signature_algorithm: str  # "rsassa-pkcs1v15" | "rsassa-pss" | "ecdsa"
    signing_time: datetime | None  # the signingTime signed attribute (aware, UTC)


# -- small helpers -------------------------------------------------------------------------------------


class _GCMParameters(core.Sequence):  # type: ignore[misc]
    """RFC 5084 §3.2 (asn1crypto 1.5 does not define it)."""

    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


def _force(*values: Any) -> None:
    """Parse these lazily-loaded asn1crypto values completely, so that hostile bytes fail here, inside a guard.

    Only for small values (versions, algorithm identifiers): the native form of a Name costs about as
    much as all the RSA work of a message, so names are compared as received (:func:`_issued_by`)."""
    for value in values:
        _ = value.native


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _as_set_of(value: Any) -> bytes:
    """The [0]/[1] IMPLICIT attributes re-tagged as SET OF, from the bytes as received (RFC 5652 §5.4, RFC 5083 §2.2)."""
    contents: bytes = value.contents
    return b"\x31" + _der_length(len(contents)) + contents


def _load(der: bytes) -> Any:
    if not isinstance(der, bytes | bytearray | memoryview):
        _malformed("the message body is not bytes")
    with _parsing("ContentInfo"):
        info = cms.ContentInfo.load(bytes(der), strict=True)  # strict: trailing bytes are refused
        oid: str = info["content_type"].dotted
        if isinstance(info["content"], core.Void):
            _malformed("ContentInfo has no content", "ContentInfo.content")
    return info, oid


def _issued_by(name: Any, cert: x509.Certificate) -> bool:
    """Whether an issuer Name from the message is ``cert``'s issuer: the same DER, or failing that the
    same name under RFC 5280 §7.1 comparison (a sender may re-encode the strings)."""
    der = cert.issuer.public_bytes()
    return bool(name.dump() == der or name == asn1_x509.Name.load(der))


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, ValueError):
        return None


def _addresses(rid: Any, cert: x509.Certificate) -> bool:
    """Whether a RecipientIdentifier/SignerIdentifier names ``cert`` (issuerAndSerialNumber or subjectKeyIdentifier)."""
    if rid.name == "issuer_and_serial_number":
        ias = rid.chosen
        return bool(ias["serial_number"].native == cert.serial_number and _issued_by(ias["issuer"], cert))
    ski = _ski(cert)
    return ski is not None and hmac.compare_digest(rid.chosen.native, ski)


def _asn1_cert(cert: x509.Certificate) -> Any:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _digest_algorithm(name: str) -> Any:
    """A SHA-2 AlgorithmIdentifier with absent parameters, as RFC 5754 §2 says to generate."""
    oid = next(o for o, n in DIGESTS.items() if n == name)
    body = core.ObjectIdentifier(oid).dump()
    return algos.DigestAlgorithm.load(b"\x30" + _der_length(len(body)) + body)


def _hash(name: str) -> hashes.HashAlgorithm:
    return _HASHES[name]()


def _digest(name: str, data: bytes) -> bytes:
    h = hashes.Hash(_hash(name))
    h.update(data)
    return h.finalize()


def _subject(cert: x509.Certificate) -> str:
    return f"subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}, serial {cert.serial_number:X}"


# -- content_type --------------------------------------------------------------------------------------


def content_type(der: bytes) -> str:
    """Peek at the outer ContentInfo: "signed-data", "enveloped-data" or "authenveloped-data"."""
    _, oid = _load(der)
    if oid not in STRUCTURES:
        _malformed(f"the content is {_name(oid)}; expected signed-data, enveloped-data or authenveloped-data",
                   "ContentInfo.contentType")
    return STRUCTURES[oid]


# -- decrypt -------------------------------------------------------------------------------------------


def _require_rsa_key(key: object, what: str) -> None:
    if not isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        raise ValueError(f"{what} must be an RSA key (key agreement for EC recipients is not supported)")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{what} is RSA-{key.key_size}; at least RSA-{MIN_RSA_BITS} is required")


def _key_transport(alg: Any) -> tuple[str, padding.AsymmetricPadding]:
    """The recipient's keyEncryptionAlgorithm against the allowlist (RFC 8017, RFC 4055 §4)."""
    oid: str = alg["algorithm"].dotted
    path = "RecipientInfo.keyEncryptionAlgorithm"
    if oid == RSA_ENCRYPTION:
        return "rsaes-pkcs1-v1_5", padding.PKCS1v15()
    if oid != RSAES_OAEP:
        _refuse(f"the content key is transported with {_name(oid)}; this gateway accepts RSA (PKCS#1 v1.5 or OAEP "
                f"with SHA-256/384/512)", path)
    params = alg["parameters"]
    if isinstance(params, core.Void):
        params = algos.RSAESOAEPParams({})
    md: str = params["hash_algorithm"]["algorithm"].dotted
    mgf = params["mask_gen_algorithm"]
    mgf_md: str = mgf["parameters"]["algorithm"].dotted if mgf["algorithm"].dotted == MGF1 else ""
    if md not in OAEP_DIGESTS or mgf_md not in OAEP_DIGESTS:
        _refuse(f"the content key is transported with RSAES-OAEP using {_name(md)} and MGF1 with {_name(mgf_md or '?')}; "
                "this gateway accepts SHA-1, SHA-256, SHA-384 or SHA-512 for both", path)
    source = params["p_source_algorithm"]
    if source["algorithm"].dotted != P_SPECIFIED:
        _malformed("RSAES-OAEP pSourceAlgorithm must be id-pSpecified", path)
    label: bytes = source["parameters"].native
    name, mgf_name = OAEP_DIGESTS[md], OAEP_DIGESTS[mgf_md]
    scheme = padding.OAEP(padding.MGF1(_OAEP_HASHES[mgf_name]()), _OAEP_HASHES[name](), label or None)
    return f"rsaes-oaep-{name}" + (f"-mgf1-{mgf_name}" if mgf_name != name else ""), scheme


def _unwrap(key: rsa.RSAPrivateKey, encrypted_key: bytes, scheme: padding.AsymmetricPadding, size: int) -> bytes:
    if isinstance(scheme, padding.PKCS1v15):
        # RFC 3218 §2.3.2: on any failure carry on with a random key so the error surfaces later as a
        # failed decryption of the content, indistinguishable from a wrong key.
        fallback = os.urandom(size)
        try:
            cek = key.decrypt(encrypted_key, scheme)
        except Exception:  # deliberately swallowed: the Bleichenbacher countermeasure
            return fallback
        return cek if len(cek) == size else fallback
    try:
        cek = key.decrypt(encrypted_key, scheme)
    except Exception:
        raise CmsDecryptionFailed() from None
    if len(cek) != size:
        raise CmsDecryptionFailed()
    return cek


def decrypt(der: bytes, certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> Decrypted:
    """Open an EnvelopedData (AES-CBC) or AuthEnvelopedData (AES-GCM) addressed to ``certificate``.

    ``key`` must be the certificate's RSA key of at least 2048 bits (else ``ValueError``: configuration).
    """
    _require_rsa_key(key, "the gateway's decryption key")
    if certificate.public_key() != key.public_key():
        raise ValueError("the gateway's decryption key does not belong to its certificate")
    try:
        return _decrypt(der, certificate, key)
    except CmsRejected:
        raise
    except Exception as exc:  # the boundary: nothing foreign leaves decrypt()
        _malformed(f"the message cannot be parsed ({type(exc).__name__})")


def _decrypt(der: bytes, certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> Decrypted:
    info, oid = _load(der)
    if oid not in (ENVELOPED_DATA, AUTH_ENVELOPED_DATA):
        _malformed(f"expected an encrypted message (enveloped-data or authenveloped-data), got {_name(oid)}",
                   "ContentInfo.contentType")
    auth = oid == AUTH_ENVELOPED_DATA
    structure = STRUCTURES[oid]
    with _parsing(structure):
        body = info["content"]
        _force(body["version"])
        eci = body["auth_encrypted_content_info" if auth else "encrypted_content_info"]
        inner_type: str = eci["content_type"].dotted
        alg = eci["content_encryption_algorithm"]
        alg_oid: str = alg["algorithm"].dotted
        ciphertext: bytes | None = eci["encrypted_content"].native
        candidates, unsupported = [], set()
        for ri in body["recipient_infos"]:
            if ri.name == "ktri":
                _force(ri.chosen["version"])
                candidates.append(ri.chosen)
            else:
                unsupported.add(str(ri.name))
        mac: bytes = body["mac"].native if auth else b""
        aad = b"" if not auth or isinstance(body["auth_attrs"], core.Void) else _as_set_of(body["auth_attrs"])
        if auth and aad:
            _force(body["auth_attrs"])
    if inner_type != ID_DATA:
        _malformed(f"the encrypted content type is {_name(inner_type)}; expected data (a MIME entity)",
                   "EncryptedContentInfo.contentType")

    # 1. the content cipher (RFC 9709: CBC only in EnvelopedData, GCM only in AuthEnvelopedData)
    path = "EncryptedContentInfo.contentEncryptionAlgorithm"
    table = GCM if auth else CBC
    if alg_oid not in table:
        if alg_oid in CBC:
            _refuse(f"AuthEnvelopedData names {_name(alg_oid)}, which does not authenticate; use AES-GCM (RFC 5083/9709)", path)
        if alg_oid in GCM:
            _refuse(f"EnvelopedData names {_name(alg_oid)}; AES-GCM must be sent as AuthEnvelopedData (RFC 5084/9709)", path)
        _refuse(f"the content is encrypted with {_name(alg_oid)}; {_CIPHER_ADVICE}", path)
    cipher, size = table[alg_oid]
    with _parsing(path + ".parameters"):
        if auth:
            gcm = _GCMParameters.load(alg["parameters"].dump(), strict=True)
            iv: bytes = gcm["aes_nonce"].native
            tag_len: int = gcm["aes_icvlen"].native
        else:
            iv = alg["parameters"].native
            tag_len = 0
    if not isinstance(iv, bytes):
        _malformed("the cipher parameters carry no IV/nonce", path)
    if auth:
        if len(iv) != GCM_NONCE_BYTES or not GCM_TAG_BYTES[0] <= tag_len <= GCM_TAG_BYTES[1]:
            _refuse(f"AES-GCM with a {len(iv)}-byte nonce and a {tag_len}-byte tag is refused; use a 12-byte nonce "
                    f"and a 16-byte tag", path)
        if len(mac) != tag_len:
            _malformed(f"the authentication tag is {len(mac)} bytes, the parameters say {tag_len}", "AuthEnvelopedData.mac")
    elif len(iv) != 16:
        _malformed(f"the AES-CBC IV is {len(iv)} bytes; it must be 16", path)

    # 2. the recipient, then its key transport algorithm
    with _parsing("RecipientInfo.rid"):
        mine = [c for c in candidates if _addresses(c["rid"], certificate)]
    if not mine:
        details = [Detail(f"this gateway's certificate: {_subject(certificate)}", path="RecipientInfo.rid")]
        if unsupported:
            details.append(Detail(f"recipient types {', '.join(sorted(unsupported))} are not supported; this gateway "
                                  f"takes RSA key transport (ktri) only", path="RecipientInfo"))
        raise CmsWrongRecipient("the message was encrypted to another certificate, not to this gateway's; encrypt it "
                                "to the gateway's current S/MIME certificate", details)
    ktri = mine[0]
    with _parsing("RecipientInfo.keyEncryptionAlgorithm"):
        key_transport, scheme = _key_transport(ktri["key_encryption_algorithm"])
    if ciphertext is None:
        _malformed("the encrypted content is absent (detached ciphertext is not supported)", "EncryptedContentInfo")

    # 3. only now: cryptography
    cek = _unwrap(key, ktri["encrypted_key"].native, scheme, size)
    try:
        if auth:
            gcm_dec = Cipher(algorithms.AES(cek), modes.GCM(iv, mac, min_tag_length=GCM_TAG_BYTES[0])).decryptor()
            gcm_dec.authenticate_additional_data(aad)
            plain = gcm_dec.update(ciphertext) + gcm_dec.finalize()
        else:
            if not ciphertext or len(ciphertext) % 16:
                raise CmsDecryptionFailed()
            dec = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
            padded = dec.update(ciphertext) + dec.finalize()
            unpad = sym_padding.PKCS7(128).unpadder()
            plain = unpad.update(padded) + unpad.finalize()
    except (InvalidTag, ValueError):
        raise CmsDecryptionFailed() from None
    return Decrypted(plain, structure, key_transport, cipher)


# -- encrypt -------------------------------------------------------------------------------------------


def encrypt(content: bytes, recipient: x509.Certificate, *, cipher: str = "aes-256-gcm") -> bytes:
    """Encrypt ``content`` to ``recipient`` (RSA >= 2048): RSAES-OAEP-SHA256 key transport, AES-GCM in
    AuthEnvelopedData (default) or AES-CBC in EnvelopedData.  Returns a DER ContentInfo."""
    public = recipient.public_key()
    _require_rsa_key(public, "the recipient's certificate key")
    assert isinstance(public, rsa.RSAPublicKey)
    table = {name: (oid, size) for oid, (name, size) in (GCM | CBC).items()}
    if cipher not in table:
        raise ValueError(f"cipher {cipher!r} is not one of {sorted(table)}")
    alg_oid, size = table[cipher]
    auth = alg_oid in GCM
    cek = os.urandom(size)
    wrapped = public.encrypt(cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    parsed = _asn1_cert(recipient)
    ktri = cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": cms.RecipientIdentifier(name="issuer_and_serial_number", value=cms.IssuerAndSerialNumber({
            "issuer": parsed["tbs_certificate"]["issuer"].copy(),
            "serial_number": parsed["tbs_certificate"]["serial_number"].native})),
        "key_encryption_algorithm": cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": algos.RSAESOAEPParams({
            "hash_algorithm": _digest_algorithm("sha256"),
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": _digest_algorithm("sha256")}})}),
        "encrypted_key": wrapped,
    })
    iv = os.urandom(GCM_NONCE_BYTES if auth else 16)
    if auth:
        gcm_enc = Cipher(algorithms.AES(cek), modes.GCM(iv)).encryptor()
        ciphertext = gcm_enc.update(content) + gcm_enc.finalize()
        tag = gcm_enc.tag
        params: Any = _GCMParameters({"aes_nonce": iv, "aes_icvlen": 16})
    else:
        pad = sym_padding.PKCS7(128).padder()
        enc = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
        ciphertext = enc.update(pad.update(content) + pad.finalize()) + enc.finalize()
        params = core.OctetString(iv)
    eci = cms.EncryptedContentInfo({
        "content_type": "data",
        "content_encryption_algorithm": {"algorithm": alg_oid, "parameters": core.Any.load(params.dump())},
        "encrypted_content": ciphertext,
    })
    recipients = [cms.RecipientInfo(name="ktri", value=ktri)]
    if auth:
        body: Any = cms.AuthEnvelopedData({"version": "v0", "recipient_infos": recipients,
                                           "auth_encrypted_content_info": eci, "mac": tag})
        info = cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": body})
    else:
        body = cms.EnvelopedData({"version": "v0", "recipient_infos": recipients, "encrypted_content_info": eci})
        info = cms.ContentInfo({"content_type": "enveloped_data", "content": body})
    out: bytes = info.dump()
    return out


# -- verify --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scheme:
    name: str  # "rsassa-pkcs1v15" | "rsassa-pss" | "ecdsa"
    hash: str
    mgf_hash: str = ""
    salt_length: int = 0


def _signature_scheme(alg: Any, digest: str) -> _Scheme:
    """SignerInfo.signatureAlgorithm against the allowlist; the hash must be the digestAlgorithm (RFC 5754 §3)."""
    oid: str = alg["algorithm"].dotted
    path = "SignerInfo.signatureAlgorithm"
    if oid in (RSA_ENCRYPTION, EC_PUBLIC_KEY):
        return _Scheme("rsassa-pkcs1v15" if oid == RSA_ENCRYPTION else "ecdsa", digest)
    if oid in RSA_PKCS1 or oid in ECDSA:
        md = RSA_PKCS1.get(oid) or ECDSA[oid]
        if md != digest:
            _refuse(f"the signature algorithm {_name(oid)} uses {md.upper()} but the digest algorithm is {digest.upper()}; "
                    f"they must be the same", path)
        return _Scheme("rsassa-pkcs1v15" if oid in RSA_PKCS1 else "ecdsa", digest)
    if oid == RSASSA_PSS:
        params = alg["parameters"]
        if isinstance(params, core.Void):
            _refuse(f"RSASSA-PSS with default parameters uses SHA-1; {_SIGNATURE_ADVICE}", path)
        md_oid: str = params["hash_algorithm"]["algorithm"].dotted
        mgf = params["mask_gen_algorithm"]
        mgf_oid: str = mgf["parameters"]["algorithm"].dotted if mgf["algorithm"].dotted == MGF1 else ""
        if md_oid not in DIGESTS or mgf_oid not in DIGESTS:
            _refuse(f"RSASSA-PSS with {_name(md_oid)} and MGF1 with {_name(mgf_oid or '?')} is refused; "
                    f"SHA-256/384/512 are required for both", path)
        if DIGESTS[md_oid] != digest:
            _refuse(f"RSASSA-PSS uses {_name(md_oid)} but the digest algorithm is {digest.upper()}; they must be the same", path)
        salt: int = params["salt_length"].native
        if not 0 <= salt <= MAX_PSS_SALT or params["trailer_field"].native != "trailer_field_bc":
            _malformed("RSASSA-PSS parameters are out of range", path)
        return _Scheme("rsassa-pss", digest, DIGESTS[mgf_oid], salt)
    _refuse(f"the signature algorithm {_name(oid)} is refused; {_SIGNATURE_ADVICE}", path)


def _one_value(attrs: dict[str, list[Any]], oid: str, what: str, *, required: bool) -> Any:
    found = attrs.get(oid, [])
    if not found and not required:
        return None
    if len(found) != 1 or len(found[0]["values"]) != 1:
        _malformed(f"the signed attributes must contain exactly one {what} with one value", "SignerInfo.signedAttrs")
    return found[0]["values"][0]


def _load_certificates(sd: Any) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    seen: set[bytes] = set()
    if isinstance(sd["certificates"], core.Void):
        return out
    for choice in sd["certificates"]:
        if choice.name != "certificate":
            continue  # attribute certificates and "other" formats play no part here
        der: bytes = choice.chosen.dump()
        if der in seen:
            continue
        seen.add(der)
        try:
            cert = x509.load_der_x509_certificate(der)
        except Exception:  # noqa: S112 - a member nobody can parse can neither be the signer nor chain to anything
            continue
        out.append(cert)
    return out


def verify(der: bytes, detached: bytes | None = None) -> Verified:
    """Check a SignedData's one signature over id-data content: attached (eContent) or ``detached``.

    This proves the content is what the holder of ``Verified.signer``'s key signed; call
    ``check_signer`` to decide whether that certificate is trusted.
    """
    try:
        return _verify(der, detached)
    except CmsRejected:
        raise
    except Exception as exc:  # the boundary: nothing foreign leaves verify()
        _malformed(f"the message cannot be parsed ({type(exc).__name__})")


def _verify(der: bytes, detached: bytes | None) -> Verified:
    info, oid = _load(der)
    if oid != SIGNED_DATA:
        _malformed(f"expected a signed message (signed-data), got {_name(oid)}", "ContentInfo.contentType")
    with _parsing("SignedData"):
        sd = info["content"]
        _force(sd["version"])
        eci = sd["encap_content_info"]
        inner_type: str = eci["content_type"].dotted
        econtent = None if isinstance(eci["content"], core.Void) else eci["content"].native
        signer_infos = sd["signer_infos"]
        count = len(signer_infos)
        bag = _load_certificates(sd)
    if inner_type != ID_DATA:
        _malformed(f"the signed content type is {_name(inner_type)}; expected data (a MIME entity)",
                   "EncapsulatedContentInfo.eContentType")
    if econtent is not None and detached is not None:
        _malformed("the signature carries the content (eContent) and detached content was given as well", "eContent")
    if econtent is None and detached is None:
        _malformed("the signature is detached but no content was given to check it against", "eContent")
    if econtent is not None and not isinstance(econtent, bytes):
        _malformed("eContent is not an OCTET STRING", "eContent")
    content = bytes(detached) if detached is not None else econtent
    assert isinstance(content, bytes)
    if count != 1:
        raise CmsSignerCount(f"the message has {count} signatures (SignerInfos); this gateway accepts exactly one",
                             [Detail(f"{count} SignerInfos", path="SignedData.signerInfos")])

    with _parsing("SignerInfo"):
        si = signer_infos[0]
        _force(si["version"])
        sid = si["sid"]
        digest_oid: str = si["digest_algorithm"]["algorithm"].dotted
        _force(si["digest_algorithm"])
        sig_alg = si["signature_algorithm"]
        _force(sig_alg)
        signature: bytes = si["signature"].native
        raw_attrs = si["signed_attrs"]
        attrs: dict[str, list[Any]] = {}
        signed_bytes = b""
        if not isinstance(raw_attrs, core.Void):
            signed_bytes = _as_set_of(raw_attrs)
            for attr in raw_attrs:
                attrs.setdefault(attr["type"].dotted, []).append(attr)

    # 1. algorithms, before hashing anything
    if digest_oid not in DIGESTS:
        _refuse(f"the signature uses the digest {_name(digest_oid)}; {_DIGEST_ADVICE}", "SignerInfo.digestAlgorithm")
    digest = DIGESTS[digest_oid]
    with _parsing("SignerInfo.signatureAlgorithm"):
        scheme = _signature_scheme(sig_alg, digest)

    # 2. signed attributes (RFC 5652 §5.3, §11)
    if not signed_bytes:
        _malformed("the signature has no signed attributes; they are required (contentType, messageDigest)",
                   "SignerInfo.signedAttrs")
    with _parsing("SignerInfo.signedAttrs"):
        ctype = _one_value(attrs, ATTR_CONTENT_TYPE, "contentType", required=True)
        ctype_oid: str = ctype.dotted
        expected: bytes = _one_value(attrs, ATTR_MESSAGE_DIGEST, "messageDigest", required=True).native
        when = _one_value(attrs, ATTR_SIGNING_TIME, "signingTime", required=False)
        signing_time = None if when is None else when.native
        protection = _one_value(attrs, ATTR_ALGORITHM_PROTECTION, "CMSAlgorithmProtection", required=False)
        if protection is not None:
            _force(protection)
    if ctype_oid != ID_DATA:
        _malformed(f"the contentType attribute is {_name(ctype_oid)}; it must be data", "SignerInfo.signedAttrs")
    if not isinstance(expected, bytes):
        _malformed("the messageDigest attribute is not an OCTET STRING", "SignerInfo.signedAttrs")
    if signing_time is not None:
        if not isinstance(signing_time, datetime) or signing_time.tzinfo is None:
            _malformed("the signingTime attribute is not a valid time", "SignerInfo.signedAttrs")
        signing_time = signing_time.astimezone(UTC)
    if protection is not None:  # RFC 6211: the signed copy of the algorithms must match the unsigned ones
        same = protection["digest_algorithm"]["algorithm"].dotted == digest_oid and (
            isinstance(protection["signature_algorithm"], core.Void)
            or protection["signature_algorithm"]["algorithm"].dotted == sig_alg["algorithm"].dotted)
        if not same:
            raise CmsSignatureInvalid("the CMSAlgorithmProtection attribute does not match the algorithms used (RFC 6211)",
                                      [Detail("algorithm substitution", path="SignerInfo.signedAttrs")])

    # 3. the signer's certificate, from the message itself
    with _parsing("SignerInfo.sid"):
        matches = [cert for cert in bag if _addresses(sid, cert)]
    if not matches:
        _malformed("the signer's certificate must be included in the signature (SignedData.certificates)", "SignerInfo.sid")
    if len(matches) > 1:
        _malformed("more than one certificate matches the signer identifier", "SignerInfo.sid")
    signer = matches[0]
    try:
        public = signer.public_key()
    except Exception:  # an unsupported or broken key type
        _refuse(f"the signer's key type is not supported; {_SIGNATURE_ADVICE}", "SignerInfo.sid")
    if scheme.name.startswith("rsassa"):
        if not isinstance(public, rsa.RSAPublicKey):
            _refuse(f"the signature algorithm is RSA but the signer's key is not; {_SIGNATURE_ADVICE}", "SignerInfo.sid")
        if public.key_size < MIN_RSA_BITS:
            _refuse(f"the signer's key is RSA-{public.key_size}; at least RSA-{MIN_RSA_BITS} is required", "SignerInfo.sid")
    elif not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in EC_CURVES:
        _refuse(f"the signature algorithm is ECDSA but the signer's key is not on P-256/P-384/P-521; {_SIGNATURE_ADVICE}",
                "SignerInfo.sid")

    # 4. digest, then signature over the signed attributes as received
    if not hmac.compare_digest(_digest(digest, content), expected):
        raise CmsSignatureInvalid("the signed content was changed after signing: its digest does not match the "
                                  "messageDigest attribute", [Detail("messageDigest mismatch", path="SignerInfo.signedAttrs")])
    h = _hash(digest)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = padding.PKCS1v15() if scheme.name == "rsassa-pkcs1v15" else \
                padding.PSS(padding.MGF1(_hash(scheme.mgf_hash)), scheme.salt_length)
            public.verify(signature, signed_bytes, pad, h)
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(signature, signed_bytes, ec.ECDSA(h))
    except (InvalidSignature, ValueError, TypeError):
        raise CmsSignatureInvalid("the signature does not verify with the signer's certificate",
                                  [Detail("signature mismatch", path="SignerInfo.signature")]) from None
    return Verified(content, signer, tuple(bag), digest, scheme.name, signing_time)


# -- check_signer --------------------------------------------------------------------------------------


def _eku_email(_policy: object, _cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
    if ext is not None and ExtendedKeyUsageOID.EMAIL_PROTECTION not in ext:
        raise ValueError("lacks EKU emailProtection")


def _ca_eku(_policy: object, _cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
    """A CA that restricts its EKUs must allow emailProtection (or any)."""
    if ext is not None and not {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(ext):
        raise ValueError("CA EKUs exclude emailProtection")


def _ku_signing(_policy: object, _cert: x509.Certificate, ext: x509.KeyUsage) -> None:
    if not (ext.digital_signature or ext.content_commitment):
        raise ValueError("lacks KeyUsage digitalSignature")


def _leaf_checks(signer: x509.Certificate, signing_time: datetime | None, at: datetime) -> None:
    not_before, not_after = signer.not_valid_before_utc, signer.not_valid_after_utc
    if at < not_before:
        raise CmsSignerCertInvalid(f"it is not valid yet (valid from {not_before.isoformat()})")
    if at > not_after:
        raise CmsSignerCertInvalid(f"it expired on {not_after.isoformat()}")
    try:
        ku = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CmsSignerCertInvalid("it has no KeyUsage extension (digitalSignature is required)") from None
    if not (ku.digital_signature or ku.content_commitment):
        raise CmsSignerCertInvalid("its KeyUsage lacks digitalSignature (or nonRepudiation)")
    try:
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CmsSignerCertInvalid("it has no ExtendedKeyUsage extension (emailProtection is required)") from None
    if ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku:
        raise CmsSignerCertInvalid("it lacks EKU emailProtection (it is not an S/MIME certificate)")
    if signing_time is not None:
        if not not_before <= signing_time <= not_after:
            raise CmsSignerCertInvalid(f"the signingTime {signing_time.isoformat()} is outside the certificate's validity "
                                       f"({not_before.isoformat()} .. {not_after.isoformat()})")
        if signing_time > at + CLOCK_SKEW:
            raise CmsSignerCertInvalid(f"the signingTime {signing_time.isoformat()} is in the future")


# The web PKI end-entity profile, except: EKU emailProtection instead of the client verifier's clientAuth,
# KeyUsage for signing required, and the SAN optional (RFC 8550 §3 also allows the address in the
# subject DN; binding it to the From: address is the MIME layer's job).
_EE_POLICY = (ExtensionPolicy.webpki_defaults_ee()
              .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_email)
              .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _ku_signing)
              .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None))
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_eku)
CHAINS_REMEMBERED = 1024  # (leaf, roots) pairs whose chain was built


@dataclass(frozen=True, slots=True)
class _Chain:
    intermediates: tuple[x509.Certificate, ...]  # between the leaf and the root, as path building found them
    valid_from: datetime  # the period in which every certificate of the chain is valid
    valid_until: datetime


class _Chains:
    """Chains built before: (leaf, roots) -> the chain found and the period in which all of it is valid.

    Path building depends on the leaf, the roots, the certificates a message offers and the time, and
    on the time only through validity periods.  So a message whose certificates include the same
    intermediates, checked inside that period, has that same valid chain: it is accepted without
    building it again (a quarter of the CPU of opening a message).  Anything else (another root set,
    an intermediate missing, a time outside the period, a chain that failed) is built anew.  An entry
    holds the chain only, never the rest of what a message carried, so its size is bounded."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()  # the listener's stage threads share it
        self._chains: OrderedDict[tuple[object, ...], _Chain] = OrderedDict()

    def known(self, leaf: x509.Certificate, roots: tuple[x509.Certificate, ...], offered: Sequence[x509.Certificate],
              at: datetime) -> bool:
        with self._lock:
            chain = self._chains.get((leaf, roots))
            if chain is not None:
                self._chains.move_to_end((leaf, roots))
        return (chain is not None and chain.valid_from <= at <= chain.valid_until
                and all(c in offered for c in chain.intermediates))

    def add(self, leaf: x509.Certificate, roots: tuple[x509.Certificate, ...], chain: Sequence[x509.Certificate]) -> None:
        """``chain`` as the verifier returns it: the leaf, the intermediates, the root."""
        entry = _Chain(tuple(chain[1:-1]), max(c.not_valid_before_utc for c in chain),
                       min(c.not_valid_after_utc for c in chain))
        with self._lock:
            self._chains[(leaf, roots)] = entry
            self._chains.move_to_end((leaf, roots))
            while len(self._chains) > self._size:
                self._chains.popitem(last=False)


_CHAINS = _Chains(CHAINS_REMEMBERED)


def check_signer(verified: Verified, roots: Sequence[x509.Certificate], at: datetime) -> None:
    """Decide whether ``verified.signer`` is a trusted S/MIME signer at ``at`` (aware datetime).

    The leaf must be valid at ``at``, have KeyUsage digitalSignature (or nonRepudiation) and EKU
    emailProtection, and either be one of ``roots`` itself (a pinned, possibly self-signed certificate)
    or chain to one of them through the certificates the message carries.  Chains are built by
    ``cryptography.x509.verification`` (RFC 5280 with the CA/B Forum profile: SHA-1 signed certificates,
    RSA below 2048 bits and malformed CA certificates do not count), with the client verifier's
    clientAuth requirement replaced by emailProtection.
    """
    if at.tzinfo is None:
        raise ValueError("check_signer needs an aware datetime")
    at = at.astimezone(UTC)
    signer = verified.signer
    try:
        _leaf_checks(signer, verified.signing_time, at)
    except CmsRejected:
        raise
    except Exception as exc:  # broken extensions, say
        raise CmsSignerCertInvalid(f"its extensions cannot be read ({type(exc).__name__})") from None
    if any(root == signer for root in roots):
        return  # pinned: the leaf itself is the trust anchor, and the checks above are all there is
    if not roots:
        raise CmsSignerCertInvalid("it is not issued by a trusted CA (no trusted roots are configured for this partner)")
    intermediates = [c for c in verified.certificates if c != signer]
    anchors = tuple(roots)
    if _CHAINS.known(signer, anchors, intermediates, at):
        return
    try:
        verifier = (PolicyBuilder().store(Store(list(roots))).time(at)
                    .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY).build_client_verifier())
        chain = verifier.verify(signer, intermediates).chain
    except Exception as exc:  # VerificationError, UnsupportedGeneralNameType, ...
        reason = str(exc).split(" (encountered processing", 1)[0].removeprefix("validation failed: ")
        if "candidates exhausted" in reason:
            reason = "no chain to a trusted root through the certificates in the message"
        raise CmsSignerCertInvalid(f"it is not issued by a trusted CA ({reason})") from None
    _CHAINS.add(signer, anchors, chain)


# -- sign ----------------------------------------------------------------------------------------------


def sign(content: bytes, certificate: x509.Certificate, key: PrivateKeyTypes, *, detached: bool = True,
         chain: Sequence[x509.Certificate] = ()) -> bytes:
    """A DER ContentInfo(SignedData v1): SHA-256, sha256WithRSAEncryption or ecdsa-with-SHA256, signed
    attributes contentType, signingTime and messageDigest, the signer by issuerAndSerialNumber, and the
    certificates ``certificate`` + ``chain``.  ``detached`` leaves eContent out (multipart/signed)."""
    return _sign(content, certificate, key, detached=detached, chain=chain, signing_time=datetime.now(UTC))


def _sign(content: bytes, certificate: x509.Certificate, key: PrivateKeyTypes, *, detached: bool,
          chain: Sequence[x509.Certificate], signing_time: datetime) -> bytes:
    if certificate.public_key() != key.public_key():
        raise ValueError("the signing key does not belong to the certificate")
    if isinstance(key, rsa.RSAPrivateKey):
        _require_rsa_key(key, "the signing key")
        sig_alg = {"algorithm": "sha256_rsa"}
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in EC_CURVES:
        sig_alg = {"algorithm": "sha256_ecdsa"}
    else:
        raise ValueError("the signing key must be RSA (>= 2048 bits) or EC on P-256/P-384/P-521")
    when = signing_time.astimezone(UTC).replace(microsecond=0)
    time = cms.Time(name="utc_time" if 1950 <= when.year < 2050 else "generalized_time", value=when)  # RFC 5652 §11.3
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [time]}),
        cms.CMSAttribute({"type": "message_digest", "values": [_digest("sha256", content)]}),
    ])
    to_sign: bytes = attrs.dump()  # a DER SET OF: asn1crypto sorts the members
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(to_sign, ec.ECDSA(hashes.SHA256()))
    parsed = _asn1_cert(certificate)
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier(name="issuer_and_serial_number", value=cms.IssuerAndSerialNumber({
            "issuer": parsed["tbs_certificate"]["issuer"].copy(),
            "serial_number": parsed["tbs_certificate"]["serial_number"].native})),
        "digest_algorithm": _digest_algorithm("sha256"),
        "signed_attrs": attrs,
        "signature_algorithm": sig_alg,
        "signature": signature,
    })
    encap: dict[str, Any] = {"content_type": "data"}
    if not detached:
        encap["content"] = content
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [_digest_algorithm("sha256")],
        "encap_content_info": encap,
        "certificates": [parsed] + [_asn1_cert(c) for c in chain],
        "signer_infos": [signer_info],
    })
    out: bytes = cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()
    return out
