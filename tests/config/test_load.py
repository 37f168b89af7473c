"""Configuration and partners-file loading: every error names its exact key path."""

from __future__ import annotations

import pytest

from gateway import devpki
from gateway.cli import main as cli
from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.book import load_directory
from tests.helpers import config_error, rewrite_config


def edit(inst, old: str, new: str) -> None:
    text = inst.config.read_text()
    assert old in text, old
    inst.config.write_text(text.replace(old, new, 1))


def test_instance_config_loads(inst):
    cfg = config_mod.load(inst.config)
    assert cfg.source == inst.config
    assert cfg.https.host == "127.0.0.1" and cfg.https.port == 0
    assert cfg.https.client_ca == (inst.ca.cert,)
    assert cfg.https.private_key == inst.server.key
    assert cfg.vault.keys == (inst.master_key,)
    assert cfg.partners_file == inst.partners
    assert cfg.state_dir == inst.state_dir
    assert [(d.name, d.path) for d in cfg.destinations] == [("erp-inbox", inst.delivery_folder)]
    assert cfg.log_level == "info"
    assert load_directory(cfg.partners_file).get(DEMO_PARTNER) is not None


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("listen_port =", "listn_port =", "https.listn_port: unknown key"),
        ("[logging]\n", "[logging]\nlevl = 'info'\n", "logging.levl: unknown key"),
        ("[xml]\n", "[xml]\nmax_depht = 1\n", "xml.max_depht: unknown key"),
        ("[instance]\n", "[instanse]\n", "instanse: unknown key"),
        ("listen_port = 0", 'listen_port = "8443"', "https.listen_port: expected an integer"),
        ("listen_host = \"127.0.0.1\"", "listen_host = 1", "https.listen_host: expected a string"),
        ("read_timeout_s = 60.0", "read_timeout_s = true", "https.read_timeout_s: expected a number"),
        ('client_ca = ["pki/ca.crt"]', 'client_ca = "pki/ca.crt"', "https.client_ca: expected a list of strings"),
        ("level = \"info\"", "level = \"verbose\"", "logging.level: 'verbose' is not one of"),
        ("listen_port = 0", "listen_port = 70000", "https.listen_port: 70000 is out of range"),
        ("listen_port = 0", "listen_port = -1", "https.listen_port: -1 is out of range"),
        ("max_depth = 100", "max_depth = 4096", "xml.max_depth: 4096 is out of range"),
        ("reload_interval_s = 1.0", "reload_interval_s = 0.0", "partners.reload_interval_s: 0.0 is out of range"),
        ('certificate = "pki/server.crt"\n', "", "https.certificate: missing (required)"),
        ('file = "partners.toml"\n', "", "partners.file: missing (required)"),
        ('name = "erp-inbox"\n', "", "destinations[0].name: missing (required)"),
        ('keys = ["keys"]', "keys = []", "vault.keys: name at least one master key file or folder"),
        ('client_ca = ["pki/ca.crt"]', 'client_ca = ["pki/nope.crt"]', "https.client_ca[0]: file not found"),
        ('client_ca = ["pki/ca.crt"]', 'client_ca = ["pki/ca.crt", "pki/nope.crt"]', "https.client_ca[1]: file not found"),
        ('keys = ["keys"]', 'keys = ["keys/master-2.key"]', "vault.keys[0]: file not found"),
        ('file = "partners.toml"', 'file = "pki"', "partners.file: not a regular file"),
        ('path = "outbox"', 'path = "no-such-folder"', "destinations[0].path:"),
        ("backoff_after = 5\n", "backoff_after = 2\n", "console.backoff_after: 2 is out of range"),
        ("backoff_max_s = 900.0", "backoff_max_s = 7200.0", "console.backoff_max_s: at most 3600 seconds"),
        ("account_backoff_after = 50", "account_backoff_after = 5", "console.account_backoff_after: 5 is out of range"),
        # The lock's settings are gone: the error says what replaced them.
        ("backoff_after = 5\n", "backoff_after = 5\nlockout_after = 5\n", "console.lockout_after: failed logins no "
         "longer lock an account; they make further attempts wait (console.backoff_after"),
        ("backoff_max_s = 900.0", "lockout_s = 900.0", "console.lockout_s: failed logins no longer lock an account"),
    ],
)
def test_error_names_key_path(inst, old, new, expected):
    edit(inst, old, new)
    assert config_error(inst.config).startswith(expected)


def test_one_address_can_never_set_off_an_accounts_shared_backoff(inst):
    edit(inst, "backoff_after = 5\n", "backoff_after = 12\n")
    edit(inst, "account_backoff_after = 50", "account_backoff_after = 12")
    assert config_error(inst.config).startswith("console.account_backoff_after: must be more than backoff_after (12), "
                                                "or one address alone could make every other address wait")
    edit(inst, "account_backoff_after = 12", "account_backoff_after = 13")
    cfg = config_mod.load(inst.config).console
    assert (cfg.backoff_after, cfg.account_backoff_after, cfg.backoff_max_s) == (12, 13, 900.0)


def test_invalid_toml(inst):
    inst.config.write_text(inst.config.read_text() + "\n[https\n")
    msg = config_error(inst.config)
    assert str(inst.config) in msg and "not valid TOML" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        config_mod.load(tmp_path / "absent.toml")


# --- the partners file ----------------------------------------------------------------------------


def partner_entry(name: str, cert: str, *ids: str) -> str:
    return (f'[[partners]]\nname = "{name}"\nverified_by = "test"\nverified_at = "2026-01-01T00:00:00Z"\n'
            f'client_certs = ["{cert}"]\nparty_ids = [{", ".join(f"{i!r}" for i in ids)}]\n\n')


@pytest.fixture
def second_cert(inst):
    return devpki.issue(inst.ca, inst.root / "pki" / "clients", "second", role="client").cert


def partners_error(inst, text: str) -> str:
    inst.partners.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_directory(inst.partners)
    return err.value.message


def test_partner_with_missing_certificate(inst):
    msg = partners_error(inst, partner_entry("acme", "partner-certs/absent.crt", "0088:123"))
    assert msg.startswith("partners[0].client_certs[0]: file not found")


def test_duplicate_partner_name(inst, second_cert):
    demo = str(inst.demo_client.cert)
    msg = partners_error(inst, partner_entry("acme", demo, "0088:1") + partner_entry("acme", str(second_cert), "0088:2"))
    assert msg.startswith("partners[1].name: duplicate partner name 'acme'")


def test_identifier_registered_to_two_partners(inst, second_cert):
    demo = str(inst.demo_client.cert)
    msg = partners_error(inst, partner_entry("acme", demo, "0088:1", "DE999") + partner_entry("beta", str(second_cert), "DE999"))
    assert msg.startswith("partners[1].party_ids: 'DE999' is already registered for partner 'acme'")


def test_certificate_registered_to_two_partners(inst):
    demo = str(inst.demo_client.cert)
    msg = partners_error(inst, partner_entry("acme", demo, "0088:1") + partner_entry("beta", demo, "0088:2"))
    assert msg.startswith("partners[1].client_certs:") and "'acme'" in msg


def test_partner_unknown_key_and_bad_party_id(inst):
    demo = str(inst.demo_client.cert)
    msg = partners_error(inst, partner_entry("acme", demo, "0088:1") + 'colour = "red"\n')
    assert msg.startswith("partners[0].colour: unknown key")
    msg = partners_error(inst, partner_entry("acme", demo, "0088:1", " "))
    assert msg.startswith("partners[0].party_ids[1]:")


def test_partners_invalid_toml(inst):
    msg = partners_error(inst, "[[partners]\nname = 'x'\n")
    assert msg.startswith("partners.file:") and "not valid TOML" in msg


# --- check-config ---------------------------------------------------------------------------------


def test_check_config_ok(inst, capsys):
    assert cli.main(["check-config", "-c", str(inst.config)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "1 partner(s)" in out


def test_check_config_bad_key(inst, capsys):
    edit(inst, "listen_port =", "listn_port =")
    assert cli.main(["check-config", "-c", str(inst.config)]) == 2
    captured = capsys.readouterr()
    assert "https.listn_port: unknown key" in captured.err
    assert "OK" not in captured.out


def test_check_config_bad_partners_file(inst, capsys):
    inst.partners.write_text(partner_entry("acme", "partner-certs/absent.crt", "0088:123"))
    assert cli.main(["check-config", "-c", str(inst.config)]) == 2
    assert "partners[0].client_certs[0]: file not found" in capsys.readouterr().err


def test_check_config_readable_key(inst, capsys):
    inst.master_key.chmod(0o644)
    assert cli.main(["check-config", "-c", str(inst.config)]) == 2
    assert "vault.keys[0]:" in capsys.readouterr().err


def test_extension_namespaces_are_read_and_business_ones_refused(inst):
    rewrite_config(inst.config, lambda c: c.setdefault("validation", {}).update(extension_namespaces=["urn:example:a"]))
    assert config_mod.load(inst.config).extension_namespaces == ("urn:example:a",)
    for uri in ("urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2", "has space", ""):
        rewrite_config(inst.config, lambda c, uri=uri: c["validation"].update(extension_namespaces=[uri]))
        assert config_error(inst.config).startswith("validation.extension_namespaces: ")
