"""The only place SSL contexts are built, and where a peer certificate becomes an identity.

Server policy (SECURITY-TESTS.md T-01…T-07): TLS 1.2 or 1.3 only; in TLS 1.2 only ECDHE key
exchange with AEAD ciphers; no renegotiation; a client certificate is required and must chain
to a configured partner CA; OpenSSL security level 2 refuses RSA < 2048 and SHA-1 signatures.
Partners are told apart by the SHA-256 of the certificate's SubjectPublicKeyInfo, never by name.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import ConfigError

# TLS 1.2 suites: forward secret and AEAD only.  TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"
MIN_RSA_BITS = 2048  # Decision 5: no RSA < 2048, in or out


def server_context(certificate: Path, private_key: Path, client_ca: tuple[Path, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"https.certificate: cannot load certificate and key ({exc.__class__.__name__}: {exc})") from None
    for i, ca in enumerate(client_ca):
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"https.client_ca[{i}]: cannot load CA bundle {ca} ({exc})") from None
    return ctx


def admin_context(certificate: Path, private_key: Path) -> ssl.SSLContext:
    """No client certificate: the admin listener off loopback (its callers authenticate with a bearer
    token) and SMTP STARTTLS (the S/MIME signature is the identity)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"https.certificate: cannot load certificate and key ({exc.__class__.__name__}: {exc})") from None
    return ctx


def client_context(ca: Path | None, certificate: Path | None = None, private_key: Path | None = None) -> ssl.SSLContext:
    """The same policy for the gateway's own outbound connections (and the demo); ``ca`` None: the
    system's trust store.  Host names are checked."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
        if certificate is not None:
            ctx.load_cert_chain(str(certificate), str(private_key) if private_key else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the TLS files {ca}, {certificate} ({exc.__class__.__name__}: {exc})") from None
    return ctx


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cert_sha256(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, as `openssl x509 -fingerprint -sha256` shows it (without colons)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki_sha256_der(der: bytes) -> tuple[str, str]:
    """SPKI hash and subject (for logs) of a DER certificate taken from a TLS connection."""
    cert = x509.load_der_x509_certificate(der)
    return spki_sha256(cert), cert.subject.rfc4514_string()


@dataclass(frozen=True, slots=True)
class CertInfo:
    spki_sha256: str
    subject: str
    not_after: datetime
    pem: bytes
    cert: x509.Certificate


def inspect_certificate(source: Path | bytes, where: str) -> CertInfo:
    """Load a partner certificate (a file, or PEM bytes as pasted in the console) and refuse what the
    TLS layer would refuse anyway."""
    path = source if isinstance(source, Path) else "the certificate"
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
        cert = x509.load_pem_x509_certificate(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {path} is not a PEM certificate ({exc})") from None
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{where}: {path} has an RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required")
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise ConfigError(f"{where}: {path} has an unsupported key type")
    algo = cert.signature_hash_algorithm
    if algo is not None and isinstance(algo, (hashes.SHA1, hashes.MD5)):
        raise ConfigError(f"{where}: {path} is signed with {algo.name}; SHA-256 or stronger is required")
    return CertInfo(spki_sha256(cert), cert.subject.rfc4514_string(), cert.not_valid_after_utc, data, cert)


def inspect_smime_certificate(source: Path | bytes, where: str) -> CertInfo:
    """A partner's (or the gateway's) S/MIME certificate: a usable certificate that may sign e-mail
    (KeyUsage digitalSignature or nonRepudiation, EKU emailProtection)."""
    info = inspect_certificate(source, where)
    problems = smime_problems(info.cert)
    if problems:
        shown = source if isinstance(source, Path) else "the certificate"
        raise ConfigError(f"{where}: {shown} is not an S/MIME certificate: {'; '.join(problems)}")
    return info


def smime_problems(cert: x509.Certificate) -> list[str]:
    out = []
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not (ku.digital_signature or ku.content_commitment):
            out.append("its KeyUsage allows neither digitalSignature nor nonRepudiation")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku:
            out.append("its ExtendedKeyUsage lacks emailProtection")
    except x509.ExtensionNotFound:
        out.append("it has no ExtendedKeyUsage (emailProtection is required)")
    return out


def encryptable(cert: x509.Certificate) -> bool:
    """Whether mail can be encrypted to this certificate: RSA key transport (key agreement is not
    supported), and a KeyUsage, if present, that allows keyEncipherment."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        return False
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment)
    except x509.ExtensionNotFound:
        return True


def email_addresses(cert: x509.Certificate) -> set[str]:
    """The certificate's rfc822Name SANs, lowercased (the addresses it may sign mail from)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {a.lower() for a in san.get_values_for_type(x509.RFC822Name)}


def ca_certificates(paths: tuple[Path, ...], key: str = "https.client_ca") -> list[x509.Certificate]:
    """Every certificate in these PEM bundles (the partner CAs, for CRL signatures, issuers and S/MIME chains)."""
    out: list[x509.Certificate] = []
    for i, path in enumerate(paths):
        try:
            out.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}[{i}]: cannot read certificates from {path} ({exc})") from None
    return out


def load_private_key(data: bytes) -> PrivateKeyTypes:
    """A PEM private key without a passphrase (the file's mode protects it)."""
    return serialization.load_pem_private_key(data, None)


def same_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(serialization.Encoding.DER, public)
                == key.public_key().public_bytes(serialization.Encoding.DER, public))


def expires_soon(info: CertInfo, days: int = 30) -> bool:
    return (info.not_after - datetime.now(UTC)).days < days
