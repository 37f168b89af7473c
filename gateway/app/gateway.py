"""The gateway process: its listeners, delivery and housekeeping, started, reloaded and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import logs
from ..clock import Clock, SystemClock
from ..config.load import load as load_config
from ..config.model import Config, Destination
from ..console.app import MAX_BODY as CONSOLE_MAX_BODY
from ..console.app import Console
from ..delivery.outbox import Outbox
from ..delivery.registry import make_sender
from ..delivery.replies import ReplySender
from ..delivery.sender import Sender
from ..delivery.smarthost import Mailer, Smarthost
from ..errors import ConfigError
from ..inbound.handshake import TlsAcceptor
from ..inbound.http import JsonRefusals
from ..inbound.https import HttpsInbound
from ..inbound.smtp import SmtpInbound
from ..inbound.submit import SubmitInbound
from ..metrics import Gauge, Metrics
from ..operations.admin import AdminInbound
from ..operations.housekeeping import ExpiryWarnings, Housekeeping, inventory
from ..pipeline import MailIdentity, Pipeline
from ..stages.routing import Router
from ..stages.rules import RuleEngine
from ..storage.factory import open_store
from ..threads import RenewableThreads, named_pool
from ..tls import admin_context, server_context
from .build import Parts, build, restart_needed, rules_key, warnings

TLS_HANDSHAKE_TIMEOUT_S = 10.0  # SECURITY-TESTS.md T-08: a handshake flood cannot hold sockets for long
SHUTDOWN_GRACE_S = 30.0  # in-flight requests get this long to finish after SIGTERM
LISTEN_BACKLOG = 1024
STAGE_THREADS_PER_WORKER = 2

log = logs.get("app")


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
                 run_delivery: bool = True, smtp_sock: socket.socket | None = None, clock: Clock | None = None):
        self.config = config
        self.clock = clock or SystemClock()  # what housekeeping and reloads wait on (tests pass one they move)
        self.started_config = config  # what the sockets and files were opened with (restart-only settings)
        self._owns_parts = parts is None
        self.parts = parts or build(config)
        self.sock = sock  # a listening socket shared by several worker processes (gateway/app/supervisor.py)
        self.smtp_sock = smtp_sock  # the same for the SMTP listener
        self.run_delivery = run_delivery  # only one process delivers
        # CPU stages (lxml releases the GIL while parsing, validating and canonicalizing) and blocking
        # file I/O.  Alone, the process needs threads for every core; as one of several workers, two
        # threads measured best (benchmarks/throughput.py: more threads only contend for the GIL).
        threads = STAGE_THREADS_PER_WORKER if sock is not None else min(8, (os.cpu_count() or 2) + 2)
        self.executor = RenewableThreads(threads, "stage")  # renewed after a budget of parsing (gateway/threads.py)
        # Status reads, delivery and reloads: never queued behind invoices waiting for the rules.
        self.io_executor = named_pool(2, "io")
        self.store = open_store(config)
        self.metrics = Metrics()
        self.mailer = self._mailer(config, self.parts)
        self._sender_stamps: dict[str, tuple[Destination, tuple[tuple[int, int, int] | None, ...]]] = {}
        self.outbox = Outbox(self.store.outbox, self.parts.vault, self._senders(config, {}), config.delivery, self.io_executor,
                             on_outcome=self.metrics.delivery,
                             replies=ReplySender(lambda: self.mailer) if config.smtp is not None else None)
        self.pipeline = self._pipeline(config, self.parts)
        self.https = HttpsInbound(config.https, self.pipeline, self.parts.partners, self.store, self.outbox.wake.set,
                                  count=self.metrics.invoice, revocation=self.parts.revocation, clock=self.clock)
        self.submit = (SubmitInbound(config.outbound, config.https, self.pipeline, self.store, self.outbox.wake.set,
                                     count=self.metrics.invoice, clock=self.clock) if config.outbound is not None else None)
        self.smtp = self._smtp(config, self.parts)
        self.housekeeping = Housekeeping(config, self.store, self.io_executor, lambda: self.parts.partners.current,
                                         lambda: self.parts.signer, ExpiryWarnings(
                                             config.operations.expiry_warn_days,
                                             lambda t: self.metrics.expiry_warnings.labels(t).inc()), self.clock)
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
                        self.store.intake, self.store.audit, Router(config.routes, config.routing_default), self.executor,
                        config.https.max_body_bytes, config.invalid_iban == "hold", config.outbound, parts.signer,
                        observe=self.metrics.stage, mail=MailIdentity(parts.smime, parts.smime_roots, parts.revocation)
                        if parts.smime is not None else None, extension_namespaces=frozenset(config.extension_namespaces))

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
        return SmtpInbound(config.smtp, self.pipeline, self.store, parts.vault,
                           admin_context(config.https.certificate, config.https.private_key), config.https.max_in_flight_bytes,
                           self.outbox.wake.set, replies=self.mailer is not None, count=self.metrics.invoice)

    def _server_tls(self) -> ssl.SSLContext:
        cfg = self.config.https
        return server_context(cfg.certificate, cfg.private_key, cfg.client_ca)

    def _current_tls(self) -> ssl.SSLContext:
        """What the next handshake uses: a reload's certificate, key and CAs apply to new connections while the
        listening socket stays open."""
        assert self._tls is not None
        return self._tls

    async def _serve(self, app: web.Application, unix: socket.socket | None = None, *, listener: str = "",
                     tls: Callable[[], ssl.SSLContext] | None = None, **kwargs: Any) -> asyncio.Server:
        """``app`` on a socket; with ``tls``, each connection's handshake is made (and, failing, reported) by
        gateway/inbound/handshake.py before aiohttp sees it."""
        # auto_decompress off: no listener takes a compressed body (415 UNSUPPORTED_ENCODING on the headers), so
        # none may inflate one either, not even while draining what the client sends after the reply.
        options: dict[str, Any] = {"access_log": None, "keepalive_timeout": self.config.https.keepalive_timeout_s,
                                   "auto_decompress": False}
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S, **options)
        await runner.setup()
        self._runners.append(runner)
        manager = runner.server
        assert manager is not None
        loop = asyncio.get_running_loop()

        def handler() -> JsonRefusals:  # what aiohttp's server makes per connection, answering its refusals in JSON
            return JsonRefusals(manager, loop=loop, **options)

        def accept() -> asyncio.BaseProtocol:
            if tls is None:
                return handler()
            return TlsAcceptor(tls, handler, TLS_HANDSHAKE_TIMEOUT_S, listener, self.metrics.handshake_failed)

        if unix is not None:
            server = await loop.create_unix_server(accept, sock=unix)
        else:
            server = await loop.create_server(accept, **kwargs)
        self._servers.append(server)
        return server

    async def start(self) -> None:
        cfg = self.config.https
        self._tls = self._server_tls()
        if self.sock is not None:
            # asyncio uses `backlog` both for listen() and as the number of connections one wake-up
            # accepts.  Accept one at a time, so the workers share a burst of new connections, then
            # give the shared socket its real queue length back (a queue of 1 drops SYNs: 1 s stalls).
            server = await self._serve(self.https.app(), sock=self.sock, listener="https", tls=self._current_tls,
                                       backlog=1)
            self.sock.listen(LISTEN_BACKLOG)
        else:
            server = await self._serve(self.https.app(), host=cfg.host, port=cfg.port, listener="https",
                                       tls=self._current_tls, backlog=LISTEN_BACKLOG)
        self.port = server.sockets[0].getsockname()[1]
        if self.smtp is not None:
            await self._start_smtp()
        if self.run_delivery:  # the ERP and admin listeners, delivery and housekeeping: in one process only
            if self.submit is not None:
                await self._start_submit()
            if self.config.admin.port:
                await self._start_admin()
            await self.store.keys.set_sealing_key(self.parts.vault.current)
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
            server = await self._serve(self.submit.app(), host=cfg.host, port=cfg.port, listener="outbound",
                                       tls=lambda: ctx)
            self.submit_port = server.sockets[0].getsockname()[1]
            where = f"https://{cfg.host}:{self.submit_port}"
        log.info("outbound.listening", url=where, destination=cfg.destination)

    async def _start_admin(self) -> None:
        cfg = self.config.admin
        token = cfg.token_file.read_text(encoding="utf-8").strip() if cfg.token_file is not None else None
        admin = AdminInbound(self.metrics, self.gauges, self.not_ready, self.store.reports.counts, self.io_executor, token)
        app = admin.app(CONSOLE_MAX_BODY if self.config.console.enabled else 1024)
        if self.config.console.enabled:
            self.console = Console(self.config, self.store, self.io_executor, lambda: self.parts.vault,
                                   lambda: self.parts.partners.current, lambda: self.parts.signer, self.outbox.wake.set,
                                   self.metrics.refusals, self.refresh_partners)
            app.add_subapp("/console/", self.console.app())
            app.router.add_get("/console", _to_console)
        ctx = None if cfg.loopback else admin_context(self.config.https.certificate, self.config.https.private_key)
        try:
            server = await self._serve(app, host=cfg.host, port=cfg.port, listener="admin",
                                       tls=None if ctx is None else lambda: ctx)
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

    async def gauges(self) -> list[Gauge]:
        """Read at each scrape: shared state, right whichever process answers."""
        depth = await self.store.outbox.depth()
        now = time.time()
        held = await self.store.quarantine.held_count()
        entries = await asyncio.get_running_loop().run_in_executor(self.io_executor, inventory, self.config,
                                                                   self.parts.partners.current)
        now_dt = datetime.now(UTC)
        return [
            ("einvoice_outbox_depth", "Delivery jobs waiting", [], [([], float(depth.jobs))]),
            ("einvoice_outbox_oldest_job_age_seconds", "Age of the oldest waiting delivery job", [],
             [([], max(0.0, now - depth.oldest) if depth.oldest else 0.0)]),
            ("einvoice_quarantine_held", "Invoices held for review", [], [([], float(held))]),
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
            await self.clock.sleep(self.config.partners_reload_s)
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
                self.smtp.reconfigure(config.smtp, self.pipeline, parts.vault,
                                      admin_context(config.https.certificate, config.https.private_key), self.mailer is not None)
            self.housekeeping.config = config
            self._tls = self._server_tls()
            if not keep_rules:  # evaluations still running on the old engine get their time limit first
                self._tasks.append(asyncio.create_task(self._close_later(old.rules), name="rules-close"))
            for sender in retired:
                self._tasks.append(asyncio.create_task(self._close_sender_later(sender), name="sender-close"))
            self.metrics.reloads.labels("ok").inc()
            if self.run_delivery:
                await self.store.keys.set_sealing_key(parts.vault.current)
                await self.store.audit.append(actor, "config.reloaded", None, None, {
                    "partners": len(parts.partners.current.partners), "destinations": [d.name for d in config.destinations],
                    "key_id": parts.vault.current, "rules_reloaded": not keep_rules, "restart_needed": restart})
            if restart:
                log.warning("config.restart_needed", settings=restart,
                            reason="these settings take effect at the next restart; the running values stay in force")
            log.info("config.reloaded", partners=len(parts.partners.current.partners), key_id=parts.vault.current,
                     destinations=len(config.destinations), rules_reloaded=not keep_rules)
            return True

    async def _close_later(self, rules: RuleEngine) -> None:
        await self.clock.sleep(self.config.rules_timeout_s + 5)
        await asyncio.get_running_loop().run_in_executor(self.io_executor, rules.close)

    async def _close_sender_later(self, sender: Sender) -> None:
        await self.clock.sleep(SHUTDOWN_GRACE_S + max((d.timeout_s for d in self.config.destinations), default=30.0))
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
        await self.store.close()
        log.info("gateway.stopped")


async def _to_console(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/console/")


