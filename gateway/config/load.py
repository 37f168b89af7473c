"""Configuration: one TOML file read into frozen dataclasses and checked before anything starts.

Every error names the exact key path (``https.client_ca[1]: file not found``).  Secrets are given
as file paths, never inline.  Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from ..errors import ConfigError
from ..identifiers import parse_email, parse_party_id
from ..model import BUSINESS_NAMESPACES, UBL_CBC_NS
from .model import (
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_MAX_TREE_BYTES,
    DEFAULT_MIN_BODY_RATE,
    DESTINATION_TYPES,
    AdminConfig,
    Config,
    ConsoleConfig,
    DeliveryConfig,
    Destination,
    HttpsConfig,
    OperationsConfig,
    OutboundConfig,
    Route,
    RulePack,
    SchemaSet,
    SigningConfig,
    SmarthostConfig,
    SmtpConfig,
    VaultConfig,
    XmlLimits,
)
from .reader import Reader, check_secret_file, key_files

MIB = 1024 * 1024

_STYLESHEET_SYNTAX = {
    b"urn:oasis:names:specification:ubl:schema:xsd:Invoice-2": "ubl",
    b"urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100": "cii",
}


def _stylesheets_in(directory: Path, where: str) -> dict[str, Path]:
    """The compiled XSLT of a rule pack folder, by the document namespace each one checks."""
    if not directory.is_dir():
        raise ConfigError(f"{where}: not a directory ({directory})")
    if any(directory.glob("*.sch")) and not any(directory.glob("*.xsl*")):
        raise ConfigError(f"{where}: {directory} holds Schematron (.sch) but no compiled XSLT; compile it to XSLT 2.0 "
                          "first (for example with SchXslt) and point here at the result")
    found: dict[str, Path] = {}
    for path in sorted([*directory.glob("*.xsl"), *directory.glob("*.xslt")]):
        head = path.read_bytes()[:262_144]
        kinds = {kind for ns, kind in _STYLESHEET_SYNTAX.items() if ns in head}
        if len(kinds) != 1:
            continue  # an included module, or a stylesheet for another document type
        kind = kinds.pop()
        if kind in found:
            raise ConfigError(f"{where}: both {found[kind].name} and {path.name} check {kind.upper()}; "
                              f"name the one to use with {kind} = \"…\"")
        found[kind] = path
    if not found:
        raise ConfigError(f"{where}: no compiled XSLT for UBL or CII in {directory}")
    return found


def _https(r: Reader) -> HttpsConfig:
    cfg = HttpsConfig(
        host=r.string("listen_host", "127.0.0.1"),
        port=r.integer("listen_port", 8443, maximum=65535),
        certificate=r.file("certificate"),
        private_key=r.secret("private_key"),
        client_ca=r.files("client_ca", required=True),
        workers=r.integer("workers", 0, maximum=64),
        max_body_bytes=r.integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1024),
        max_in_flight_bytes=r.integer("max_in_flight_bytes", DEFAULT_MAX_IN_FLIGHT_BYTES, minimum=1024),
        read_timeout_s=r.number("read_timeout_s", 60.0, minimum=1.0),
        keepalive_timeout_s=r.number("keepalive_timeout_s", 75.0, minimum=1.0),
        max_in_flight_bytes_per_partner=r.integer("max_in_flight_bytes_per_partner", 0),
        min_body_rate=r.integer("min_body_rate", DEFAULT_MIN_BODY_RATE, minimum=1024),
    )
    if cfg.max_in_flight_bytes < cfg.max_body_bytes:
        raise ConfigError(f"{r.key('max_in_flight_bytes')}: must be at least https.max_body_bytes")
    if not cfg.max_body_bytes <= cfg.partner_share <= cfg.max_in_flight_bytes:
        raise ConfigError(f"{r.key('max_in_flight_bytes_per_partner')}: must lie between https.max_body_bytes and "
                          "https.max_in_flight_bytes (or be 0: a quarter of max_in_flight_bytes)")
    r.done()
    return cfg


def _destination(d: Reader) -> Destination:
    name = d.string("name", required=True)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ConfigError(f"{d.key('name')}: {name!r} is not a destination name (letters, digits, . _ -)")
    kind = d.string("type", "directory")
    if kind not in DESTINATION_TYPES:
        raise ConfigError(f"{d.key('type')}: {kind!r} is not one of {', '.join(DESTINATION_TYPES)}")
    common = dict(name=name, type=kind, concurrency=d.integer("concurrency", 16, minimum=1, maximum=256),
                  timeout_s=d.number("timeout_s", 30.0, minimum=0.5))
    if kind == "directory":
        folder = d.resolve(d.string("path", required=True))
        if not folder.is_dir():
            raise ConfigError(f"{d.key('path')}: {folder} is not an existing folder")
        group = d.string("group") if d.has("group") else None
        if group is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", group):
            raise ConfigError(f"{d.key('group')}: {group!r} is not a group name (letters, digits, _ . -; at most 32)")
        mode = _octal(d, "mode", "0640")
        if mode & 0o007:
            raise ConfigError(f"{d.key('mode')}: {mode:04o} lets every local user read or change the invoices; give "
                              "the ERP's account a group (group = \"NAME\") and use 0640")
        if mode & 0o020:
            raise ConfigError(f"{d.key('mode')}: {mode:04o} lets the ERP's group change delivered invoices; use 0640 "
                              "(the ERP's group reads them; only the gateway writes)")
        if mode & 0o600 != 0o600:
            raise ConfigError(f"{d.key('mode')}: {mode:04o} keeps the gateway from reading or rewriting what it "
                              "delivered (a redelivery writes the same names again); the owner needs 6, e.g. 0640")
        dest = Destination(**common, path=folder, group=group, mode=mode)  # type: ignore[arg-type]
    elif kind == "email":
        dest = Destination(**common, to=parse_email(d.string("to", required=True), d.key("to")),  # type: ignore[arg-type]
                           recipient_certificate=d.file("recipient_certificate"),
                           cipher=d.choice("cipher", CIPHERS, "aes-256-gcm"))
    else:
        tls = dict(ca=d.file("ca") if d.has("ca") else None,
                   client_certificate=d.file("client_certificate") if d.has("client_certificate") else None,
                   client_key=d.secret("client_key") if d.has("client_key") else None)
        if (tls["client_certificate"] is None) != (tls["client_key"] is None):
            raise ConfigError(f"{d.key('client_key')}: give client_certificate and client_key together")
        if kind == "https":
            url = d.string("url", required=True)
            if not re.fullmatch(r"https://[^/\s?#]+(/[^\s#]*)?", url):
                raise ConfigError(f"{d.key('url')}: {url!r} is not an https:// URL")
            hmac_key = d.secret("hmac_key_file")
            if len(hmac_key.read_bytes()) < MIN_HMAC_KEY_BYTES:
                raise ConfigError(f"{d.key('hmac_key_file')}: the key must be at least {MIN_HMAC_KEY_BYTES} bytes "
                                  "(for example: head -c 32 /dev/urandom | base64 > FILE)")
            token = d.secret("bearer_token_file") if d.has("bearer_token_file") else None
            if token is not None:
                if not re.fullmatch(r"[\x21-\x7e]+", token.read_text(encoding="utf-8", errors="replace").strip()):
                    raise ConfigError(f"{d.key('bearer_token_file')}: the token must be one line of printable ASCII "
                                      "without spaces (a trailing newline is ignored)")
            dest = Destination(**common, url=url, hmac_key_file=hmac_key, bearer_token_file=token, **tls)  # type: ignore[arg-type]
        else:
            if tls["client_certificate"] is None:
                raise ConfigError(f"{d.key('client_certificate')}: missing (required): partners authenticate the gateway "
                                  "by its client certificate")
            dest = Destination(**common, partner=d.string("partner", ""), **tls)  # type: ignore[arg-type]
    d.done()
    return dest


def _routing(top: Reader, destinations: tuple[Destination, ...]) -> tuple[tuple[Route, ...], tuple[str, ...]]:
    names = [d.name for d in destinations]
    outbound_only = {d.name for d in destinations if d.type == "partner" and not d.partner}

    def known(r: Reader, key: str, values: list[str]) -> tuple[str, ...]:
        for i, v in enumerate(values):
            if v not in names:
                raise ConfigError(f"{r.key(key)}[{i}]: no destination is named {v!r}")
            if v in outbound_only:
                raise ConfigError(f"{r.key(key)}[{i}]: destination {v!r} carries outbound invoices to their buyer; "
                                  "to route received invoices to a trading partner, give that destination partner = NAME")
        return tuple(values)

    routes = []
    for rt in top.tables("routes"):
        dests = known(rt, "destinations", rt.str_list("destinations", required=True))
        if not dests:
            raise ConfigError(f"{rt.key('destinations')}: a route needs at least one destination")
        criteria = {k: (rt.string(k) if rt.has(k) else None) for k in ROUTE_CRITERIA}
        if criteria["receiver"] is not None:
            if not re.fullmatch(r"[^:\s]+:[^:\s]\S*|[^:\s]+", criteria["receiver"].strip()):
                raise ConfigError(f"{rt.key('receiver')}: {criteria['receiver']!r} is not an identifier (write "
                                  "scheme:value, e.g. 0088:5790000435975, or a bare value, without spaces)")
            criteria["receiver"] = parse_party_id(criteria["receiver"], rt.key("receiver"))
        if criteria["document_type"] not in (None, *DOCUMENT_TYPE_LABELS):
            raise ConfigError(f"{rt.key('document_type')}: {criteria['document_type']!r} is not one of "
                              f"{', '.join(DOCUMENT_TYPE_LABELS)}")
        route = Route(dests, **criteria)
        rt.done()
        routes.append(route)
    ro = top.table("routing")
    # Without the key: every directory/https destination (a one-destination setup needs no routing).
    default = (known(ro, "default", ro.str_list("default")) if ro.has("default") else
               tuple(d.name for d in destinations if d.type != "partner"))
    ro.done()
    return tuple(routes), default


def _octal(r: Reader, name: str, default: str) -> int:
    text = r.string(name, default)
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ConfigError(f"{r.key(name)}: {text!r} is not a file mode (write it as a string, e.g. \"0660\")")
    return int(text, 8)


DOCUMENT_TYPE_LABELS = ("ubl:Invoice", "ubl:CreditNote", "cii:CrossIndustryInvoice")
ROUTE_CRITERIA = ("receiver", "partner", "document_type", "customization", "profile")
MIN_HMAC_KEY_BYTES = 32


def _delivery(r: Reader) -> DeliveryConfig:
    cfg = DeliveryConfig(
        horizon_s=r.number("horizon_h", 72.0, minimum=0.01) * 3600.0,
        retry_base_s=r.number("retry_base_s", 5.0, minimum=0.01),
        retry_cap_s=r.number("retry_cap_s", 1800.0, minimum=0.01),
        lease_s=r.number("lease_s", 300.0, minimum=5.0),
        breaker_failures=r.integer("breaker_failures", 5, minimum=1),
        breaker_cooldown_s=r.number("breaker_cooldown_s", 30.0, minimum=0.01),
    )
    if cfg.retry_cap_s < cfg.retry_base_s:
        raise ConfigError(f"{r.key('retry_cap_s')}: must be at least delivery.retry_base_s")
    r.done()
    return cfg


def _outbound(r: Reader, destinations: tuple[Destination, ...]) -> OutboundConfig:
    socket_path = r.resolve(r.string("socket")) if r.has("socket") else None
    client_ca = r.files("client_ca", required=socket_path is None)
    spkis = frozenset(s.lower() for s in r.str_list("client_spki"))
    if socket_path is None and not spkis:
        raise ConfigError(f"{r.key('client_spki')}: name the SHA-256 of the ERP's client certificate key (as shown by "
                          "`einvoice-gateway partners show`), so that no other holder of a certificate from client_ca "
                          "can submit")
    ids = r.str_list("identities", required=True)
    if not ids:
        raise ConfigError(f"{r.key('identities')}: list this business's seller identifiers (scheme:value)")
    partner_dests = [d.name for d in destinations if d.type == "partner" and not d.partner]
    name = r.string("destination", partner_dests[0] if len(partner_dests) == 1 else "")
    if name not in partner_dests:
        raise ConfigError(f"{r.key('destination')}: name the [[destinations]] entry with type = \"partner\" (and no "
                          f"partner key) that carries outbound invoices; found: {', '.join(partner_dests) or 'none'}")
    cfg = OutboundConfig(
        host=r.string("listen_host", "127.0.0.1"),
        port=r.integer("listen_port", 8444, maximum=65535),
        socket=socket_path,
        socket_mode=_octal(r, "socket_mode", "0660"),
        client_ca=client_ca,
        client_spki=spkis,
        identities=frozenset(parse_party_id(v, f"{r.key('identities')}[{i}]") for i, v in enumerate(ids)),
        destination=name,
    )
    if cfg.socket_mode & 0o007:
        raise ConfigError(f"{r.key('socket_mode')}: {cfg.socket_mode:04o} lets every local user submit; use 0660 or 0600")
    r.done()
    return cfg


CIPHERS = ("aes-256-gcm", "aes-128-gcm", "aes-256-cbc", "aes-128-cbc")  # for mail the gateway encrypts


def _smtp(r: Reader, https: HttpsConfig) -> SmtpConfig | None:
    if not r.boolean("enabled", True):
        return None  # (the other keys may stay, unchecked, for switching it back on)
    addresses = tuple(parse_email(a, f"{r.key('addresses')}[{i}]") for i, a in enumerate(r.str_list("addresses", required=True)))
    if not addresses:
        raise ConfigError(f"{r.key('addresses')}: name at least one address the gateway receives invoices at")
    # Base64 makes the invoice a third larger; the CMS layers and headers add a little.
    default_size = https.max_body_bytes * 4 // 3 + 1024 * 1024
    cfg = SmtpConfig(
        enabled=True,
        host=r.string("listen_host", "127.0.0.1"),
        port=r.integer("listen_port", 2525, maximum=65535),
        hostname=r.string("hostname", "localhost"),
        addresses=addresses,
        certificate=r.file("certificate"),
        private_key=r.secret("private_key"),
        partner_ca=r.files("partner_ca") if r.has("partner_ca") else https.client_ca,
        max_message_bytes=r.integer("max_message_bytes", default_size, minimum=64 * 1024),
        command_timeout_s=r.number("command_timeout_s", 300.0, minimum=1.0),
        data_timeout_s=r.number("data_timeout_s", 600.0, minimum=1.0),
        max_sessions=r.integer("max_sessions", 200, minimum=1),
        max_sessions_per_client=r.integer("max_sessions_per_client", 10, minimum=1),
        transaction_deadline_s=r.number("transaction_deadline_s", 60.0, minimum=1.0),
        replies=r.boolean("replies", True),
        reply_cipher=r.choice("reply_cipher", CIPHERS, "aes-256-gcm"),
    )
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", cfg.hostname):
        raise ConfigError(f"{r.key('hostname')}: {cfg.hostname!r} is not a host name")
    r.done()
    return cfg


def _smarthost(r: Reader) -> SmarthostConfig:
    cfg = SmarthostConfig(
        host=r.string("host", required=True),
        port=r.integer("port", 587, minimum=1, maximum=65535),
        ca=r.file("ca") if r.has("ca") else None,
        username=r.string("username", ""),
        password_file=r.secret("password_file") if r.has("password_file") else None,
        timeout_s=r.number("timeout_s", 60.0, minimum=1.0),
    )
    if bool(cfg.username) != (cfg.password_file is not None):
        raise ConfigError(f"{r.key('password_file')}: give username and password_file together (SMTP authentication)")
    r.done()
    return cfg


def _admin(r: Reader) -> AdminConfig:
    cfg = AdminConfig(host=r.string("listen_host", "127.0.0.1"), port=r.integer("listen_port", 8445, maximum=65535),
                      token_file=r.secret("token_file") if r.has("token_file") else None)
    if cfg.token_file is not None and not re.fullmatch(r"[\x21-\x7e]{16,}", cfg.token_file.read_text(
            encoding="utf-8", errors="replace").strip()):
        raise ConfigError(f"{r.key('token_file')}: the token must be one line of at least 16 printable ASCII characters "
                          "without spaces (for example: head -c 32 /dev/urandom | base64 > FILE)")
    if cfg.port and not cfg.loopback and cfg.token_file is None:
        raise ConfigError(f"{r.key('token_file')}: the admin listener on {cfg.host} is reachable from other hosts; "
                          "give a bearer token file (it is then served over HTTPS with the https certificate)")
    r.done()
    return cfg


MAX_BACKOFF_S = 3600.0  # the longest wait between failed logins an operator may set (gateway/console/throttle.py)


def _console(r: Reader, admin: AdminConfig) -> ConsoleConfig:
    d = ConsoleConfig()
    hosts = r.str_list("allowed_hosts")
    cfg = ConsoleConfig(
        enabled=r.boolean("enabled", d.enabled),
        idle_timeout_s=r.number("idle_timeout_s", d.idle_timeout_s, minimum=60.0),
        absolute_timeout_s=r.number("absolute_timeout_s", d.absolute_timeout_s, minimum=300.0),
        fresh_auth_s=r.number("fresh_auth_s", d.fresh_auth_s, minimum=30.0),
        backoff_after=r.integer("backoff_after", d.backoff_after, minimum=3, maximum=20),
        backoff_max_s=r.number("backoff_max_s", d.backoff_max_s, minimum=60.0),
        account_backoff_after=r.integer("account_backoff_after", d.account_backoff_after, minimum=10, maximum=10_000),
        login_burst=r.integer("login_burst", d.login_burst, minimum=1, maximum=1000),
        login_every_s=r.number("login_every_s", d.login_every_s, minimum=0.01),
        allowed_hosts=tuple(dict.fromkeys([h.lower().strip("[]") for h in hosts] + list(d.allowed_hosts)
                                          + ([admin.host.strip("[]")] if admin.host not in ("0.0.0.0", "::") else []))),  # noqa: S104
    )
    if cfg.fresh_auth_s > 300:
        raise ConfigError(f"{r.key('fresh_auth_s')}: at most 300 seconds (sensitive actions need an authentication at "
                          "most five minutes old)")
    if cfg.backoff_max_s > MAX_BACKOFF_S:
        raise ConfigError(f"{r.key('backoff_max_s')}: at most {MAX_BACKOFF_S:g} seconds (a longer wait keeps a person "
                          "who mistyped out for hours, and failed logins are forgotten after a day anyway)")
    if cfg.account_backoff_after <= cfg.backoff_after:
        raise ConfigError(f"{r.key('account_backoff_after')}: must be more than backoff_after ({cfg.backoff_after}), "
                          "or one address alone could make every other address wait")
    for gone, now in (("lockout_after", "backoff_after"), ("lockout_s", "backoff_max_s")):
        if r.has(gone):
            raise ConfigError(f"{r.key(gone)}: failed logins no longer lock an account; they make further attempts "
                              f"wait (console.{now}, see docs/console.md, 'Failed logins: a wait, never a lock')")
    if cfg.idle_timeout_s > cfg.absolute_timeout_s:
        raise ConfigError(f"{r.key('idle_timeout_s')}: longer than absolute_timeout_s ({cfg.absolute_timeout_s:g} s)")
    r.done()
    return cfg


def _operations(top: Reader) -> OperationsConfig:
    au, re_, rv, ce = top.table("audit"), top.table("retention"), top.table("revocation"), top.table("certificates")
    max_age = rv.number("max_age_h", 0.0) * 3600
    cfg = OperationsConfig(
        audit_checkpoint_s=au.number("checkpoint_interval_s", 300.0, minimum=1.0),
        audit_trusted=au.files("trusted_certificates"),
        retention_days=re_.number("delete_after_days", 0.0),
        crls=rv.files("crls"),
        crl_soft_fail=rv.boolean("soft_fail", False),
        crl_max_age_s=max_age or None,
        expiry_warn_days=tuple(sorted(set(ce.int_list("warn_days", [30, 14, 7], 1, 365)), reverse=True)),
    )
    for r in (au, re_, rv, ce):
        r.done()
    return cfg


def load(path: str | os.PathLike[str]) -> Config:
    """Read and check a configuration file; raises ConfigError naming the offending key."""
    source = Path(path).resolve()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    top = Reader(raw, "", source.parent)

    inst = top.table("instance")
    state_dir = inst.resolve(inst.string("state_dir", "state"))
    inst.done()

    https = _https(top.table("https"))

    x = top.table("xml")
    xml = XmlLimits(
        max_depth=x.integer("max_depth", DEFAULT_MAX_DEPTH, minimum=16, maximum=2048),
        max_elements=x.integer("max_elements", DEFAULT_MAX_ELEMENTS, minimum=100),
        max_attributes=x.integer("max_attributes", DEFAULT_MAX_ATTRIBUTES, minimum=8),
        max_tree_bytes=x.integer("max_tree_mib", DEFAULT_MAX_TREE_BYTES // MIB, minimum=1, maximum=4096) * MIB,
    )
    x.done()

    v = top.table("validation")
    schemas = []
    for s in v.tables("schemas"):
        version = s.string("ubl_version", required=True)
        directory = s.resolve(s.string("directory", required=True))
        if not (directory / "maindoc").is_dir():
            raise ConfigError(f"{s.key('directory')}: {directory} has no maindoc/ folder of UBL schemas")
        schemas.append(SchemaSet(version, directory))
        s.done()
    cii_schema = v.file("cii_schema") if v.has("cii_schema") else None
    extension_namespaces = tuple(v.str_list("extension_namespaces")) if v.has("extension_namespaces") else ()
    for uri in extension_namespaces:
        if not uri or any(c.isspace() for c in uri) or uri in BUSINESS_NAMESPACES or uri == UBL_CBC_NS:
            raise ConfigError(f"{v.key('extension_namespaces')}: {uri!r} is not a namespace an extension may use "
                              "(a URI without spaces, and not one of UBL's or CII's business component namespaces)")
    v.done()

    ru = top.table("rules")
    rules_default = tuple(ru.str_list("default")) if ru.has("default") else ("en16931",)
    rules_processes = ru.integer("processes", 2, minimum=1, maximum=64)
    rules_timeout_s = ru.number("timeout_s", 60.0, minimum=1.0)
    packs = []
    for rp in ru.tables("packs"):
        name = rp.string("name", required=True)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigError(f"{rp.key('name')}: {name!r} is not a pack name (letters, digits, . _ -)")
        found = _stylesheets_in(rp.resolve(rp.string("directory")), rp.key("directory")) if rp.has("directory") else {}
        ubl = rp.file("ubl") if rp.has("ubl") else found.get("ubl")
        cii = rp.file("cii") if rp.has("cii") else found.get("cii")
        if ubl is None and cii is None:
            raise ConfigError(f"{rp.key('name')}: rule pack {name!r} names no stylesheet (give directory, ubl and/or cii)")
        packs.append(RulePack(name, rp.string("version", ""), ubl, cii))
        rp.done()
    ru.done()

    fr = top.table("fraud")
    invalid_iban = fr.choice("invalid_iban", ("reject", "hold"), "reject")
    fr.done()

    k = top.table("vault")
    entries = [k.resolve(v) for v in k.str_list("keys", required=True)]
    if not entries:
        raise ConfigError("vault.keys: name at least one master key file or folder")
    keys: list[Path] = []
    for i, entry in enumerate(entries):
        for key_path in key_files(entry, f"vault.keys[{i}]"):
            check_secret_file(key_path, f"vault.keys[{i}]")
            keys.append(key_path)
    vault = VaultConfig(keys=tuple(keys), current=k.string("current", "") or None,
                        folder=next((e for e in entries if e.is_dir()), None))
    k.done()

    p = top.table("partners")
    partners_file = p.file("file")
    reload_s = p.number("reload_interval_s", 1.0, minimum=0.1)
    p.done()

    destinations = tuple(_destination(d) for d in top.tables("destinations"))
    names = [d.name for d in destinations]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"destinations[{i}].name: duplicate destination name {name!r}")
    routes, routing_default = _routing(top, destinations)
    delivery = _delivery(top.table("delivery"))
    outbound = _outbound(top.table("outbound"), destinations) if top.has("outbound") else None
    if not top.has("outbound"):
        top.table("outbound")

    signing = None
    if top.has("signing"):
        sg = top.table("signing")
        signing = SigningConfig(sg.file("certificate"), sg.secret("private_key"))
        sg.done()
    else:
        top.table("signing")

    admin = _admin(top.table("admin"))
    console = _console(top.table("console"), admin)
    operations = _operations(top)
    smtp = _smtp(top.table("smtp"), https) if top.has("smtp") else None
    smarthost = _smarthost(top.table("smarthost")) if top.has("smarthost") else None
    if not top.has("smtp"):
        top.table("smtp")
    if not top.has("smarthost"):
        top.table("smarthost")
    mailing = [d.name for d in destinations if d.type == "email"]
    if mailing and smarthost is None:
        raise ConfigError(f"smarthost: destination {mailing[0]!r} sends e-mail; configure [smarthost] (host, port, ...)")
    if mailing and smtp is None:
        raise ConfigError(f"smtp: destination {mailing[0]!r} sends signed e-mail; the [smtp] section names the gateway's "
                          "S/MIME certificate and address")

    lg = top.table("logging")
    level = lg.choice("level", ("debug", "info", "warning", "error"), "info")
    lg.done()
    top.done()

    return Config(
        source=source,
        state_dir=state_dir,
        https=https,
        xml=xml,
        schemas=tuple(schemas),
        cii_schema=cii_schema,
        rules_default=rules_default,
        rules_processes=rules_processes,
        rules_timeout_s=rules_timeout_s,
        invalid_iban=invalid_iban,
        rule_packs=tuple(packs),
        vault=vault,
        partners_file=partners_file,
        partners_reload_s=reload_s,
        destinations=destinations,
        routes=routes,
        routing_default=routing_default,
        delivery=delivery,
        outbound=outbound,
        log_level=level,
        signing=signing,
        admin=admin,
        operations=operations,
        smtp=smtp,
        smarthost=smarthost,
        console=console,
        extension_namespaces=extension_namespaces,
    )
