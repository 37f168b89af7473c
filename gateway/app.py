"""Composition root: builds every part from a Config, starts and stops them.  Nothing imports it but the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from . import logs
from .config import Config
from .delivery import Outbox, make_sender
from .errors import ConfigError
from .inbound.https import HttpsInbound
from .inbound.submit import SubmitInbound
from .model import Syntax
from .partners import PartnerBook
from .pipeline import Pipeline
from .routing import Router
from .rules import PackSpec, RuleEngine
from .schema import SchemaRegistry
from .signature import SigningKey
from .store import SqliteStore
from .tls import server_context
from .vault import Vault
from .xmlparse import XmlParser

TLS_HANDSHAKE_TIMEOUT_S = 10.0  # SECURITY-TESTS.md T-08: a handshake flood cannot hold sockets for long
SHUTDOWN_GRACE_S = 30.0  # in-flight requests get this long to finish after SIGTERM
LISTEN_BACKLOG = 1024
STAGE_THREADS_PER_WORKER = 2

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


def build(config: Config, *, processes: int | None = None) -> Parts:
    """Build and check every part that can fail on bad configuration (no sockets, no state writes)."""
    server_context(config.https.certificate, config.https.private_key, config.https.client_ca)
    vault = Vault.from_files(config.vault.keys, config.vault.current)
    partners = PartnerBook(config.partners_file)
    schemas = SchemaRegistry(config.schemas, config.cii_schema)
    rules = RuleEngine(rule_specs(config), processes=processes or config.rules_processes, timeout_s=config.rules_timeout_s)
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
        if config.outbound is not None and config.outbound.socket is None:  # its TLS listener
            server_context(config.https.certificate, config.https.private_key, config.outbound.client_ca)
    except ConfigError:
        rules.close()
        raise
    return Parts(config, vault, schemas, partners, XmlParser(config.xml), rules, signer)


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
    wanting = [p.name for p in parts.partners.current.partners if p.sign_outbound]
    if wanting and parts.signer is None:
        out.append(f"partners {', '.join(wanting)} receive signed invoices only, and there is no [signing] key: "
                   "invoices submitted for them are refused with SIGNING_UNAVAILABLE")
    return out


def rule_specs(config: Config) -> list[PackSpec]:
    return [PackSpec(p.name, p.version, {s: path for s, path in ((Syntax.UBL, p.ubl), (Syntax.CII, p.cii)) if path})
            for p in config.rule_packs]


class Gateway:
    def __init__(self, config: Config, parts: Parts | None = None, *, sock: socket.socket | None = None,
                 run_delivery: bool = True):
        self.config = config
        self._owns_parts = parts is None
        self.parts = parts or build(config)
        self.sock = sock  # a listening socket shared by several worker processes (gateway/supervisor.py)
        self.run_delivery = run_delivery  # only one process delivers
        # CPU stages (lxml releases the GIL while parsing, validating and canonicalizing) and blocking
        # file I/O.  Alone, the process needs threads for every core; as one of several workers, two
        # threads measured best (benchmarks/throughput.py: more threads only contend for the GIL).
        threads = STAGE_THREADS_PER_WORKER if sock is not None else min(8, (os.cpu_count() or 2) + 2)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage")
        # Status reads, delivery and reloads: never queued behind invoices waiting for the rules.
        self.io_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="io")
        self.store = SqliteStore(config.state_dir)
        senders = {d.name: make_sender(d, self.parts.partners, self.io_executor) for d in config.destinations}
        self.outbox = Outbox(self.store, self.parts.vault, senders, config.delivery, self.io_executor)
        self.pipeline = Pipeline(self.parts.parser, self.parts.schemas, self.parts.rules, config.rules_default,
                                 self.parts.partners, self.parts.vault, self.store,
                                 Router(config.routes, config.routing_default), self.executor, config.https.max_body_bytes,
                                 config.invalid_iban == "hold", config.outbound, self.parts.signer)
        self.https = HttpsInbound(config.https, self.pipeline, self.parts.partners, self.store, self.outbox.wake.set,
                                  self.io_executor)
        self.submit = (SubmitInbound(config.outbound, config.https, self.pipeline, self.store, self.outbox.wake.set,
                                     self.io_executor) if config.outbound is not None else None)
        self._runner: web.AppRunner | None = None
        self._submit_runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._submit_server: asyncio.AbstractServer | None = None
        self.submit_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = config.https.port

    async def start(self) -> None:
        cfg = self.config.https
        ctx = server_context(cfg.certificate, cfg.private_key, cfg.client_ca)
        self._runner = web.AppRunner(self.https.app(), handle_signals=False, access_log=None,
                                     keepalive_timeout=cfg.keepalive_timeout_s, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        assert self._runner.server is not None
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            # asyncio uses `backlog` both for listen() and as the number of connections one wake-up
            # accepts.  Accept one at a time, so the workers share a burst of new connections, then
            # give the shared socket its real queue length back (a queue of 1 drops SYNs: 1 s stalls).
            self._server = await loop.create_server(self._runner.server, sock=self.sock, ssl=ctx, backlog=1,
                                                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
            self.sock.listen(LISTEN_BACKLOG)
        else:
            self._server = await loop.create_server(
                self._runner.server, cfg.host, cfg.port, ssl=ctx, backlog=LISTEN_BACKLOG,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
            )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        if self.submit is not None and self.run_delivery:  # the ERP listener: in the delivering process only
            await self._start_submit()
        if self.run_delivery:  # one process of several: say it once
            self._tasks.append(asyncio.create_task(self.outbox.run(), name="delivery"))
            for warning in warnings(self.parts):
                log.warning("gateway.weakened", reason=warning)
        self._tasks.append(asyncio.create_task(self._watch_partners(), name="partners-reload"))
        log.info("gateway.started", url=f"https://{cfg.host}:{self.port}", pid=os.getpid(),
                 partners=len(self.parts.partners.current.partners), destinations=len(self.config.destinations),
                 key_id=self.parts.vault.current, schema_sets=self.parts.schemas.fingerprints)

    async def _start_submit(self) -> None:
        assert self.submit is not None and self.config.outbound is not None
        cfg = self.config.outbound
        self._submit_runner = web.AppRunner(self.submit.app(), handle_signals=False, access_log=None,
                                            shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._submit_runner.setup()
        assert self._submit_runner.server is not None
        loop = asyncio.get_running_loop()
        if cfg.socket is not None:
            # Bound and given its mode before listen(): nobody can connect while it has another mode
            # (and no process-wide umask change races other threads creating files).
            cfg.socket.unlink(missing_ok=True)
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(str(cfg.socket))
            os.chmod(cfg.socket, cfg.socket_mode)
            unix.listen(LISTEN_BACKLOG)
            self._submit_server = await loop.create_unix_server(self._submit_runner.server, sock=unix)
            where = f"unix:{cfg.socket}"
        else:
            ctx = server_context(self.config.https.certificate, self.config.https.private_key, cfg.client_ca)
            self._submit_server = await loop.create_server(self._submit_runner.server, cfg.host, cfg.port, ssl=ctx,
                                                           ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
            self.submit_port = self._submit_server.sockets[0].getsockname()[1]
            where = f"https://{cfg.host}:{self.submit_port}"
        log.info("outbound.listening", url=where, destination=cfg.destination)

    async def _watch_partners(self) -> None:
        book = self.parts.partners
        while True:
            await asyncio.sleep(self.config.partners_reload_s)
            try:
                if await asyncio.get_running_loop().run_in_executor(self.io_executor, book.refresh):
                    log.info("partners.reloaded", partners=len(book.current.partners))
            except ConfigError as exc:
                log.error("partners.reload_failed", reason=str(exc), kept=len(book.current.partners))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then close storage."""
        for server in (self._server, self._submit_server):
            if server is not None:
                server.close()
        for runner in (self._runner, self._submit_runner):
            if runner is not None:
                await runner.cleanup()
        if self._submit_server is not None and self.config.outbound is not None and self.config.outbound.socket:
            self.config.outbound.socket.unlink(missing_ok=True)
        if self.run_delivery:
            await self.outbox.stop(SHUTDOWN_GRACE_S)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.executor.shutdown(wait=True)
        self.io_executor.shutdown(wait=True)
        if self._owns_parts:
            self.parts.rules.close()
        self.store.close()
        log.info("gateway.stopped")


async def serve_forever(config: Config, parts: Parts | None = None, *, worker: int | None = None,
                        sock: socket.socket | None = None) -> None:
    """Run one gateway process; as worker N of several (``worker`` set), serve the supervisor's
    listening socket and let only worker 0 deliver."""
    gw = Gateway(config, parts, sock=sock, run_delivery=not worker)
    await gw.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await gw.stop()


def bind_probe(host: str, port: int) -> None:
    """Fail early, naming the key, when the port cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"https.listen_port: cannot listen on {host}:{port} ({exc.strerror})") from None
