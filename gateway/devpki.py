"""A development PKI for `init` and the demo (and the tests): clearly labelled, never for production.

Real deployments use the partners' own CA bundles and a server certificate from the operator's CA;
this module only makes a throwaway CA whose key is kept so an operator can issue test partners.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LABEL = "DEVELOPMENT ONLY"
ORGANIZATION = f"einvoice-gateway {LABEL}"  # the organization of every name this module writes
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")  # id-kp-documentSigning, RFC 9336


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, replace: bool = True) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL), 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies to a new file only: a key issued again over an old one
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def new_key(kind: str = "ec") -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    bits = int(kind.removeprefix("rsa"))
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_ca(folder: Path, name: str = "CA", cn: str = "einvoice-gateway development CA") -> Issued:
    folder.mkdir(parents=True, exist_ok=True)
    key = new_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out = Issued(folder / f"{name}.crt", folder / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out.key, key)
    return out


def issue(ca: Issued, folder: Path, name: str, *, role: str, cn: str | None = None,
          sans: tuple[str, ...] = (), key_kind: str = "ec", not_before: datetime | None = None,
          not_after: datetime | None = None, hash_alg: hashes.HashAlgorithm | None = None,
          emails: tuple[str, ...] = (), replace: bool = True) -> Issued:
    """Issue a leaf certificate: role "server" (serverAuth), "client" (clientAuth), "signing" (documents)
    or "smime" (emailProtection; ``emails`` become rfc822Name SANs; an RSA key may also be encrypted to).
    ``replace`` False: FileExistsError rather than writing over an existing certificate or key file."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    key = new_key(key_kind)
    now = datetime.now(UTC)
    eku = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH,
           "signing": DOCUMENT_SIGNING, "smime": ExtendedKeyUsageOID.EMAIL_PROTECTION}[role]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn or name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=role == "signing",
                                     key_encipherment=role in ("server", "smime") and key_kind != "ec", data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if sans or emails:
        names: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emails]
        for s in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hash_alg or hashes.SHA256())  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    out = Issued(folder / f"{name}.crt", folder / f"{name}.key")
    if not replace and out.cert.exists():  # before the key is written: a refusal leaves nothing behind
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out.cert))
    _write_key(out.key, key, replace)
    with out.cert.open("wb" if replace else "xb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    return out


def is_development_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is a CA that ``make_ca`` made: a CA certificate, self-issued and self-signed, whose
    subject carries the development label.  (An operator's CA does not name itself DEVELOPMENT ONLY.)"""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    organizations = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if not constraints.ca or cert.subject != cert.issuer or organizations != [ORGANIZATION]:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def development_cas(files: Sequence[Path]) -> list[tuple[Path, x509.Certificate]]:
    """The development CAs among CA files (``https.client_ca``): each file that holds one certificate, a
    development CA, in the order listed; unreadable files and bundles are not development CAs."""
    found = []
    for path in files:
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue
        if len(certs) == 1 and is_development_ca(certs[0]):
            found.append((path, certs[0]))
    return found


def key_matches(cert: x509.Certificate, key_file: Path) -> bool:
    """Whether ``key_file`` holds an unencrypted PEM private key (as this module writes them) of ``cert``'s key."""
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    except (ValueError, TypeError):  # not PEM, or encrypted
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(serialization.Encoding.DER, spki) ==
                cert.public_key().public_bytes(serialization.Encoding.DER, spki))
