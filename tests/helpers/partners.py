"""Partners files and certificate rollovers: a development CA with a few leaf certificates, partners
files written beside them, the peer a certificate presents, the fingerprint openssl prints."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import devpki
from gateway.errors import Forbidden
from gateway.model import PeerIdentity
from gateway.partners.directory import PartnerDirectory
from gateway.tls import CertInfo, inspect_certificate

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
FUTURE = NOW + 30 * DAY
PAST = NOW - DAY


def rollover_pki(folder: Path) -> dict[str, devpki.Issued]:
    """A development CA and a few leaf certificates, in ``folder`` (where the partners files that name them go)."""
    ca = devpki.make_ca(folder, "ca")
    out = {"ca": ca}
    for name, role in (("old", "client"), ("new", "client"), ("third", "client"), ("sig-old", "signing"),
                       ("sig-new", "signing"), ("sig-next", "signing")):
        out[name] = devpki.issue(ca, folder, name, role=role)
    out["smime"] = devpki.issue(ca, folder, "smime", role="smime", emails=("billing@acme.example",))
    return out


def info(cert: devpki.Issued) -> CertInfo:
    return inspect_certificate(cert.cert, "test")


def peer(cert: devpki.Issued) -> PeerIdentity:
    return PeerIdentity(info(cert).spki_sha256, "test", "https")


def write_partners(folder: Path, body: str) -> Path:
    """A partners file beside the certificates (paths in it are relative to its folder)."""
    path = folder / "partners.toml"
    path.write_text(body, encoding="utf-8")
    return path


def acme(client: str, *, extra: str = "", status: str = "active") -> str:
    return (f'[[partners]]\nname = "acme"\nstatus = "{status}"\nverified_by = "pytest"\nverified_at = "2026-01-01T00:00:00Z"\n'
            f'party_ids = ["0088:5790000435975"]\nclient_certs = [{client}]\n{extra}')


def refused(directory: PartnerDirectory, cert: devpki.Issued, at: datetime | None = None) -> str:
    with pytest.raises(Forbidden) as caught:
        directory.gate(peer(cert), at)
    return caught.value.code


def openssl_fingerprint(cert: Path) -> str:
    """What `openssl x509 -noout -fingerprint -sha256` prints after '=': AB:CD:… (colons, upper case)."""
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                         capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    label, _, value = out.partition("=")
    assert label.lower() == "sha256 fingerprint", out
    return value
