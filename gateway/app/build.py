"""Building the parts from a configuration, checking everything that can be wrong before any socket opens.

``check-config`` and ``serve`` build the same way; a reload builds anew and swaps the parts in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from ..config.model import Config
from ..delivery.folder import access_warnings
from ..errors import ConfigError
from ..model import Syntax
from ..partners.book import PartnerBook
from ..smime.identity import Identity
from ..stages.revocation import Revocation, RevocationPolicy
from ..stages.rules import RuleEngine, rule_specs
from ..stages.schema import SchemaRegistry
from ..stages.signature import SigningKey
from ..stages.xmlparse import XmlParser
from ..tls import ca_certificates, email_addresses, encryptable, load_private_key, same_key, server_context, smime_problems
from ..vault import Vault


@dataclass
class Parts:
    """Everything that check-config builds; serve adds sockets and tasks on top."""

    config: Config
    vault: Vault
    schemas: SchemaRegistry
    partners: PartnerBook
    parser: XmlParser
    rules: RuleEngine
    signer: SigningKey | None
    revocation: Revocation
    smime: Identity | None = None  # the gateway's S/MIME certificate and key ([smtp])
    smime_roots: tuple[x509.Certificate, ...] = ()  # CAs partners' S/MIME certificates chain to


def build(config: Config, *, processes: int | None = None, rules: RuleEngine | None = None,
          partners: PartnerBook | None = None) -> Parts:
    """Build and check every part that can fail on bad configuration (no sockets, no state writes).

    A reload passes the running rule engine when the rule configuration is unchanged (its processes
    and compiled stylesheets are kept), and the partner book when the file is the same one.
    """
    server_context(config.https.certificate, config.https.private_key, config.https.client_ca)
    vault = Vault.from_files(config.vault.keys, config.vault.current)
    if partners is None or partners.path != config.partners_file:
        partners = PartnerBook(config.partners_file)
    else:
        partners.refresh(force=True)
    schemas = SchemaRegistry(config.schemas, config.cii_schema)
    ops = config.operations
    smime_identity, smime_roots = smime_parts(config)
    revocation = Revocation(RevocationPolicy(ops.crls, ops.crl_soft_fail, ops.crl_max_age_s),
                            [*ca_certificates(config.https.client_ca), *smime_roots] if ops.crls else [])
    owned = rules is None
    rules = rules or RuleEngine(rule_specs(config), processes=processes or config.rules_processes,
                                timeout_s=config.rules_timeout_s)
    try:
        rules.check_names(config.rules_default, "rules.default")
        for p in partners.current.partners:
            if p.rules is not None:
                rules.check_names(p.rules, f"{config.partners_file}: partners.{p.name}.rules")
        signer = None
        if config.signing is not None:
            try:
                signer = SigningKey.load(config.signing.certificate.read_bytes(), config.signing.private_key.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"signing: {exc}") from None
        for d in config.destinations:
            if d.type == "partner" and d.partner and partners.current.get(d.partner) is None:
                raise ConfigError(f"destinations: {d.name!r} names partner {d.partner!r}, which is not registered")
            if d.type == "email" and d.recipient_certificate is not None and not encryptable(
                    x509.load_pem_x509_certificate(d.recipient_certificate.read_bytes())):
                raise ConfigError(f"destinations: {d.name!r}: recipient_certificate has no RSA key of 2048 bits or more; "
                                  "mail cannot be encrypted to it")
        if config.outbound is not None and config.outbound.socket is None:  # its TLS listener
            server_context(config.https.certificate, config.https.private_key, config.outbound.client_ca)
    except ConfigError:
        if owned:
            rules.close()
        raise
    return Parts(config, vault, schemas, partners, XmlParser(config.xml), rules, signer, revocation, smime_identity,
                 tuple(smime_roots))


def smime_parts(config: Config) -> tuple[Identity | None, list[x509.Certificate]]:
    """The gateway's S/MIME identity and the partner S/MIME CAs, checked."""
    cfg = config.smtp
    if cfg is None:
        return None, []
    try:
        cert = x509.load_pem_x509_certificate(cfg.certificate.read_bytes())
        key = load_private_key(cfg.private_key.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"smtp.certificate: cannot load the S/MIME certificate and key ({exc})") from None
    if not encryptable(cert) or not same_key(cert, key):
        raise ConfigError("smtp.private_key: the S/MIME key must be the RSA key (2048 bits or more) of smtp.certificate: "
                          "partners encrypt to it")
    problems = smime_problems(cert)
    if problems:
        raise ConfigError(f"smtp.certificate: not an S/MIME certificate: {'; '.join(problems)}")
    if cfg.addresses[0] not in email_addresses(cert):
        raise ConfigError(f"smtp.certificate: the certificate does not name {cfg.addresses[0]!r} (smtp.addresses[0], the "
                          "From of the gateway's mail) as an rfc822Name; partners' mail programs would refuse the signature")
    roots = ca_certificates(cfg.partner_ca, "smtp.partner_ca")
    return Identity(cert, key, cfg.addresses[0]), roots


def warnings(parts: Parts) -> list[str]:
    """Weakened defaults an operator should know about (logged at start, printed by check-config)."""
    out = []
    config, rules = parts.config, parts.rules
    if not config.rules_default:
        out.append("rules.default is empty: invoices from partners that choose no rule pack are not checked "
                   "against EN 16931")
    for p in parts.partners.current.partners:
        if p.rules == ():
            out.append(f"partner {p.name!r} is registered with --no-rules: its invoices are not checked against any "
                       "business rules")
    used = {n for p in parts.partners.current.partners for n in (config.rules_default if p.rules is None else p.rules)}
    for name in sorted(used & set(rules.packs)):
        if Syntax.CII not in rules.packs[name].stylesheets:
            out.append(f"rule pack {name!r} has no CII stylesheet: CII invoices from partners using it are refused "
                       f"with RULES_UNAVAILABLE until a [[rules.packs]] entry named {name!r} gives cii = \"…\"")
    if not config.routing_default:
        out.append("routing.default is empty: invoices that no [[routes]] entry matches are held for review "
                   "(quarantine list) instead of delivered")
    if config.smtp is not None and config.smtp.replies and config.smarthost is None:
        out.append("smtp.replies is on but there is no [smarthost]: partners get the SMTP reply only, no reply e-mail")
    mailing = [p.name for p in parts.partners.current.partners if p.endpoint.startswith("mailto:")]
    if mailing and (config.smarthost is None or parts.smime is None):
        out.append(f"partners {', '.join(mailing)} receive invoices by e-mail, and there is no [smarthost] or [smtp] "
                   "identity: deliveries to them wait in the outbox until the horizon")
    wanting = [p.name for p in parts.partners.current.partners if p.sign_outbound]
    if wanting and parts.signer is None:
        out.append(f"partners {', '.join(wanting)} receive signed invoices only, and there is no [signing] key: "
                   "invoices submitted for them are refused with SIGNING_UNAVAILABLE")
    if parts.signer is None:
        out.append("there is no [signing] key: audit checkpoints are not signed, so a rewrite of the whole audit log "
                   "would not be detected")
    out.extend(parts.revocation.warnings())
    for i, dest in enumerate(config.destinations):
        out.extend(access_warnings(dest, f"destinations[{i}]"))
    return out


def rules_key(config: Config) -> tuple[object, ...]:
    """What the rule engine is built from: a reload keeps the running engine when this is unchanged."""
    return (tuple(config.rule_packs), config.rules_processes, config.rules_timeout_s)


# Settings a running process cannot change (its sockets and files are open): a reload keeps them
# and says that a restart is needed.
RESTART_ONLY: dict[str, Callable[[Config], object]] = {
    "instance.state_dir": lambda c: c.state_dir,
    "https.listen_host/listen_port": lambda c: (c.https.host, c.https.port),
    "https.workers": lambda c: c.https.workers,
    "https limits": lambda c: (c.https.max_body_bytes, c.https.max_in_flight_bytes, c.https.read_timeout_s,
                               c.https.keepalive_timeout_s),
    "outbound listener": lambda c: None if c.outbound is None else (c.outbound.socket, c.outbound.host, c.outbound.port),
    "admin": lambda c: c.admin,
    "smtp listener": lambda c: None if c.smtp is None else (c.smtp.host, c.smtp.port, c.smtp.max_message_bytes,
                                                          c.smtp.max_sessions, c.smtp.command_timeout_s),
    "logging.level": lambda c: c.log_level,
}


def restart_needed(old: Config, new: Config) -> list[str]:
    return [key for key, get in RESTART_ONLY.items() if get(old) != get(new)]



