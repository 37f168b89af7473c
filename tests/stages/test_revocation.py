"""CRL-based revocation of partner client certificates (gateway/stages/revocation.py), with a PKI made at test time."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from gateway.errors import ConfigError, Forbidden, Transient
from gateway.stages.revocation import CertificateRevoked, Revocation, RevocationPolicy, RevocationUnknown, find_issuer

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "revocation tests"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    def issue(self, cn: str, *, crl_dp: str | None = None) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(NOW - 30 * DAY).not_valid_after(NOW + 365 * DAY))
        if crl_dp is not None:
            dp = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_dp)], None, None, None)
            b = b.add_extension(x509.CRLDistributionPoints([dp]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def crl(self, revoked: tuple[int, ...] = (), *, this: datetime = NOW - DAY, next: datetime = NOW + 6 * DAY,
            extensions: tuple[x509.ExtensionType, ...] = ()) -> x509.CertificateRevocationList:
        b = x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject).last_update(this).next_update(next)
        for serial in revoked:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this).build())
        for ext in extensions:
            b = b.add_extension(ext, critical=True)
        return b.sign(self.key, hashes.SHA256())


def make_ca(cn: str, *, rsa_key: bool = False, crl_sign: bool = True) -> CA:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=crl_sign, encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - 365 * DAY).not_valid_after(NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA256()))
    return CA(cert, key)


def write(path: Path, crl: x509.CertificateRevocationList | bytes, *, der: bool = False) -> Path:
    data = crl if isinstance(crl, bytes) else crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # as a CRL fetcher would: a new inode, never a half-written file
    return path


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca("Partner CA")


@pytest.fixture(scope="module")
def other_ca() -> CA:
    return make_ca("Other Partner CA")


@pytest.fixture(scope="module")
def good(ca: CA) -> x509.Certificate:
    return ca.issue("good partner")


@pytest.fixture(scope="module")
def bad(ca: CA) -> x509.Certificate:
    return ca.issue("revoked partner")


def revocation(tmp_path: Path, cas: list[CA], *crls: x509.CertificateRevocationList | bytes, der: bool = False,
               soft_fail: bool = False, max_age_s: float | None = None) -> Revocation:
    files = tuple(write(tmp_path / f"crl{i}.{'der' if der else 'pem'}", c, der=der) for i, c in enumerate(crls))
    return Revocation(RevocationPolicy(files, soft_fail=soft_fail, max_age_s=max_age_s), [c.cert for c in cas])


# -- the verdicts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("der", [False, True], ids=["pem", "der"])
def test_good_passes_and_revoked_is_refused(tmp_path: Path, ca: CA, good: x509.Certificate, bad: x509.Certificate, der: bool) -> None:
    rev = revocation(tmp_path, [ca], ca.crl((bad.serial_number,)), der=der)
    assert rev.check(good, ca.cert, NOW) == "good"
    with pytest.raises(CertificateRevoked) as info:
        rev.check(bad, ca.cert, NOW)
    exc = info.value
    assert isinstance(exc, Forbidden) and exc.code == "CERT_REVOKED" and exc.http_status == 403
    assert exc.as_json()["error"] == "CERT_REVOKED"
    assert f"{bad.serial_number:#x}" in exc.message and "new certificate" in exc.message
    assert str(tmp_path) not in exc.message


def test_no_crl_for_the_issuer_fails_closed(tmp_path: Path, ca: CA, other_ca: CA) -> None:
    rev = revocation(tmp_path, [ca, other_ca], ca.crl())
    cert = other_ca.issue("partner of the other CA")
    with pytest.raises(RevocationUnknown) as info:
        rev.check(cert, other_ca.cert, NOW)
    exc = info.value
    # The operator's CRL is missing or stale: the partner is told to retry (503), not refused for good.
    assert isinstance(exc, Transient) and exc.code == "REVOCATION_UNKNOWN" and exc.http_status == 503
    assert "Retry later" in exc.message and str(tmp_path) not in exc.message
    assert "Other Partner CA" in exc.reason


def test_unknown_issuer_fails_closed(tmp_path: Path, ca: CA, good: x509.Certificate) -> None:
    rev = revocation(tmp_path, [ca], ca.crl())
    with pytest.raises(RevocationUnknown):
        rev.check(good, None, NOW)  # not self-signed: no issuer found is not a pin


def test_stale_crl_fails_closed(tmp_path: Path, ca: CA, good: x509.Certificate, bad: x509.Certificate) -> None:
    rev = revocation(tmp_path, [ca], ca.crl((bad.serial_number,), this=NOW - 10 * DAY, next=NOW - DAY))
    with pytest.raises(RevocationUnknown) as info:
        rev.check(good, ca.cert, NOW)
    assert "stale" in info.value.reason
    with pytest.raises(CertificateRevoked):  # a listed serial is revoked, stale list or not
        rev.check(bad, ca.cert, NOW)
    assert rev.check(good, ca.cert, NOW - 2 * DAY) == "good"


def test_max_age_makes_an_old_crl_stale(tmp_path: Path, ca: CA, good: x509.Certificate) -> None:
    rev = revocation(tmp_path, [ca], ca.crl(this=NOW - 2 * DAY, next=NOW + 30 * DAY), max_age_s=DAY.total_seconds())
    with pytest.raises(RevocationUnknown):
        rev.check(good, ca.cert, NOW)
    assert rev.check(good, ca.cert, NOW - 1.5 * DAY) == "good"


def test_soft_fail_reports_unknown_and_is_a_weakening(tmp_path: Path, ca: CA, other_ca: CA, good: x509.Certificate,
                                                      bad: x509.Certificate) -> None:
    rev = revocation(tmp_path, [ca, other_ca], ca.crl((bad.serial_number,), this=NOW - 10 * DAY, next=NOW - DAY), soft_fail=True)
    assert rev.check(good, ca.cert, NOW) == "unknown"
    assert rev.check(other_ca.issue("x"), other_ca.cert, NOW) == "unknown"
    with pytest.raises(CertificateRevoked):
        rev.check(bad, ca.cert, NOW)
    assert any("soft_fail" in w for w in rev.warnings())
    assert Revocation(RevocationPolicy(rev.policy.crl_files), [ca.cert, other_ca.cert]).warnings() == []


def test_pinned_self_signed_needs_no_crl(tmp_path: Path, ca: CA) -> None:
    pinned = make_ca("a partner with a self-signed certificate").cert
    rev = revocation(tmp_path, [ca], ca.crl())
    assert rev.check(pinned, None, NOW) == "pinned"


def test_no_crl_files_is_off(ca: CA, good: x509.Certificate) -> None:
    rev = Revocation(RevocationPolicy(()), [ca.cert])
    assert rev.check(good, ca.cert) == "off"
    assert rev.check(good, None) == "off"
    assert rev.status() == [] and rev.warnings() == []
    assert Revocation(RevocationPolicy((), soft_fail=True), []).warnings() == []


def test_crl_is_used_only_with_the_issuer_that_signed_it(tmp_path: Path, ca: CA, other_ca: CA, good: x509.Certificate) -> None:
    """A certificate is looked up by its issuer; the CRL must have been verified with that issuer's key."""
    rev = revocation(tmp_path, [ca, other_ca], ca.crl(), other_ca.crl())
    with pytest.raises(RevocationUnknown):
        rev.check(good, other_ca.cert, NOW)  # wrong issuer given by the caller
    assert find_issuer(good, [other_ca.cert, ca.cert]) == ca.cert


# -- what is refused at load ---------------------------------------------------------------------------


def test_crl_of_a_foreign_ca_is_refused(tmp_path: Path, ca: CA) -> None:
    foreign = make_ca("Somebody Else's CA")
    with pytest.raises(ConfigError) as info:
        revocation(tmp_path, [ca], foreign.crl())
    msg = info.value.message
    assert msg.startswith("revocation.crls[0]: ") and "crl0.pem" in msg and "not one of the partner CAs" in msg


def test_crl_signed_by_an_impostor_with_the_same_name_is_refused(tmp_path: Path, ca: CA) -> None:
    impostor = make_ca("Partner CA")  # same subject, different key
    assert impostor.cert.subject == ca.cert.subject
    with pytest.raises(ConfigError, match=r"revocation\.crls\[1\]: .*crl1\.der.* does not verify"):
        revocation(tmp_path, [ca], ca.crl(), impostor.crl(), der=True)


def test_ca_without_crl_sign_usage_cannot_sign_crls(tmp_path: Path) -> None:
    ca = make_ca("No CRL CA", crl_sign=False)
    with pytest.raises(ConfigError, match="key usage"):
        revocation(tmp_path, [ca], ca.crl())


def _sha1_resigned(ca: CA) -> bytes:
    """cryptography (>= 45 or so) will not sign with SHA-1, so a SHA-256 CRL is re-signed by hand: the
    two OIDs encode to the same length and an RSA-2048 signature is 256 bytes either way."""
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    crl = ca.crl()
    sha256_rsa, sha1_rsa = bytes.fromhex("2a864886f70d01010b"), bytes.fromhex("2a864886f70d010105")
    der = crl.public_bytes(serialization.Encoding.DER)
    assert der.count(sha256_rsa) == 2  # in tbsCertList and in the outer signatureAlgorithm
    signature = ca.key.sign(crl.tbs_certlist_bytes.replace(sha256_rsa, sha1_rsa), padding.PKCS1v15(), hashes.SHA1())
    return der.replace(sha256_rsa, sha1_rsa)[:-256] + signature


def test_sha1_signed_crl_is_refused(tmp_path: Path) -> None:
    ca = make_ca("RSA CA", rsa_key=True)
    try:
        forged = _sha1_resigned(ca)
        algorithm = x509.load_der_x509_crl(forged).signature_hash_algorithm
        assert algorithm is not None and algorithm.name == "sha1"
    except Exception as exc:  # pragma: no cover - depends on the cryptography build
        pytest.skip(f"cannot make a SHA-1-signed CRL with this cryptography: {exc!r}")
    with pytest.raises(ConfigError, match=r"revocation\.crls\[0\]: .* is signed with SHA1"):
        revocation(tmp_path, [ca], forged)
    assert revocation(tmp_path, [ca], ca.crl()).check(ca.issue("rsa partner"), ca.cert, NOW) == "good"


def test_partial_and_delta_crls_are_refused(tmp_path: Path, ca: CA) -> None:
    ca_only = x509.IssuingDistributionPoint(None, None, False, True, None, False, False)
    with pytest.raises(ConfigError, match="covers only part"):
        revocation(tmp_path, [ca], ca.crl(extensions=(ca_only,)))
    with pytest.raises(ConfigError, match="delta CRL"):
        revocation(tmp_path, [ca], ca.crl(extensions=(x509.DeltaCRLIndicator(1),)))


def test_distribution_point_crl_covers_only_its_certificates(tmp_path: Path, ca: CA) -> None:
    url = "http://crl.example/partner-ca-1.crl"
    idp = x509.IssuingDistributionPoint([x509.UniformResourceIdentifier(url)], None, False, False, None, False, False)
    rev = revocation(tmp_path, [ca], ca.crl(extensions=(idp,)))
    assert rev.check(ca.issue("in shard 1", crl_dp=url), ca.cert, NOW) == "good"
    with pytest.raises(RevocationUnknown):
        rev.check(ca.issue("in shard 2", crl_dp="http://crl.example/partner-ca-2.crl"), ca.cert, NOW)
    with pytest.raises(RevocationUnknown):
        rev.check(ca.issue("no distribution point"), ca.cert, NOW)


def test_missing_file_and_bad_policy(tmp_path: Path, ca: CA) -> None:
    with pytest.raises(ConfigError, match=r"revocation\.crls\[0\]: cannot read .*absent\.crl"):
        Revocation(RevocationPolicy((tmp_path / "absent.crl",)), [ca.cert])
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="revocation.max_age_s"):
            RevocationPolicy((), max_age_s=bad)


def test_random_bytes_are_a_config_error_never_anything_else(tmp_path: Path, ca: CA) -> None:
    rng = random.Random(20300601)  # fixed seed: a failure can be replayed
    valid = ca.crl((1, 2, 3)).public_bytes(serialization.Encoding.DER)
    blobs = [b"", b"-----BEGIN X509 CRL-----\n", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", valid[:-1], valid[:40]]
    blobs += [rng.randbytes(rng.randrange(1, 2048)) for _ in range(200)]
    blobs += [b"\x30\x82" + rng.randbytes(rng.randrange(2, 600)) for _ in range(100)]  # starts like a DER SEQUENCE
    for _ in range(300):  # single-byte mutations of a valid CRL
        mutated = bytearray(valid)
        mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        blobs.append(bytes(mutated))
    path = tmp_path / "fuzz.crl"
    for blob in blobs:
        write(path, blob)
        try:
            Revocation(RevocationPolicy((path,)), [ca.cert])
        except ConfigError as exc:
            assert exc.message.startswith("revocation.crls[0]: ")


# -- refresh -------------------------------------------------------------------------------------------


def test_refresh_picks_up_a_newly_revoked_serial(tmp_path: Path, ca: CA, good: x509.Certificate) -> None:
    rev = revocation(tmp_path, [ca], ca.crl())
    assert rev.check(good, ca.cert, NOW) == "good"
    assert rev.refresh() is False
    write(tmp_path / "crl0.pem", ca.crl((good.serial_number,), this=NOW - DAY / 2))
    assert rev.refresh() is True
    with pytest.raises(CertificateRevoked):
        rev.check(good, ca.cert, NOW)
    assert rev.refresh() is False


@pytest.mark.parametrize("replacement", ["garbage", "foreign", "rollback", "deleted"])
def test_bad_replacement_keeps_the_old_crl(tmp_path: Path, ca: CA, good: x509.Certificate, bad: x509.Certificate,
                                           replacement: str) -> None:
    rev = revocation(tmp_path, [ca], ca.crl((bad.serial_number,)))
    path = tmp_path / "crl0.pem"
    if replacement == "garbage":
        write(path, b"<html>502 Bad Gateway</html>")
    elif replacement == "foreign":
        write(path, make_ca("Somebody Else's CA").crl())
    elif replacement == "rollback":
        write(path, ca.crl(this=NOW - 5 * DAY))  # an older CRL, from before the serial was revoked
    else:
        path.unlink()
    with pytest.raises(ConfigError, match=r"revocation\.crls\[0\]: .*crl0\.pem"):
        rev.refresh()
    with pytest.raises(CertificateRevoked):
        rev.check(bad, ca.cert, NOW)
    assert rev.check(good, ca.cert, NOW) == "good"
    with pytest.raises(ConfigError):  # still bad: said again on the next refresh
        rev.refresh()


# -- reporting and helpers -----------------------------------------------------------------------------


def test_status(tmp_path: Path, ca: CA, other_ca: CA) -> None:
    rev = revocation(tmp_path, [ca, other_ca], ca.crl((1, 2), this=NOW - 3 * DAY), ca.crl((1, 2, 3)), other_ca.crl(next=NOW + DAY),
                     max_age_s=(2 * DAY).total_seconds())
    rows = rev.status(NOW)
    assert [r["revoked"] for r in rows] == [2, 3, 0]
    assert [r["in_use"] for r in rows] == [False, True, True]  # the newer CRL of the same CA wins
    assert rows[0]["issuer"] == ca.cert.subject.rfc4514_string() and rows[0]["file"] == str(tmp_path / "crl0.pem")
    assert rows[0]["this_update"] == (NOW - 3 * DAY).isoformat() and rows[0]["next_update"] == (NOW + 6 * DAY).isoformat()
    assert [r["seconds_until_stale"] for r in rows] == [-DAY.total_seconds(), DAY.total_seconds(), DAY.total_seconds()]
    assert rev.check(ca.issue("p"), ca.cert, NOW) == "good"


def test_find_issuer(ca: CA, other_ca: CA, good: x509.Certificate) -> None:
    impostor = make_ca("Partner CA")
    assert find_issuer(good, [other_ca.cert, impostor.cert, ca.cert]) == ca.cert
    assert find_issuer(good, [other_ca.cert, impostor.cert]) is None
    assert find_issuer(good, []) is None
