"""gateway.smime.cms against a real, independent peer: the ``openssl cms`` command line.

Certificates are made at test time with gateway.devpki (once per module: RSA key generation is
slow).  Messages built by openssl must decrypt and verify here; messages built here must decrypt
and verify with openssl; every refusal has its stable code; hostile bytes raise only CmsRejected.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import devpki
from gateway.errors import Malformed, Rejected
from gateway.smime import cms

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command line is the interop peer")

CONTENT = b"Content-Type: application/xml\r\n\r\n<Invoice>4711</Invoice>\r\n"
NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Party:
    cert: x509.Certificate
    key: PrivateKeyTypes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: x509.Certificate
    ca_path: Path
    other_ca: x509.Certificate
    gw: Party
    other: Party
    rsa: Party
    ec: Party
    weak: Party
    expired: Party
    not_yet: Party
    foreign: Party
    client: Party
    pinned: Party
    keyid: Party


def _party(issued: devpki.Issued) -> Party:
    return Party(x509.load_pem_x509_certificate(issued.cert.read_bytes()),
                 serialization.load_pem_private_key(issued.key.read_bytes(), None), issued.cert, issued.key)


def _with_ski(ca: devpki.Issued, folder: Path) -> Party:
    """devpki leaves have no SubjectKeyIdentifier, which ``openssl cms -keyid`` needs."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyid")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write(folder, "keyid", cert, key)


def _write(folder: Path, name: str, cert: x509.Certificate, key: PrivateKeyTypes) -> Party:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Party(cert, key, cert_path, key_path)


def _self_signed(folder: Path) -> Party:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinned supplier")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .sign(key, hashes.SHA256()))
    return _write(folder, "pinned", cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = devpki.make_ca(d)
    other_ca = devpki.make_ca(d / "other", name="OtherCA", cn="some other CA")
    mail = ("billing@supplier.example",)

    def smime(name: str, key_kind: str = "ec", not_before: datetime | None = None, not_after: datetime | None = None) -> Party:
        return _party(devpki.issue(ca, d, name, role="smime", emails=mail, key_kind=key_kind,
                                   not_before=not_before, not_after=not_after))

    return Pki(
        folder=d, ca=x509.load_pem_x509_certificate(ca.cert.read_bytes()), ca_path=ca.cert,
        other_ca=x509.load_pem_x509_certificate(other_ca.cert.read_bytes()),
        gw=_party(devpki.issue(ca, d, "gw", role="smime", emails=("einvoice@gateway.example",), key_kind="rsa2048")),
        other=smime("other", "rsa2048"),
        rsa=smime("supplier-rsa", "rsa2048"),
        ec=smime("supplier-ec"),
        weak=smime("supplier-weak", "rsa1024"),
        expired=smime("expired", not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=1)),
        not_yet=smime("not-yet", not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=400)),
        foreign=_party(devpki.issue(other_ca, d, "foreign", role="smime", emails=mail)),
        client=_party(devpki.issue(ca, d, "client", role="client")),
        pinned=_self_signed(d),
        keyid=_with_ski(ca, d),
    )


def openssl(*args: str | Path, data: bytes | None = None) -> bytes:
    result = subprocess.run(["openssl", "cms", *map(str, args)], input=data, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def ossl_sign(*signers: Party, args: tuple[str, ...] = ("-md", "sha256"), detached: bool = False,
              content: bytes = CONTENT) -> bytes:
    who: list[str | Path] = []
    for s in signers:
        who += ["-signer", s.cert_path, "-inkey", s.key_path]
    return openssl("-sign", "-binary", "-outform", "DER", *([] if detached else ["-nodetach"]), *who, *args, data=content)


def ossl_encrypt(to: Party, *args: str, content: bytes = CONTENT) -> bytes:
    """``args`` follow ``-recip``, so that ``-keyopt`` applies to this recipient."""
    return openssl("-encrypt", "-binary", "-outform", "DER", "-recip", to.cert_path, *args, data=content)


def rejects(code: str, fn: Callable[[], object]) -> cms.CmsRejected:
    with pytest.raises(cms.CmsRejected) as info:
        fn()
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def decrypt(pki: Pki, der: bytes) -> cms.Decrypted:
    assert isinstance(pki.gw.key, rsa.RSAPrivateKey)
    return cms.decrypt(der, pki.gw.cert, pki.gw.key)


def flip(der: bytes, offset: int) -> bytes:
    return der[:offset] + bytes([der[offset] ^ 0x01]) + der[offset + 1:]


# -- the error tree ------------------------------------------------------------------------------------


def test_error_codes_and_statuses() -> None:
    expected = {cms.CmsMalformed: ("SMIME_MALFORMED", 400), cms.CmsAlgorithmRefused: ("SMIME_ALGORITHM_REFUSED", 403),
                cms.CmsWrongRecipient: ("SMIME_WRONG_RECIPIENT", 403), cms.CmsDecryptionFailed: ("SMIME_DECRYPTION_FAILED", 403),
                cms.CmsSignerCount: ("SMIME_SIGNER_COUNT", 403), cms.CmsSignatureInvalid: ("SMIME_SIGNATURE_INVALID", 403),
                cms.CmsSignerCertInvalid: ("SMIME_SIGNER_CERT_INVALID", 403)}
    for cls, (code, status) in expected.items():
        assert issubclass(cls, cms.CmsRejected) and issubclass(cls, Rejected)
        assert (cls.code, cls.http_status) == (code, status)
    assert issubclass(cms.CmsMalformed, Malformed)
    assert cms.CmsRejected.http_status == 403


# -- openssl-built messages are accepted ---------------------------------------------------------------


@pytest.mark.parametrize(("signer", "args", "digest", "algorithm"), [
    ("rsa", ("-md", "sha256"), "sha256", "rsassa-pkcs1v15"),
    ("rsa", ("-md", "sha384"), "sha384", "rsassa-pkcs1v15"),
    ("rsa", ("-md", "sha512"), "sha512", "rsassa-pkcs1v15"),
    ("rsa", ("-md", "sha256", "-keyopt", "rsa_padding_mode:pss"), "sha256", "rsassa-pss"),
    ("rsa", ("-md", "sha512", "-keyopt", "rsa_padding_mode:pss", "-keyopt", "rsa_pss_saltlen:32"), "sha512", "rsassa-pss"),
    ("ec", ("-md", "sha256"), "sha256", "ecdsa"),
    ("ec", ("-md", "sha384"), "sha384", "ecdsa"),
])
def test_openssl_attached_signature_verifies(pki: Pki, signer: str, args: tuple[str, ...], digest: str, algorithm: str) -> None:
    party: Party = getattr(pki, signer)
    v = cms.verify(ossl_sign(party, args=args))
    assert v.content == CONTENT
    assert v.signer == party.cert and party.cert in v.certificates
    assert (v.digest, v.signature_algorithm) == (digest, algorithm)
    assert v.signing_time is not None and abs(v.signing_time - datetime.now(UTC)) < timedelta(minutes=5)
    assert v.signing_time.tzinfo is not None
    cms.check_signer(v, [pki.ca], datetime.now(UTC))


def test_openssl_detached_signature_verifies(pki: Pki) -> None:
    der = ossl_sign(pki.rsa, detached=True)
    v = cms.verify(der, CONTENT)
    assert v.content == CONTENT
    rejects("SMIME_SIGNATURE_INVALID", lambda: cms.verify(der, CONTENT + b" "))
    rejects("SMIME_MALFORMED", lambda: cms.verify(der))  # neither eContent nor detached content


def test_openssl_streamed_ber_signature_verifies(pki: Pki) -> None:
    der = ossl_sign(pki.ec, args=("-md", "sha256", "-stream"))
    assert der[1] == 0x80  # indefinite length: BER, as S/MIME clients send it
    assert cms.verify(der).content == CONTENT


@pytest.mark.parametrize(("args", "structure", "transport", "cipher"), [
    (("-aes256",), "enveloped-data", "rsaes-pkcs1-v1_5", "aes-256-cbc"),
    (("-aes128",), "enveloped-data", "rsaes-pkcs1-v1_5", "aes-128-cbc"),
    (("-aes192",), "enveloped-data", "rsaes-pkcs1-v1_5", "aes-192-cbc"),
    (("-aes-256-gcm",), "authenveloped-data", "rsaes-pkcs1-v1_5", "aes-256-gcm"),
    (("-aes-128-gcm",), "authenveloped-data", "rsaes-pkcs1-v1_5", "aes-128-gcm"),
    (("-aes256", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256", "-keyopt", "rsa_mgf1_md:sha256"),
     "enveloped-data", "rsaes-oaep-sha256", "aes-256-cbc"),
    (("-aes-256-gcm", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha512", "-keyopt", "rsa_mgf1_md:sha512"),
     "authenveloped-data", "rsaes-oaep-sha512", "aes-256-gcm"),
    # OAEP as openssl cms and most S/MIME and AS2 software send it: SHA-1 for both hashes (its defaults),
    # or SHA-256 with MGF1-SHA-1 (as Java's OAEPWithSHA-256AndMGF1Padding).
    (("-aes256", "-keyopt", "rsa_padding_mode:oaep"), "enveloped-data", "rsaes-oaep-sha1", "aes-256-cbc"),
    (("-aes-256-gcm", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256", "-keyopt", "rsa_mgf1_md:sha1"),
     "authenveloped-data", "rsaes-oaep-sha256-mgf1-sha1", "aes-256-gcm"),
    (("-aes-256-gcm", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha1", "-keyopt", "rsa_mgf1_md:sha384"),
     "authenveloped-data", "rsaes-oaep-sha1-mgf1-sha384", "aes-256-gcm"),
    (("-aes-256-gcm", "-stream"), "authenveloped-data", "rsaes-pkcs1-v1_5", "aes-256-gcm"),
    (("-aes256", "-stream"), "enveloped-data", "rsaes-pkcs1-v1_5", "aes-256-cbc"),
])
def test_openssl_encrypted_message_decrypts(pki: Pki, args: tuple[str, ...], structure: str, transport: str, cipher: str) -> None:
    der = ossl_encrypt(pki.gw, *args)
    assert cms.content_type(der) == structure
    out = decrypt(pki, der)
    assert (out.content, out.structure, out.key_transport, out.cipher) == (CONTENT, structure, transport, cipher)
    assert "Invoice" not in repr(out)


def test_openssl_signed_then_encrypted(pki: Pki) -> None:
    signed = ossl_sign(pki.ec)
    out = decrypt(pki, ossl_encrypt(pki.gw, "-aes-256-gcm", content=signed))
    assert cms.content_type(out.content) == "signed-data"
    assert cms.verify(out.content).content == CONTENT


def test_several_recipients_find_ours(pki: Pki) -> None:
    der = openssl("-encrypt", "-binary", "-outform", "DER", "-aes256", "-recip", pki.other.cert_path,
                  "-recip", pki.gw.cert_path, data=CONTENT)
    assert decrypt(pki, der).content == CONTENT


def test_subject_key_identifiers(pki: Pki) -> None:
    """``-keyid``: the recipient and the signer named by subjectKeyIdentifier instead of issuer and serial."""
    key = pki.keyid.key
    assert isinstance(key, rsa.RSAPrivateKey)
    for cipher in ("-aes256", "-aes-128-gcm"):
        der = ossl_encrypt(pki.keyid, cipher, "-keyid")
        assert cms.decrypt(der, pki.keyid.cert, key).content == CONTENT
    v = cms.verify(ossl_sign(pki.keyid, args=("-md", "sha256", "-keyid")))
    assert v.signer == pki.keyid.cert
    cms.check_signer(v, [pki.ca], datetime.now(UTC))
    rejects("SMIME_WRONG_RECIPIENT", lambda: decrypt(pki, ossl_encrypt(pki.keyid, "-aes256", "-keyid")))


def _renamed_issuer(der: bytes, where: Callable[[asn1_cms.ContentInfo], asn1_cms.IssuerAndSerialNumber],
                    rename: Callable[[dict[str, str]], dict[str, str]], printable: bool) -> bytes:
    """``der`` with the issuer of its recipient or signer identifier re-encoded from its native form
    (the identifiers are not covered by any signature or tag, so the message stays valid)."""
    info = asn1_cms.ContentInfo.load(der)
    ias = where(info)
    before = ias["issuer"].dump()
    ias["issuer"] = asn1_x509.Name.build(rename(dict(ias["issuer"].native)), use_printable=printable)
    assert ias["issuer"].dump() != before
    out: bytes = info.dump(force=True)
    return out


def test_an_issuer_name_is_matched_as_a_name_not_only_as_bytes(pki: Pki) -> None:
    """RFC 5280 §7.1: an identifier whose issuer a sender re-encoded (PrintableString for UTF8String,
    other case) still names the certificate; another name does not."""
    def recipient(info: asn1_cms.ContentInfo) -> asn1_cms.IssuerAndSerialNumber:
        return info["content"]["recipient_infos"][0].chosen["rid"].chosen

    def signer(info: asn1_cms.ContentInfo) -> asn1_cms.IssuerAndSerialNumber:
        return info["content"]["signer_infos"][0]["sid"].chosen

    same_name = (lambda n: n, True)
    other_case = (lambda n: {k: v.upper() for k, v in n.items()}, False)
    another = (lambda n: {**n, "common_name": n["common_name"] + " 2"}, False)
    encrypted, signed = ossl_encrypt(pki.gw, "-aes-256-gcm"), ossl_sign(pki.rsa)
    for rename, printable in (same_name, other_case):
        assert decrypt(pki, _renamed_issuer(encrypted, recipient, rename, printable)).content == CONTENT
        assert cms.verify(_renamed_issuer(signed, signer, rename, printable)).signer == pki.rsa.cert
    rejects("SMIME_WRONG_RECIPIENT", lambda: decrypt(pki, _renamed_issuer(encrypted, recipient, *another)))
    err = rejects("SMIME_MALFORMED", lambda: cms.verify(_renamed_issuer(signed, signer, *another)))
    assert "signer's certificate must be included" in err.message


def test_authenveloped_data_authenticates_its_auth_attrs(pki: Pki) -> None:
    """RFC 5083 §2.1: authAttrs, DER-encoded as a SET OF, are the GCM additional data."""
    cek, nonce = os.urandom(32), os.urandom(12)
    attrs = asn1_cms.CMSAttributes([asn1_cms.CMSAttribute({"type": "content_type", "values": ["data"]})])
    sealed = AESGCM(cek).encrypt(nonce, CONTENT, attrs.dump())
    public = pki.gw.cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)

    def build(auth_attrs: asn1_cms.CMSAttributes) -> bytes:
        info = asn1_cms.ContentInfo.load(cms.encrypt(b"template", pki.gw.cert))
        body = info["content"]
        body["recipient_infos"][0].chosen["encrypted_key"] = public.encrypt(
            cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        eci = body["auth_encrypted_content_info"]
        eci["content_encryption_algorithm"]["parameters"] = asn1_core.Any.load(b"\x30\x11\x04\x0c" + nonce + b"\x02\x01\x10")
        eci["encrypted_content"] = sealed[:-16]
        body["auth_attrs"] = auth_attrs
        body["mac"] = sealed[-16:]
        out: bytes = info.dump(force=True)
        return out

    assert decrypt(pki, build(attrs)).content == CONTENT
    other = asn1_cms.CMSAttributes([asn1_cms.CMSAttribute({"type": "content_type", "values": ["signed_data"]})])
    rejects("SMIME_DECRYPTION_FAILED", lambda: decrypt(pki, build(other)))


# -- refusals ------------------------------------------------------------------------------------------


def test_des3_is_refused(pki: Pki) -> None:
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: decrypt(pki, ossl_encrypt(pki.gw, "-des3")))
    assert "DES-EDE3-CBC" in err.message and "AES" in err.message


@pytest.mark.parametrize(("md", "mgf1"), [("md5", "sha256"), ("sha256", "md5"), ("sha224", "sha224")])
def test_oaep_with_a_hash_outside_sha1_and_sha2_is_refused(pki: Pki, md: str, mgf1: str) -> None:
    der = ossl_encrypt(pki.gw, "-aes256", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", f"rsa_oaep_md:{md}",
                       "-keyopt", f"rsa_mgf1_md:{mgf1}")
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: decrypt(pki, der))
    assert err.message.endswith("this gateway accepts SHA-1, SHA-256, SHA-384 or SHA-512 for both"), err.message


def test_sha1_accepted_for_oaep_stays_refused_for_signatures(pki: Pki) -> None:
    """The one place SHA-1 is allowed is OAEP's hashes: a SHA-1 signature under OAEP-SHA-1 encryption is refused."""
    signed = openssl("-sign", "-binary", "-nodetach", "-outform", "DER", "-md", "sha1", "-signer", pki.rsa.cert_path,
                     "-inkey", pki.rsa.key_path, data=CONTENT)
    opened = decrypt(pki, ossl_encrypt(pki.gw, "-aes256", "-keyopt", "rsa_padding_mode:oaep", content=signed))
    assert opened.key_transport == "rsaes-oaep-sha1"
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: cms.verify(opened.content))
    assert "SHA-256" in err.message


@pytest.mark.parametrize("md", ["sha1", "md5", "sha224"])
def test_weak_digests_are_refused(pki: Pki, md: str) -> None:
    result = subprocess.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-outform", "DER", "-md", md,
                             "-signer", str(pki.rsa.cert_path), "-inkey", str(pki.rsa.key_path)],
                            input=CONTENT, capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"this openssl cannot sign with {md}: {result.stderr[-200:]!r}")
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: cms.verify(result.stdout))
    assert "SHA-256" in err.message


def test_rsa_1024_signer_is_refused(pki: Pki) -> None:
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: cms.verify(ossl_sign(pki.weak)))
    assert "RSA-1024" in err.message


def test_encrypted_to_someone_else(pki: Pki) -> None:
    err = rejects("SMIME_WRONG_RECIPIENT", lambda: decrypt(pki, ossl_encrypt(pki.other, "-aes-256-gcm")))
    assert "another certificate" in err.message
    assert f"{pki.gw.cert.serial_number:X}" in err.details[0].message and "CN=gw" in err.details[0].message


def _ciphertext_offset(der: bytes) -> tuple[int, int]:
    info = asn1_cms.ContentInfo.load(der)
    body = info["content"]
    field = "auth_encrypted_content_info" if info["content_type"].native == "authenticated_enveloped_data" \
        else "encrypted_content_info"
    ct = body[field]["encrypted_content"].native
    return der.index(ct), len(ct)


def test_flipped_gcm_ciphertext_fails(pki: Pki) -> None:
    der = ossl_encrypt(pki.gw, "-aes-256-gcm")
    start, length = _ciphertext_offset(der)
    for offset in (start, start + length // 2, start + length - 1):
        rejects("SMIME_DECRYPTION_FAILED", lambda o=offset: decrypt(pki, flip(der, o)))  # type: ignore[misc]
    rejects("SMIME_DECRYPTION_FAILED", lambda: decrypt(pki, flip(der, len(der) - 1)))  # the tag


def test_flipped_cbc_ciphertext_fails_or_breaks_the_signature(pki: Pki) -> None:
    """CBC is not authenticated: a flipped byte either breaks the padding or yields garbage that the
    signature inside (or, for a flip in the unsigned certificate bag, the chain check) refuses."""
    signed = ossl_sign(pki.rsa)
    der = ossl_encrypt(pki.gw, "-aes256", content=signed)
    start, length = _ciphertext_offset(der)
    target = start + signed.index(b"4711") - 16  # flips one bit of "4711", garbles the block before it
    for offset in (target, start + length // 2, start + length - 1):
        try:
            out = decrypt(pki, flip(der, offset))
        except cms.CmsDecryptionFailed:
            continue
        assert out.content != signed
        with pytest.raises(cms.CmsRejected):
            v = cms.verify(out.content)
            assert offset != target, "a bit flip in the signed content went unnoticed"
            cms.check_signer(v, [pki.ca], datetime.now(UTC))


def test_decryption_failures_are_opaque(pki: Pki) -> None:
    """A broken PKCS#1 v1.5 key block and a broken ciphertext give the same error and message (RFC 3218)."""
    der = ossl_encrypt(pki.gw, "-aes-256-gcm")
    ek = asn1_cms.ContentInfo.load(der)["content"]["recipient_infos"][0].chosen["encrypted_key"].native
    bad_key = flip(der, der.index(ek) + 5)
    start, _ = _ciphertext_offset(der)
    a = rejects("SMIME_DECRYPTION_FAILED", lambda: decrypt(pki, bad_key))
    b = rejects("SMIME_DECRYPTION_FAILED", lambda: decrypt(pki, flip(der, start)))
    assert (a.message, a.details) == (b.message, b.details)


def test_changed_signed_content(pki: Pki) -> None:
    der = ossl_sign(pki.rsa)
    at = der.index(b"4711")
    err = rejects("SMIME_SIGNATURE_INVALID", lambda: cms.verify(flip(der, at)))
    assert "messageDigest" in err.message


def test_changed_signature_value(pki: Pki) -> None:
    der = ossl_sign(pki.ec, args=("-md", "sha256", "-nocerts"))  # no bag: the signature is the DER's tail
    rejects("SMIME_MALFORMED", lambda: cms.verify(der))  # and the signer's certificate is missing
    der = ossl_sign(pki.rsa)
    rejects("SMIME_SIGNATURE_INVALID", lambda: cms.verify(flip(der, len(der) - 3)))


def test_two_signers(pki: Pki) -> None:
    err = rejects("SMIME_SIGNER_COUNT", lambda: cms.verify(ossl_sign(pki.rsa, pki.ec)))
    assert "exactly one" in err.message


def test_no_signed_attributes(pki: Pki) -> None:
    err = rejects("SMIME_MALFORMED", lambda: cms.verify(ossl_sign(pki.rsa, args=("-md", "sha256", "-noattr"))))
    assert "signed attributes" in err.message


def test_econtent_and_detached_content(pki: Pki) -> None:
    err = rejects("SMIME_MALFORMED", lambda: cms.verify(ossl_sign(pki.rsa), CONTENT))
    assert "detached" in err.message


def _swap_cipher(der: bytes, structure: str, field: str, oid: str, parameters: object) -> bytes:
    info = asn1_cms.ContentInfo.load(der)
    alg = info["content"][field]["content_encryption_algorithm"]
    alg["algorithm"] = oid
    alg["parameters"] = parameters
    out: bytes = info.dump(force=True)
    assert cms.content_type(out) == structure
    return out


def test_authenveloped_data_naming_cbc_is_refused(pki: Pki) -> None:
    der = _swap_cipher(ossl_encrypt(pki.gw, "-aes-256-gcm"), "authenveloped-data", "auth_encrypted_content_info",
                       "2.16.840.1.101.3.4.1.42", asn1_core.OctetString(b"\x00" * 16))
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: decrypt(pki, der))
    assert "AES-256-CBC" in err.message


def test_enveloped_data_naming_gcm_is_refused(pki: Pki) -> None:
    der = _swap_cipher(ossl_encrypt(pki.gw, "-aes256"), "enveloped-data", "encrypted_content_info",
                       "2.16.840.1.101.3.4.1.46", asn1_core.OctetString(b"\x00" * 12))
    err = rejects("SMIME_ALGORITHM_REFUSED", lambda: decrypt(pki, der))
    assert "AuthEnvelopedData" in err.message


def test_detached_ciphertext_is_refused(pki: Pki) -> None:
    info = asn1_cms.ContentInfo.load(cms.encrypt(CONTENT, pki.gw.cert, cipher="aes-128-cbc"))
    del info["content"]["encrypted_content_info"]["encrypted_content"]
    err = rejects("SMIME_MALFORMED", lambda: decrypt(pki, info.dump(force=True)))
    assert "absent" in err.message


def _resigned(pki: Pki, edit: Callable[[list[asn1_cms.CMSAttribute]], list[asn1_cms.CMSAttribute]]) -> bytes:
    """Our own signature with edited signed attributes, validly re-signed: only the structure rules can object."""
    info = asn1_cms.ContentInfo.load(cms.sign(CONTENT, pki.ec.cert, pki.ec.key, detached=False))
    si = info["content"]["signer_infos"][0]
    attrs = asn1_cms.CMSAttributes(edit([asn1_cms.CMSAttribute.load(a.dump()) for a in si["signed_attrs"]]))
    key = pki.ec.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    si["signed_attrs"] = attrs
    si["signature"] = key.sign(attrs.dump(), ec.ECDSA(hashes.SHA256()))
    out: bytes = info.dump(force=True)
    return out


def _attr(kind: str, value: object) -> asn1_cms.CMSAttribute:
    return asn1_cms.CMSAttribute({"type": kind, "values": [value]})


def test_signed_attribute_rules(pki: Pki) -> None:
    assert cms.verify(_resigned(pki, lambda a: a)).content == CONTENT  # the re-signing itself is sound

    def without(kind: str) -> Callable[[list[asn1_cms.CMSAttribute]], list[asn1_cms.CMSAttribute]]:
        return lambda attrs: [a for a in attrs if a["type"].native != kind]

    rejects("SMIME_MALFORMED", lambda: cms.verify(_resigned(pki, without("message_digest"))))
    rejects("SMIME_MALFORMED", lambda: cms.verify(_resigned(pki, without("content_type"))))
    v = cms.verify(_resigned(pki, without("signing_time")))  # optional
    assert v.signing_time is None
    rejects("SMIME_MALFORMED", lambda: cms.verify(_resigned(pki, lambda a: [*a, _attr("signing_time", asn1_cms.Time(
        name="utc_time", value=NOW))])))
    rejects("SMIME_MALFORMED", lambda: cms.verify(_resigned(pki, lambda a: [*without("content_type")(a), _attr(
        "content_type", "signed_data")])))
    protection = {"digest_algorithm": {"algorithm": "sha256"}, "signature_algorithm": {"algorithm": "sha256_ecdsa"}}
    assert cms.verify(_resigned(pki, lambda a: [*a, _attr("cms_algorithm_protection", protection)])).content == CONTENT
    swapped = {"digest_algorithm": {"algorithm": "sha512"}}
    rejects("SMIME_SIGNATURE_INVALID", lambda: cms.verify(_resigned(pki, lambda a: [*a, _attr("cms_algorithm_protection", swapped)])))


def test_trailing_garbage(pki: Pki) -> None:
    signed, sealed = ossl_sign(pki.rsa), ossl_encrypt(pki.gw, "-aes-256-gcm")
    rejects("SMIME_MALFORMED", lambda: cms.verify(signed + b"\x00"))
    rejects("SMIME_MALFORMED", lambda: decrypt(pki, sealed + b"junk"))
    rejects("SMIME_MALFORMED", lambda: cms.content_type(signed + b"\x00\x00"))


def test_wrong_structure_for_the_call(pki: Pki) -> None:
    signed, sealed = ossl_sign(pki.rsa), ossl_encrypt(pki.gw, "-aes256")
    rejects("SMIME_MALFORMED", lambda: cms.verify(sealed))
    rejects("SMIME_MALFORMED", lambda: decrypt(pki, signed))
    data = openssl("-data_create", "-binary", "-outform", "DER", data=CONTENT)
    err = rejects("SMIME_MALFORMED", lambda: cms.content_type(data))
    assert "data" in err.message
    for junk in (b"", b"\x30", b"hello", b"\x30\x03\x06\x01\x00"):
        rejects("SMIME_MALFORMED", lambda j=junk: cms.content_type(j))  # type: ignore[misc]


def test_configuration_errors_are_value_errors(pki: Pki) -> None:
    sealed = ossl_encrypt(pki.gw, "-aes256")
    with pytest.raises(ValueError, match="RSA-1024"):
        cms.decrypt(sealed, pki.weak.cert, pki.weak.key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RSA"):
        cms.decrypt(sealed, pki.ec.cert, pki.ec.key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not belong"):
        cms.decrypt(sealed, pki.other.cert, pki.gw.key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key agreement"):
        cms.encrypt(CONTENT, pki.ec.cert)
    with pytest.raises(ValueError, match="RSA-1024"):
        cms.encrypt(CONTENT, pki.weak.cert)
    with pytest.raises(ValueError, match="cipher"):
        cms.encrypt(CONTENT, pki.gw.cert, cipher="des-ede3-cbc")
    with pytest.raises(ValueError, match="does not belong"):
        cms.sign(CONTENT, pki.rsa.cert, pki.ec.key)


# -- our messages are accepted by openssl --------------------------------------------------------------


@pytest.mark.parametrize("signer", ["rsa", "ec"])
@pytest.mark.parametrize("detached", [True, False])
def test_our_signature_verifies_with_openssl(pki: Pki, tmp_path: Path, signer: str, detached: bool) -> None:
    party: Party = getattr(pki, signer)
    der = cms.sign(CONTENT, party.cert, party.key, detached=detached)
    (tmp_path / "sig.der").write_bytes(der)
    (tmp_path / "content").write_bytes(CONTENT)
    content: list[str | Path] = ["-content", tmp_path / "content"] if detached else []
    out = openssl("-verify", "-inform", "DER", "-in", tmp_path / "sig.der", "-CAfile", pki.ca_path,
                  "-purpose", "smimesign", "-binary", *content)
    assert out == CONTENT
    v = cms.verify(der, CONTENT if detached else None)
    assert (v.content, v.digest, v.signature_algorithm) == (CONTENT, "sha256", "ecdsa" if signer == "ec" else "rsassa-pkcs1v15")
    assert v.certificates == (party.cert,)
    cms.check_signer(v, [pki.ca], datetime.now(UTC))


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-gcm", "aes-256-cbc", "aes-128-cbc"])
def test_our_encryption_decrypts_with_openssl(pki: Pki, tmp_path: Path, cipher: str) -> None:
    signed = cms.sign(CONTENT, pki.ec.cert, pki.ec.key, detached=False)
    der = cms.encrypt(signed, pki.gw.cert, cipher=cipher)
    (tmp_path / "enc.der").write_bytes(der)
    plain = openssl("-decrypt", "-inform", "DER", "-in", tmp_path / "enc.der", "-recip", pki.gw.cert_path,
                    "-inkey", pki.gw.key_path, "-binary")
    assert plain == signed
    (tmp_path / "sig.der").write_bytes(plain)
    assert openssl("-verify", "-inform", "DER", "-in", tmp_path / "sig.der", "-CAfile", pki.ca_path,
                   "-purpose", "smimesign", "-binary") == CONTENT
    out = decrypt(pki, der)
    assert (out.content, out.cipher, out.key_transport) == (signed, cipher, "rsaes-oaep-sha256")
    assert out.structure == ("authenveloped-data" if "gcm" in cipher else "enveloped-data")


def test_our_signature_carries_the_chain(pki: Pki) -> None:
    der = cms.sign(CONTENT, pki.rsa.cert, pki.rsa.key, detached=False, chain=[pki.ca])
    v = cms.verify(der)
    assert set(v.certificates) == {pki.rsa.cert, pki.ca}  # a DER SET OF: sorted, not in the given order
    cms.check_signer(v, [pki.ca], datetime.now(UTC))


# -- check_signer --------------------------------------------------------------------------------------


def _signed_by(party: Party, signing_time: datetime | None = None) -> cms.Verified:
    der = cms._sign(CONTENT, party.cert, party.key, detached=False, chain=(), signing_time=signing_time or NOW)
    return cms.verify(der)


def test_pinned_self_signed_signer(pki: Pki) -> None:
    v = _signed_by(pki.pinned)
    cms.check_signer(v, [pki.pinned.cert], datetime.now(UTC))
    cms.check_signer(v, [pki.ca, pki.pinned.cert], datetime.now(UTC))
    err = rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(v, [pki.ca], datetime.now(UTC)))
    assert "trusted CA" in err.message
    rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(v, [pki.pinned.cert], NOW + timedelta(days=60)))


@pytest.mark.parametrize(("who", "reason"), [
    ("expired", "expired on"),
    ("not_yet", "not valid yet"),
    ("foreign", "trusted CA"),
    ("client", "emailProtection"),
])
def test_untrusted_signers(pki: Pki, who: str, reason: str) -> None:
    party: Party = getattr(pki, who)
    signing_time = party.cert.not_valid_before_utc + timedelta(minutes=1)
    v = _signed_by(party, signing_time)
    err = rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(v, [pki.ca], datetime.now(UTC)))
    assert reason in err.message and reason in err.details[0].message


def test_signing_time_checks(pki: Pki) -> None:
    now = datetime.now(UTC)
    cms.check_signer(_signed_by(pki.ec, now + timedelta(minutes=4)), [pki.ca], now)  # within the clock skew
    err = rejects("SMIME_SIGNER_CERT_INVALID",
                  lambda: cms.check_signer(_signed_by(pki.ec, now + timedelta(hours=1)), [pki.ca], now))
    assert "future" in err.message
    early = pki.ec.cert.not_valid_before_utc - timedelta(days=1)
    err = rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(_signed_by(pki.ec, early), [pki.ca], now))
    assert "outside the certificate's validity" in err.message
    v = cms.verify(ossl_sign(pki.ec))  # the expiry is judged at `at`, not now
    rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(v, [pki.ca], now + timedelta(days=900)))


def _ca_cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
             path_length: int, eku: list[x509.ObjectIdentifier] | None = None,
             not_after: datetime = NOW + timedelta(days=60)) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1)).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.mark.parametrize(("intermediate_eku", "ok"), [
    (None, True),
    ([ExtendedKeyUsageOID.EMAIL_PROTECTION], True),
    ([ExtendedKeyUsageOID.CLIENT_AUTH], False),  # a CA restricted to other purposes cannot vouch for S/MIME
])
def test_chain_through_an_intermediate_in_the_message(intermediate_eku: list[x509.ObjectIdentifier] | None, ok: bool) -> None:
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca_cert("root", root_key, None, 1)
    mid = _ca_cert("intermediate", mid_key, (root.subject, root_key), 0, intermediate_eku)
    leaf = _leaf_of(mid, mid_key, leaf_key)
    with_chain = cms.verify(cms.sign(CONTENT, leaf, leaf_key, chain=[mid]), CONTENT)
    if ok:
        cms.check_signer(with_chain, [root], datetime.now(UTC))
    else:
        rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(with_chain, [root], datetime.now(UTC)))
    without = cms.verify(cms.sign(CONTENT, leaf, leaf_key), CONTENT)
    err = rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(without, [root], datetime.now(UTC)))
    assert "trusted CA" in err.message


def test_a_chain_built_before_counts_only_while_all_of_it_is_valid_and_for_the_same_roots() -> None:
    """check_signer remembers chains it built (cms._Chains); what it remembers must never accept a
    signer that building the chain anew would refuse: an intermediate that expired, or other roots."""
    root_key, other_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root, other_root = _ca_cert("root", root_key, None, 1), _ca_cert("root", other_key, None, 1)  # the same name
    mid = _ca_cert("intermediate", mid_key, (root.subject, root_key), 0, not_after=NOW + timedelta(days=10))
    leaf = _leaf_of(mid, mid_key, leaf_key)  # valid 30 days, longer than its issuer
    signed = cms.verify(cms.sign(CONTENT, leaf, leaf_key, chain=[mid]), CONTENT)
    now = datetime.now(UTC)  # the messages are signed now; NOW is when the module was imported, maybe minutes ago
    for _ in range(2):  # built, then remembered
        cms.check_signer(signed, [root], now)
    err = rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(signed, [root], now + timedelta(days=11)))
    assert "trusted CA" in err.message
    rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(signed, [other_root], now))
    cms.check_signer(signed, [root], now)
    cms.check_signer(signed, [other_root, root], now)
    without_mid = cms.verify(cms.sign(CONTENT, leaf, leaf_key), CONTENT)  # the chain needs the intermediate
    rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(without_mid, [root], now))
    # What a message carries beyond the chain is not kept (an entry's size is the chain's, whatever was sent).
    extras = [_ca_cert(f"extra {i}", ec.generate_private_key(ec.SECP256R1()), None, 0) for i in range(5)]
    padded = cms.verify(cms.sign(CONTENT, leaf, leaf_key, chain=[mid, *extras]), CONTENT)
    cms.check_signer(padded, [root], now)
    assert cms._CHAINS._chains[(leaf, (root,))].intermediates == (mid,)


def _leaf_of(mid: x509.Certificate, mid_key: ec.EllipticCurvePrivateKey, leaf_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(mid.subject).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("billing@supplier.example")]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(mid_key.public_key()), critical=False)
            .sign(mid_key, hashes.SHA256()))


def test_check_signer_needs_roots_and_an_aware_time(pki: Pki) -> None:
    v = _signed_by(pki.ec)
    rejects("SMIME_SIGNER_CERT_INVALID", lambda: cms.check_signer(v, [], datetime.now(UTC)))
    with pytest.raises(ValueError, match="aware"):
        cms.check_signer(v, [pki.ca], datetime.now())  # noqa: DTZ005


# -- hostile input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(pki: Pki) -> list[tuple[str, bytes, bytes | None]]:
    return [
        ("enveloped", ossl_encrypt(pki.gw, "-aes256"), None),
        ("authenveloped", ossl_encrypt(pki.gw, "-aes-256-gcm"), None),
        ("ours-oaep-gcm", cms.encrypt(CONTENT, pki.gw.cert), None),
        ("signed-rsa", ossl_sign(pki.rsa), None),
        ("signed-pss", ossl_sign(pki.rsa, args=("-md", "sha256", "-keyopt", "rsa_padding_mode:pss")), None),
        ("signed-ec-detached", cms.sign(CONTENT, pki.ec.cert, pki.ec.key), CONTENT),
    ]


@st.composite
def _hostile(draw: st.DrawFn, samples: list[tuple[str, bytes, bytes | None]]) -> tuple[str, bytes, bytes | None]:
    kind, der, detached = draw(st.sampled_from(samples))
    how = draw(st.sampled_from(["flip", "set", "truncate", "insert", "random"]))
    if how == "random":
        return kind, draw(st.binary(max_size=600)), detached
    at = draw(st.integers(0, len(der) - 1))
    if how == "flip":
        return kind, der[:at] + bytes([der[at] ^ (1 << draw(st.integers(0, 7)))]) + der[at + 1:], detached
    if how == "set":
        return kind, der[:at] + bytes([draw(st.integers(0, 255))]) + der[at + 1:], detached
    if how == "insert":
        return kind, der[:at] + draw(st.binary(min_size=1, max_size=4)) + der[at:], detached
    return kind, der[:at], detached


def test_hostile_bytes_raise_only_cms_rejected(pki: Pki, samples: list[tuple[str, bytes, bytes | None]]) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_hostile(samples))
    def run(case: tuple[str, bytes, bytes | None]) -> None:
        kind, der, detached = case
        try:
            cms.content_type(der)
        except cms.CmsRejected:
            pass
        try:
            out = decrypt(pki, der)
        except cms.CmsRejected:
            pass
        else:  # CBC is malleable (the IV); AES-GCM must give the original or nothing
            assert kind == "enveloped" or out.content == CONTENT
        try:
            v = cms.verify(der, detached)
        except cms.CmsRejected:
            pass
        else:
            assert v.content == CONTENT

    run()
