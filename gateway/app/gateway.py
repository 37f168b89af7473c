"""Composition root: builds every part from a Config, starts and stops them.  Nothing imports it but the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from .. import logs, systemd
from ..config.load import Config, Destination
from ..config.load import load as load_config
from ..console.web import MAX_BODY as CONSOLE_MAX_BODY
from ..console.web import Console
from ..delivery.outbox import Outbox, Sender, make_sender
from ..delivery.smarthost import Mailer, Smarthost
from ..errors import ConfigError
from ..inbound.https import HttpsInbound
from ..inbound.smtp import SmtpInbound
from ..inbound.submit import SubmitInbound
from ..metrics import Gauge, Metrics
from ..model import Syntax
from ..operations.admin import AdminInbound
from ..operations.housekeeping import ExpiryWarnings, Housekeeping, inventory
from ..partners.directory import PartnerBook
from ..pipeline import Pipeline
from ..smime.unwrap import Identity
from ..stages.revocation import Revocation, RevocationPolicy
from ..stages.routing import Router
from ..stages.rules import PackSpec, RuleEngine
from ..stages.schema import SchemaRegistry
from ..stages.signature import SigningKey
from ..stages.xmlparse import XmlParser
from ..storage.sqlite import SqliteStore
from ..tls import admin_context, ca_certificates, email_addresses, encryptable, load_private_key, same_key, server_context, smime_problems
from ..vault import Vault

TLS_HANDSHAKE_TIMEOUT_S = 10.0  # SECURITY-TESTS.md T-08: a handshake flood cannot hold sockets for long
SHUTDOWN_GRACE_S = 30.0  # in-flight requests get this long to finish after SIGTERM
LISTEN_BACKLOG = 1024
STAGE_THREADS_PER_WORKER = 2
SEALING_KEY = "sealing_key"  # meta: the master key the running gateway seals with (`keys rewrap` checks it)

log = logs.get("app")


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


def rule_specs(config: Config) -> list[PackSpec]:
    return [PackSpec(p.name, p.version, {s: path for s, path in ((Syntax.UBL, p.ubl), (Syntax.CII, p.cii)) if path})
            for p in config.rule_packs]


def _file_stamps(dest: Destination) -> tuple[tuple[int, int, int] | None, ...]:
    """What a sender read from files when it was made: a reload replaces it when one of them changed."""
    def stamp(path: Path | None) -> tuple[int, int, int] | None:
        try:
            st = path.stat() if path is not None else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None

    return tuple(stamp(p) for p in (dest.ca, dest.hmac_key_file, dest.bearer_token_file, dest.client_certificate,
                                    dest.client_key, dest.recipient_certificate))


class Gateway:
    def __init__(self, config: Config, parts: Parts | None = None, *, sock: socket.socket | None = None,
                 run_delivery: bool = True, smtp_sock: socket.socket | None = None):
        self.config = config
        self.started_config = config  # what the sockets and files were opened with (restart-only settings)
        self._owns_parts = parts is None
        self.parts = parts or build(config)
        self.sock = sock  # a listening socket shared by several worker processes (gateway/supervisor.py)
        self.smtp_sock = smtp_sock  # the same for the SMTP listener
        self.run_delivery = run_delivery  # only one process delivers
        # CPU stages (lxml releases the GIL while parsing, validating and canonicalizing) and blocking
        # file I/O.  Alone, the process needs threads for every core; as one of several workers, two
        # threads measured best (benchmarks/throughput.py: more threads only contend for the GIL).
        threads = STAGE_THREADS_PER_WORKER if sock is not None else min(8, (os.cpu_count() or 2) + 2)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage")
        # Status reads, delivery and reloads: never queued behind invoices waiting for the rules.
        self.io_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="io")
        self.store = SqliteStore(config.state_dir)
        self.metrics = Metrics()
        self.mailer = self._mailer(config, self.parts)
        self._sender_stamps: dict[str, tuple[Destination, tuple[tuple[int, int, int] | None, ...]]] = {}
        self.outbox = Outbox(self.store, self.parts.vault, self._senders(config, {}), config.delivery, self.io_executor,
                             on_outcome=self.metrics.delivery)
        self.pipeline = self._pipeline(config, self.parts)
        self.https = HttpsInbound(config.https, self.pipeline, self.parts.partners, self.store, self.outbox.wake.set,
                                  self.io_executor, count=self.metrics.invoice, revocation=self.parts.revocation)
        self.submit = (SubmitInbound(config.outbound, config.https, self.pipeline, self.store, self.outbox.wake.set,
                                     self.io_executor, count=self.metrics.invoice) if config.outbound is not None else None)
        self.smtp = self._smtp(config, self.parts)
        self.housekeeping = Housekeeping(config, self.store, self.io_executor, lambda: self.parts.partners.current,
                                         lambda: self.parts.signer, ExpiryWarnings(
                                             config.operations.expiry_warn_days,
                                             lambda t: self.metrics.expiry_warnings.labels(t).inc()))
        self._tls: ssl.SSLContext | None = None  # the context new handshakes use (replaced by a reload)
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.Server] = []
        self.submit_port: int | None = None
        self.smtp_port: int | None = None
        self.admin_port: int | None = None
        self.console: Console | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.stopping = False
        self.port = config.https.port

    def _pipeline(self, config: Config, parts: Parts) -> Pipeline:
        return Pipeline(parts.parser, parts.schemas, parts.rules, config.rules_default, parts.partners, parts.vault,
                        self.store, Router(config.routes, config.routing_default), self.executor,
                        config.https.max_body_bytes, config.invalid_iban == "hold", config.outbound, parts.signer,
                        observe=self.metrics.stage)

    def _senders(self, config: Config, old: dict[str, Sender]) -> dict[str, Sender]:
        """A sender per destination; one whose destination and files (keys, certificates, tokens) are
        unchanged is kept (its connections too)."""
        before, self._sender_stamps = self._sender_stamps, {d.name: (d, _file_stamps(d)) for d in config.destinations}
        return {d.name: old[d.name] if d.name in old and before.get(d.name) == self._sender_stamps[d.name]
                else make_sender(d, self.parts.partners, self.io_executor, lambda: self.mailer) for d in config.destinations}

    def _mailer(self, config: Config, parts: Parts) -> Mailer | None:
        if config.smarthost is None or parts.smime is None:
            return None
        return Mailer(Smarthost(config.smarthost), parts.smime, self.executor)

    def _smtp(self, config: Config, parts: Parts) -> SmtpInbound | None:
        if config.smtp is None or parts.smime is None:
            return None
        return SmtpInbound(config.smtp, self.pipeline, parts.partners, self.store, parts.smime, parts.smime_roots,
                           parts.revocation, admin_context(config.https.certificate, config.https.private_key),
                           self.executor, config.https.max_body_bytes, config.https.max_in_flight_bytes,
                           self.outbox.wake.set, self.mailer, count=self.metrics.invoice)

    def _server_tls(self) -> ssl.SSLContext:
        cfg = self.config.https
        ctx = server_context(cfg.certificate, cfg.private_key, cfg.client_ca)
        # Every handshake switches to the current context, so a reload's certificate, key and CAs
        # apply to new connections while the listening socket stays open.
        ctx.sni_callback = self._pick_context
        return ctx

    def _pick_context(self, sslobj: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        if self._tls is not None and self._tls is not ctx:
            sslobj.context = self._tls

    async def _serve(self, app: web.Application, unix: socket.socket | None = None, **kwargs: Any) -> asyncio.Server:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S,
                               keepalive_timeout=self.config.https.keepalive_timeout_s)
        await runner.setup()
        self._runners.append(runner)
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        if unix is not None:
            server = await loop.create_unix_server(runner.server, sock=unix)
        else:
            server = await loop.create_server(runner.server, **kwargs)
        self._servers.append(server)
        return server

    async def start(self) -> None:
        cfg = self.config.https
        self._tls = self._server_tls()
        if self.sock is not None:
            # asyncio uses `backlog` both for listen() and as the number of connections one wake-up
            # accepts.  Accept one at a time, so the workers share a burst of new connections, then
            # give the shared socket its real queue length back (a queue of 1 drops SYNs: 1 s stalls).
            server = await self._serve(self.https.app(), sock=self.sock, ssl=self._tls, backlog=1,
                                       ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
            self.sock.listen(LISTEN_BACKLOG)
        else:
            server = await self._serve(self.https.app(), host=cfg.host, port=cfg.port, ssl=self._tls,
                                       backlog=LISTEN_BACKLOG, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        self.port = server.sockets[0].getsockname()[1]
        if self.smtp is not None:
            await self._start_smtp()
        if self.run_delivery:  # the ERP and admin listeners, delivery and housekeeping: in one process only
            if self.submit is not None:
                await self._start_submit()
            if self.config.admin.port:
                await self._start_admin()
            await asyncio.wrap_future(self.store.set_meta(SEALING_KEY, self.parts.vault.current))
            self._tasks.append(asyncio.create_task(self.outbox.run(), name="delivery"))
            self._tasks.append(asyncio.create_task(self.housekeeping.run(), name="housekeeping"))
            for warning in warnings(self.parts):
                log.warning("gateway.weakened", reason=warning)
        self._tasks.append(asyncio.create_task(self._watch_partners(), name="partners-reload"))
        log.info("gateway.started", url=f"https://{cfg.host}:{self.port}", pid=os.getpid(),
                 partners=len(self.parts.partners.current.partners), destinations=len(self.config.destinations),
                 key_id=self.parts.vault.current, schema_sets=self.parts.schemas.fingerprints,
                 admin=f"{self.config.admin.host}:{self.admin_port}" if self.admin_port else None,
                 smtp=f"{self.config.smtp.host}:{self.smtp_port}" if self.config.smtp and self.smtp_port else None)

    async def _start_smtp(self) -> None:
        assert self.smtp is not None and self.config.smtp is not None
        cfg = self.config.smtp
        loop = asyncio.get_running_loop()
        try:
            if self.smtp_sock is not None:
                server = await loop.create_server(self.smtp.protocol, sock=self.smtp_sock, backlog=1)
                self.smtp_sock.listen(LISTEN_BACKLOG)
            else:
                server = await loop.create_server(self.smtp.protocol, host=cfg.host, port=cfg.port, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise ConfigError(f"smtp.listen_port: cannot listen on {cfg.host}:{cfg.port} ({exc.strerror})") from None
        self._servers.append(server)
        self.smtp_port = server.sockets[0].getsockname()[1]
        log.info("smtp.listening", address=f"{cfg.host}:{self.smtp_port}", recipients=list(cfg.addresses))

    async def _start_submit(self) -> None:
        assert self.submit is not None and self.config.outbound is not None
        cfg = self.config.outbound
        if cfg.socket is not None:
            # Bound and given its mode before listen(): nobody can connect while it has another mode
            # (and no process-wide umask change races other threads creating files).
            cfg.socket.unlink(missing_ok=True)
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(str(cfg.socket))
            os.chmod(cfg.socket, cfg.socket_mode)
            unix.listen(LISTEN_BACKLOG)
            await self._serve(self.submit.app(), unix=unix)
            where = f"unix:{cfg.socket}"
        else:
            ctx = server_context(self.config.https.certificate, self.config.https.private_key, cfg.client_ca)
            server = await self._serve(self.submit.app(), host=cfg.host, port=cfg.port, ssl=ctx,
                                       ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
            self.submit_port = server.sockets[0].getsockname()[1]
            where = f"https://{cfg.host}:{self.submit_port}"
        log.info("outbound.listening", url=where, destination=cfg.destination)

    async def _start_admin(self) -> None:
        cfg = self.config.admin
        token = cfg.token_file.read_text(encoding="utf-8").strip() if cfg.token_file is not None else None
        admin = AdminInbound(self.metrics, self.gauges, self.not_ready, self.store.counts, self.io_executor, token)
        app = admin.app(CONSOLE_MAX_BODY if self.config.console.enabled else 1024)
        if self.config.console.enabled:
            self.console = Console(self.config, self.store, self.io_executor, lambda: self.parts.vault,
                                   lambda: self.parts.partners.current, lambda: self.parts.signer, self.outbox.wake.set,
                                   self.metrics.refusals, self.refresh_partners)
            app.add_subapp("/console/", self.console.app())
            app.router.add_get("/console", _to_console)
        ctx = None if cfg.loopback else admin_context(self.config.https.certificate, self.config.https.private_key)
        try:
            server = await self._serve(app, host=cfg.host, port=cfg.port, ssl=ctx)
        except OSError as exc:
            raise ConfigError(f"admin.listen_port: cannot listen on {cfg.host}:{cfg.port} ({exc.strerror})") from None
        self.admin_port = server.sockets[0].getsockname()[1]
        log.info("admin.listening", url=f"{'https' if ctx else 'http'}://{cfg.host}:{self.admin_port}")

    def not_ready(self) -> str | None:
        if self.stopping:
            return "stopping"
        if not self._servers:
            return "starting"
        return None

    def gauges(self) -> list[Gauge]:
        """Read at each scrape (in the io executor): shared state, right whichever process answers."""
        depth, oldest = self.store.outbox_depth()
        now = time.time()
        held = self.store.quarantined("held", limit=100_000)
        entries = inventory(self.config, self.parts.partners.current)
        now_dt = datetime.now(UTC)
        return [
            ("einvoice_outbox_depth", "Delivery jobs waiting", [], [([], float(depth))]),
            ("einvoice_outbox_oldest_job_age_seconds", "Age of the oldest waiting delivery job", [],
             [([], max(0.0, now - oldest) if oldest else 0.0)]),
            ("einvoice_quarantine_held", "Invoices held for review", [], [([], float(len(held)))]),
            ("einvoice_certificate_expiry_days", "Days until a certificate expires (negative: expired)",
             ["owner", "purpose", "subject", "spki_sha256"],
             [([e.owner, e.purpose, e.subject, e.spki_sha256], round(e.days_left(now_dt), 3)) for e in entries]),
            ("einvoice_partners", "Registered trading partners by status", ["status"],
             [([st], float(n)) for st, n in sorted(Counter(p.status.value for p in self.parts.partners.current.partners).items())]),
        ]

    async def _watch_partners(self) -> None:
        """Re-read the partners file and the CRL files when they change (every worker gates partners)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.partners_reload_s)
            revocation = self.parts.revocation
            await self.refresh_partners()
            try:
                if await loop.run_in_executor(self.io_executor, revocation.refresh):
                    log.info("revocation.reloaded", crls=len(revocation.status()))
            except ConfigError as exc:
                log.error("revocation.reload_failed", reason=str(exc), kept="the CRLs loaded before")

    async def refresh_partners(self) -> None:
        """Re-read the partners file if it changed (the watch loop, and the console after it wrote it)."""
        book = self.parts.partners
        try:
            if await asyncio.get_running_loop().run_in_executor(self.io_executor, book.refresh):
                log.info("partners.reloaded", partners=len(book.current.partners))
        except ConfigError as exc:
            log.error("partners.reload_failed", reason=str(exc), kept=len(book.current.partners))

    async def reload(self, actor: str = "SIGHUP") -> bool:
        """Re-read the configuration, partners, certificates, keys and routes; connections and invoices
        in flight finish with what they started with.  An invalid configuration is refused (logged),
        and the running one stays in force.  Returns whether the new configuration took effect."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            old_config, old = self.config, self.parts
            try:
                config = await loop.run_in_executor(self.io_executor, load_config, old_config.source)
                keep_rules = rules_key(config) == rules_key(old_config)
                parts = await loop.run_in_executor(self.io_executor, functools.partial(
                    build, config, rules=old.rules if keep_rules else None, partners=old.partners))
            except ConfigError as exc:
                log.error("config.reload_failed", reason=exc.message, kept="the running configuration")
                self.metrics.reloads.labels("failed").inc()
                return False
            restart = restart_needed(self.started_config, config)
            self.parts = parts
            self.mailer = self._mailer(config, parts)
            retired = self.outbox.reconfigure(self._senders(config, self.outbox.senders), config.delivery, parts.vault)
            self.config = config
            self.pipeline = self._pipeline(config, parts)
            self.https.pipeline, self.https.partners, self.https.revocation = self.pipeline, parts.partners, parts.revocation
            if self.submit is not None:
                self.submit.pipeline = self.pipeline
            if self.smtp is not None and parts.smime is not None and config.smtp is not None:
                self.smtp.reconfigure(config.smtp, self.pipeline, parts.partners, parts.smime, parts.smime_roots,
                                      parts.revocation, admin_context(config.https.certificate, config.https.private_key),
                                      self.mailer)
            self.housekeeping.config = config
            self._tls = self._server_tls()
            if not keep_rules:  # evaluations still running on the old engine get their time limit first
                self._tasks.append(asyncio.create_task(self._close_later(old.rules), name="rules-close"))
            for sender in retired:
                self._tasks.append(asyncio.create_task(self._close_sender_later(sender), name="sender-close"))
            self.metrics.reloads.labels("ok").inc()
            if self.run_delivery:
                await asyncio.wrap_future(self.store.set_meta(SEALING_KEY, parts.vault.current))
                await asyncio.wrap_future(self.store.audit(actor, "config.reloaded", None, None, {
                    "partners": len(parts.partners.current.partners), "destinations": [d.name for d in config.destinations],
                    "key_id": parts.vault.current, "rules_reloaded": not keep_rules, "restart_needed": restart}))
            if restart:
                log.warning("config.restart_needed", settings=restart,
                            reason="these settings take effect at the next restart; the running values stay in force")
            log.info("config.reloaded", partners=len(parts.partners.current.partners), key_id=parts.vault.current,
                     destinations=len(config.destinations), rules_reloaded=not keep_rules)
            return True

    async def _close_later(self, rules: RuleEngine) -> None:
        await asyncio.sleep(self.config.rules_timeout_s + 5)
        await asyncio.get_running_loop().run_in_executor(self.io_executor, rules.close)

    async def _close_sender_later(self, sender: Sender) -> None:
        await asyncio.sleep(SHUTDOWN_GRACE_S + max((d.timeout_s for d in self.config.destinations), default=30.0))
        await sender.close()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then close storage."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for runner in self._runners:
            await runner.cleanup()
        if self.smtp is not None:
            await self.smtp.stop(SHUTDOWN_GRACE_S)
        cfg = self.config.outbound
        if self.submit is not None and self.run_delivery and cfg is not None and cfg.socket is not None:
            cfg.socket.unlink(missing_ok=True)
        if self.run_delivery:
            await self.outbox.stop(SHUTDOWN_GRACE_S)
            await self.housekeeping.final_checkpoint()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.console is not None:
            self.console.close()
        self.executor.shutdown(wait=True)
        self.io_executor.shutdown(wait=True)
        if self._owns_parts:
            self.parts.rules.close()
        self.store.close()
        log.info("gateway.stopped")


async def _to_console(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/console/")


HEARTBEAT_S = 2.0  # a worker tells the supervisor it is alive this often (the watchdog depends on it)


async def serve_forever(config: Config, parts: Parts | None = None, *, worker: int | None = None,
                        sock: socket.socket | None = None, status_fd: int | None = None,
                        smtp_sock: socket.socket | None = None) -> None:
    """Run one gateway process; as worker N of several (``worker`` set), serve the supervisor's
    listening socket, let only worker 0 deliver, and report to the supervisor on ``status_fd``
    (R: ready, H: reloaded, .: alive).  Alone, it talks to systemd itself (gateway/systemd.py)."""
    gw = Gateway(config, parts, sock=sock, run_delivery=not worker, smtp_sock=smtp_sock)
    await gw.start()
    loop = asyncio.get_running_loop()

    def report(code: bytes) -> None:
        if status_fd is not None:
            with contextlib.suppress(OSError):
                os.write(status_fd, code)

    async def reload() -> None:
        if status_fd is None:
            systemd.reloading()
        await gw.reload()
        report(b"H")
        if status_fd is None:
            systemd.notify("READY=1", f"STATUS=serving on port {gw.port}")

    async def heartbeat() -> None:
        interval = systemd.watchdog_interval_s() if status_fd is None else HEARTBEAT_S
        while interval:
            report(b".")
            if status_fd is None:
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    beat = asyncio.create_task(heartbeat(), name="heartbeat")
    report(b"R")
    systemd.notify("READY=1", f"STATUS=serving on port {gw.port}")
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        beat.cancel()
        for task in (beat, *reloads):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gw.stop()


def bind_probe(host: str, port: int, key: str = "https.listen_port") -> None:
    """Fail early, naming the key, when the port cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{key}: cannot listen on {host}:{port} ({exc.strerror})") from None
