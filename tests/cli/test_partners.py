"""gateway/cli/partners.py: the ``partners`` commands, run in-process on a real instance.

* add, list, show, suspend, resume, remove; add refuses a name, an identifier (in any of its forms) or a
  certificate another partner has, and changes nothing then; edit adds and removes identifiers by their keys;
* edit of a rollover (``--active-from``, ``--retire-cert`` / ``--retire-at``) checked with ``gate()`` on
  the file as the daemon loads it, its refusals (which change nothing and leave no stray certificate),
  a renewal on the same key, a signing certificate's window that must not gate the client certificate;
* activate and resume of a pending partner (fingerprints as openssl prints them);
* signing certificates and the signature policy through add and edit;
* what each refusal is said as (``usage error:``, ``not found:``, ``refused:``; exit 2, one line); list and
  show as tables or labelled lines, or JSON; who is recorded (the OS account, ``--by`` beside it);
* check: expiring and expired certificates under a header, or JSON; exit 1 when one has expired.

Certificates are made at test time with gateway.devpki.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.cli import partners as partners_cli
from gateway.cli.common import actor
from gateway.errors import Forbidden
from gateway.model import Partner, PartnerStatus
from gateway.operations import instance
from gateway.operations.housekeeping import expiring
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.book import instant_text, load_directory
from gateway.partners.edit import register_partner
from gateway.storage.sqlite.store import SqliteStore
from gateway.tls import cert_sha256, inspect_certificate
from tests.helpers import FOREIGN_IDS, audit_of, run_command, table_rows
from tests.helpers.partners import DAY, FUTURE, NOW, PAST, info, openssl_fingerprint, peer, refused
from tests.helpers.signatures import Pki, signing_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return signing_pki(tmp_path_factory.mktemp("sigpki"))


def audit_records(inst: instance.Instance, action: str) -> list[dict[str, Any]]:
    """``audit_of`` the stopped instance, read with a store of our own (a sync test has no loop)."""
    async def read() -> list[dict[str, Any]]:
        store = SqliteStore(inst.state_dir)
        try:
            return await audit_of(store, action)
        finally:
            await store.close()

    return asyncio.run(read())


# --- add, list, show, suspend, resume, remove ----------------------------------------------------


def test_partners_lifecycle(inst, tmp_path, capsys):
    cfg = str(inst.config)
    cert = devpki.issue(inst.ca, tmp_path / "acme-pki", "acme", role="client").cert
    code, _, err = run_command(capsys, "partners", "add", "acme", "--client-cert", str(cert), "--party-id", "0088:123",
                       "--party-id", "DE999", "--email", "a@b.example", "-c", cfg)
    assert code == 0, err

    code, out, _ = run_command(capsys, "partners", "list", "-c", cfg)
    assert code == 0
    rows = {r["NAME"]: r for r in table_rows(out)}
    assert rows["acme"] == {"NAME": "acme", "STATUS": "active", "CERTIFICATES": "1 client", "PARTY IDS": "0088:123, DE999",
                            "EMAILS": "a@b.example"}
    assert rows["demo-supplier"]["STATUS"] == "active"
    code, out, _ = run_command(capsys, "partners", "list", "--json", "-c", cfg)
    listed = {p["name"]: p for p in json.loads(out)}
    assert set(listed) == {"acme", "demo-supplier"}
    assert {k: listed["acme"][k] for k in ("status", "party_ids", "emails", "client_certs", "smime_certs")} == \
        {"status": "active", "party_ids": ["0088:123", "DE999"], "emails": ["a@b.example"], "client_certs": 1, "smime_certs": 0}

    code, out, _ = run_command(capsys, "partners", "show", "acme", "--json", "-c", cfg)
    shown = json.loads(out)
    assert code == 0
    assert (shown["name"], shown["status"]) == ("acme", "active")
    assert (shown["party_ids"], shown["emails"]) == (["0088:123", "DE999"], ["a@b.example"])
    [stored] = shown["client_certs"]
    assert stored["spki_sha256"] == inspect_certificate(cert, "test").spki_sha256
    assert Path(stored["path"]).is_file() and Path(stored["path"]).parent == inst.root / "partner-certs"

    def status() -> str:
        return json.loads(run_command(capsys, "partners", "show", "acme", "--json", "-c", cfg)[1])["status"]

    assert run_command(capsys, "partners", "suspend", "acme", "-c", cfg)[0] == 0
    assert status() == "suspended"
    assert {r["NAME"]: r["STATUS"] for r in table_rows(run_command(capsys, "partners", "list", "-c", cfg)[1])}["acme"] == "suspended"
    assert run_command(capsys, "partners", "resume", "acme", "-c", cfg)[0] == 0
    assert status() == "active"

    code, _, err = run_command(capsys, "partners", "add", "acme", "--client-cert", str(cert), "--party-id", "0088:777", "-c", cfg)
    assert code == 2 and err.startswith("einvoice-gateway: refused: ") and "exists already" in err

    assert run_command(capsys, "partners", "remove", "acme", "-c", cfg)[0] == 0
    assert "acme" not in run_command(capsys, "partners", "list", "-c", cfg)[1]
    for action in ("show", "suspend", "resume", "remove", "edit"):
        code, out, err = run_command(capsys, "partners", action, "acme", "-c", cfg)
        assert (code, out) == (2, "")
        assert err == "einvoice-gateway: not found: no partner named 'acme' (see: einvoice-gateway partners list)\n"
    assert [p.name for p in load_directory(inst.partners).partners] == ["demo-supplier"]


@pytest.mark.parametrize("party_id", ["DE123456789", " 0088:4000001000006 ", "DE 123.456.789", "9930:123456789",
                                      "de\u200b123456789", "GLN:4000001000006", "0088:４０００００１０００００６",
                                      "4000001000006"])
def test_partners_add_refuses_identifier_of_another_partner(inst, tmp_path, capsys, party_id):
    before = inst.partners.read_bytes()
    cert = devpki.issue(inst.ca, tmp_path / "rival-pki", "rival", role="client").cert
    code, _, err = run_command(capsys, "partners", "add", "rival", "--client-cert", str(cert), "--party-id", "0088:555",
                       "--party-id", party_id, "-c", str(inst.config))
    assert code == 2 and err.startswith("einvoice-gateway: refused: ")
    assert "already registered for partner 'demo-supplier'" in err
    assert inst.partners.read_bytes() == before


def test_partners_edit_compares_identifiers_by_their_keys(inst, capsys):
    """--party-id of one already registered in another form changes nothing; --remove-party-id finds it in any form."""
    cfg = str(inst.config)

    def ids() -> set[str]:
        [demo] = load_directory(inst.partners).partners
        return set(demo.party_ids)

    assert ids() == {"0088:4000001000006", "DE123456789"}
    code, _, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--party-id", "9930:DE 123 456 789",
                               "--party-id", "0088:4000-0010-00006", "-c", cfg)
    assert code == 0, err
    assert ids() == {"0088:4000001000006", "DE123456789"}  # as registered
    code, _, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--remove-party-id", "de 123456789",
                               "--party-id", "0088:5790000435975", "-c", cfg)
    assert code == 0, err
    assert ids() == {"0088:4000001000006", "0088:5790000435975"}
    code, _, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, "--remove-party-id", "9930:123456789", "-c", cfg)
    assert code == 2 and "--remove-party-id: '9930:123456789' is not registered for 'demo-supplier'" in err


def test_partners_add_refuses_certificate_of_another_partner(inst, capsys):
    before = inst.partners.read_bytes()
    code, _, err = run_command(capsys, "partners", "add", "clone", "--client-cert", str(inst.demo_client.cert),
                       "--party-id", "0088:555", "-c", str(inst.config))
    assert code == 2 and "demo-supplier" in err
    assert inst.partners.read_bytes() == before


@pytest.mark.parametrize(("argv", "says"), [
    (["--client-cert", "{missing}", "--party-id", "0088:555"], "usage error: --client-cert[0]: {missing} not found"),
    (["--party-id", "0088:555"], "usage error: partners add: give --client-cert (HTTPS) and/or --smime-cert"),
    (["--client-cert", "{cert}", "--party-id", "0088:"], "usage error: --party-id[0]: '0088:' is not an identifier"),
    (["--client-cert", "{cert}", "--party-id", "0088:555", "--endpoint", "http://x.example/"], "usage error: --endpoint: "),
    (["--client-cert", "{cert}", "--party-id", "0088:555", "--amount-ceiling", "EUR"], "usage error: --amount-ceiling[0]: "),
    (["--client-cert", "{cert}", "--party-id", "0088:555", "--rules", "nope"], "not found: --rules: no rule pack named 'nope'"),
    (["--client-cert", "{demo}", "--party-id", "0088:555"], "refused: "),  # the demo partner's certificate
    (["--client-cert", "{cert}", "--party-id", "0088:555", "--signature-policy", "required"], "refused: partners["),
])
def test_partners_add_says_what_kind_of_refusal(inst, tmp_path, capsys, argv, says):
    values = {"cert": str(devpki.issue(inst.ca, tmp_path, "rival", role="client").cert), "missing": str(tmp_path / "none.crt"),
              "demo": str(inst.demo_client.cert)}
    before = inst.partners.read_bytes()
    code, out, err = run_command(capsys, "partners", "add", "rival", *(a.format(**values) for a in argv), "-c", str(inst.config))
    assert (code, out) == (2, "") and err.startswith(f"einvoice-gateway: {says.format(**values)}"), err
    assert err.count("\n") == 1
    assert inst.partners.read_bytes() == before
    assert audit_records(inst, "partner.added") == []


def test_partners_show_is_labelled_lines_for_people(inst, capsys):
    code, out, err = run_command(capsys, "partners", "show", DEMO_PARTNER, "-c", str(inst.config))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["name:", DEMO_PARTNER] and lines[1].split() == ["status:", "active"]
    assert any(line.split() == ["party", "ids:", "0088:4000001000006,", "DE123456789"] for line in lines), out
    assert "client certs:" in lines, out
    assert any(line.startswith("  - path: ") and str(inst.root / "partner-certs") in line for line in lines), out
    spki = info(inst.demo_client).spki_sha256
    assert any(line.split() == ["spki", "sha256:", spki] for line in lines), out


def test_an_empty_allowlist_says_so(inst, capsys):
    cfg = str(inst.config)
    assert run_command(capsys, "partners", "remove", DEMO_PARTNER, "-c", cfg)[0] == 0
    code, out, err = run_command(capsys, "partners", "list", "-c", cfg)
    assert (code, out, err) == (0, "", "no partners (add one: einvoice-gateway partners add)\n")
    code, out, err = run_command(capsys, "partners", "list", "--json", "-c", cfg)
    assert (code, json.loads(out), err) == (0, [], "")


def test_partner_changes_record_the_os_account_and_by_beside_it(inst, tmp_path, capsys, monkeypatch):
    cfg = str(inst.config)
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", "mallory")  # never read
    cert = devpki.issue(inst.ca, tmp_path, "acme", role="client").cert
    assert run_command(capsys, "partners", "add", "acme", "--client-cert", str(cert), "--party-id", "0088:123",
                       "--by", "alice", "-c", cfg)[0] == 0
    assert run_command(capsys, "partners", "suspend", "acme", "-c", cfg)[0] == 0
    assert run_command(capsys, "partners", "edit", "acme", "--email", "a@b.example", "--by", "bob", "-c", cfg)[0] == 0
    [added] = audit_records(inst, "partner.added")
    [suspended] = audit_records(inst, "partner.suspended")
    [edited] = audit_records(inst, "partner.edited")
    assert (added["actor"], suspended["actor"], edited["actor"]) == (actor("alice"), actor(), actor("bob"))
    assert actor() == f"cli:{pwd.getpwuid(os.geteuid()).pw_name}" and "mallory" not in str([added, suspended, edited])
    assert edited["detail"]["changed"] == ["email"]  # --by is who, not what changed
    assert load_directory(inst.partners).get("acme").verified_by == actor("alice")


# --- check ------------------------------------------------------------------------------------------


def test_check_lists_expiring_certificates_under_a_header(inst, tmp_path, capsys):
    cfg = str(inst.config)
    soon = devpki.issue(inst.ca, tmp_path, "soon", role="client", not_after=NOW + 10 * DAY)
    assert run_command(capsys, "partners", "add", "soon", "--client-cert", str(soon.cert), "--party-id", "0088:777",
                       "-c", cfg)[0] == 0
    code, out, err = run_command(capsys, "partners", "check", "-c", cfg)
    assert code == 0, err  # expiring is a warning; expired or revoked is exit 1
    [row] = table_rows(out)
    assert list(row) == ["OWNER", "PURPOSE", "STATE", "NOT AFTER", "SUBJECT", "KEY SHA-256"]
    assert (row["OWNER"], row["PURPOSE"], row["KEY SHA-256"]) == ("soon", "client", info(soon).spki_sha256[:16])
    assert row["STATE"] in ("expires in 9 day(s)", "expires in 10 day(s)")
    code, out, err = run_command(capsys, "partners", "check", "--json", "-c", cfg)
    report = json.loads(out)
    assert (code, report["ok"], report["horizon_days"], report["crls"]) == (0, True, 30, [])
    [cert] = report["certificates"]
    assert (cert["owner"], cert["problem"], cert["spki_sha256"]) == ("soon", False, info(soon).spki_sha256)


def test_check_of_expired_certificates_is_exit_1(inst, capsys, monkeypatch):
    later = NOW + 4000 * DAY  # every certificate of the instance has expired by then
    monkeypatch.setattr(partners_cli, "expiring", lambda entries, days: expiring(entries, days, later))
    code, out, _ = run_command(capsys, "partners", "check", "-c", str(inst.config))
    rows = table_rows(out)
    assert code == 1 and rows and {r["STATE"] for r in rows} == {"EXPIRED"}
    assert {r["OWNER"] for r in rows} == {"gateway", DEMO_PARTNER}
    code, out, _ = run_command(capsys, "partners", "check", "--json", "-c", str(inst.config))
    assert code == 1 and json.loads(out)["ok"] is False


def test_check_with_nothing_expiring_says_so(inst, capsys):
    code, out, err = run_command(capsys, "partners", "check", "-c", str(inst.config))
    assert (code, out, err) == (0, "no certificate expires within 30 days, none is revoked\n", "")


# --- edit: rollover windows -----------------------------------------------------------------------


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

    code, out, err = run_command(capsys, "partners", "show", DEMO_PARTNER, "--json", "-c", cfg)
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
    (["--retire-cert", "{old16}"], "usage error: --retire-cert and --retire-at go together"),
    (["--retire-at", "2027-01-31"], "usage error: --retire-cert and --retire-at go together"),
    (["--retire-cert", "{old8}", "--retire-at", "2027-01-31"], "usage error: --retire-cert: '{old8}' is too short"),
    (["--retire-cert", "0000000000000000", "--retire-at", "2027-01-31"],
     "not found: --retire-cert: no registered certificate of 'demo-supplier' has a key SHA-256 starting '0000000000000000'"),
    (["--retire-cert", "{old16}", "--retire-at", "tomorrow"], "usage error: --retire-at: 'tomorrow' is not a date"),
    (["--active-from", "2027-01-31"], "usage error: --active-from: it applies to the certificates this command adds"),
    (["--client-cert", "{new}", "--active-from", "31/01/2027"], "usage error: --active-from: '31/01/2027' is not a date"),
    (["--client-cert", "{new}", "--active-from", "2027-01-31", "--retire-cert", "{new16}", "--retire-at", "2027-02-01"],
     "not found: --retire-cert: no registered certificate"),  # the one being added is not registered yet
    (["--party-id", "0088:"], "usage error: --party-id[0]: '0088:' is not an identifier"),
    (["--email", "Demo <a@b.example>"], "usage error: --email[0]: "),
    (["--remove-email", "nobody@x.example"], "not found: --remove-email: 'nobody@x.example' is not registered for"),
    (["--rules", "nope"], "not found: --rules: no rule pack named 'nope'"),
    (["--client-cert", "{demo}"], "refused: "),  # registered for this partner already
    (["--signature-policy", "required"], "refused: partners["),  # no signing certificate: the file would be invalid
])
def test_cli_edit_refusals_change_nothing(inst, tmp_path, capsys, argv, says):
    new = devpki.issue(inst.ca, tmp_path, "demo-next", role="client")
    values = {"old16": info(inst.demo_client).spki_sha256[:16], "old8": info(inst.demo_client).spki_sha256[:8],
              "new": str(new.cert), "new16": info(new).spki_sha256[:16], "demo": str(inst.demo_client.cert)}
    before = inst.partners.read_bytes()
    stored = sorted((inst.root / "partner-certs").iterdir())
    code, out, err = run_command(capsys, "partners", "edit", DEMO_PARTNER, *(a.format(**values) for a in argv),
                             "-c", str(inst.config))
    assert (code, out) == (2, "") and err.startswith(f"einvoice-gateway: {says.format(**values)}"), err
    assert inst.partners.read_bytes() == before
    assert sorted((inst.root / "partner-certs").iterdir()) == stored  # no stray certificate left behind
    assert audit_records(inst, "partner.edited") == []


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


# --- activate -------------------------------------------------------------------------------------


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
        assert code == 2 and err.startswith(f"einvoice-gateway: refused: partners {action}: 'pend' is pending activation")
        assert "partners activate pend" in err, err
        assert state().status is PartnerStatus.PENDING
    colon = openssl_fingerprint(cert.cert)
    wrong = colon[:-2] + ("00" if not colon.endswith("00") else "11")
    for given in (wrong, colon[:47], openssl_fingerprint(inst.demo_client.cert)):
        code, _, err = run_command(capsys, "partners", "activate", "pend", "--fingerprint", given, "-c", cfg)
        assert code == 2 and err.startswith("einvoice-gateway: refused: activation refused: "), err
        assert state().status is PartnerStatus.PENDING and state().verified_by == ""

    code, out, err = run_command(capsys, "partners", "activate", "pend", "--fingerprint", colon, "-c", cfg)
    assert code == 0 and "activate done" in out, err
    p = state()
    assert (p.status, p.verified_by) == (PartnerStatus.ACTIVE, actor())
    assert load_directory(inst.partners).gate(peer(cert)).name == "pend"
    code, _, err = run_command(capsys, "partners", "activate", "pend", "--fingerprint", colon, "-c", cfg)
    assert code == 2 and "is active, not pending activation" in err
    code, out, _ = run_command(capsys, "partners", "show", "pend", "--json", "-c", cfg)
    assert json.loads(out)["status"] == "active"
    [rec] = audit_records(inst, "partner.activated")
    assert rec["partner"] == "pend"


# --- signing certificates -------------------------------------------------------------------------


def test_cli_partners_signing_certs(inst: instance.Instance, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ("-c", str(inst.config))
    client = devpki.issue(inst.ca, tmp_path, "acme-client", role="client")

    def show() -> dict[str, Any]:
        code, out, err = run_command(capsys, "partners", "show", "acme", "--json", *cfg)
        assert code == 0, err
        return dict(json.loads(out))

    add = ("partners", "add", "acme", "--client-cert", str(client.cert), "--party-id", "0088:5790000435975")
    code, _, err = run_command(capsys, *add, "--signature-policy", "required", *cfg)
    assert code == 2 and "'required' needs at least one entry in signing_certs" in err, err
    code, _, err = run_command(capsys, *add, "--signing-cert", str(pki.weak.cert_path), *cfg)
    assert code == 2 and "1024 bits" in err, err
    code, _, err = run_command(capsys, *add, "--signing-cert", str(pki.ec.cert_path), "--signature-policy", "required", *cfg)
    assert code == 0, err
    shown = show()
    assert shown["signature_policy"] == "required"
    assert [c["spki_sha256"] for c in shown["signing_certs"]] == [pki.ec.spki]

    other = devpki.issue(inst.ca, tmp_path, "other-client", role="client")
    code, _, err = run_command(capsys, "partners", "add", "other", "--client-cert", str(other.cert), "--party-id", "0088:123",
                           "--signing-cert", str(pki.ec.cert_path), *cfg)
    assert code == 2 and "a signing key is also registered for partner 'acme'" in err, err

    prefix = pki.ec.spki[:16]
    code, _, err = run_command(capsys, "partners", "edit", "acme", "--remove-cert", prefix, *cfg)
    assert code == 2 and "'required' needs at least one entry" in err, err  # the only key of a required partner
    assert show()["signing_certs"][0]["spki_sha256"] == pki.ec.spki
    assert run_command(capsys, "partners", "edit", "acme", "--signature-policy", "ignore", *cfg)[0] == 0
    assert show()["signature_policy"] == "ignore"
    assert run_command(capsys, "partners", "edit", "acme", "--remove-cert", prefix, "--signing-cert", str(pki.rsa.cert_path), *cfg)[0] == 0
    shown = show()
    assert [c["spki_sha256"] for c in shown["signing_certs"]] == [pki.rsa.spki]
    assert len(shown["client_certs"]) == 1  # the client certificate was not touched
