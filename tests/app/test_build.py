"""gateway/app/build.py: the parts a configuration names, built and checked before any socket opens.

``build`` assembles the vault, the partner book, the schemas, the rule engine, the gateway's signing key
and S/MIME identity from a real instance's configuration; a reload hands it the running rule engine and
partner book, which it keeps (the book re-read); a configuration it refuses names the key, and a rule
engine it started for nothing is stopped.  ``smime_parts`` checks the gateway's S/MIME identity;
``warnings`` names the weakened defaults; ``restart_needed`` and ``rules_key`` decide what a reload keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from gateway.app import build as build_mod
from gateway.app.build import Parts, build, restart_needed, rules_key, smime_parts, warnings
from gateway.config import load as config_mod
from gateway.config.model import Config
from gateway.errors import ConfigError
from gateway.operations import instance
from gateway.operations.instance import DEMO_PARTNER, MAIL_HOST
from gateway.partners.book import PartnerBook
from gateway.stages.rules import RuleEngine, rule_specs
from tests.helpers import add_partner, rewrite_config

CII_WARNING = ("rule pack 'en16931' has no CII stylesheet: CII invoices from partners using it are refused with "
               "RULES_UNAVAILABLE until a [[rules.packs]] entry named 'en16931' gives cii = \"…\"")
REPLIES_WARNING = "smtp.replies is on but there is no [smarthost]: partners get the SMTP reply only, no reply e-mail"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuleEngine]:
    """One rule engine (a rules process) for the module, handed to ``build`` as a reload does: every instance
    made by init configures the same packs."""
    cfg = config_mod.load(instance.init(tmp_path_factory.mktemp("engine") / "gw", port=0).config)
    rules = RuleEngine(rule_specs(cfg), processes=1, timeout_s=cfg.rules_timeout_s)
    yield rules
    rules.close()


def loaded(inst: instance.Instance) -> Config:
    return config_mod.load(inst.config)


def built(inst: instance.Instance, engine: RuleEngine, **kw: object) -> Parts:
    return build(loaded(inst), rules=engine, **kw)  # type: ignore[arg-type]


class FakeEngine:
    """A rule engine that starts no process and says whether it was stopped."""

    def __init__(self, specs: object = None, **_kw: object):
        self.packs = {"en16931": None}
        self.closed = False

    def check_names(self, names: tuple[str, ...], where: str) -> None:
        RuleEngine.check_names(self, names, where)  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed = True


# --- what build assembles ------------------------------------------------------------------------------


def test_build_assembles_every_part_the_configuration_names(inst):
    cfg = loaded(inst)
    parts = build(cfg, processes=1)  # its own rule engine, as check-config and serve build it
    try:
        assert parts.config is cfg
        assert parts.vault.current == inst.key_id
        assert isinstance(parts.partners, PartnerBook) and parts.partners.path == inst.partners
        assert [p.name for p in parts.partners.current.partners] == [DEMO_PARTNER]
        assert set(parts.rules.packs) == {"en16931"}
        assert "2.1" in parts.schemas.versions
        signing = x509.load_pem_x509_certificate(inst.signing.cert.read_bytes())
        assert parts.signer is not None and parts.signer.cert == signing
        assert parts.smime is not None and parts.smime.address == f"invoices@{MAIL_HOST}"
        assert parts.smime.certificate == x509.load_pem_x509_certificate(inst.smime.cert.read_bytes())
        assert parts.smime_roots == (x509.load_pem_x509_certificate(inst.ca.cert.read_bytes()),)  # smtp.partner_ca
        assert parts.parser.limits == cfg.xml and parts.revocation.warnings() == []  # no CRLs configured
    finally:
        parts.rules.close()


def test_a_reload_keeps_the_rule_engine_and_re_reads_the_partner_book(inst, engine):
    first = built(inst, engine)
    assert first.rules is engine
    before = first.partners.current
    again = built(inst, engine, partners=first.partners)
    assert again.partners is first.partners and again.rules is engine
    assert again.partners.current is not before  # re-read even though the file did not change (its certificates may have)
    add_partner(inst, "newco", ["0088:4000009000001"])
    assert built(inst, engine, partners=first.partners).partners.current.get("newco") is not None


def test_a_partners_file_of_another_path_gets_a_book_of_its_own(inst, engine):
    first = built(inst, engine)
    moved = inst.root / "partners-2.toml"
    moved.write_bytes(inst.partners.read_bytes())
    rewrite_config(inst.config, lambda c: c["partners"].update(file=str(moved)))
    again = built(inst, engine, partners=first.partners)
    assert again.partners is not first.partners and again.partners.path == moved


def test_without_smtp_there_is_no_smime_identity(inst, engine):
    rewrite_config(inst.config, lambda c: c.pop("smtp"))
    parts = built(inst, engine)
    assert (parts.smime, parts.smime_roots) == (None, ())


# --- what build refuses ------------------------------------------------------------------------------------


def with_partner_destination(inst: instance.Instance, partner: str) -> None:
    rewrite_config(inst.config, lambda c: c["destinations"].append(
        {"name": "to-acme", "type": "partner", "partner": partner, "client_certificate": str(inst.server.cert),
         "client_key": str(inst.server.key)}))


def test_a_destination_naming_an_unregistered_partner_is_refused(inst, engine):
    with_partner_destination(inst, "acme")
    with pytest.raises(ConfigError) as caught:
        built(inst, engine)
    assert caught.value.message == "destinations: 'to-acme' names partner 'acme', which is not registered"
    add_partner(inst, "acme", ["0088:4000009000001"])
    assert built(inst, engine).partners.current.get("acme") is not None


def test_a_signing_key_that_does_not_load_is_named(inst, engine):
    inst.signing.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as caught:
        built(inst, engine)
    assert caught.value.message.startswith("signing: "), caught.value.message


def test_a_rule_engine_build_started_is_stopped_when_the_configuration_is_refused(inst, monkeypatch):
    made: list[FakeEngine] = []

    def engine(*args: object, **kw: object) -> FakeEngine:
        made.append(FakeEngine(*args, **kw))
        return made[-1]

    monkeypatch.setattr(build_mod, "RuleEngine", engine)
    with_partner_destination(inst, "acme")
    with pytest.raises(ConfigError, match="which is not registered"):
        build(loaded(inst))
    [owned] = made
    assert owned.closed  # no rules process outlives a refused configuration
    given = FakeEngine()
    with pytest.raises(ConfigError, match="which is not registered"):
        build(loaded(inst), rules=given)
    assert not given.closed  # the running engine of a refused reload keeps serving


# --- the S/MIME identity -------------------------------------------------------------------------------------


def test_smime_parts_checks_the_key_and_the_address(inst):
    identity, roots = smime_parts(loaded(inst))
    assert identity is not None and identity.address == f"invoices@{MAIL_HOST}" and len(roots) == 1
    rewrite_config(inst.config, lambda c: c["smtp"].update(private_key=str(inst.demo_smime.key)))  # another RSA key
    with pytest.raises(ConfigError) as caught:
        smime_parts(loaded(inst))
    assert caught.value.message.startswith("smtp.private_key: the S/MIME key must be the RSA key (2048 bits or more) of "
                                           "smtp.certificate"), caught.value.message
    rewrite_config(inst.config, lambda c: c["smtp"].update(private_key=str(inst.smime.key),
                                                           addresses=["other@gateway.localhost"]))
    with pytest.raises(ConfigError) as caught:
        smime_parts(loaded(inst))
    assert caught.value.message.startswith("smtp.certificate: the certificate does not name 'other@gateway.localhost' "
                                           "(smtp.addresses[0]"), caught.value.message


def test_an_unreadable_smime_certificate_is_named(inst):
    Path(inst.smime.cert).write_text("not a certificate")
    with pytest.raises(ConfigError) as caught:
        smime_parts(loaded(inst))
    assert caught.value.message.startswith("smtp.certificate: cannot load the S/MIME certificate and key"), caught.value.message


# --- warnings -----------------------------------------------------------------------------------------------


def test_the_warnings_of_a_fresh_instance(inst, engine):
    assert warnings(built(inst, engine)) == [CII_WARNING, REPLIES_WARNING]


def test_weakened_defaults_are_named(inst, engine):
    def weaken(c: dict) -> None:
        c["rules"]["default"] = []
        c["routing"]["default"] = []
        c.pop("signing")

    rewrite_config(inst.config, weaken)
    add_partner(inst, "lax", ["0088:4000009000001"], rules=())
    found = warnings(built(inst, engine))
    assert found[0].startswith("rules.default is empty: invoices from partners that choose no rule pack are not checked")
    assert found[1].startswith("partner 'lax' is registered with --no-rules")
    assert any(w.startswith("routing.default is empty: invoices that no [[routes]] entry matches are held") for w in found)
    assert any(w.startswith("there is no [signing] key: audit checkpoints are not signed") for w in found)
    assert CII_WARNING not in found  # no partner uses en16931 any more


# --- what a reload keeps ---------------------------------------------------------------------------------------


def test_restart_needed_names_the_settings_a_process_cannot_change(inst):
    old = loaded(inst)
    assert restart_needed(old, loaded(inst)) == []

    def change(c: dict) -> None:
        c["https"]["listen_port"] = 18443
        c["https"]["workers"] = 3
        c["logging"]["level"] = "debug"
        c["partners"]["reload_interval_s"] = 5.0  # not restart-only

    rewrite_config(inst.config, change)
    assert restart_needed(old, loaded(inst)) == ["https.listen_host/listen_port", "https.workers", "logging.level"]


def test_rules_key_changes_only_with_the_rule_settings(inst):
    old = loaded(inst)
    rewrite_config(inst.config, lambda c: c["partners"].update(reload_interval_s=5.0))
    assert rules_key(loaded(inst)) == rules_key(old)
    rewrite_config(inst.config, lambda c: c["rules"].update(timeout_s=61.0))
    assert rules_key(loaded(inst)) != rules_key(old)
