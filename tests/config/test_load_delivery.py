"""Configuration of delivery: [[destinations]], [[routes]], [routing], [delivery] and [outbound].

Every refusal names the exact key path; a fresh instance (``inst``) is the starting point and each
test appends or replaces TOML text in its config.toml.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gateway import devpki
from gateway.config import load as config_mod
from gateway.config.model import DeliveryConfig, Destination, OutboundConfig, Route
from gateway.operations import instance
from tests.helpers import config_error

ERP_URL = "https://erp.example.internal/einvoices"


def secret(inst: instance.Instance, name: str, data: bytes = b"k" * 32, mode: int = 0o600) -> Path:
    path = inst.root / "keys" / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def client_cert(inst: instance.Instance) -> devpki.Issued:
    return devpki.issue(inst.ca, inst.root / "pki", "gw-client", role="client")


def append(inst: instance.Instance, text: str) -> None:
    inst.config.write_text(inst.config.read_text() + "\n" + text)


def set_key(inst: instance.Instance, key: str, value: str) -> None:
    """Replace the one line ``key = …`` of the file (an existing key of the template)."""
    text, n = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", inst.config.read_text())
    assert n == 1, key
    inst.config.write_text(text)


def set_default(inst: instance.Instance, value: str) -> None:
    text = inst.config.read_text()
    assert text.count("[routing]\n") == 1
    inst.config.write_text(text.replace("[routing]\n", f"[routing]\ndefault = {value}\n"))


def https_dest(name: str = "erp-api", url: str = ERP_URL, hmac: str | None = "keys/erp.hmac", **extra: str) -> str:
    lines = [f'name = "{name}"', 'type = "https"', f'url = "{url}"']
    if hmac is not None:
        lines.append(f'hmac_key_file = "{hmac}"')
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "[[destinations]]\n" + "\n".join(lines) + "\n"


def partner_dest(name: str = "partners", **extra: str) -> str:
    lines = [f'name = "{name}"', 'type = "partner"'] + [f'{k} = "{v}"' for k, v in extra.items()]
    return "[[destinations]]\n" + "\n".join(lines) + "\n"


PARTNER_TLS = dict(client_certificate="pki/gw-client.crt", client_key="pki/gw-client.key")


# --- [[destinations]] -------------------------------------------------------------------------------------


def test_email_destination_needs_its_mailbox(inst: instance.Instance) -> None:
    append(inst, '[[destinations]]\nname = "mail"\ntype = "email"\n')
    assert config_error(inst.config) == "destinations[1].to: missing (required)"


def test_unknown_destination_type(inst: instance.Instance) -> None:
    append(inst, '[[destinations]]\nname = "x"\ntype = "ftp"\n')
    assert config_error(inst.config) == "destinations[1].type: 'ftp' is not one of directory, https, partner, email"


@pytest.mark.parametrize("url", ["http://erp.example/in", "erp.example/in", "https://", "https://erp example/in",
                                 "ftp://erp.example/in", "https://erp.example/in#frag"])
def test_https_url_must_be_https(inst: instance.Instance, url: str) -> None:
    secret(inst, "erp.hmac")
    append(inst, https_dest(url=url))
    assert config_error(inst.config) == f"destinations[1].url: {url!r} is not an https:// URL"


def test_https_url_is_required(inst: instance.Instance) -> None:
    append(inst, '[[destinations]]\nname = "erp-api"\ntype = "https"\nhmac_key_file = "keys/erp.hmac"\n')
    assert config_error(inst.config) == "destinations[1].url: missing (required)"


def test_hmac_key_file_is_required(inst: instance.Instance) -> None:
    append(inst, https_dest(hmac=None))
    assert config_error(inst.config) == "destinations[1].hmac_key_file: missing (required)"


def test_hmac_key_file_must_exist(inst: instance.Instance) -> None:
    append(inst, https_dest())
    assert config_error(inst.config).startswith("destinations[1].hmac_key_file: file not found")


def test_hmac_key_shorter_than_32_bytes(inst: instance.Instance) -> None:
    secret(inst, "erp.hmac", b"k" * 31)
    append(inst, https_dest())
    msg = config_error(inst.config)
    assert msg.startswith("destinations[1].hmac_key_file: the key must be at least 32 bytes")


def test_hmac_key_of_32_bytes_is_enough(inst: instance.Instance) -> None:
    key = secret(inst, "erp.hmac", b"k" * 32)
    append(inst, https_dest())
    [_, dest] = config_mod.load(inst.config).destinations
    assert dest.hmac_key_file == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_hmac_key_readable_by_others(inst: instance.Instance, mode: int) -> None:
    key = secret(inst, "erp.hmac", mode=mode)
    append(inst, https_dest())
    msg = config_error(inst.config)
    assert msg.startswith("destinations[1].hmac_key_file:")
    assert f"(mode {mode:04o})" in msg and f"chmod 600 {key}" in msg


def test_bearer_token_readable_by_group(inst: instance.Instance) -> None:
    secret(inst, "erp.hmac")
    token = secret(inst, "erp.token", b"token", mode=0o640)
    append(inst, https_dest(bearer_token_file="keys/erp.token"))
    msg = config_error(inst.config)
    assert msg.startswith("destinations[1].bearer_token_file:") and f"chmod 600 {token}" in msg


def test_client_certificate_without_client_key(inst: instance.Instance) -> None:
    client_cert(inst)
    secret(inst, "erp.hmac")
    append(inst, https_dest(client_certificate="pki/gw-client.crt"))
    assert config_error(inst.config) == "destinations[1].client_key: give client_certificate and client_key together"


def test_client_key_without_client_certificate(inst: instance.Instance) -> None:
    client_cert(inst)
    append(inst, partner_dest(client_key="pki/gw-client.key"))
    assert config_error(inst.config) == "destinations[1].client_key: give client_certificate and client_key together"


def test_client_key_readable_by_group(inst: instance.Instance) -> None:
    cert = client_cert(inst)
    cert.key.chmod(0o640)
    append(inst, partner_dest(**PARTNER_TLS))
    msg = config_error(inst.config)
    assert msg.startswith("destinations[1].client_key:") and "chmod 600" in msg


def test_partner_destination_needs_a_client_certificate(inst: instance.Instance) -> None:
    append(inst, partner_dest())
    msg = config_error(inst.config)
    assert msg.startswith("destinations[1].client_certificate: missing (required)")


def test_duplicate_destination_names(inst: instance.Instance) -> None:
    (inst.root / "other").mkdir()
    append(inst, '[[destinations]]\nname = "erp-inbox"\ntype = "directory"\npath = "other"\n')
    assert config_error(inst.config) == "destinations[1].name: duplicate destination name 'erp-inbox'"


@pytest.mark.parametrize("name", ["erp inbox", "-erp", "", "e" * 65, "erp/inbox"])
def test_destination_name_must_be_plain(inst: instance.Instance, name: str) -> None:
    append(inst, f'[[destinations]]\nname = "{name}"\ntype = "directory"\npath = "outbox"\n')
    assert config_error(inst.config).startswith("destinations[1].name:")


def test_destination_unknown_key(inst: instance.Instance) -> None:
    secret(inst, "erp.hmac")
    append(inst, https_dest(hmac_key="keys/erp.hmac"))
    assert config_error(inst.config) == "destinations[1].hmac_key: unknown key (check the spelling)"


# --- [[routes]] and [routing] -----------------------------------------------------------------------------


def test_route_naming_an_unknown_destination(inst: instance.Instance) -> None:
    append(inst, '[[routes]]\ndestinations = ["erp-inbox"]\npartner = "a"\n\n'
                 '[[routes]]\ndestinations = ["erp-inbox", "nope"]\n')
    assert config_error(inst.config) == "routes[1].destinations[1]: no destination is named 'nope'"


def test_route_needs_destinations(inst: instance.Instance) -> None:
    append(inst, "[[routes]]\ndestinations = []\n")
    assert config_error(inst.config) == "routes[0].destinations: a route needs at least one destination"
    inst.config.write_text(inst.config.read_text().replace("destinations = []\n", 'partner = "a"\n'))
    assert config_error(inst.config) == "routes[0].destinations: missing (required)"


def test_route_document_type_must_be_known(inst: instance.Instance) -> None:
    append(inst, '[[routes]]\ndestinations = ["erp-inbox"]\ndocument_type = "ubl:Order"\n')
    assert config_error(inst.config) == ("routes[0].document_type: 'ubl:Order' is not one of ubl:Invoice, ubl:CreditNote, "
                              "cii:CrossIndustryInvoice")


def test_route_unknown_criterion(inst: instance.Instance) -> None:
    append(inst, '[[routes]]\ndestinations = ["erp-inbox"]\nreciever = "0088:1"\n')
    assert config_error(inst.config) == "routes[0].reciever: unknown key (check the spelling)"


@pytest.mark.parametrize(("written", "normalised"), [("0088:123", "0088:123"), ("  0088:123 ", "0088:123"),
                                                      ("NL123456789B01", "NL123456789B01")])
def test_route_receiver_is_normalised(inst: instance.Instance, written: str, normalised: str) -> None:
    append(inst, f'[[routes]]\ndestinations = ["erp-inbox"]\nreceiver = "{written}"\n')
    assert config_mod.load(inst.config).routes == (Route(("erp-inbox",), receiver=normalised),)


@pytest.mark.parametrize("written", ["", "   ", "0088:1\\u0001", "x" * 250])
def test_route_receiver_that_is_no_identifier(inst: instance.Instance, written: str) -> None:
    append(inst, f'[[routes]]\ndestinations = ["erp-inbox"]\nreceiver = "{written}"\n')
    assert config_error(inst.config).startswith("routes[0].receiver:")


@pytest.mark.parametrize("written", ["0088: 123", "0088:", ":123"])
def test_route_receiver_malformed_scheme_value(inst: instance.Instance, written: str) -> None:
    append(inst, f'[[routes]]\ndestinations = ["erp-inbox"]\nreceiver = "{written}"\n')
    assert config_error(inst.config).startswith("routes[0].receiver:")


def test_routes_cannot_name_the_outbound_partner_destination(inst: instance.Instance) -> None:
    client_cert(inst)
    append(inst, partner_dest(**PARTNER_TLS) + partner_dest("to-demo", partner="demo-supplier", **PARTNER_TLS)
           + '\n[[routes]]\ndestinations = ["to-demo"]\n\n[[routes]]\ndestinations = ["erp-inbox", "partners"]\n')
    msg = config_error(inst.config)
    assert msg.startswith("routes[1].destinations[1]: destination 'partners' carries outbound invoices")
    inst.config.write_text(inst.config.read_text().replace('["erp-inbox", "partners"]', '["erp-inbox"]'))
    set_default(inst, '["partners"]')
    assert config_error(inst.config).startswith("routing.default[0]: destination 'partners' carries outbound invoices")


def test_routing_default_naming_an_unknown_destination(inst: instance.Instance) -> None:
    set_default(inst, '["erp-inbox", "nope"]')
    assert config_error(inst.config) == "routing.default[1]: no destination is named 'nope'"


def test_routing_default_unknown_key(inst: instance.Instance) -> None:
    inst.config.write_text(inst.config.read_text().replace("[routing]\n", '[routing]\ndefualt = ["erp-inbox"]\n'))
    assert config_error(inst.config) == "routing.defualt: unknown key (check the spelling)"


def test_routing_default_absent_is_every_non_partner_destination(inst: instance.Instance) -> None:
    secret(inst, "erp.hmac")
    client_cert(inst)
    append(inst, partner_dest(**PARTNER_TLS) + https_dest())
    cfg = config_mod.load(inst.config)
    assert [d.name for d in cfg.destinations] == ["erp-inbox", "partners", "erp-api"]
    assert cfg.routing_default == ("erp-inbox", "erp-api")
    assert cfg.routes == ()


def test_routing_default_empty_holds(inst: instance.Instance) -> None:
    set_default(inst, "[]")
    assert config_mod.load(inst.config).routing_default == ()


# --- [delivery] ----------------------------------------------------------------------------------------


def test_delivery_defaults(inst: instance.Instance) -> None:
    assert config_mod.load(inst.config).delivery == DeliveryConfig()
    assert DeliveryConfig() == DeliveryConfig(horizon_s=72 * 3600.0, retry_base_s=5.0, retry_cap_s=1800.0, lease_s=300.0,
                                              breaker_failures=5, breaker_cooldown_s=30.0)


def test_retry_cap_below_retry_base(inst: instance.Instance) -> None:
    set_key(inst, "retry_base_s", "60.0")
    set_key(inst, "retry_cap_s", "30.0")
    assert config_error(inst.config) == "delivery.retry_cap_s: must be at least delivery.retry_base_s"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("lease_s", "1.0", "delivery.lease_s: 1.0 is out of range (must be >= 5.0, and finite)"),
    ("breaker_failures", "0", "delivery.breaker_failures: 0 is out of range (must be >= 1)"),
    ("horizon_h", '"72"', "delivery.horizon_h: expected a number, got '72'"),
])
def test_delivery_bounds(inst: instance.Instance, key: str, value: str, expected: str) -> None:
    set_key(inst, key, value)
    assert config_error(inst.config) == expected


# --- [outbound] -----------------------------------------------------------------------------------------


def with_partner_destination(inst: instance.Instance) -> None:
    client_cert(inst)
    append(inst, partner_dest(**PARTNER_TLS))


def test_outbound_over_tcp_needs_client_ca(inst: instance.Instance) -> None:
    with_partner_destination(inst)
    append(inst, '[outbound]\nclient_spki = ["ab"]\nidentities = ["0088:4000001000006"]\n')
    assert config_error(inst.config) == "outbound.client_ca: missing (required)"


def test_outbound_over_tcp_needs_client_spki(inst: instance.Instance) -> None:
    with_partner_destination(inst)
    append(inst, '[outbound]\nclient_ca = ["pki/ca.crt"]\nidentities = ["0088:4000001000006"]\n')
    msg = config_error(inst.config)
    assert msg.startswith("outbound.client_spki: name the SHA-256 of the ERP's client certificate key")


@pytest.mark.parametrize("mode", ["0666", "0661", "0604", "777"])
def test_outbound_socket_open_to_every_user(inst: instance.Instance, mode: str) -> None:
    with_partner_destination(inst)
    append(inst, f'[outbound]\nsocket = "run/out.sock"\nsocket_mode = "{mode}"\nidentities = ["0088:4000001000006"]\n')
    assert config_error(inst.config).startswith(f"outbound.socket_mode: {int(mode, 8):04o} lets every local user submit")


@pytest.mark.parametrize("mode", ["0x1b0", "06600", "0668", "rw-rw----"])
def test_outbound_socket_mode_not_a_mode(inst: instance.Instance, mode: str) -> None:
    with_partner_destination(inst)
    append(inst, f'[outbound]\nsocket = "run/out.sock"\nsocket_mode = "{mode}"\nidentities = ["0088:4000001000006"]\n')
    assert config_error(inst.config).startswith(f"outbound.socket_mode: {mode!r} is not a file mode")


def test_outbound_identities_required(inst: instance.Instance) -> None:
    with_partner_destination(inst)
    append(inst, '[outbound]\nsocket = "run/out.sock"\n')
    assert config_error(inst.config) == "outbound.identities: missing (required)"
    append(inst, "identities = []\n")
    assert config_error(inst.config).startswith("outbound.identities: list this business's seller identifiers")


def test_outbound_identity_must_be_an_identifier(inst: instance.Instance) -> None:
    with_partner_destination(inst)
    append(inst, '[outbound]\nsocket = "run/out.sock"\nidentities = ["0088:1", " "]\n')
    assert config_error(inst.config).startswith("outbound.identities[1]:")


def test_outbound_destination_must_be_a_partner_destination(inst: instance.Instance) -> None:
    with_partner_destination(inst)
    append(inst, '[outbound]\nsocket = "run/out.sock"\nidentities = ["0088:1"]\ndestination = "erp-inbox"\n')
    msg = config_error(inst.config)
    assert msg.startswith('outbound.destination: name the [[destinations]] entry with type = "partner"')
    assert msg.endswith("found: partners")


def test_outbound_without_any_partner_destination(inst: instance.Instance) -> None:
    client_cert(inst)
    append(inst, partner_dest("acme-direct", partner="demo-supplier", **PARTNER_TLS))  # a fixed partner does not count
    append(inst, '[outbound]\nsocket = "run/out.sock"\nidentities = ["0088:1"]\n')
    assert config_error(inst.config).endswith("found: none")


def test_outbound_over_tcp_loads(inst: instance.Instance) -> None:
    with_partner_destination(inst)
    append(inst, '[outbound]\nclient_ca = ["pki/ca.crt"]\nclient_spki = ["ABCDEF"]\nidentities = ["0088:1"]\n'
                 'listen_port = 0\n')
    out = config_mod.load(inst.config).outbound
    assert out == OutboundConfig(host="127.0.0.1", port=0, socket=None, socket_mode=0o660, client_ca=(inst.ca.cert,),
                                 client_spki=frozenset({"abcdef"}), identities=frozenset({"0088:1"}), destination="partners")


# --- a whole configuration ------------------------------------------------------------------------------


def test_full_delivery_configuration_loads(inst: instance.Instance) -> None:
    root = inst.root
    set_key(inst, "concurrency", "8")  # the template's erp-inbox (before more destinations bring their own)
    cert = client_cert(inst)
    hmac_key = secret(inst, "erp.hmac", os.urandom(48))
    token = secret(inst, "erp.token", b"tok\n")
    append(inst, https_dest(bearer_token_file="keys/erp.token", ca="pki/ca.crt", **PARTNER_TLS)
           + "concurrency = 2\ntimeout_s = 5.0\n\n"
           + partner_dest(**PARTNER_TLS) + "\n"
           + partner_dest("to-demo", partner="demo-supplier", ca="pki/ca.crt", **PARTNER_TLS) + "\n"
           + '[[routes]]\nreceiver = "0088:4000002000005"\npartner = "demo-supplier"\ndocument_type = "ubl:Invoice"\n'
             'customization = "urn:c"\nprofile = "urn:p"\ndestinations = ["erp-api"]\n\n'
           + '[[routes]]\ndestinations = ["erp-inbox", "erp-api"]\n\n'
           + '[outbound]\nsocket = "run/outbound.sock"\nsocket_mode = "0600"\n'
             'identities = ["0088:4000001000006", " DE123456789 "]\n')
    set_default(inst, '["erp-inbox"]')
    for key, value in (("horizon_h", "24.0"), ("retry_base_s", "2.0"), ("retry_cap_s", "600.0"), ("lease_s", "60.0"),
                       ("breaker_failures", "3"), ("breaker_cooldown_s", "10.0")):
        set_key(inst, key, value)

    cfg = config_mod.load(inst.config)
    assert cfg.destinations == (
        Destination("erp-inbox", "directory", path=inst.delivery_folder, concurrency=8),
        Destination("erp-api", "https", url=ERP_URL, ca=root / "pki" / "ca.crt", hmac_key_file=hmac_key,
                    bearer_token_file=token, client_certificate=cert.cert, client_key=cert.key, concurrency=2,
                    timeout_s=5.0),
        Destination("partners", "partner", client_certificate=cert.cert, client_key=cert.key),
        Destination("to-demo", "partner", ca=root / "pki" / "ca.crt", client_certificate=cert.cert, client_key=cert.key,
                    partner="demo-supplier"),
    )
    assert cfg.routes == (
        Route(("erp-api",), receiver="0088:4000002000005", partner="demo-supplier", document_type="ubl:Invoice",
              customization="urn:c", profile="urn:p"),
        Route(("erp-inbox", "erp-api")),
    )
    assert cfg.routing_default == ("erp-inbox",)
    assert cfg.delivery == DeliveryConfig(horizon_s=86400.0, retry_base_s=2.0, retry_cap_s=600.0, lease_s=60.0,
                                          breaker_failures=3, breaker_cooldown_s=10.0)
    assert cfg.outbound == OutboundConfig(host="127.0.0.1", port=8444, socket=root / "run" / "outbound.sock",
                                          socket_mode=0o600, client_ca=(), client_spki=frozenset(),
                                          identities=frozenset({"0088:4000001000006", "DE123456789"}),
                                          destination="partners")


# --- a directory destination's group and file mode -------------------------------------------------


def test_directory_group_and_mode(inst):
    text = inst.config.read_text()
    assert 'mode = "0640"' in text  # the template names the default
    cfg = config_mod.load(inst.config)
    assert (cfg.destinations[0].group, cfg.destinations[0].mode) == (None, 0o640)
    inst.config.write_text(text.replace('mode = "0640"', 'group = "erp_users"\nmode = "0600"'))
    cfg = config_mod.load(inst.config)
    assert (cfg.destinations[0].group, cfg.destinations[0].mode) == ("erp_users", 0o600)
    inst.config.write_text(text.replace('mode = "0640"\n', ''))
    assert config_mod.load(inst.config).destinations[0].mode == 0o640  # the default


@pytest.mark.parametrize(("line", "expected"), [
    ('mode = "0644"', "destinations[0].mode: 0644 lets every local user read or change the invoices; give the ERP's "
                      'account a group (group = "NAME") and use 0640'),
    ('mode = "0642"', "destinations[0].mode: 0642 lets every local user"),
    ('mode = "0660"', "destinations[0].mode: 0660 lets the ERP's group change delivered invoices; use 0640"),
    ('mode = "0440"', "destinations[0].mode: 0440 keeps the gateway from reading or rewriting what it delivered"),
    ('mode = "rw-r-----"', "destinations[0].mode: 'rw-r-----' is not a file mode"),
    ('mode = "4640"', "destinations[0].mode: '4640' is not a file mode"),
    ('mode = "0640"\ngroup = "erp users"', "destinations[0].group: 'erp users' is not a group name"),
    ('mode = "0640"\ngroup = 1001', "destinations[0].group: expected a string, got int"),
])
def test_directory_mode_and_group_refusals(inst, line, expected):
    inst.config.write_text(inst.config.read_text().replace('mode = "0640"', line))
    assert config_error(inst.config).startswith(expected)
