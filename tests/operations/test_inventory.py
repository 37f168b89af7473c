"""gateway/operations/inventory.py: every file a configuration names, found by walking it, sorted by kind.

A fresh instance (``init``) is the start; each test adds what a production configuration has (secrets
of an ERP webhook, trusted audit certificates, CRLs, a rule pack, files outside the configuration's
folder) and checks that the backup would take each file once, and leave out what is not state.
"""

from __future__ import annotations

import os

from gateway import devpki
from gateway.config import load as config_mod
from gateway.operations import instance
from gateway.operations.inventory import (
    CONFIGURATION,
    ERP_FOLDER,
    FILE,
    KEY_FOLDER,
    MASTER_KEY,
    PARTNERS,
    SECRET,
    inventory,
)
from gateway.vault import write_key_file
from tests.helpers import CII_RULES, rewrite_config


def kinds(inst: instance.Instance) -> dict[str, tuple[str, str]]:
    """path (relative to the instance, or absolute outside it) -> (kind, the key naming it)"""
    inv = inventory(config_mod.load(inst.config))
    out = {}
    for item in inv.files:
        shown = item.path.relative_to(inst.root).as_posix() if item.path.is_relative_to(inst.root) else str(item.path)
        assert shown not in out, f"{shown} twice"
        out[shown] = (item.kind, item.key)
    return out


def test_a_fresh_instance(inst):
    found = kinds(inst)
    assert found["config.toml"] == (CONFIGURATION, "source")
    assert found["partners.toml"] == (PARTNERS, "partners_file")
    assert found["keys/master-1.key"] == (MASTER_KEY, "vault.keys[0]")
    assert found["pki/server.key"] == (SECRET, "https.private_key")
    assert found["pki/ca.crt"] == (FILE, "https.client_ca[0]")  # once, though smtp.partner_ca names it too
    assert found["pki/ca.key"] == (SECRET, "https.client_ca[0] (its private key)")  # the development CA's key
    assert {found[f"pki/{n}.key"][0] for n in ("signing", "smime")} == {SECRET}
    partner = {k for _, k in found.values() if k.startswith("partners.demo-supplier.")}
    assert partner == {"partners.demo-supplier.client_certs[0]", "partners.demo-supplier.smime_certs[0]"}
    assert not any(p.startswith(("state", "outbox", "pki/clients")) for p in found)  # the database goes by snapshot
    inv = inventory(config_mod.load(inst.config))
    assert [(f.kind, f.path) for f in inv.folders] == [(KEY_FOLDER, inst.root / "keys"), (ERP_FOLDER, inst.delivery_folder)]
    assert inv.config_dir == inst.root and inv.state_dir == inst.state_dir and inv.external == ()


def test_every_path_the_configuration_names(inst, tmp_path):
    outside = tmp_path / "etc-pki"
    outside.mkdir()
    erp_ca = devpki.make_ca(outside, "erp-ca")  # outside the configuration's folder, with its key beside it
    devpki.make_ca(inst.root / "pki", "old-signing")  # an earlier signing certificate, with its key beside it
    hmac, token = inst.root / "keys" / "erp.hmac", inst.root / "erp.token"
    for path in (hmac, token):
        path.write_bytes(b"k" * 32)
        os.chmod(path, 0o600)
    crl = inst.root / "pki" / "ca.crl"
    crl.write_bytes(b"")  # (not read by load; only named)

    def change(c: dict) -> None:
        c["destinations"].append({"name": "erp-api", "type": "https", "url": "https://erp.example/x",
                                  "hmac_key_file": "keys/erp.hmac", "bearer_token_file": "erp.token", "ca": str(erp_ca.cert)})
        c["audit"]["trusted_certificates"] = ["pki/old-signing.crt"]
        c["revocation"]["crls"] = ["pki/ca.crl"]
        c["rules"]["packs"] = [{"name": "en16931", "cii": str(CII_RULES)}]
        c["routing"] = {"default": ["erp-inbox"]}

    rewrite_config(inst.config, change)
    found = kinds(inst)
    assert found["keys/erp.hmac"] == (SECRET, "destinations[1].hmac_key_file")
    assert found["erp.token"] == (SECRET, "destinations[1].bearer_token_file")
    assert found[str(erp_ca.cert)] == (FILE, "destinations[1].ca")
    assert found[str(erp_ca.key)] == (SECRET, "destinations[1].ca (its private key)")
    assert found["pki/old-signing.crt"] == (FILE, "operations.audit_trusted[0]")
    assert found["pki/old-signing.key"][0] == SECRET
    assert found["pki/ca.crl"] == (FILE, "operations.crls[0]")
    assert str(CII_RULES) not in found  # a rule pack comes with software: named, not copied
    inv = inventory(config_mod.load(inst.config))
    assert [(e.key, e.path) for e in inv.external] == [("rule_packs[0].cii", CII_RULES)]


def test_a_key_folder_with_several_keys(inst):
    write_key_file(inst.root / "keys" / "master-2.key")
    found = kinds(inst)
    assert {p: k for p, (kind, k) in found.items() if kind == MASTER_KEY} == {
        "keys/master-1.key": "vault.keys[0]", "keys/master-2.key": "vault.keys[1]"}
