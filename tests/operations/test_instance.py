"""gateway/operations/instance.py: ``init``, a complete, working instance in one folder.

What init writes (a development PKI, a master key, the state and outbox folders, the configuration and
the partners file with the demo partner), the modes it writes them with, the configuration it renders
(it loads, and names what init made), the addresses it derives from the port and host, its refusal of a
folder that is not empty, and ``remove``.  The ``init`` command's JSON output and exit codes are here too.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.model import PartnerStatus
from gateway.operations import instance
from gateway.operations.instance import DEMO_EMAIL, DEMO_PARTNER, DEMO_PARTY_IDS, MAIL_HOST
from gateway.partners.book import load_directory
from gateway.tls import email_addresses, encryptable, inspect_certificate
from gateway.vault import Vault
from tests.helpers import run_command

# --- the init command ----------------------------------------------------------------------------------


def test_init_json(tmp_path, capsys):
    code, out, _ = run_command(capsys, "init", str(tmp_path / "gw"), "--port", "18443", "--json")
    assert code == 0
    info = json.loads(out)  # the whole output is one JSON object
    assert info["https_url"] == "https://127.0.0.1:18443"
    assert info["console_url"] == "http://localhost:18445/console/" and info["console_user"] == "admin"
    assert info["console_password_file"] == str(Path(info["state_dir"]) / "console-bootstrap-password")
    for name in ("config_file", "ca_certificate", "ca_key", "demo_partner_client_certificate",
                 "demo_partner_client_key", "master_key_file"):
        assert Path(info[name]).is_file(), name
    assert Path(info["delivery_folder"]).is_dir()
    for name in ("master_key_file", "ca_key", "demo_partner_client_key"):
        assert Path(info[name]).stat().st_mode & 0o777 == 0o600, name
    assert run_command(capsys, "check-config", "-c", info["config_file"])[0] == 0


def test_init_refuses_non_empty_dir(tmp_path, capsys):
    target = tmp_path / "gw"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, out, err = run_command(capsys, "init", str(target), "--json")
    assert code == 2 and out == ""
    assert "not empty" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]



# --- what init writes -------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_keeps_the_folders_private_and_every_key_0600(tmp_path):
    inst = instance.init(tmp_path / "gw", port=0)
    for folder in (inst.root, inst.root / "keys", inst.state_dir, inst.delivery_folder):
        assert mode(folder) == 0o700, folder
    keys = [inst.master_key, inst.ca.key, inst.server.key, inst.signing.key, inst.smime.key, inst.demo_client.key,
            inst.demo_smime.key]
    for key in keys:
        assert key.is_file() and mode(key) == 0o600, key
    for cert in (inst.ca.cert, inst.server.cert, inst.signing.cert, inst.smime.cert, inst.demo_client.cert, inst.demo_smime.cert):
        assert cert.is_file() and b"PRIVATE KEY" not in cert.read_bytes(), cert
    assert sorted(p.name for p in (inst.root / "keys").iterdir()) == ["master-1.key"]
    assert list(inst.state_dir.iterdir()) == [] and list(inst.delivery_folder.iterdir()) == []


def test_the_rendered_configuration_loads_and_names_what_init_made(tmp_path):
    inst = instance.init(tmp_path / "gw", port=18443)
    cfg = config_mod.load(inst.config)
    assert (cfg.https.host, cfg.https.port) == ("127.0.0.1", 18443)
    assert (cfg.https.certificate, cfg.https.private_key, cfg.https.client_ca) == (inst.server.cert, inst.server.key, (inst.ca.cert,))
    assert cfg.state_dir == inst.state_dir and cfg.partners_file == inst.partners
    assert cfg.vault.keys == (inst.master_key,)
    assert Vault.from_files(cfg.vault.keys, cfg.vault.current).current == inst.key_id  # new invoices are sealed under it
    assert cfg.signing is not None and (cfg.signing.certificate, cfg.signing.private_key) == (inst.signing.cert, inst.signing.key)
    [dest] = cfg.destinations
    assert (dest.type, dest.path) == ("directory", inst.delivery_folder)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 18445) == ("127.0.0.1", inst.admin_port)
    assert cfg.smtp is not None and (cfg.smtp.host, cfg.smtp.port) == ("127.0.0.1", 18446) == (inst.smtp_host, inst.smtp_port)
    assert cfg.smtp.addresses == (f"invoices@{MAIL_HOST}",) and cfg.smtp.hostname == MAIL_HOST
    assert (cfg.smtp.certificate, cfg.smtp.private_key) == (inst.smime.cert, inst.smime.key)


def test_the_demo_partner_is_registered_with_its_certificates(tmp_path):
    inst = instance.init(tmp_path / "gw", port=0)
    directory = load_directory(inst.partners)
    [demo] = directory.partners
    assert (demo.name, demo.status, demo.verified_by) == (DEMO_PARTNER, PartnerStatus.ACTIVE, "einvoice-gateway init (demo)")
    assert demo.party_ids == frozenset(DEMO_PARTY_IDS) and demo.emails == (DEMO_EMAIL,)
    assert demo.client_spki == {inspect_certificate(inst.demo_client.cert, "client").spki_sha256}
    assert demo.smime_spki == {inspect_certificate(inst.demo_smime.cert, "smime").spki_sha256}
    for stored in (*demo.client_certs, *demo.smime_certs):  # copies beside the partners file, not the PKI's files
        assert Path(stored).parent == inst.root / "partner-certs"


def test_the_certificates_name_what_they_serve(tmp_path):
    inst = instance.init(tmp_path / "gw", port=0)
    server = x509.load_pem_x509_certificate(inst.server.cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(inst.ca.cert.read_bytes())
    for cert in (inst.server.cert, inst.signing.cert, inst.smime.cert, inst.demo_client.cert, inst.demo_smime.cert):
        assert x509.load_pem_x509_certificate(cert.read_bytes()).issuer == ca.subject, cert
    smime = x509.load_pem_x509_certificate(inst.smime.cert.read_bytes())
    demo_smime = x509.load_pem_x509_certificate(inst.demo_smime.cert.read_bytes())
    assert f"invoices@{MAIL_HOST}" in email_addresses(smime) and DEMO_EMAIL in email_addresses(demo_smime)
    assert encryptable(smime) and encryptable(demo_smime)  # mail is encrypted to both


# --- addresses ------------------------------------------------------------------------------------------


def test_port_zero_derives_no_admin_or_smtp_port(tmp_path):
    inst = instance.init(tmp_path / "gw", port=0)
    assert (inst.https_url, inst.admin_port, inst.smtp_port, inst.console_url) == ("https://127.0.0.1:0", 0, 0, "")
    cfg = config_mod.load(inst.config)
    assert (cfg.https.port, cfg.admin.port) == (0, 0)  # ephemeral and off: tests run many instances at once
    assert cfg.smtp is not None and cfg.smtp.port == 0


@pytest.mark.parametrize(("host", "url", "console"), [
    ("::1", "https://[::1]:18443", "http://localhost:18445/console/"),
    ("127.0.0.1", "https://127.0.0.1:18443", "http://localhost:18445/console/"),
    ("gateway.example", "https://gateway.example:18443", "http://gateway.example:18445/console/"),
])
def test_the_urls_follow_the_host(tmp_path, host, url, console):
    inst = instance.init(tmp_path / "gw", host=host, port=18443)
    assert (inst.https_url, inst.console_url) == (url, console)
    assert inst.as_json()["https_url"] == url and inst.as_json()["console_url"] == console
    cfg = config_mod.load(inst.config)
    assert cfg.https.host == host and cfg.smtp is not None and cfg.smtp.host == host


# --- refusals and removal ----------------------------------------------------------------------------------


def test_init_refuses_a_folder_that_is_not_empty_and_takes_an_empty_one(tmp_path):
    target = tmp_path / "gw"
    target.mkdir()
    (target / ".hidden").write_text("mine")
    with pytest.raises(ConfigError) as caught:
        instance.init(target, port=0)
    assert caught.value.message == f"init: {target.resolve()} exists and is not empty; choose a new folder"
    assert [p.name for p in target.iterdir()] == [".hidden"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert instance.init(empty, port=0).config == empty.resolve() / "config.toml"


def test_init_makes_missing_parent_folders(tmp_path):
    inst = instance.init(tmp_path / "a" / "b" / "gw", port=0)
    assert inst.root == (tmp_path / "a" / "b" / "gw").resolve() and inst.config.is_file()


def test_remove_deletes_the_instance_and_ignores_one_that_is_gone(tmp_path):
    inst = instance.init(tmp_path / "gw", port=0)
    instance.remove(inst.root)
    assert not inst.root.exists()
    instance.remove(inst.root)  # already gone: nothing to do
    assert list(tmp_path.iterdir()) == []
