"""gateway/devpki.py: the development PKI that ``init``, the demo and the tests use (never production).

``make_ca`` makes a self-signed CA that may sign leaves only (path length 0); ``issue`` makes a leaf
for one role — server (serverAuth), client (clientAuth), signing (documentSigning, RFC 9336, with
nonRepudiation) or smime (emailProtection, the addresses as rfc822Name SANs) — with the key kind, SANs,
validity and hash asked for.  Every name says DEVELOPMENT ONLY; private keys are PKCS#8 files of mode
0600.  What it issues is checked here with ``openssl verify`` (each role for its own purpose only).
``replace=False`` refuses to write over a certificate or key.  ``is_development_ca`` recognises a CA
``make_ca`` made (and not one openssl made, nor a leaf, nor a CA carrying the label but signed by another
key); ``development_cas`` finds them among CA files; ``key_matches`` pairs a CA with its key file.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import devpki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
# openssl verify -purpose for each role, and a purpose the role must not pass.
PURPOSES = {"server": ("sslserver", "sslclient"), "client": ("sslclient", "sslserver"),
            "smime": ("smimesign", "sslclient"), "signing": ("any", "smimesign")}


def load(issued: devpki.Issued) -> tuple[x509.Certificate, object]:
    return (x509.load_pem_x509_certificate(issued.cert.read_bytes()),
            serialization.load_pem_private_key(issued.key.read_bytes(), None))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask():
    """With no umask, only the mode the module asks for protects a key."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> devpki.Issued:
    return devpki.make_ca(tmp_path_factory.mktemp("devpki") / "pki", "ca")


def test_ca_is_self_signed_may_sign_leaves_only_and_says_development(tmp_path: Path, no_umask) -> None:
    before = datetime.now(UTC)
    issued = devpki.make_ca(tmp_path / "new" / "pki", "root", cn="test CA")  # folders are made
    cert, key = load(issued)
    assert (issued.cert.name, issued.key.name) == ("root.crt", "root.key")
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "einvoice-gateway DEVELOPMENT ONLY"
    cert.verify_directly_issued_by(cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.not_valid_before_utc <= before and cert.not_valid_after_utc - before > timedelta(days=3649)
    assert mode(issued.key) == 0o600


@pytest.mark.parametrize(("role", "eku"), [
    ("server", ExtendedKeyUsageOID.SERVER_AUTH),
    ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ("signing", x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")),
    ("smime", ExtendedKeyUsageOID.EMAIL_PROTECTION),
])
def test_each_role_gets_its_one_extended_key_usage(ca: devpki.Issued, tmp_path: Path, role: str, eku: x509.ObjectIdentifier) -> None:
    cert, _ = load(devpki.issue(ca, tmp_path, f"{role}-leaf", role=role))
    ca_cert, _ = load(ca)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca  # a leaf cannot issue
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert ku.value.content_commitment is (role == "signing")  # nonRepudiation for document signatures only
    assert not ku.value.key_encipherment  # an EC key is never encrypted to
    assert cert.issuer == ca_cert.subject
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    cert.verify_directly_issued_by(ca_cert)


def test_an_unknown_role_is_refused(ca: devpki.Issued, tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        devpki.issue(ca, tmp_path, "x", role="admin")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@needs_openssl
@pytest.mark.parametrize("role", sorted(PURPOSES))
def test_openssl_verifies_each_role_for_its_purpose_only(ca: devpki.Issued, tmp_path: Path, role: str) -> None:
    leaf = devpki.issue(ca, tmp_path, role, role=role, key_kind="rsa2048" if role == "smime" else "ec",
                        emails=("billing@acme.example",) if role == "smime" else ())
    good, bad = PURPOSES[role]

    def verify(purpose: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([OPENSSL, "verify", "-x509_strict", "-CAfile", str(ca.cert), "-purpose", purpose, str(leaf.cert)],
                              capture_output=True, text=True, timeout=30)

    ok = verify(good)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{leaf.cert}: OK", ok.stdout + ok.stderr
    refused = verify(bad)
    assert refused.returncode != 0 and "unsuitable certificate purpose" in refused.stdout + refused.stderr


@needs_openssl
def test_openssl_refuses_a_leaf_of_another_ca_and_a_leaf_as_issuer(ca: devpki.Issued, tmp_path: Path) -> None:
    other = devpki.make_ca(tmp_path / "other", "other")
    foreign = devpki.issue(other, tmp_path, "foreign", role="client")
    leaf = devpki.issue(ca, tmp_path, "leaf", role="client")
    result = subprocess.run([OPENSSL, "verify", "-CAfile", str(ca.cert), str(foreign.cert)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0 and "unable to get local issuer certificate" in result.stdout + result.stderr
    # A "CA" made of a leaf: its certificate says it may not sign, so nothing it signs verifies.
    grandchild = devpki.issue(leaf, tmp_path, "grandchild", role="client")
    result = subprocess.run([OPENSSL, "verify", "-CAfile", str(ca.cert), "-untrusted", str(leaf.cert), str(grandchild.cert)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "invalid CA certificate" in result.stderr, result.stderr


def test_sans_become_ip_addresses_dns_names_and_addresses(ca: devpki.Issued, tmp_path: Path) -> None:
    cert, _ = load(devpki.issue(ca, tmp_path, "srv", role="server", cn="localhost",
                                sans=("localhost", "127.0.0.1", "::1", "gw.example")))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gw.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"

    mail, _ = load(devpki.issue(ca, tmp_path, "mail", role="smime", emails=("ap@acme.example", "billing@acme.example")))
    san = mail.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["ap@acme.example", "billing@acme.example"]
    assert mail.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail"  # the name, when no cn is given

    plain, _ = load(devpki.issue(ca, tmp_path, "plain", role="client"))
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize(("kind", "bits"), [("ec", 256), ("rsa2048", 2048), ("rsa3072", 3072)])
def test_key_kinds_and_sizes(ca: devpki.Issued, tmp_path: Path, kind: str, bits: int) -> None:
    cert, key = load(devpki.issue(ca, tmp_path, kind, role="smime", key_kind=kind, emails=("a@b.example",)))
    assert key.key_size == bits  # type: ignore[attr-defined]
    assert isinstance(key, ec.EllipticCurvePrivateKey if kind == "ec" else rsa.RSAPrivateKey)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[attr-defined]
    # An RSA S/MIME key may be encrypted to; an EC one may not (no key agreement).
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment is (kind != "ec")


def test_validity_and_signature_hash_as_asked(ca: devpki.Issued, tmp_path: Path) -> None:
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    cert, _ = load(devpki.issue(ca, tmp_path, "window", role="client", not_before=start, not_after=end,
                                hash_alg=hashes.SHA384()))
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)

    before = datetime.now(UTC)
    default, _ = load(devpki.issue(ca, tmp_path, "default", role="client"))
    assert isinstance(default.signature_hash_algorithm, hashes.SHA256)
    assert before - timedelta(minutes=6) < default.not_valid_before_utc <= before  # a little back, for clock skew
    assert timedelta(days=824) < default.not_valid_after_utc - before <= timedelta(days=825)


def test_private_keys_are_unencrypted_pkcs8_of_mode_0600(ca: devpki.Issued, tmp_path: Path, no_umask) -> None:
    issued = devpki.issue(ca, tmp_path / "clients", "acme", role="client")  # the folder is made
    assert issued.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert mode(issued.key) == 0o600
    assert issued.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\n")


def test_issuing_again_under_a_name_replaces_both_files(ca: devpki.Issued, tmp_path: Path) -> None:
    first = devpki.issue(ca, tmp_path, "acme", role="client")
    first_cert, first_key = first.cert.read_bytes(), first.key.read_bytes()
    again = devpki.issue(ca, tmp_path, "acme", role="client")
    assert again == first  # the same paths
    assert again.cert.read_bytes() != first_cert and again.key.read_bytes() != first_key
    cert, key = load(again)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[attr-defined]


def test_a_reissued_key_is_0600_even_over_a_readable_old_key(ca: devpki.Issued, tmp_path: Path) -> None:
    first = devpki.issue(ca, tmp_path, "acme", role="client")
    first.key.chmod(0o644)
    again = devpki.issue(ca, tmp_path, "acme", role="client")
    assert mode(again.key) == 0o600


def test_serial_numbers_are_random_and_distinct(ca: devpki.Issued, tmp_path: Path) -> None:
    serials = {load(devpki.issue(ca, tmp_path, f"c{i}", role="client"))[0].serial_number for i in range(5)}
    assert len(serials) == 5 and all(s.bit_length() > 64 for s in serials)  # CA/B BR 7.1: at least 64 random bits


def test_issuing_without_replace_refuses_existing_files_and_writes_nothing(ca: devpki.Issued, tmp_path: Path) -> None:
    first = devpki.issue(ca, tmp_path, "acme", role="client")
    before = first.cert.read_bytes(), first.key.read_bytes()
    with pytest.raises(FileExistsError) as exc:
        devpki.issue(ca, tmp_path, "acme", role="client", replace=False)
    assert exc.value.filename == str(first.cert)
    assert (first.cert.read_bytes(), first.key.read_bytes()) == before
    first.cert.unlink()  # the key alone left: refused as well, and no certificate written
    with pytest.raises(FileExistsError):
        devpki.issue(ca, tmp_path, "acme", role="client", replace=False)
    assert not first.cert.exists() and first.key.read_bytes() == before[1]
    fresh = devpki.issue(ca, tmp_path, "new", role="client", replace=False)
    assert fresh.cert.is_file() and mode(fresh.key) == 0o600


def openssl_ca(folder: Path, subject: str) -> Path:
    """A CA made by openssl, as an operator's own CA would be."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([OPENSSL or "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", subject, "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.crt"), "-days", "30",
                    "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True, timeout=30)
    return folder / "ca.crt"


def pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@needs_openssl
def test_a_development_ca_is_recognised_and_nothing_else(ca: devpki.Issued, tmp_path: Path) -> None:
    assert devpki.is_development_ca(pem(ca.cert))
    leaf = devpki.issue(ca, tmp_path, "leaf", role="client")
    assert not devpki.is_development_ca(pem(leaf.cert))  # carries the label, is no CA
    operators = openssl_ca(tmp_path / "op", "/O=Example Corp/CN=Example Issuing CA")
    assert not devpki.is_development_ca(pem(operators))
    # the label alone does not make one: a CA certificate with the label's name, signed by another key
    other = devpki.make_ca(tmp_path / "other", "ca")
    forged = x509.CertificateBuilder().subject_name(pem(ca.cert).subject).issuer_name(pem(ca.cert).subject) \
        .public_key(load(ca)[1].public_key()).serial_number(1) \
        .not_valid_before(datetime.now(UTC) - timedelta(days=1)).not_valid_after(datetime.now(UTC) + timedelta(days=1)) \
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(load(other)[1], hashes.SHA256())
    assert not devpki.is_development_ca(forged)


@needs_openssl
def test_development_cas_are_found_among_ca_files_in_order(ca: devpki.Issued, tmp_path: Path) -> None:
    operators = openssl_ca(tmp_path / "op", "/O=Example Corp/CN=Example Issuing CA")
    second = devpki.make_ca(tmp_path / "second", "ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.cert.read_bytes() + second.cert.read_bytes())  # a bundle is nobody's development CA
    found = devpki.development_cas([operators, tmp_path / "missing.crt", bundle, second.cert, ca.cert])
    assert [p for p, _ in found] == [second.cert, ca.cert]
    assert devpki.development_cas([operators]) == []


def test_a_ca_key_matches_its_own_certificate_only(ca: devpki.Issued, tmp_path: Path) -> None:
    other = devpki.make_ca(tmp_path / "other", "ca")
    assert devpki.key_matches(pem(ca.cert), ca.key)
    assert not devpki.key_matches(pem(ca.cert), other.key)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    assert not devpki.key_matches(pem(ca.cert), garbage)
