"""gateway/tls.py: the only place SSL contexts are built, and where a certificate becomes an identity.

Server policy: TLS 1.2 or 1.3, in TLS 1.2 only ECDHE with AEAD suites, a client certificate that
chains to a configured CA, and OpenSSL security level 2 (no RSA < 2048, no SHA-1 signatures).  The
gateway's own connections (``client_context``) hold servers to the same policy and check host names;
the admin context asks for no client certificate.  A peer is its SubjectPublicKeyInfo's SHA-256
(checked here against ``openssl``'s own computation); ``inspect_certificate`` refuses what the TLS
layer would refuse, with a message that names the file and what is wrong with it.

Handshakes are real: a server thread on 127.0.0.1:0 and a client, each reporting how it ended; the
other peer is a plain ``ssl`` context where a test needs one outside the gateway's policy.  The
fuller refusal matrix against the running gateway (with ``openssl s_client``) is tests/inbound/test_https_mtls.py.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import devpki
from gateway.errors import ConfigError
from gateway.tls import (
    MIN_RSA_BITS,
    admin_context,
    ca_certificates,
    cert_sha256,
    client_context,
    email_addresses,
    encryptable,
    expires_soon,
    inspect_certificate,
    inspect_smime_certificate,
    load_private_key,
    same_key,
    server_context,
    smime_problems,
    spki_sha256,
    spki_sha256_der,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
TIMEOUT_S = 10.0  # for each socket operation; nothing here should come near it


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: devpki.Issued
    server: devpki.Issued  # CN=localhost, SANs 127.0.0.1 and localhost
    client: devpki.Issued
    foreign: devpki.Issued  # a client certificate from another CA
    rsa1024: devpki.Issued  # a client certificate with a weak key, from the trusted CA
    rsa2048: devpki.Issued
    smime: devpki.Issued  # RSA, emailProtection, two addresses


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("tls")
    ca = devpki.make_ca(folder, "ca")
    other = devpki.make_ca(folder / "other", "other")
    return Pki(
        folder, ca,
        server=devpki.issue(ca, folder, "server", role="server", cn="localhost", sans=("127.0.0.1", "localhost")),
        client=devpki.issue(ca, folder, "client", role="client", cn="acme"),
        foreign=devpki.issue(other, folder, "foreign", role="client", cn="acme"),
        rsa1024=devpki.issue(ca, folder, "rsa1024", role="client", key_kind="rsa1024"),
        rsa2048=devpki.issue(ca, folder, "rsa2048", role="client", key_kind="rsa2048"),
        smime=devpki.issue(ca, folder, "smime", role="smime", key_kind="rsa2048",
                           emails=("Billing@Acme.Example", "ap@acme.example")),
    )


def cert_of(issued: devpki.Issued) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert.read_bytes())


def built(pki: Pki, name: str, *, key: object = None, extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
          days: int = 365) -> x509.Certificate:
    """A certificate signed by the test CA with exactly the extensions given (devpki adds its own)."""
    ca_key = load_private_key(pki.ca.key.read_bytes())
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(cert_of(pki.ca).subject).public_key(key.public_key())  # type: ignore[attr-defined]
               .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=days)))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- real handshakes -------------------------------------------------------------------------------


@dataclass
class Handshake:
    server_error: Exception | None = None
    client_error: Exception | None = None
    version: str | None = None
    cipher: str | None = None
    peer_der: bytes | None = None  # the client certificate the server saw
    received: bytes = b""  # what the client read after the handshake

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.received == b"hello"


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost") -> Handshake:
    """One connection on 127.0.0.1: the server greets with b"hello" once its handshake succeeds."""
    out = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT_S)
                with server.wrap_socket(conn, server_side=True) as tls:
                    out.version, out.cipher = tls.version(), tls.cipher()[0]
                    out.peer_der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError) as exc:
                out.server_error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S) as raw, \
                    client.wrap_socket(raw, server_hostname=hostname) as tls:
                while len(out.received) < 5:  # TLS 1.3: a refused client certificate shows here, as an alert
                    chunk = tls.recv(5 - len(out.received))
                    if not chunk:
                        break
                    out.received += chunk
        except (ssl.SSLError, OSError) as exc:
            out.client_error = exc
        thread.join(TIMEOUT_S * 2)
        assert not thread.is_alive(), "the server side of the handshake did not finish"
    return out


def permissive_client(cert: devpki.Issued | None = None, trust: Path | None = None) -> ssl.SSLContext:
    """A client outside the gateway's policy (security level 0): what a careless partner might run."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE if trust is None else ssl.CERT_REQUIRED
    if trust is not None:
        ctx.load_verify_locations(cafile=str(trust))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def permissive_server(pki: Pki, *, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED, ciphers: str = "DEFAULT:@SECLEVEL=0",
                      cert: devpki.Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1_1 is deprecated: that is the point
        ctx.maximum_version = maximum
    ctx.set_ciphers(ciphers)
    issued = cert or pki.server
    ctx.load_cert_chain(str(issued.cert), str(issued.key))
    return ctx


def test_mutual_tls_handshake_and_the_identity_the_server_sees(pki: Pki) -> None:
    server = server_context(pki.server.cert, pki.server.key, (pki.ca.cert,))
    result = handshake(server, client_context(pki.ca.cert, pki.client.cert, pki.client.key))
    assert result.ok, result
    assert result.version == "TLSv1.3"
    assert result.peer_der is not None
    assert spki_sha256_der(result.peer_der) == (spki_sha256(cert_of(pki.client)), cert_of(pki.client).subject.rfc4514_string())
    assert "CN=acme" in spki_sha256_der(result.peer_der)[1]


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                                    "ECDHE-ECDSA-CHACHA20-POLY1305"])
def test_tls12_handshake_agrees_on_an_ecdhe_aead_suite(pki: Pki, cipher: str) -> None:
    server = server_context(pki.server.cert, pki.server.key, (pki.ca.cert,))
    client = client_context(pki.ca.cert, pki.client.cert, pki.client.key)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(cipher)
    result = handshake(server, client)
    assert result.ok, result
    assert (result.version, result.cipher) == ("TLSv1.2", cipher)


@pytest.mark.parametrize("make", ["server", "admin", "client"])
def test_every_context_offers_only_tls12_or_13_with_forward_secret_aead_suites(pki: Pki, make: str) -> None:
    ctx = {"server": lambda: server_context(pki.server.cert, pki.server.key, (pki.ca.cert,)),
           "admin": lambda: admin_context(pki.server.cert, pki.server.key),
           "client": lambda: client_context(pki.ca.cert)}[make]()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.options & ssl.OP_NO_COMPRESSION
    suites = ctx.get_ciphers()
    assert suites
    for suite in suites:
        assert suite["aead"], suite["name"]
        assert suite["protocol"] == "TLSv1.3" or suite["kea"] == "kx-ecdhe", suite["name"]
    assert {s["protocol"] for s in suites} == {"TLSv1.2", "TLSv1.3"}


def test_server_refuses_a_trusted_client_certificate_with_an_rsa_1024_key(pki: Pki) -> None:
    server = server_context(pki.server.cert, pki.server.key, (pki.ca.cert,))
    result = handshake(server, permissive_client(pki.rsa1024))
    assert not result.ok
    assert "EE certificate key too weak" in str(result.server_error), result.server_error
    assert handshake(server, permissive_client(pki.rsa2048)).ok  # 2048 bits pass


@needs_openssl
def test_server_refuses_a_trusted_client_certificate_signed_with_sha1(pki: Pki, tmp_path: Path) -> None:
    """cryptography will not sign with SHA-1 any more; openssl still does, for this test."""
    key, csr, crt, ext = (tmp_path / n for n in ("sha1.key", "sha1.csr", "sha1.crt", "ext.cnf"))
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    subprocess.run([OPENSSL, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=sha1-client", "-keyout", key, "-out", csr], check=True, capture_output=True, timeout=30)
    subprocess.run([OPENSSL, "x509", "-req", "-in", csr, "-CA", pki.ca.cert, "-CAkey", pki.ca.key, "-sha1", "-days", "30",
                    "-extfile", ext, "-out", crt], check=True, capture_output=True, timeout=30)
    assert cert_of(devpki.Issued(crt, key)).signature_hash_algorithm.name == "sha1"

    server = server_context(pki.server.cert, pki.server.key, (pki.ca.cert,))
    result = handshake(server, permissive_client(devpki.Issued(crt, key)))
    assert not result.ok
    assert "digest algorithm too weak" in str(result.server_error), result.server_error
    with pytest.raises(ConfigError) as err:  # and a partner registering it is told why
        inspect_certificate(crt, "partners[0].client_certs[0]")
    assert err.value.message == f"partners[0].client_certs[0]: {crt} is signed with sha1; SHA-256 or stronger is required"


@pytest.mark.parametrize(("who", "says"), [("nobody", "peer did not return a certificate"),
                                           ("foreign CA", "unable to get local issuer certificate")])
def test_server_requires_a_client_certificate_from_its_ca_and_admin_does_not(pki: Pki, who: str, says: str) -> None:
    server = server_context(pki.server.cert, pki.server.key, (pki.ca.cert,))
    client = client_context(pki.ca.cert) if who == "nobody" else client_context(pki.ca.cert, pki.foreign.cert, pki.foreign.key)
    refused = handshake(server, client)
    assert not refused.ok and says in str(refused.server_error), refused
    admitted = handshake(admin_context(pki.server.cert, pki.server.key), client)
    assert admitted.ok, admitted
    assert admitted.peer_der is None  # the admin listener asks for no certificate, so it sees none


@pytest.mark.parametrize(("case", "says"), [
    ("TLS 1.1 server", "alert protocol version"),  # the client offered nothing below TLS 1.2
    ("CBC-only server", "handshake failure"),
    ("server RSA 1024", "EE certificate key too weak"),
    ("wrong host name", "Hostname mismatch"),
    ("system trust store", "unable to get local issuer certificate"),
])
def test_client_context_holds_servers_to_the_policy(pki: Pki, case: str, says: str) -> None:
    """The gateway's outbound connections (ERP, partners, the smarthost) refuse what its server refuses."""
    server, hostname, ca = permissive_server(pki), "localhost", pki.ca.cert
    if case == "TLS 1.1 server":
        server = permissive_server(pki, maximum=ssl.TLSVersion.TLSv1_1)
    elif case == "CBC-only server":
        server = permissive_server(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    elif case == "server RSA 1024":
        weak = devpki.issue(pki.ca, pki.folder, "weak-server", role="server", key_kind="rsa1024", sans=("localhost",))
        server = permissive_server(pki, cert=weak)
    elif case == "wrong host name":
        hostname = "erp.example"
    else:
        ca = None
    result = handshake(server, client_context(ca), hostname)
    assert result.client_error is not None, result
    assert says in str(result.client_error), result.client_error
    assert handshake(permissive_server(pki), client_context(pki.ca.cert), "127.0.0.1").ok  # the same server, by the SAN, is fine


def test_context_files_that_cannot_be_loaded_are_config_errors(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        (lambda: server_context(pki.server.cert, tmp_path / "absent.key", (pki.ca.cert,)),
         "https.certificate: cannot load certificate and key (FileNotFoundError"),
        (lambda: server_context(pki.server.cert, pki.client.key, (pki.ca.cert,)),  # another certificate's key
         "https.certificate: cannot load certificate and key (SSLError"),
        (lambda: server_context(pki.server.cert, pki.server.key, (pki.ca.cert, garbage)),
         f"https.client_ca[1]: cannot load CA bundle {garbage}"),
        (lambda: admin_context(garbage, pki.server.key), "https.certificate: cannot load certificate and key"),
        (lambda: client_context(tmp_path / "absent-ca.crt"), f"cannot load the TLS files {tmp_path / 'absent-ca.crt'}, None"),
        (lambda: client_context(pki.ca.cert, pki.rsa1024.cert, pki.rsa1024.key), "cannot load the TLS files"),  # level 2 refuses it
    ]
    for make, says in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert err.value.message.startswith(says), err.value.message
        assert "PRIVATE KEY" not in err.value.message


# --- identities ------------------------------------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize("name", ["client", "rsa2048"])
def test_spki_sha256_is_what_openssl_computes(pki: Pki, name: str) -> None:
    issued: devpki.Issued = getattr(pki, name)
    public_pem = subprocess.run([OPENSSL, "x509", "-in", issued.cert, "-noout", "-pubkey"], check=True,
                                capture_output=True, timeout=30).stdout
    spki_der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "DER"], input=public_pem, check=True,
                              capture_output=True, timeout=30).stdout
    cert = cert_of(issued)
    assert spki_sha256(cert) == hashlib.sha256(spki_der).hexdigest()
    assert spki_sha256(cert) != cert_sha256(cert)  # the key's hash, not the certificate's fingerprint


def test_a_renewed_certificate_with_the_same_key_is_the_same_identity(pki: Pki) -> None:
    """Partners are told apart by key, never by name: same key, other certificate, same SPKI hash."""
    key = load_private_key(pki.client.key.read_bytes())
    renewed = built(pki, "acme renewed", key=key)
    original = cert_of(pki.client)
    assert spki_sha256(renewed) == spki_sha256(original) and cert_sha256(renewed) != cert_sha256(original)
    assert spki_sha256(cert_of(pki.foreign)) != spki_sha256(original)  # same CN, other key: another identity
    assert same_key(renewed, key) and not same_key(cert_of(pki.foreign), key)


# --- inspecting partner certificates ---------------------------------------------------------------


def test_inspect_accepts_the_usable_key_types(pki: Pki) -> None:
    for cert in (cert_of(pki.client), cert_of(pki.rsa2048), built(pki, "ed", key=ed25519.Ed25519PrivateKey.generate())):
        info = inspect_certificate(pem(cert), "test")
        assert (info.spki_sha256, info.subject, info.not_after, info.pem, info.cert) == (
            spki_sha256(cert), cert.subject.rfc4514_string(), cert.not_valid_after_utc, pem(cert), cert)
    assert inspect_certificate(pki.client.cert, "test").pem == pki.client.cert.read_bytes()  # from a file, the same


def test_inspect_refuses_naming_the_file_and_the_problem(pki: Pki, tmp_path: Path) -> None:
    der = tmp_path / "client.der"
    der.write_bytes(cert_of(pki.client).public_bytes(serialization.Encoding.DER))
    ed448_pem = pem(built(pki, "ed448", key=ed448.Ed448PrivateKey.generate()))
    cases = [
        (pki.rsa1024.cert, f"k: {pki.rsa1024.cert} has an RSA key of 1024 bits; at least {MIN_RSA_BITS} are required"),
        (cert_of(pki.rsa1024).public_bytes(serialization.Encoding.PEM), "k: the certificate has an RSA key of 1024 bits"),
        (ed448_pem, "k: the certificate has an unsupported key type"),
        (der, f"k: {der} is not a PEM certificate"),
        (b"hello", "k: the certificate is not a PEM certificate"),
        (tmp_path / "absent.crt", f"k: {tmp_path / 'absent.crt'} is not a PEM certificate"),
    ]
    for source, says in cases:
        with pytest.raises(ConfigError) as err:
            inspect_certificate(source, "k")
        assert err.value.message.startswith(says), err.value.message


def test_smime_certificates_must_be_able_to_sign_mail(pki: Pki) -> None:
    assert inspect_smime_certificate(pki.smime.cert, "smtp.certificate").spki_sha256 == spki_sha256(cert_of(pki.smime))
    with pytest.raises(ConfigError) as err:
        inspect_smime_certificate(pki.client.cert, "smtp.certificate")
    assert err.value.message == \
        f"smtp.certificate: {pki.client.cert} is not an S/MIME certificate: its ExtendedKeyUsage lacks emailProtection"

    no_eku = built(pki, "no-eku")
    encipher_only_ku = x509.KeyUsage(False, False, True, False, False, False, False, False, False)
    wrong_ku = built(pki, "wrong-ku", extensions=[(encipher_only_ku, True),
                                                  (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)])
    assert smime_problems(no_eku) == ["it has no ExtendedKeyUsage (emailProtection is required)"]  # no KeyUsage is fine
    assert smime_problems(wrong_ku) == ["its KeyUsage allows neither digitalSignature nor nonRepudiation"]
    with pytest.raises(ConfigError, match=r"^x: the certificate is not an S/MIME certificate: it has no ExtendedKeyUsage"):
        inspect_smime_certificate(pem(no_eku), "x")


def test_mail_is_encrypted_only_to_rsa_keys_that_allow_key_encipherment(pki: Pki) -> None:
    rsa_key = rsa.generate_private_key(65537, 2048)
    assert encryptable(cert_of(pki.smime))  # RSA 2048, keyEncipherment
    assert encryptable(built(pki, "rsa-no-ku", key=rsa_key))  # no KeyUsage: nothing forbids it
    assert not encryptable(cert_of(pki.rsa2048))  # a client certificate's KeyUsage: digitalSignature only
    assert not encryptable(cert_of(pki.client))  # EC: key agreement is not supported
    assert not encryptable(built(pki, "rsa1024", key=rsa.generate_private_key(65537, 1024)))


def test_email_addresses_are_the_rfc822_sans_lowercased(pki: Pki) -> None:
    assert email_addresses(cert_of(pki.smime)) == {"billing@acme.example", "ap@acme.example"}
    assert email_addresses(cert_of(pki.server)) == set()  # DNS and IP SANs are not addresses
    assert email_addresses(cert_of(pki.client)) == set()  # no SAN at all


def test_ca_certificates_reads_every_certificate_of_every_bundle(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert.read_bytes() + (pki.folder / "other" / "other.crt").read_bytes())
    found = ca_certificates((pki.ca.cert, bundle))
    assert [c.subject for c in found] == [cert_of(pki.ca).subject, cert_of(pki.ca).subject,
                                          x509.load_pem_x509_certificate((pki.folder / "other" / "other.crt").read_bytes()).subject]
    with pytest.raises(ConfigError) as err:
        ca_certificates((bundle, tmp_path / "absent.pem"), "smtp.partner_ca")
    assert err.value.message.startswith(f"smtp.partner_ca[1]: cannot read certificates from {tmp_path / 'absent.pem'}")


def test_expires_soon_counts_whole_days_left(pki: Pki) -> None:
    now = datetime.now(UTC)
    ten_days = devpki.issue(pki.ca, pki.folder, "ten-days", role="client", not_after=now + timedelta(days=10, hours=1))
    info = inspect_certificate(ten_days.cert, "test")
    assert expires_soon(info) and expires_soon(info, days=11)
    assert not expires_soon(info, days=10) and not expires_soon(info, days=5)
    assert not expires_soon(inspect_certificate(pki.client.cert, "test"))  # 825 days
