"""Certificate rollover: acceptance windows of registered certificates, pending partners and their activation.

* Units: ``parse_instant``, the partners file's inline tables ``{file, from, until}`` and their round
  trip through ``editing()``, ``rollover()``, ``fingerprint_matches`` / ``unconfirmed`` / ``activated``
  (against the fingerprint the real ``openssl x509 -fingerprint -sha256`` prints), ``signers_for``.
* The ``partners`` commands: ``edit --active-from / --retire-cert --retire-at``, ``activate``, ``show``,
  and ``resume`` of a pending partner, checked with ``gate()`` on the file as the daemon loads it.
* Over the real mutual-TLS listener: the daemon re-reads the edited partners file by itself (every
  ``reload_interval_s``); during an overlap both certificates are accepted, a retired or not-yet-active
  one gets 403 CERTIFICATE_NOT_ACTIVE and a pending partner 403 PARTNER_PENDING.

Certificates are made at test time with gateway.devpki.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.cli.common import current_user
from gateway.errors import ConfigError, Forbidden
from gateway.model import CertWindow, Partner, PartnerStatus, PeerIdentity
from gateway.operations import instance
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.book import _as_toml, editing, instant_text, load_directory, parse_instant
from gateway.partners.edit import activated, fingerprint_matches, register_partner, rollover, unconfirmed, with_status
from gateway.storage.sqlite.store import SqliteStore
from gateway.tls import CertInfo, cert_sha256, inspect_certificate, inspect_smime_certificate
from tests.helpers import FOREIGN, FOREIGN_IDS, audit_of, eventually, numbered, post, run_command, run_command_aside

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
FUTURE = NOW + 30 * DAY
PAST = NOW - DAY
JAN31 = datetime(2027, 1, 31, tzinfo=UTC)


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, devpki.Issued]:
    """A development CA and a few leaf certificates, in the folder the partners files of this module live in."""
    folder = tmp_path_factory.mktemp("rollover-pki")
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


def refused(directory, cert: devpki.Issued, at: datetime | None = None) -> str:
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


def audit_records(inst: instance.Instance, action: str) -> list[dict[str, Any]]:
    """``audit_of`` the stopped instance, read with a store of our own (a sync test has no loop)."""
    async def read() -> list[dict[str, Any]]:
        store = SqliteStore(inst.state_dir)
        try:
            return await audit_of(store, action)
        finally:
            await store.close()

    return asyncio.run(read())


# --- 1. parse_instant and the inline tables --------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2027-01-31", JAN31),
    ("2027-01-31T12:00:00Z", JAN31 + timedelta(hours=12)),
    ("2027-01-31T12:30Z", JAN31 + timedelta(hours=12, minutes=30)),
])
def test_parse_instant_accepts_a_date_and_a_utc_time(text, expected):
    got = parse_instant(text, "start")
    assert got == expected and got.tzinfo is not None and got.utcoffset() == timedelta(0)
    assert instant_text(got) == expected.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("text", ["", "junk", "31.01.2027", "2027-1-31", "2027-02-30", "2027-01-31T12:00:00",
                                  "2027-01-31T12:00:00+02:00", "2027-01-31 12:00:00Z", "2027-01-31T25:00:00Z",
                                  " 2027-01-31", "2027-01-31\n"])
def test_parse_instant_refuses_junk_naming_the_key(text):
    with pytest.raises(ConfigError) as caught:
        parse_instant(text, "partners[0].client_certs[1].from")
    assert caught.value.message.startswith(f"partners[0].client_certs[1].from: {text!r} is not a date")
    assert "2027-01-31T12:00:00Z" in caught.value.message  # says how to write it


@pytest.mark.parametrize(("entry", "named"), [
    ('{file = "new.crt", from = "soon"}', "partners[0].client_certs[1].from: 'soon' is not a date"),
    ('{file = "new.crt", until = "2027-13-01"}', "partners[0].client_certs[1].until: '2027-13-01' is not a date"),
    ('{file = "new.crt", from = "2027-02-01", until = "2027-01-01"}',
     "partners[0].client_certs[1].until: must be later than partners[0].client_certs[1].from"),
    ('{file = "new.crt", from = "2027-02-01", until = "2027-02-01T00:00:00Z"}',  # the same moment: an empty window
     "partners[0].client_certs[1].until: must be later than partners[0].client_certs[1].from"),
    ('{file = "new.crt", from = "2027-02-01", unitl = "2027-03-01"}', "partners[0].client_certs[1].unitl: unknown key"),
    ('{file = "new.crt", start = "2027-02-01"}', "partners[0].client_certs[1].start: unknown key"),
    ('{from = "2027-02-01"}', "partners[0].client_certs[1].file: missing (required)"),
    ('{file = "gone.crt", from = "2027-02-01"}', "partners[0].client_certs[1].file: file not found"),
    ('{file = "new.crt", from = 2027-02-01}', "partners[0].client_certs[1].from: expected a string"),
])
def test_bad_window_is_refused_naming_the_key(pki, entry, named):
    path = write_partners(pki["ca"].cert.parent, acme(f'"old.crt", {entry}'))
    with pytest.raises(ConfigError) as caught:
        load_directory(path)
    assert caught.value.message.startswith(named), caught.value.message


# --- 2. loading and writing back -------------------------------------------------------------------


def test_windows_load_and_round_trip(pki):
    folder = pki["ca"].cert.parent
    path = write_partners(folder, acme(
        '"old.crt", {file = "new.crt", from = "2027-01-31T12:00:00Z"}',
        extra='signing_certs = [{file = "sig-old.crt", until = "2027-06-01"}, "sig-new.crt"]\n'
              'emails = ["billing@acme.example"]\n'
              'smime_certs = [{file = "smime.crt", from = "2027-01-01", until = "2028-01-01T08:00:00Z"}]\n'))
    [p] = load_directory(path).partners
    abs_ = {name: str(folder / f"{name}.crt") for name in ("old", "new", "sig-old", "sig-new", "smime")}
    expected = (
        CertWindow("client", abs_["new"], info(pki["new"]).spki_sha256, JAN31 + timedelta(hours=12), None),
        CertWindow("signing", abs_["sig-old"], info(pki["sig-old"]).spki_sha256, None, datetime(2027, 6, 1, tzinfo=UTC)),
        CertWindow("smime", abs_["smime"], info(pki["smime"]).spki_sha256, datetime(2027, 1, 1, tzinfo=UTC),
                   datetime(2028, 1, 1, 8, tzinfo=UTC)),
    )
    assert p.windows == expected
    assert p.client_certs == (abs_["old"], abs_["new"]) and p.signing_certs == (abs_["sig-old"], abs_["sig-new"])

    shown = _as_toml(p, folder)
    assert shown["client_certs"] == ["old.crt", {"file": "new.crt", "from": "2027-01-31T12:00:00Z"}]
    assert shown["signing_certs"] == [{"file": "sig-old.crt", "until": "2027-06-01T00:00:00Z"}, "sig-new.crt"]
    assert shown["smime_certs"] == [{"file": "smime.crt", "from": "2027-01-01T00:00:00Z", "until": "2028-01-01T08:00:00Z"}]

    with editing(path):
        pass  # no change: written back as it was read
    [again] = load_directory(path).partners
    assert again == p
    assert 'from = "2027-01-31T12:00:00Z"' in path.read_text()


def test_pending_partner_round_trips(pki):
    path = write_partners(pki["ca"].cert.parent, acme('"old.crt"', status="pending").replace('"pytest"', '""')
                          .replace('"2026-01-01T00:00:00Z"', '""'))
    with editing(path):
        pass
    [p] = load_directory(path).partners
    assert (p.status, p.verified_by, p.verified_at) == (PartnerStatus.PENDING, "", "")


# --- 3. rollover() ---------------------------------------------------------------------------------


@pytest.fixture
def acme_file(pki, tmp_path) -> Path:
    """acme with one client certificate and one signing certificate, no windows."""
    for name in ("old", "new", "third", "sig-old", "sig-new"):
        (tmp_path / f"{name}.crt").write_bytes(pki[name].cert.read_bytes())
    return write_partners(tmp_path, acme('"old.crt"', extra='signing_certs = ["sig-old.crt"]\n'))


def test_rollover_add_retire_remove(pki, acme_file):
    folder = acme_file.parent
    old_k, new_k, sig_k = (info(pki[n]).spki_sha256 for n in ("old", "new", "sig-old"))
    new_path = str(folder / "new.crt")
    [p] = load_directory(acme_file).partners
    start, end = NOW + DAY, NOW + 10 * DAY

    added = rollover(p, [("client", new_path, new_k)], start)
    assert added.client_certs == (str(folder / "old.crt"), new_path)
    assert added.windows == (CertWindow("client", new_path, new_k, start, None),)
    assert added.signing_certs == p.signing_certs

    retired = rollover(added, [], retire={old_k: end})
    assert set(retired.windows) == {CertWindow("client", new_path, new_k, start, None),
                                    CertWindow("client", str(folder / "old.crt"), old_k, None, end)}
    # written and read back as the daemon would
    with editing(acme_file) as ps:
        ps[0] = retired
    directory = load_directory(acme_file)
    assert set(directory.get("acme").windows) == set(retired.windows)
    assert directory.gate(peer(pki["old"]), NOW).name == "acme"
    assert refused(directory, pki["new"], NOW) == "CERTIFICATE_NOT_ACTIVE"
    assert directory.gate(peer(pki["new"]), start).name == "acme"  # from its start on
    assert directory.gate(peer(pki["old"]), end - timedelta(seconds=1)).name == "acme"
    assert refused(directory, pki["old"], end) == "CERTIFICATE_NOT_ACTIVE"  # until, not including, its end

    removed = rollover(retired, [], remove=frozenset({old_k, sig_k}))
    assert removed.client_certs == (new_path,) and removed.signing_certs == ()
    assert removed.windows == (CertWindow("client", new_path, new_k, start, None),)  # the removed one's window goes with it


def test_rollover_refuses_unknown_keys_and_a_retirement_before_the_start(pki, acme_file):
    [p] = load_directory(acme_file).partners
    new_k = info(pki["new"]).spki_sha256
    stranger = info(pki["third"]).spki_sha256
    for kw in ({"retire": {stranger: FUTURE}}, {"remove": frozenset({stranger})}):
        with pytest.raises(ConfigError, match=f"has no certificate with key SHA-256 {stranger}"):
            rollover(p, [], **kw)
    start = NOW + 10 * DAY
    added = rollover(p, [("client", str(acme_file.parent / "new.crt"), new_k)], start)
    for end in (start - DAY, start):
        with pytest.raises(ConfigError, match=r"the retirement \(.*\) must come after the certificate's start"):
            rollover(added, [], retire={new_k: end})
    assert rollover(added, [], retire={new_k: start + DAY}).windows == (
        CertWindow("client", str(acme_file.parent / "new.crt"), new_k, start, start + DAY),)


def test_rollover_refuses_the_same_certificate_twice(pki, acme_file):
    [p] = load_directory(acme_file).partners
    old = str(acme_file.parent / "old.crt")
    new = str(acme_file.parent / "new.crt")
    new_k = info(pki["new"]).spki_sha256
    with pytest.raises(ConfigError, match="registered for 'acme' already"):
        rollover(p, [("client", old, info(pki["old"]).spki_sha256)])
    with pytest.raises(ConfigError, match="registered for 'acme' already"):
        rollover(p, [("client", new, new_k), ("client", new, new_k)])


# --- 4. fingerprints and activation ----------------------------------------------------------------


def test_fingerprint_matches_the_openssl_colon_form_and_the_key_hash(pki):
    old, new = info(pki["old"]), info(pki["new"])
    colon = openssl_fingerprint(pki["old"].cert)
    assert len(colon) == 95 and colon.count(":") == 31 and colon == colon.upper()
    assert colon.replace(":", "").lower() == cert_sha256(old.cert)
    for given in (colon, colon.lower(), f"  {colon.replace(':', ' ')} ", cert_sha256(old.cert), old.spki_sha256,
                  ":".join(old.spki_sha256[i:i + 2] for i in range(0, 64, 2)).upper()):
        assert fingerprint_matches(old, given), given
    wrong = colon[:-1] + ("0" if colon[-1] != "0" else "1")
    for given in (wrong, colon[:48], colon + ":00", "", openssl_fingerprint(pki["new"].cert), new.spki_sha256,
                  "sha256 Fingerprint=" + colon.replace(":", "")[:45]):
        assert not fingerprint_matches(old, given), given


def test_unconfirmed_names_what_is_missing_or_wrong(pki):
    old, new = info(pki["old"]), info(pki["new"])
    fp_old, fp_new = openssl_fingerprint(pki["old"].cert), openssl_fingerprint(pki["new"].cert)
    assert unconfirmed([old, new], [fp_new, fp_old]) == []
    assert unconfirmed([old, new], [fp_old, new.spki_sha256, "  "]) == []  # a blank field is no claim
    [missing] = unconfirmed([old, new], [fp_old])
    assert "was not confirmed" in missing and new.spki_sha256[:16] in missing and new.subject in missing
    bogus = "00" * 32
    problems = unconfirmed([old], [fp_old, bogus])
    assert problems == [f"{bogus!r} is not the fingerprint of any of these certificates"]
    assert len(unconfirmed([old], [])) == 1
    wrong = fp_old[:-2] + ("01" if fp_old.endswith("00") else "00")  # differs in the last byte, whatever it was
    assert len(unconfirmed([old, new], [wrong, fp_new])) == 2  # one wrong: and so old is not confirmed


def pending_acme(pki, tmp_path: Path) -> Partner:
    for name in ("old", "smime"):
        (tmp_path / f"{name}.crt").write_bytes(pki[name].cert.read_bytes())
    path = write_partners(tmp_path, acme('"old.crt"', status="pending", extra='emails = ["billing@acme.example"]\n'
                                                                              'smime_certs = ["smime.crt"]\n'))
    [p] = load_directory(path).partners
    return p


def test_activated_needs_every_certificate_confirmed(pki, tmp_path):
    p = pending_acme(pki, tmp_path)
    fp_client, fp_smime = openssl_fingerprint(pki["old"].cert), openssl_fingerprint(pki["smime"].cert)
    with pytest.raises(ConfigError, match="activation refused: .*was not confirmed"):
        activated(p, [fp_client], "bob")
    with pytest.raises(ConfigError, match="activation refused: .*is not the fingerprint of any"):
        activated(p, [fp_client, fp_smime, openssl_fingerprint(pki["new"].cert)], "bob")
    done = activated(p, [fp_smime.lower(), info(pki["old"]).spki_sha256], "bob (by telephone)")
    assert (done.status, done.verified_by) == (PartnerStatus.ACTIVE, "bob (by telephone)")
    assert abs(parse_instant(done.verified_at, "verified_at") - datetime.now(UTC)) < timedelta(minutes=1)
    assert inspect_smime_certificate(Path(done.smime_certs[0]), "x").spki_sha256 == info(pki["smime"]).spki_sha256
    for state in (PartnerStatus.ACTIVE, PartnerStatus.SUSPENDED):
        with pytest.raises(ConfigError, match=f"is {state.value}, not pending activation"):
            activated(with_status(p, state), [fp_client, fp_smime], "bob")


# --- 7. signers_for --------------------------------------------------------------------------------


def test_signers_for_leaves_out_retired_and_future_signing_certificates(pki, tmp_path):
    for name in ("old", "sig-old", "sig-new", "sig-next"):
        (tmp_path / f"{name}.crt").write_bytes(pki[name].cert.read_bytes())
    path = write_partners(tmp_path, acme('"old.crt"', extra=(
        f'signing_certs = [{{file = "sig-old.crt", until = "{instant_text(PAST)}"}}, "sig-new.crt", '
        f'{{file = "sig-next.crt", from = "{instant_text(FUTURE)}"}}]\n')))
    directory = load_directory(path)
    keys = {n: info(pki[n]).spki_sha256 for n in ("sig-old", "sig-new", "sig-next")}

    def signers(at: datetime | None = None) -> set[str]:
        return {s.spki for s in directory.signers_for("acme", at)}

    assert signers() == {keys["sig-new"]}
    assert signers(PAST - DAY) == {keys["sig-old"], keys["sig-new"]}
    assert signers(FUTURE) == {keys["sig-new"], keys["sig-next"]}
    assert directory.signers_for("nobody") == []
    # the client certificate (no window) is not affected by its partner's signing windows
    assert directory.gate(peer(pki["old"])).name == "acme"


def test_window_of_a_signing_certificate_does_not_gate_the_client_certificate(inst, capsys):
    # One certificate used for both TLS and document signing (clientAuth + documentSigning is a common profile):
    # registering it as a signing certificate accepted from next month must not stop the TLS client today.
    cfg = str(inst.config)
    code, _, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--signing-cert", str(inst.demo_client.cert),
                           "--active-from", instant_text(FUTURE), "-c", cfg)
    assert code == 0, err
    directory = load_directory(inst.partners)
    assert directory.signers_for(DEMO_PARTNER) == []  # the signing certificate waits for its start, as asked
    assert directory.gate(peer(inst.demo_client)).name == DEMO_PARTNER


# --- 5. the partners commands ----------------------------------------------------------------------


def test_cli_rollover_with_active_from_and_retire(inst, tmp_path, capsys):
    cfg = str(inst.config)
    old, new = inst.demo_client, devpki.issue(inst.ca, tmp_path, "demo-next", role="client")
    old_k, new_k = info(old).spki_sha256, info(new).spki_sha256
    start = NOW + 2 * DAY

    code, out, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--client-cert", str(new.cert),
                             "--active-from", start.strftime("%Y-%m-%d"), "-c", cfg)
    assert code == 0, err
    directory = load_directory(inst.partners)
    assert directory.gate(peer(old)).name == DEMO_PARTNER
    with pytest.raises(Forbidden) as caught:
        directory.gate(peer(new))
    assert caught.value.code == "CERTIFICATE_NOT_ACTIVE"
    assert f"is registered from {start.strftime('%Y-%m-%d')}T00:00:00Z on" in caught.value.message
    start = start.replace(hour=0, minute=0, second=0)
    assert directory.gate(peer(new), start).name == DEMO_PARTNER

    code, out, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--retire-cert", old_k[:16].upper(),
                             "--retire-at", instant_text(PAST), "-c", cfg)
    assert code == 0, err
    directory = load_directory(inst.partners)
    assert refused(directory, old) == "CERTIFICATE_NOT_ACTIVE"
    assert refused(directory, old, start) == "CERTIFICATE_NOT_ACTIVE"
    assert refused(directory, new) == "CERTIFICATE_NOT_ACTIVE"  # not yet
    assert directory.gate(peer(new), start + timedelta(seconds=1)).name == DEMO_PARTNER  # once its start has passed

    code, out, err = run_command(capsys, "partners", "show", DEMO_PARTNER, "-c", cfg)
    assert code == 0, err
    shown = {c["spki_sha256"]: c for c in json.loads(out)["client_certs"]}
    assert set(shown) == {old_k, new_k}
    assert shown[old_k]["sha256"] == cert_sha256(info(old).cert) == openssl_fingerprint(old.cert).replace(":", "").lower()
    assert shown[new_k]["sha256"] == cert_sha256(info(new).cert)
    assert (shown[old_k].get("accepted_from"), shown[old_k]["accepted_until"]) == (None, instant_text(PAST))
    assert (shown[new_k]["accepted_from"], shown[new_k].get("accepted_until")) == (instant_text(start), None)

    edits = sorted(audit_records(inst, "partner.edited"), key=lambda r: r["seq"])
    assert len(edits) == 2 and "retire_cert" in edits[-1]["detail"]["changed"]


@pytest.mark.parametrize(("argv", "says"), [
    (["--retire-cert", "{old16}"], "--retire-cert and --retire-at go together"),
    (["--retire-at", "2027-01-31"], "--retire-cert and --retire-at go together"),
    (["--retire-cert", "{old8}", "--retire-at", "2027-01-31"], "--retire-cert: '{old8}' is too short"),
    (["--retire-cert", "0000000000000000", "--retire-at", "2027-01-31"],
     "--retire-cert: no registered certificate of 'demo-supplier' has a key SHA-256 starting '0000000000000000'"),
    (["--retire-cert", "{old16}", "--retire-at", "tomorrow"], "--retire-at: 'tomorrow' is not a date"),
    (["--active-from", "2027-01-31"], "--active-from: it applies to the certificates this command adds"),
    (["--client-cert", "{new}", "--active-from", "31/01/2027"], "--active-from: '31/01/2027' is not a date"),
    (["--client-cert", "{new}", "--active-from", "2027-01-31", "--retire-cert", "{new16}", "--retire-at", "2027-02-01"],
     "--retire-cert: no registered certificate"),  # the one being added is not registered yet
])
def test_cli_edit_refusals_change_nothing(inst, tmp_path, capsys, argv, says):
    new = devpki.issue(inst.ca, tmp_path, "demo-next", role="client")
    values = {"old16": info(inst.demo_client).spki_sha256[:16], "old8": info(inst.demo_client).spki_sha256[:8],
              "new": str(new.cert), "new16": info(new).spki_sha256[:16]}
    before = inst.partners.read_bytes()
    stored = sorted((inst.root / "partner-certs").iterdir())
    code, out, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, *(a.format(**values) for a in argv),
                             "-c", str(inst.config))
    assert code == 2 and says.format(**values) in err, err
    assert inst.partners.read_bytes() == before
    assert sorted((inst.root / "partner-certs").iterdir()) == stored  # no stray certificate left behind


def test_refused_renewal_with_the_same_key_leaves_the_registered_file_alone(inst, tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    # The partner's CA renews its certificate on the same key (common practice): a new certificate, the same SPKI.
    ca_cert = x509.load_pem_x509_certificate(inst.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(inst.ca.key.read_bytes(), None)
    old = x509.load_pem_x509_certificate(inst.demo_client.cert.read_bytes())
    builder = x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca_cert.subject).public_key(old.public_key())
    builder = builder.serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + 90 * DAY)
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    renewed = tmp_path / "renewed.crt"
    renewed.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]
    assert info(devpki.Issued(renewed, renewed)).spki_sha256 == info(inst.demo_client).spki_sha256

    [registered] = load_directory(inst.partners).get(DEMO_PARTNER).client_certs
    before = Path(registered).read_bytes()
    code, _, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--client-cert", str(renewed), "-c", str(inst.config))
    assert code == 2 and "already" in err, err
    assert Path(registered).read_bytes() == before  # what was verified and registered stays registered


def test_cli_activate_and_resume_of_a_pending_partner(inst, tmp_path, capsys):
    cfg = str(inst.config)
    cert = devpki.issue(inst.ca, tmp_path, "pend", role="client")
    register_partner(inst.partners, "pend", [cert.cert], FOREIGN_IDS, [], "", pending=True)

    def state() -> Partner:
        p = load_directory(inst.partners).get("pend")
        assert p is not None
        return p

    assert state().status is PartnerStatus.PENDING
    assert refused(load_directory(inst.partners), cert) == "PARTNER_PENDING"
    for action in ("resume", "suspend"):
        code, _, err = run_command(capsys, "partners", action, "pend", "-c", cfg)
        assert code == 2 and "pending activation" in err and "partners activate pend" in err, err
        assert state().status is PartnerStatus.PENDING
    colon = openssl_fingerprint(cert.cert)
    wrong = colon[:-2] + ("00" if not colon.endswith("00") else "11")
    for given in (wrong, colon[:47], openssl_fingerprint(inst.demo_client.cert)):
        code, _, err = run_command(capsys, "partners", "activate", "pend", "--fingerprint", given, "-c", cfg)
        assert code == 2 and "activation refused" in err, err
        assert state().status is PartnerStatus.PENDING and state().verified_by == ""

    code, out, err = run_command(capsys, "partners", "activate", "pend", "--fingerprint", colon, "-c", cfg)
    assert code == 0 and "activate done" in out, err
    p = state()
    assert (p.status, p.verified_by) == (PartnerStatus.ACTIVE, current_user())
    assert load_directory(inst.partners).gate(peer(cert)).name == "pend"
    code, _, err = run_command(capsys, "partners", "activate", "pend", "--fingerprint", colon, "-c", cfg)
    assert code == 2 and "is active, not pending activation" in err
    code, out, _ = run_command(capsys, "partners", "show", "pend", "-c", cfg)
    assert json.loads(out)["status"] == "active"
    [rec] = audit_records(inst, "partner.activated")
    assert rec["partner"] == "pend"


# --- 6. over the real mutual-TLS listener ------------------------------------------------------------


async def test_overlap_retirement_and_pending_over_mutual_tls(gateway, tmp_path, capsys):
    cfg = str(gateway.inst.config)
    book = gateway.gw.parts.partners
    old = gateway.inst.demo_client
    new = gateway.issue_client("demo-next")
    later = gateway.issue_client("demo-later")
    old_k = info(old).spki_sha256

    def demo() -> Partner:
        p = book.current.get(DEMO_PARTNER)
        assert p is not None
        return p

    # the overlap: the new certificate accepted since yesterday, the old one until tomorrow
    code, _, err = await run_command_aside(capsys, "partners", "edit", DEMO_PARTNER, "--client-cert", str(new.cert),
                                   "--active-from", instant_text(PAST), "--retire-cert", old_k[:20],
                                   "--retire-at", instant_text(NOW + DAY), "-c", cfg)
    assert code == 0, err
    await eventually(lambda: len(demo().windows) == 2, what="the daemon to re-read the partners file")
    async with gateway.session() as s_old, gateway.session(new.cert, new.key) as s_new:
        status, body = await post(s_old, numbered("MT-0001"))
        assert (status, body["status"]) == (202, "accepted"), body
        status, body = await post(s_new, numbered("MT-0002"))
        assert (status, body["status"]) == (202, "accepted"), body

    # the old one retired a minute ago, a third accepted only from next month
    code, _, err = await run_command_aside(capsys, "partners", "edit", DEMO_PARTNER, "--retire-cert", old_k[:16],
                                   "--retire-at", instant_text(NOW - timedelta(minutes=1)), "--client-cert", str(later.cert),
                                   "--active-from", instant_text(FUTURE), "-c", cfg)
    assert code == 0, err
    await eventually(lambda: len(demo().windows) == 3, what="the daemon to re-read the partners file")
    async with gateway.session() as s_old, gateway.session(new.cert, new.key) as s_new, \
            gateway.session(later.cert, later.key) as s_later:
        status, body = await post(s_old, numbered("MT-0003"))
        assert (status, body["error"]) == (403, "CERTIFICATE_NOT_ACTIVE"), body
        assert "was retired at" in body["message"] and old_k in body["message"]
        status, body = await post(s_later, numbered("MT-0004"))
        assert (status, body["error"]) == (403, "CERTIFICATE_NOT_ACTIVE"), body
        assert "not accepted yet" in body["message"]
        status, body = await post(s_new, numbered("MT-0005"))
        assert (status, body["status"]) == (202, "accepted"), body

    # a pending partner (added in the console) is known but sends nothing
    pend = gateway.issue_client("pend")
    await asyncio.to_thread(register_partner, gateway.inst.partners, "pend", [pend.cert], FOREIGN_IDS, [], "",
                            pending=True)
    await eventually(lambda: book.current.get("pend") is not None, what="the daemon to pick up the pending partner")
    async with gateway.session(pend.cert, pend.key) as s:
        status, body = await post(s, FOREIGN)
        assert (status, body["error"]) == (403, "PARTNER_PENDING"), body
    assert (await gateway.gw.store.reports.counts())["invoices"] == 3
