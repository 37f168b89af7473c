"""gateway/partners/edit.py: certificate rollover, fingerprint confirmation and activation of pending partners.

* Units: ``rollover()`` (written back through ``editing()`` and read as the daemon loads it),
  ``fingerprint_matches`` / ``unconfirmed`` / ``activated`` (against the fingerprint the real
  ``openssl x509 -fingerprint -sha256`` prints).
* Over the real mutual-TLS listener: the daemon re-reads the edited partners file by itself (every
  ``reload_interval_s``); during an overlap both certificates are accepted, a retired or not-yet-active
  one gets 403 CERTIFICATE_NOT_ACTIVE and a pending partner 403 PARTNER_PENDING.

The partners file's inline tables and its round trip are tested in tests/partners/test_book.py, the
``partners`` commands in tests/cli/test_partners.py.  Certificates are made at test time with gateway.devpki.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import devpki
from gateway.errors import ConfigError
from gateway.model import CertWindow, Partner, PartnerStatus
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.book import editing, instant_text, load_directory, parse_instant
from gateway.partners.edit import activated, fingerprint_matches, register_partner, rollover, unconfirmed, with_status
from gateway.tls import cert_sha256, inspect_smime_certificate
from tests.helpers import FOREIGN, FOREIGN_IDS, eventually, numbered, post, run_command_aside
from tests.helpers.partners import DAY, FUTURE, NOW, PAST, acme, info, openssl_fingerprint, peer, refused, rollover_pki, write_partners

# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, devpki.Issued]:
    """A development CA and a few leaf certificates, in the folder the partners files of this module live in."""
    return rollover_pki(tmp_path_factory.mktemp("rollover-pki"))


# --- 1. rollover() ---------------------------------------------------------------------------------


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


# --- 2. fingerprints and activation ----------------------------------------------------------------


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


# --- 3. over the real mutual-TLS listener ------------------------------------------------------------


@pytest.mark.slow
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
